"""Hostile ``model.pt`` files (issue 17, defects 1, 2, 5, 9, 10, 11, 12): the torch-file
reader refuses them with :class:`~jaxvi.io.torchfile.UnsafePickleError` instead of crashing,
hanging, amplifying memory or handing back uninitialised, forged or non-finite weights.

Files that crashed the interpreter are loaded in a child process (which imports
:mod:`jaxvi.io.torchfile`, then caps its address space) so that a regression fails the test
instead of killing pytest.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest

from jaxvi import SCVI
from jaxvi.io import torchfile
from jaxvi.io.torchfile import UnsafePickleError

# Loads one file with jaxvi.io.torchfile, then reads every array it returned; the address
# space is capped 3 GiB above what the imports took, so an amplification fails fast.
_CHILD = textwrap.dedent(
    """
    import resource, sys
    from jaxvi.io import torchfile as tf
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) << 10 for line in f if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), vm + (3 << 30)))
    try:
        obj = tf.load(sys.argv[1])
    except tf.UnsafePickleError as e:
        print("REFUSED:", e)
        sys.exit(0)

    def touch(x, depth=0):
        if depth > 50:
            return
        if isinstance(x, dict):
            for v in x.values():
                touch(v, depth + 1)
        elif isinstance(x, (list, tuple)):
            for v in x:
                touch(v, depth + 1)
        else:
            repr(x)
            if hasattr(x, "tolist"):
                x.tolist()

    touch(obj)
    print("LOADED")
    """
)


def _load_in_child(path: Path, timeout: float = 60.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-c", _CHILD, str(path)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {path.name} did not finish within {timeout} s")


def _write(hp, tmp_path: Path, name: str, pickle_bytes: bytes, storages=None, compress=None):
    path = tmp_path / name
    path.write_bytes(hp.torch_zip(pickle_bytes, storages, compress))
    return path


@pytest.mark.parametrize(
    "attack",
    ["forged_object_array", "forged_object_scalar", "forged_subarray", "use_after_free"],
)
def test_forged_dtypes_and_freed_views_are_refused_without_crashing(hp, tmp_path, attack):
    """Defects 1 and 2: the file never drives NumPy's own dtype / array reconstruction."""
    path = _write(hp, tmp_path, f"{attack}.pt", getattr(hp, attack)())
    proc = _load_in_child(path)
    assert proc.returncode == 0, f"child died with {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.startswith("REFUSED:"), proc.stdout


def test_billion_laughs_is_refused_quickly(hp, tmp_path):
    """Defect 5: shared nested lists expanding to 10**9 leaves."""
    payload = hp.billion_laughs()
    assert len(payload) < 400
    path = _write(hp, tmp_path, "laughs.pt", payload)
    proc = _load_in_child(path)  # the child imports JAX first: the bound covers that too
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("REFUSED:"), proc.stdout
    assert "expand" in proc.stdout, proc.stdout


def test_stride_zero_tensor_is_refused(hp, tmp_path):
    """Defect 9: a tensor larger than its storage (stride 0) is not materialised."""
    pkl, storages = hp.stride_zero_tensor()
    path = _write(hp, tmp_path, "stride0.pt", pkl, storages)
    assert path.stat().st_size < 1000
    with pytest.raises(UnsafePickleError, match="more elements than its storage"):
        torchfile.load(str(path))


def test_compressed_members_are_refused_unread(hp, tmp_path):
    """Defect 9: a deflate bomb (64 MiB of zeros in ~64 KiB) is refused before inflating."""
    pkl = hp.program(hp.tensor(hp.storage("0", numel=1 << 24), (1 << 24,), (1,)))
    path = _write(hp, tmp_path, "bomb.pt", pkl, {"0": bytes(1 << 26)}, {"0": True})
    assert path.stat().st_size < (1 << 20)
    with pytest.raises(UnsafePickleError, match="compressed"):
        torchfile.load(str(path))


def test_uninitialised_memory_never_becomes_an_array(hp, tmp_path):
    """Defect 10: ``_reconstruct`` without its BUILD and ``ndarray(shape)`` are refused."""
    path = _write(hp, tmp_path, "uninit.pt", hp.uninitialised_array())
    with pytest.raises(UnsafePickleError, match="never filled|numpy.ndarray"):
        torchfile.load(str(path))


# --------------------------------------------------------------- through SCVI.from_scvi_tools
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny jaxvi model written in scvi-tools' format (no torch needed)."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.poisson(2.0, size=(24, 6)).astype(np.float32))
    a.obs["batch"] = pd.Categorical(["x", "y"] * 12)
    SCVI.setup_anndata(a, batch_key="batch")
    model = SCVI(a, n_hidden=4, n_latent=2)
    path = tmp_path_factory.mktemp("pt") / "model"
    model.save(str(path), format="scvi-tools")
    return path


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """Load ``src/model.pt``, let ``edit`` change its state dict, write ``dst/model.pt``."""
    obj = torchfile.load(str(src / "model.pt"))
    state = obj["model_state_dict"]
    for k, v in list(state.items()):
        if isinstance(v, np.ndarray):
            state[k] = torchfile.Tensor(v)
    edit(state)
    dst.mkdir()
    torchfile.save(obj, str(dst / "model.pt"))
    return dst


KERNEL = "decoder.px_scale_decoder.0.weight"
RUNNING_VAR = "z_encoder.encoder.fc_layers.Layer 0.1.running_var"


def test_exported_model_still_loads(exported):
    model = SCVI.from_scvi_tools(str(exported))
    assert model.config.n_hidden == 4


