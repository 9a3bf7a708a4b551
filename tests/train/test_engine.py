"""The engine takes any :class:`~jaxvi.module.ModelDef`: a small model defined here, outside
the package (a Gaussian autoencoder on log counts with an extra per-cell penalty term and a
scalar term, in ``second_model.py`` beside this file), trains with :func:`jaxvi.train.fit` from
cells in device memory, streamed from a backed h5ad and (``tests/parallel``) sharded over 8
fake CPU devices; resumes bit-identically from a saved progress and from a checkpoint file;
is stopped by the non-finite guard; and is queried through :func:`jaxvi.posterior.run_query`."""

from __future__ import annotations

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from second_model import gaussian_ae

from jaxvi import SCVI
from jaxvi.data import StreamingSource, make_source, to_device
from jaxvi.data.registry import get_registry
from jaxvi.posterior import Query, elbo_terms_program, run_query
from jaxvi.train import FitProgress, NonFiniteError, PlanConfig, checkpoint, fit, init_train_state

N_GENES = 20


def _adata(n=150, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(3, 0.3, size=(n, N_GENES)).astype(np.float32)
    a = anndata.AnnData(sp.csr_matrix(x))
    a.obs["batch"] = pd.Categorical(np.where(np.arange(n) % 2 == 0, "a", "b"))
    a.var_names = [f"g{j}" for j in range(N_GENES)]
    SCVI.setup_anndata(a, batch_key="batch")
    return a


MODEL = gaussian_ae(N_GENES)
FIT = {"plan": PlanConfig(lr=1e-2, n_epochs_kl_warmup=None), "batch_size": 32}


def _fit(source, max_epochs=3, state=None, **kwargs):
    if state is None:
        state, _ = init_train_state(MODEL, MODEL.init(jax.random.key(0)), FIT["plan"])
    return fit(
        MODEL,
        state,
        source,
        train_idx=np.arange(120),
        val_idx=np.arange(120, 150),
        max_epochs=max_epochs,
        check_val_every_n_epoch=1,
        progress_bar=False,
        **FIT,
        **kwargs,
    )


def test_a_second_model_trains_reports_its_terms_and_is_queried():
    adata = _adata()
    source = make_source(adata, get_registry(adata), purpose="train")
    state, history, epoch_fn = _fit(source, max_epochs=6)
    assert epoch_fn._cache_size() == 1
    assert int(state.step) == 6 * 4
    for name in ("penalty_train", "scale_train", "penalty_validation", "scale_validation"):
        assert name in history, name
    np.testing.assert_allclose(history["scale_train"].to_numpy(), 2.0)  # scalar: cell-weighted
    rec = history["reconstruction_loss_train"].to_numpy().ravel()
    np.testing.assert_allclose(history["elbo_train"].to_numpy().ravel(), rec)  # no KL terms
    np.testing.assert_array_equal(history["kl_local_train"].to_numpy(), 0.0)
    assert history["train_loss"].to_numpy()[-1, 0] < 0.8 * history["train_loss"].to_numpy()[0, 0]

    # a query on the trained model: per-cell terms equal the loss's, from cells on the host
    variables = {"params": state.params, "batch_stats": {}}
    cells = np.array([3, 140, 7])
    query = Query(
        MODEL, variables, make_source(adata, get_registry(adata), purpose="query"), cells, None, 2
    )
    terms = run_query(elbo_terms_program(MODEL), query)
    batch = source.minibatch(cells)
    out, _ = MODEL.loss(None, variables, batch, training=False)
    np.testing.assert_allclose(terms["penalty"], out.terms["penalty"], rtol=1e-6)
    np.testing.assert_allclose(
        terms["reconstruction_loss"], out.terms["reconstruction_loss"], rtol=1e-6
    )
    np.testing.assert_array_equal(terms["scale"], 2.0)


def test_resume_from_progress_is_bit_identical():
    adata = _adata()
    source = make_source(adata, get_registry(adata), purpose="train")
    full_state, full_hist, _ = _fit(source, max_epochs=4)
    saved = {}

    def keep(state, progress):
        if progress.epoch == 2:
            saved["state"] = jax.tree_util.tree_map(np.array, state)
            saved["progress"] = progress

    _fit(source, max_epochs=2, on_epoch_end=keep)
    state = jax.tree_util.tree_map(jnp.asarray, saved["state"])
    resumed = fit(
        MODEL,
        state,
        source,
        train_idx=np.arange(120),
        val_idx=np.arange(120, 150),
        max_epochs=4,
        check_val_every_n_epoch=1,
        progress_bar=False,
        progress=saved["progress"],
        **FIT,
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed[0].params, full_state.params)
    for name, frame in full_hist.items():
        pd.testing.assert_frame_equal(resumed[1][name], frame)


def test_streamed_from_a_backed_h5ad(tmp_path):
    """The same model streamed in blocks of 64 cells: every block trained, the epoch compiled
    for the two block shapes, the terms reported as in memory."""
    _adata().write_h5ad(tmp_path / "cells.h5ad")
    backed = anndata.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    SCVI.setup_anndata(backed, batch_key="batch")
    source = make_source(
        backed, get_registry(backed), purpose="train", chunk_cells=32, max_host_bytes=64 * 160
    )
    assert isinstance(source, StreamingSource)
    assert source.block_sizes(np.arange(120)) == [64, 56]
    state, history, epoch_fn = _fit(source)
    assert epoch_fn._cache_size() == 2
    assert int(state.step) == 3 * (2 + 2)
    assert history["penalty_validation"].shape == (3, 1)


def test_guard_stops_a_second_model_at_a_nan():
    adata = _adata()
    arrays = {
        "X": np.asarray(adata.X.toarray()),
        "batch_index": np.zeros(150, np.int32),
        "labels": np.zeros(150, np.int32),
        "cat_covs": None,
        "cont_covs": None,
        "size_factor": None,
    }
    arrays["X"][5, 2] = np.nan
    with pytest.raises(NonFiniteError, match="loss became non-finite .* at epoch 0") as info:
        _fit(to_device(arrays))
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(info.value.state.params))


