"""Fixtures of the reader tests: hand-assembled hostile ``torch.save`` files (issue 17).

:mod:`pickle` cannot write most of these (a dtype whose state clears its object flag, a BUILD
on an array that already has views, ...), so they are assembled opcode by opcode. Each
builder returns the bytes of ``data.pkl``; :func:`torch_zip` wraps them (and raw storages)
in the zip layout of ``torch.save``. Tests get the builders through the :func:`hp` fixture
(test files do not import one another); ``benchmarks/fuzz/make_corpus.py`` loads this file
by path to write the fuzz corpus.
"""

from __future__ import annotations

import io
import pickle
import struct
import types
import zipfile

import pytest

P = pickle
NONE, TRUE, FALSE = P.NONE, P.NEWTRUE, P.NEWFALSE


def s(text: str) -> bytes:
    """A str (BINUNICODE)."""
    b = text.encode()
    return P.BINUNICODE + struct.pack("<I", len(b)) + b


def raw(data: bytes) -> bytes:
    """A bytes object (BINBYTES)."""
    return P.BINBYTES + struct.pack("<I", len(data)) + data


def i(n: int) -> bytes:
    """A 32-bit int (BININT)."""
    return P.BININT + struct.pack("<i", n)


def glob(module: str, name: str) -> bytes:
    return P.GLOBAL + f"{module}\n{name}\n".encode()


def tup(*items: bytes) -> bytes:
    return P.MARK + b"".join(items) + P.TUPLE


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + P.REDUCE


def build(state: bytes) -> bytes:
    return state + P.BUILD


def put(k: int) -> bytes:
    return P.BINPUT + bytes([k]) if k < 256 else P.LONG_BINPUT + struct.pack("<I", k)


def get(k: int) -> bytes:
    return P.BINGET + bytes([k]) if k < 256 else P.LONG_BINGET + struct.pack("<I", k)


def program(body: bytes) -> bytes:
    return P.PROTO + b"\x02" + body + P.STOP


def dict_of(**items: bytes) -> bytes:
    return P.EMPTY_DICT + P.MARK + b"".join(s(k) + v for k, v in items.items()) + P.SETITEMS


def dtype(spec: str, state: bytes | None = None) -> bytes:
    """``numpy.dtype(spec, False, True)``, then BUILD ``state`` if given."""
    out = call(glob("numpy", "dtype"), s(spec), FALSE, TRUE)
    return out + build(state) if state is not None else out


def dtype_state(order="<", subarray=NONE, names=NONE, fields=NONE, elsize=-1, align=-1, flags=0):
    return tup(i(3), s(order), subarray, names, fields, i(elsize), i(align), i(flags))


def reconstruct() -> bytes:
    """``numpy._core.multiarray._reconstruct(ndarray, (0,), b'b')``: an array before BUILD."""
    return call(
        glob("numpy._core.multiarray", "_reconstruct"),
        glob("numpy", "ndarray"),
        tup(i(0)),
        raw(b"b"),
    )


def array(shape: tuple[int, ...], dtype_ops: bytes, data: bytes) -> bytes:
    """An ndarray as NumPy pickles it: reconstruct, then BUILD (1, shape, dtype, False, data)."""
    return reconstruct() + build(tup(i(1), tup(*(i(n) for n in shape)), dtype_ops, FALSE, data))


def storage(key: str, kind: str = "FloatStorage", numel: int = 4) -> bytes:
    """A persistent storage reference as ``torch.save`` writes it."""
    return tup(s("storage"), glob("torch", kind), s(key), s("cpu"), i(numel)) + P.BINPERSID


def tensor(storage_ops: bytes, size: tuple[int, ...], stride: tuple[int, ...], offset=0):
    return call(
        glob("torch._utils", "_rebuild_tensor_v2"),
        storage_ops,
        i(offset),
        tup(*(i(n) for n in size)),
        tup(*(i(n) for n in stride)),
        FALSE,
        glob("collections", "OrderedDict") + P.EMPTY_TUPLE + P.REDUCE,
    )


def torch_zip(
    pickle_bytes: bytes,
    storages: dict[str, bytes] | None = None,
    compress: dict[str, bool] | None = None,
) -> bytes:
    """``torch.save``'s zip layout holding ``data.pkl`` and raw storages."""
    buf = io.BytesIO()
    compress = compress or {}
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("model/data.pkl", pickle_bytes)
        zf.writestr("model/byteorder", "little")
        for key, data in (storages or {}).items():
            method = zipfile.ZIP_DEFLATED if compress.get(key) else zipfile.ZIP_STORED
            zf.writestr(f"model/data/{key}", data, compress_type=method)
        zf.writestr("model/version", "3\n")
    return buf.getvalue()