@pytest.mark.parametrize(
    ("name", "edit", "match"),
    [
        ("nan", lambda st: st[KERNEL].array.__setitem__((0, 0), np.nan), "non-finite"),
        ("inf", lambda st: st[KERNEL].array.__setitem__((0, 0), np.inf), "non-finite"),
        ("negvar", lambda st: st[RUNNING_VAR].array.__setitem__(0, -1.0), "negative"),
    ],
)
def test_non_finite_weights_and_negative_variances_are_refused(
    exported, tmp_path, name, edit, match
):
    """Defect 11."""
    path = _rewrite(exported, tmp_path / name, edit)
    with pytest.raises(ValueError, match=match) as err:
        SCVI.from_scvi_tools(str(path))
    assert KERNEL in str(err.value) or RUNNING_VAR in str(err.value)


def _as(kind):
    def edit(state):
        w = state[KERNEL].array
        if kind == "complex":  # a plain NumPy array where a tensor belongs
            state[KERNEL] = w.astype(np.complex64)
        else:
            state[KERNEL] = torchfile.Tensor(w.astype(kind))

    return edit


@pytest.mark.parametrize(
    ("kind", "error", "match"),
    [
        (np.bool_, ValueError, "dtype bool"),
        (np.int32, ValueError, "dtype int32"),
        ("complex", UnsafePickleError, "dtype"),
    ],
)
def test_weight_dtypes_are_checked(exported, tmp_path, kind, error, match):
    """Defect 12: bool, int and complex weights are refused, naming the weight."""
    path = _rewrite(
        exported, tmp_path / str(np.dtype(kind) if kind != "complex" else kind), _as(kind)
    )
    with pytest.raises(error, match=match) as err:
        SCVI.from_scvi_tools(str(path))
    if error is ValueError:
        assert KERNEL in str(err.value)


def test_big_endian_and_unknown_storage_dtypes_are_refused(hp, tmp_path):
    """Defect 12: only plain little-endian numeric dtypes are built."""
    big = hp.program(
        hp.array((2,), hp.dtype("f4", hp.dtype_state(order=">")), hp.raw(b"\x00" * 8))
    )
    with pytest.raises(UnsafePickleError, match="big-endian|dtype"):
        torchfile.load(str(_write(hp, tmp_path, "big.pt", big)))
    cplx = hp.program(hp.array((2,), hp.dtype("c8", hp.dtype_state()), hp.raw(b"\x00" * 16)))
    with pytest.raises(UnsafePickleError, match="dtype 'c8'"):
        torchfile.load(str(_write(hp, tmp_path, "c8.pt", cplx)))


def test_real_scvi_tools_layouts_still_load(tmp_path):
    """The records scvi-tools' files hold (object arrays of strings, int64 index arrays,
    NumPy scalars, tensors) are rebuilt as before."""
    arr = np.array(["g1", "g2"], dtype=object)
    obj = {
        "names": arr,
        "idx": np.arange(5, dtype=np.int64),
        "f": np.array([[1.5, 2.5]], dtype=np.float32),
        "u": np.array(["ab", "c"]),
        "scalar": np.float64(2.5),
        "b": np.array([True, False]),
        "t": torchfile.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
    }
    torchfile.save(obj, str(tmp_path / "ok.pt"))
    back = torchfile.load(str(tmp_path / "ok.pt"))
    assert back["names"].tolist() == ["g1", "g2"]
    np.testing.assert_array_equal(back["idx"], np.arange(5))
    np.testing.assert_array_equal(back["f"], obj["f"])
    np.testing.assert_array_equal(back["u"], obj["u"])
    assert back["scalar"] == 2.5
    assert isinstance(back["scalar"], np.float64)
    np.testing.assert_array_equal(back["b"], [True, False])
    np.testing.assert_array_equal(back["t"], np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(back["fortran"], obj["fortran"])
    for v in back.values():
        if isinstance(v, np.ndarray):
            assert v.flags.owndata or v.base is None or isinstance(v.base, np.ndarray)


def test_zip_with_too_many_members_is_refused(hp, tmp_path):
    """Work is bounded by the archive too: a central directory of 10,001 members."""
    path = tmp_path / "many.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/data.pkl", hp.program(hp.NONE))
        for k in range(10_001):
            zf.writestr(f"model/data/{k}", b"")
    with pytest.raises(UnsafePickleError, match="members"):
        torchfile.load(str(path))


def test_fuzzer_findings_are_value_errors(hp, tmp_path):
    """Two inputs atheris found (benchmarks/fuzz): an "encrypted" member (zipfile raised
    RuntimeError) and a zip64 locator claiming several disks (BadZipFile)."""
    src = hp.torch_zip(hp.program(hp.NONE))
    encrypted = bytearray(src)
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):  # local, central
        pos = encrypted.find(signature)
        while pos >= 0:
            encrypted[pos + flag_at] |= 0x1
            pos = encrypted.find(signature, pos + 4)
    (tmp_path / "encrypted.pt").write_bytes(bytes(encrypted))
    encrypted = tmp_path / "encrypted.pt"
    with pytest.raises(ValueError, match="encrypted|corrupted"):
        torchfile.load(str(encrypted))
    eocd = src.rindex(b"PK\x05\x06")
    locator = b"PK\x06\x07" + struct.pack("<LQL", 0, 0, 2)
    (tmp_path / "disks.pt").write_bytes(src[:eocd] + locator + src[eocd:])
    with pytest.raises(ValueError, match="zip"):
        torchfile.load(str(tmp_path / "disks.pt"))