def test_resume_from_a_checkpoint_file_is_bit_identical(tmp_path):
    """Checkpoints written by :class:`jaxvi.train.checkpoint.Checkpointer` during a fit of the
    second model restore its state (parameters, optimizer moments, step) and progress; the
    resumed fit equals an uninterrupted one bit for bit."""
    adata = _adata()
    source = make_source(adata, get_registry(adata), purpose="train")
    full_state, full_hist, _ = _fit(source, max_epochs=4)
    run = {  # the run description the checkpoint schema requires (split within n_cells)
        "model": MODEL.name,
        "n_cells": 150,
        "seed": 0,
        "max_epochs": 4,
        "split": {"train": list(range(120)), "validation": list(range(120, 150)), "test": []},
        "history_before": {},
    }
    writer = checkpoint.Checkpointer(str(tmp_path / "ckpt"), 1, 2, run)
    _fit(source, max_epochs=2, on_epoch_end=writer)
    names = [p.rsplit("_", 1)[-1] for p in checkpoint.list_checkpoints(str(tmp_path / "ckpt"))]
    assert [int(n) for n in names] == [1, 2]
    meta, arrays = checkpoint.read_checkpoint(checkpoint.find_checkpoint(str(tmp_path / "ckpt")))
    assert meta["model"] == MODEL.name
    template, _ = init_train_state(MODEL, MODEL.init(jax.random.key(1)), FIT["plan"])
    state = checkpoint.restore_state(template, meta, arrays)
    resumed_state, resumed_hist, _ = _fit(
        source, max_epochs=4, state=state, progress=FitProgress(**meta["progress"])
    )
    jax.tree_util.tree_map(np.testing.assert_array_equal, resumed_state.params, full_state.params)
    jax.tree_util.tree_map(
        np.testing.assert_array_equal, resumed_state.opt_state, full_state.opt_state
    )
    for name, frame in full_hist.items():
        pd.testing.assert_frame_equal(resumed_hist[name], frame)
