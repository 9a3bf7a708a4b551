"""Property-based fuzzing of the two readers of untrusted files (issue 17, "Also"):
:func:`jaxvi.io.torchfile.load` (scvi-tools' ``model.pt``) and :func:`jaxvi.io.read_model_dir`
(jaxvi's ``model.json`` + ``model.npz``).

Valid files are mutated (truncation, byte flips, pickle-opcode substitution, JSON values
replaced by others of any type); whatever the mutation, the reader either returns plain data
or raises ``ValueError`` / ``FileNotFoundError`` -- never another exception, a crash, a hang
or an array it did not build itself. The examples are derandomised and few, so this runs in
seconds on every test run (``JAXVI_FUZZ_EXAMPLES=2000`` for a longer local run); the
coverage-guided long run is ``benchmarks/fuzz``.
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import tempfile
import zipfile

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxvi import io as jio
from jaxvi.io import torchfile

EXAMPLES = int(os.environ.get("JAXVI_FUZZ_EXAMPLES", "60"))  # more for a longer local run
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ALLOWED_DTYPES = {np.dtype(d) for d in ("b1", "i1", "u1", "i2", "i4", "i8", "u2", "u4", "u8")}
ALLOWED_DTYPES |= {np.dtype(d) for d in ("f2", "f4", "f8", "O")}


def _valid_torch_file() -> tuple[bytes, bytes]:
    """(zip bytes, data.pkl bytes) of a file with everything a scvi-tools model.pt holds."""
    rng = np.random.default_rng(0)
    obj = {
        "model_state_dict": {
            "w": torchfile.Tensor(rng.normal(size=(3, 4)).astype(np.float32)),
            "n": torchfile.Tensor(np.array(5, np.int64)),
            "pyro_param_store": {"params": {}, "constraints": {}},
        },
        "var_names": np.array(["g1", "g2", "g3"], dtype=object),
        "attr_dict": {
            "history_": {"elbo": pd.DataFrame({"elbo": [3.5, 2.0]}, index=pd.Index([0, 1]))},
            "train_indices_": np.arange(4, dtype=np.int64),
            "flags": [True, None, 2.5, "x", (1, b"b")],
            "scalar": np.float64(1.5),
        },
    }
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.pt")
        torchfile.save(obj, path)
        data = open(path, "rb").read()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        pkl = zf.read("model/data.pkl")
    return data, pkl


ZIP_BYTES, PICKLE_BYTES = _valid_torch_file()
OPCODE_POSITIONS = [pos for _, _, pos in pickletools.genops(PICKLE_BYTES)]
OPCODE_BYTES = sorted(
    {ord(op.code[0]) if isinstance(op.code, str) else op.code[0] for op in pickletools.opcodes}
)


def _rezip(pkl: bytes) -> bytes:
    """``ZIP_BYTES`` with ``data.pkl`` replaced (fresh CRC: the mutation reaches the pickle)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(ZIP_BYTES)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = pkl if info.filename == "model/data.pkl" else src.read(info)
            dst.writestr(info.filename, data)
    return out.getvalue()


def _mutations(size: int, opcodes: bool):
    """A list of edits to a byte string of ``size`` bytes."""
    edit = st.one_of(
        st.tuples(st.just("flip"), st.integers(0, size - 1), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, size - 1), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, size - 1), st.integers(0, 255)),
        st.tuples(st.just("delete"), st.integers(0, size - 1), st.integers(1, 16)),
    )
    if opcodes:
        edit = st.one_of(
            edit,
            st.tuples(
                st.just("opcode"),
                st.sampled_from(OPCODE_POSITIONS),
                st.sampled_from(OPCODE_BYTES),
            ),
        )
    return st.lists(edit, min_size=1, max_size=4)


