"""Saved files: atomic writes, and refusal of truncated, corrupted, newer, mis-declared and
code-executing files, each with a clear message."""

import io as pyio
import os
import pickle
import struct
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from jaxvi import SCVI
from jaxvi import io as jio


class _Boom:
    """Unpickling this would run code; nothing may ever unpickle it."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.negative_binomial(3, 0.3, size=(30, 10)).astype(np.float32))
    a.obs["batch"] = pd.Categorical(np.where(np.arange(30) % 2, "a", "b"))
    SCVI.setup_anndata(a, batch_key="batch")
    model = SCVI(a, n_hidden=8, n_latent=3)
    path = tmp_path_factory.mktemp("io") / "model"
    model.save(str(path))
    return str(path), a


def test_round_trip_and_manifest(saved):
    path, adata = saved
    meta, arrays = jio.read_model_dir(path)
    assert set(meta["arrays"]) == set(arrays)
    entry = meta["arrays"]["params/decoder/px_scale_decoder/kernel"]
    assert (entry["shape"], entry["dtype"], len(entry["sha256"])) == ([8, 10], "<f4", 64)
    SCVI.load(path, adata=adata)


def test_save_is_atomic_when_writing_fails(copy_dir, saved, tmp_path, monkeypatch):
    """A crash while writing leaves the previous files intact and no temporary files."""
    path, adata = saved
    target = copy_dir(path, tmp_path / "m")
    before = {n: open(os.path.join(target, n), "rb").read() for n in os.listdir(target)}
    model = SCVI.load(target, adata=adata)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save(target, overwrite=True)
    after = {n: open(os.path.join(target, n), "rb").read() for n in os.listdir(target)}
    assert after == before


def test_truncated_and_corrupted_files_are_refused(copy_dir, saved, tmp_path):
    path, adata = saved
    npz = os.path.join(path, jio.MODEL_NPZ)
    raw = open(npz, "rb").read()

    trunc = copy_dir(path, tmp_path / "trunc")
    with open(os.path.join(trunc, jio.MODEL_NPZ), "wb") as f:
        f.write(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        SCVI.load(trunc, adata=adata)

    # One flipped byte inside an array's values: the zip CRC catches it.
    flipped = copy_dir(path, tmp_path / "flip")
    with zipfile.ZipFile(npz) as zf:
        info = zf.getinfo("params/decoder/px_scale_decoder/kernel.npy")
    name_len, extra_len = struct.unpack(
        "<HH", raw[info.header_offset + 26 : info.header_offset + 30]
    )
    data = bytearray(raw)
    data[info.header_offset + 30 + name_len + extra_len + 128 + 100] ^= 0xFF  # past the header
    with open(os.path.join(flipped, jio.MODEL_NPZ), "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ValueError, match="corrupted"):
        SCVI.load(flipped, adata=adata)

    # A valid archive whose values differ from what was saved: the checksum catches it.
    swapped = copy_dir(path, tmp_path / "swap")
    _, arrays = jio.read_model_dir(path)
    arrays["params/decoder/px_scale_decoder/kernel"] = (
        arrays["params/decoder/px_scale_decoder/kernel"] + 1.0
    )
    with open(os.path.join(swapped, jio.MODEL_NPZ), "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match="px_scale_decoder/kernel.*checksum mismatch"):
        SCVI.load(swapped, adata=adata)

    bad_json = copy_dir(path, tmp_path / "json")
    text = open(os.path.join(path, jio.MODEL_JSON)).read()
    with open(os.path.join(bad_json, jio.MODEL_JSON), "w") as f:
        f.write(text[: len(text) // 2])
    with pytest.raises(ValueError, match="corrupted or truncated .not valid JSON"):
        SCVI.load(bad_json, adata=adata)

    missing = copy_dir(path, tmp_path / "missing")
    os.remove(os.path.join(missing, jio.MODEL_NPZ))
    with pytest.raises(FileNotFoundError, match="the save is incomplete"):
        SCVI.load(missing, adata=adata)


def test_newer_format_version_is_refused(copy_dir, edit_json, saved, tmp_path):
    path, adata = saved
    newer = copy_dir(path, tmp_path / "newer")
    edit_json(
        os.path.join(newer, jio.MODEL_JSON),
        lambda m: m.update(format_version=jio.FORMAT_VERSION + 1),
    )
    with pytest.raises(ValueError, match="newer than this jaxvi reads.*upgrade"):
        SCVI.load(newer, adata=adata)


def test_declared_shapes_must_match(copy_dir, edit_json, saved, tmp_path):
    path, adata = saved
    manifest = copy_dir(path, tmp_path / "manifest")
    edit_json(
        os.path.join(manifest, jio.MODEL_JSON),
        lambda m: m["arrays"]["params/px_r"].update(shape=[11]),
    )  # the file holds (10,)
    with pytest.raises(ValueError, match=r"'params/px_r' is <f4\[10\] but the JSON"):
        SCVI.load(manifest, adata=adata)
    # The architecture in model.json disagrees with the arrays (and the AnnData).
    config = copy_dir(path, tmp_path / "config")
    edit_json(os.path.join(config, jio.MODEL_JSON), lambda m: m["config"].update(n_latent=4))
    with pytest.raises(ValueError, match="has shape .* expected"):
        SCVI.load(config, adata=adata)


def test_files_needing_code_execution_are_refused(copy_dir, saved, tmp_path):
    path, adata = saved
    _, arrays = jio.read_model_dir(path)
    # An object array inside the npz (np.save pickles it).
    obj = copy_dir(path, tmp_path / "obj")
    with open(os.path.join(obj, jio.MODEL_NPZ), "wb") as f:
        np.savez(f, **arrays, evil=np.array([_Boom()], dtype=object))
    with pytest.raises(jio.PickleRefused, match="'evil' holds Python objects.*refused"):
        SCVI.load(obj, adata=adata)
    # A bare pickle where the npz should be.
    raw = copy_dir(path, tmp_path / "raw")
    with open(os.path.join(raw, jio.MODEL_NPZ), "wb") as f:
        pickle.dump({"params": _Boom()}, f)
    with pytest.raises(ValueError, match="corrupted or truncated"):
        SCVI.load(raw, adata=adata)
    # A zip member that is not an .npy array.
    other = copy_dir(path, tmp_path / "other")
    buf = pyio.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("params.pkl", pickle.dumps(_Boom()))
    with open(os.path.join(other, jio.MODEL_NPZ), "wb") as f:
        f.write(buf.getvalue())
    with pytest.raises(ValueError, match="'params.pkl' that is not an array"):
        SCVI.load(other, adata=adata)
    # A model.pt that is a bare pickle (not torch's zip format) is refused unread; real
    # scvi-tools files go through jaxvi.io.torchfile's allow-list (tests/test_scvi_io.py).
    pt = tmp_path / "pt"
    pt.mkdir()
    (pt / "model.pt").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(ValueError, match="not a zip-format torch file"):
        SCVI.load(str(pt))
    # Saving refuses object arrays in the first place.
    with pytest.raises(TypeError, match="dtype object"):
        jio.write_model_dir(
            str(tmp_path / "w"), {}, {"a": np.array([None], dtype=object)}, overwrite=False
        )


def test_directory_saved_before_the_redesign_loads():
    """A model directory written by the code before the package was split into subpackages
    (tests/io/format_v1_scvi, commit 14ce6cf) loads, with its AnnData, and gives the same
    latent representation that code computed."""
    data = Path(__file__).parent
    model = SCVI.load(str(data / "format_v1_scvi"))
    assert model.is_trained
    assert model.adata.n_obs == 80
    assert model.history["elbo_train"].shape == (3, 1)
    expected = np.load(data / "format_v1_scvi_latent.npy")
    np.testing.assert_allclose(model.get_latent_representation(), expected, rtol=1e-5, atol=1e-6)