# ------------------------------------------------------------------------------- attacks
def forged_object_array() -> bytes:
    """Defect 1: an object dtype whose BUILD clears its flags (``hasobject`` False); eight
    bytes of the file would then be read as a PyObject pointer."""
    forged = dtype("O8", dtype_state(order="|", flags=0))
    return program(array((1,), forged, raw(b"\x41" * 8)))


def forged_object_scalar() -> bytes:
    """Defect 1, scalar variant: ``numpy.core.multiarray.scalar(forged dtype, 8 bytes)``."""
    forged = dtype("O8", dtype_state(order="|", flags=0))
    return program(call(glob("numpy._core.multiarray", "scalar"), forged, raw(b"\x41" * 8)))


def forged_subarray() -> bytes:
    """Defect 1, subarray variant: an 8-byte void dtype whose state declares a subarray of a
    million doubles, read far past the buffer."""
    base = dtype("f8", dtype_state())
    forged = dtype(
        "V8", dtype_state(order="|", subarray=tup(base, tup(i(1 << 20))), elsize=8, align=1)
    )
    return program(array((1,), forged, raw(b"\x00" * 8)))


def use_after_free(n: int = 1 << 20) -> bytes:
    """Defect 2: array A, a view V = ndarray(shape, dtype, buffer=A), then BUILD A again
    (which frees A's data while V points into it); V is returned."""
    f8 = dtype("f8", dtype_state()) + put(3)
    a = array((n,), f8, raw(b"\x00" * (8 * n))) + put(1)
    v = call(glob("numpy", "ndarray"), tup(i(n)), s("f8"), get(1)) + put(2)
    rebuild = get(1) + build(tup(i(1), tup(i(1)), get(3), FALSE, raw(b"\x00" * 8))) + P.POP
    return program(P.EMPTY_DICT + P.MARK + s("a") + a + s("v") + v + P.SETITEMS + rebuild)


def billion_laughs(levels: int = 9, fanout: int = 10) -> bytes:
    """Defect 5: ``levels`` lists each holding ``fanout`` references to the previous one;
    a few hundred bytes that expand to ``fanout ** levels`` leaves."""
    body = P.EMPTY_LIST + put(0)
    for k in range(1, levels + 1):
        body += P.MARK + get(k - 1) * fanout + P.LIST + put(k)
    return program(body)


def stride_zero_tensor(numel: int = 1 << 26) -> tuple[bytes, dict[str, bytes]]:
    """Defect 9: a tensor of ``numel`` elements, stride 0, over a 4-element storage."""
    body = tensor(storage("0", numel=4), (numel,), (0,))
    return program(body), {"0": b"\x00" * 16}


def uninitialised_array(n: int = 4096) -> bytes:
    """Defect 10: arrays whose memory the file never fills (no BUILD / ``ndarray(shape)``)."""
    unbuilt = call(
        glob("numpy._core.multiarray", "_reconstruct"),
        glob("numpy", "ndarray"),
        tup(i(n)),
        raw(b"b"),
    )
    empty = call(glob("numpy", "ndarray"), tup(i(n)), s("f8"))
    return program(dict_of(unbuilt=unbuilt, empty=empty))


@pytest.fixture(scope="session")
def hp() -> types.ModuleType:
    """The builders of this module (``hp.program(...)``, ``hp.torch_zip(...)``, ...). From
    ``globals()``, not ``sys.modules[__name__]``: every folder's conftest is named
    ``conftest``, so that name may be another folder's module."""
    return types.SimpleNamespace(**{k: v for k, v in globals().items() if not k.startswith("__")})


@pytest.fixture(scope="session")
def without_torch():
    """``run(code, cwd) -> stdout``: run ``code`` in a fresh interpreter where ``import torch``
    fails (the file readers and writers must not need it); the worktree's jaxvi is imported."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def run(code: str, cwd) -> str:
        script = "import sys\nsys.modules['torch'] = None\n" + code
        path = os.environ.get("PYTHONPATH", "")
        env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{path}"}
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=env,
            cwd=cwd,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    return run
