"""Counts and checkpoints that training reads (issue 17, defects 4, 8, 15, 17, 18): CSR
structure and count range are refused at setup, a resumed run never deletes or overwrites
another run's checkpoints, and edited checkpoints are refused by name.
"""

from __future__ import annotations

import hashlib
import os
import stat

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jaxvi import SCVI
from jaxvi.train import FitProgress, TrainState
from jaxvi.train import checkpoint as ckpt

TRAIN = {"batch_size": 32, "enable_progress_bar": False}


def _counts(n=40, g=12, seed=0):
    return np.random.default_rng(seed).poisson(1.5, size=(n, g)).astype(np.float32)


# ------------------------------------------------------------------- 4: CSR / CSC structure
def _broken(fmt: str, what: str):
    m = sp.csr_matrix(_counts()) if fmt == "csr" else sp.csc_matrix(_counts())
    data, indices, indptr = m.data.copy(), m.indices.copy(), m.indptr.copy()
    if what == "index":
        indices[3] = 10_000
    elif what == "negative":
        indices[3] = -1
    elif what == "indptr":
        indptr[5], indptr[6] = indptr[6], indptr[5] - 1
    cls = sp.csr_matrix if fmt == "csr" else sp.csc_matrix
    return cls((data, indices, indptr), shape=m.shape)  # scipy does not check these


@pytest.mark.parametrize("fmt", ["csr", "csc"])
@pytest.mark.parametrize("what", ["index", "negative", "indptr"])
def test_setup_refuses_broken_sparse_structure(fmt, what):
    adata = ad.AnnData(_broken(fmt, what))
    name = "row index" if fmt == "csc" else "column index"
    with pytest.raises(ValueError, match=f"adata.X.*({name}|indptr)"):
        SCVI.setup_anndata(adata)


def test_setup_refuses_broken_structure_of_a_backed_anndata(tmp_path):
    path = tmp_path / "a.h5ad"
    ad.AnnData(sp.csr_matrix(_counts())).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        idx = f["X/indices"][...]
        idx[-1] = 99
        f["X/indices"][...] = idx
        ptr = f["X/indptr"][...]
        del f["X/indptr"]
        f["X"].create_dataset("indptr", data=ptr[:-3])  # too short for the rows
    adata = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match="adata.X.*indptr"):
        SCVI.setup_anndata(adata)


def test_setup_accepts_valid_sparse_with_unsorted_and_empty_rows():
    m = sp.csr_matrix(_counts())
    m[3] = 0
    m.eliminate_zeros()
    m.indices[m.indptr[0] : m.indptr[1]] = m.indices[m.indptr[0] : m.indptr[1]][::-1].copy()
    m.has_sorted_indices = False
    SCVI.setup_anndata(ad.AnnData(m))


# -------------------------------------------------------------------- 17: count range
def test_setup_refuses_counts_beyond_float32_and_complex_counts():
    x = _counts().astype(np.float64)
    x[0, 0] = 1e39
    with pytest.raises(ValueError, match="float32"):
        SCVI.setup_anndata(ad.AnnData(x))
    with pytest.raises(ValueError, match="complex"):
        SCVI.setup_anndata(ad.AnnData(_counts().astype(np.complex64)))
    with pytest.raises(ValueError, match="complex"):
        SCVI.setup_anndata(ad.AnnData(sp.csr_matrix(_counts().astype(np.complex128))))


# --------------------------------------------------------------- 8: runs kept apart
def _adata():
    a = ad.AnnData(_counts(60, 10))
    a.obs["b"] = pd.Categorical(np.where(np.arange(60) % 2, "u", "v"))
    SCVI.setup_anndata(a, batch_key="b")
    return a