def _apply(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in edits:
        pos = min(pos, max(len(b) - 1, 0))
        if kind == "flip" and b:
            b[pos] ^= arg
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b.insert(pos, arg)
        elif kind == "delete":
            del b[pos : pos + arg]
        elif kind == "opcode" and b:
            b[pos] = arg
    return bytes(b)


def _check_plain(obj, depth=0):
    """Everything the reader returns is plain data, every array built by it."""
    assert depth < 200
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(obj, list | tuple):
        for v in obj:
            _check_plain(v, depth + 1)
    elif isinstance(obj, np.ndarray):
        assert obj.dtype in ALLOWED_DTYPES or obj.dtype.kind in "US", obj.dtype
        assert obj.base is None or isinstance(obj.base, np.ndarray)
        obj.tolist()
    elif isinstance(obj, pd.DataFrame):
        assert all(obj.dtypes == np.float64)
    else:
        assert isinstance(
            obj, str | bytes | int | float | bool | type(None) | slice | np.generic | np.dtype
        ), type(obj)


def _load_torch(data: bytes, tmp_path) -> None:
    path = tmp_path / "model.pt"
    path.write_bytes(data)
    try:
        obj = torchfile.load(str(path))
    except ValueError:  # UnsafePickleError is one
        return
    _check_plain(obj)


@FUZZ
@given(edits=_mutations(len(PICKLE_BYTES), opcodes=True))
def test_torch_reader_survives_mutated_pickles(tmp_path, edits):
    _load_torch(_rezip(_apply(PICKLE_BYTES, edits)), tmp_path)


@FUZZ
@given(edits=_mutations(len(ZIP_BYTES), opcodes=False))
def test_torch_reader_survives_mutated_archives(tmp_path, edits):
    _load_torch(_apply(ZIP_BYTES, edits), tmp_path)


# ------------------------------------------------------------------------- model directory
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The bytes of a saved tiny model's model.json and model.npz."""
    import anndata as ad

    from jaxvi import SCVI

    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.poisson(2.0, size=(12, 5)).astype(np.float32))
    a.obs["b"] = pd.Categorical(["x", "y"] * 6)
    SCVI.setup_anndata(a, batch_key="b")
    model = SCVI(a, n_hidden=3, n_latent=2)
    model.train_indices_ = np.arange(10)
    path = tmp_path_factory.mktemp("fuzz") / "m"
    model.save(str(path))
    files = {n: (path / n).read_bytes() for n in (jio.MODEL_JSON, jio.MODEL_NPZ)}
    return files, a


def _read_dir(tmp_path, files) -> None:
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    for name, data in files.items():
        (d / name).write_bytes(data)
    try:
        meta, arrays = jio.read_model_dir(str(d))
    except (ValueError, FileNotFoundError):
        return
    for v in arrays.values():
        assert v.dtype.str in {"|b1", "<f4", "<f8", "<i4", "<i8", "|u1", "<f2", "|i1"}
    json.dumps(meta)


@FUZZ
@given(edits=st.data())
def test_npz_and_json_reader_survives_byte_mutations(model_dir, tmp_path, edits):
    files, _ = model_dir
    name = edits.draw(st.sampled_from(sorted(files)))
    mutated = _apply(files[name], edits.draw(_mutations(len(files[name]), opcodes=False)))
    _read_dir(tmp_path, {**files, name: mutated})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "arrays" or prefix:  # the manifest: covered by byte mutations
                yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):
            yield from _paths(v, (*prefix, i))


@settings(FUZZ, max_examples=max(1, EXAMPLES * 2 // 3))
@given(data=st.data())
def test_model_load_gives_value_errors_for_any_json_value(model_dir, tmp_path, data):
    """Any field of a re-sealed model.json replaced by any JSON value (or deleted): loading
    the model raises ValueError (naming a field) or loads a usable model -- no KeyError,
    TypeError, MemoryError or an error from inside JAX."""
    from jaxvi import SCVI

    files, adata = model_dir
    meta = json.loads(files[jio.MODEL_JSON])
    paths = [p for p in _paths(meta) if p and p[0] not in ("meta_sha256",)]
    where = data.draw(st.sampled_from(paths))
    node = meta
    for k in where[:-1]:
        node = node[k]
    if data.draw(st.booleans()) and isinstance(node, dict):
        del node[where[-1]]
    else:
        node[where[-1]] = data.draw(JSON_VALUES)
    meta["meta_sha256"] = jio.meta_digest(meta)
    text = json.dumps(meta).encode()
    d = tmp_path / "m"
    d.mkdir(exist_ok=True)
    (d / jio.MODEL_JSON).write_bytes(text)
    (d / jio.MODEL_NPZ).write_bytes(files[jio.MODEL_NPZ])
    try:
        model = SCVI.load(str(d), adata=adata)
    except ValueError:
        return
    assert model.config.n_input == adata.n_vars