def _digest(ckpt_dir):
    with open(os.path.join(ckpt_dir, ckpt.CKPT_NPZ), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _state(value: float) -> TrainState:
    """A small training state whose parameters identify the run and epoch."""
    return TrainState(
        params={"w": np.full(3, value, np.float32)},
        batch_stats={},
        buffers={},
        opt_state=(np.zeros(3, np.float32),),
        step=np.int32(0),
    )


RUN_META = {
    "n_cells": 10,
    "seed": 0,
    "max_epochs": 9,
    "split": {"train": list(range(8)), "validation": [8, 9], "test": []},
    "history_before": {},
}


def test_resuming_an_older_checkpoint_keeps_both_runs_apart(tmp_path):
    """Defect 8: run A writes epochs 1-6 keeping 3 (4, 5, 6); run B resumes A's epoch 4 into
    the same directory keeping 2 and writes 5 to 8. A's checkpoints are neither deleted nor
    overwritten, B keeps its own newest two, and "the newest" (what ``resume=dir`` takes)
    is B's epoch 8, not the abandoned A's 6."""
    d = str(tmp_path / "ck")
    run_a = ckpt.Checkpointer(d, every_n_epochs=1, keep=3, meta=RUN_META)
    for epoch in range(1, 7):
        run_a(_state(epoch), FitProgress(epoch=epoch))
    a_ckpts = {p: _digest(p) for p in ckpt.list_checkpoints(d)}
    assert len(a_ckpts) == 3
    assert ckpt.read_checkpoint(d)[0]["progress"]["epoch"] == 6
    run_b = ckpt.Checkpointer(d, every_n_epochs=1, keep=2, meta=RUN_META)
    for epoch in range(5, 9):
        run_b(_state(100 + epoch), FitProgress(epoch=epoch))
    for p, digest in a_ckpts.items():
        assert os.path.isdir(p), f"run B deleted run A's {os.path.basename(p)}"
        assert _digest(p) == digest, f"run B overwrote run A's {os.path.basename(p)}"
    assert len(ckpt.list_checkpoints(d)) == 5  # A's three, B's newest two
    meta, arrays = ckpt.read_checkpoint(d)
    assert meta["progress"]["epoch"] == 8
    np.testing.assert_array_equal(arrays["params/w"], np.full(3, 108, np.float32))
    # B's epoch 5 and 6 sat beside A's of the same epoch; B pruned only its own
    names = sorted(os.path.basename(p) for p in ckpt.list_checkpoints(d))
    assert names[:3] == ["epoch_000004", "epoch_000005", "epoch_000006"]
    assert [n[:12] for n in names[3:]] == ["epoch_000007", "epoch_000008"]


# ------------------------------------------------------------- 15, 18: checkpoint files
@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory):
    adata = _adata()
    d = str(tmp_path_factory.mktemp("ck"))
    old = os.umask(0o022)
    try:
        SCVI(adata, n_hidden=8, n_latent=2).train(max_epochs=1, checkpoint_dir=d, **TRAIN)
    finally:
        os.umask(old)
    return adata, ckpt.find_checkpoint(d)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["split"]["train"].append(10**6), r"split\.train"),
        (lambda m: m["split"].update(validation=[-2]), r"split\.validation"),
        (lambda m: m.update(n_cells="sixty"), "n_cells"),
        (lambda m: m.pop("progress"), "progress"),
        (lambda m: m["progress"].update(epoch=-1), r"progress\.epoch"),
    ],
)
def test_edited_checkpoint_is_refused_naming_the_field(
    copy_dir, edit_json, one_checkpoint, tmp_path, edit, match
):
    """Defect 15: out-of-range split indices (and other bad fields) refused on resume."""
    adata, path = one_checkpoint
    target = copy_dir(path, str(tmp_path / "epoch_000001"))
    edit_json(os.path.join(target, ckpt.CKPT_JSON), edit)
    with pytest.raises(ValueError, match=match):
        SCVI(adata, n_hidden=8, n_latent=2).train(max_epochs=2, resume=target, **TRAIN)


def test_checkpoint_json_checksum(copy_dir, edit_json, one_checkpoint, tmp_path):
    adata, path = one_checkpoint
    target = copy_dir(path, str(tmp_path / "epoch_000001"))
    edit_json(
        os.path.join(target, ckpt.CKPT_JSON),
        lambda m: m["split"]["train"].__setitem__(0, 59),
        reseal=False,
    )
    with pytest.raises(ValueError, match="checkpoint.json.*checksum"):
        ckpt.read_checkpoint(target)


def test_checkpoints_respect_the_umask(one_checkpoint):
    """Defect 18: 0755 / 0644 under umask 022 (was 0700 / 0600 whatever the umask)."""
    _, path = one_checkpoint
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    for name in os.listdir(path):
        assert stat.S_IMODE(os.stat(os.path.join(path, name)).st_mode) == 0o644, name


def test_a_failed_checkpoint_write_keeps_the_training(tmp_path, monkeypatch):
    """Defect 16: a disk-full error while writing the epoch-2 checkpoint used to end train()
    and throw away its in-memory progress. Now it is a warning naming the epoch; training
    runs to the end, the model keeps all 3 epochs, and the other checkpoints are written."""
    real = ckpt.write_checkpoint

    def full_at_epoch_2(directory, state, meta, name=None):
        if meta["progress"]["epoch"] == 2:
            raise OSError(28, "No space left on device")
        return real(directory, state, meta, name)

    monkeypatch.setattr(ckpt, "write_checkpoint", full_at_epoch_2)
    adata = ad.AnnData(_counts())
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8, n_latent=2)
    before = np.asarray(model.variables["params"]["decoder"]["px_scale_decoder"]["kernel"])
    with pytest.warns(UserWarning, match=r"after epoch 2 could not be written .*No space left"):
        model.train(max_epochs=3, checkpoint_dir=str(tmp_path), **TRAIN)
    assert model.is_trained_
    assert list(model.history["elbo_train"].index) == [0, 1, 2]
    after = np.asarray(model.variables["params"]["decoder"]["px_scale_decoder"]["kernel"])
    assert not np.array_equal(before, after)
    names = sorted(os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path)))
    assert names == ["epoch_000001", "epoch_000003"]
