"""Prediction methods go through any number of cells with bounded device memory."""

import anndata as ad
import jax
import numpy as np
import pytest
import scipy.sparse as sp

from jaxvi import SCVI
from jaxvi import posterior as inference
from jaxvi._settings import settings
from jaxvi.data import CellData

N, G, BS = 600, 50, 32


@pytest.fixture
def small_budget():
    old = settings.inference_bytes_per_call
    settings.inference_bytes_per_call = 64 * G * 4  # 64 cells of dense float32 counts
    yield 64
    settings.inference_bytes_per_call = old


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_queries_move_bounded_pieces_to_the_device(small_budget, monkeypatch, fmt):
    rng = np.random.default_rng(0)
    x = rng.negative_binomial(2, 0.3, size=(N, G)).astype(np.float32)
    adata = ad.AnnData(sp.csr_matrix(x) if fmt == "csr" else x)
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8, n_latent=3)

    moved, live = [], []
    original = jax.device_put

    def tracking_put(value, *args, **kwargs):
        out = original(value, *args, **kwargs)
        if not isinstance(value, CellData):  # keys, index grids: not the cells
            return out
        leaves = jax.tree_util.tree_leaves(out)
        moved.append(sum(a.nbytes for a in leaves))
        live.append(sum(a.nbytes for a in jax.live_arrays()))
        return out

    baseline = sum(a.nbytes for a in jax.live_arrays())
    monkeypatch.setattr(jax, "device_put", tracking_put)
    latent = model.get_latent_representation(batch_size=BS)
    stats = dict(inference.last_run)
    assert stats["max_cells_per_call"] == small_budget  # 2 chunks of 32 cells
    assert stats["calls"] == -(-N // small_budget)
    assert stats["max_bytes_per_call"] <= settings.inference_bytes_per_call
    assert len(moved) == stats["calls"]
    assert max(moved) < 2 * settings.inference_bytes_per_call  # counts + codes
    dataset_bytes = N * G * 4
    assert max(live) - baseline < dataset_bytes / 4  # never the whole dataset on the device

    expr = model.get_normalized_expression(batch_size=BS, return_numpy=True)
    assert inference.last_run["max_cells_per_call"] == small_budget
    assert np.all(np.isfinite(expr))
    assert np.isfinite(model.get_elbo(batch_size=BS))
    assert inference.last_run["calls"] == -(-N // small_budget)
    monkeypatch.undo()

    settings.inference_bytes_per_call = 2**30  # everything in one call
    unbounded = model.get_latent_representation(batch_size=BS)
    assert inference.last_run["calls"] == 1
    np.testing.assert_allclose(latent, unbounded, rtol=1e-6, atol=1e-7)


def test_chunks_per_call_is_a_power_of_two_within_limits():
    old = settings.inference_bytes_per_call
    try:
        settings.inference_bytes_per_call = 1  # below one minibatch: one chunk per call
        assert inference.chunks_per_call(2000, 128) == 1
        settings.inference_bytes_per_call = 5 * 128 * 2000 * 4
        assert inference.chunks_per_call(2000, 128) == 4
        settings.inference_bytes_per_call = 2**40
        assert inference.chunks_per_call(2000, 128) == inference.MAX_CHUNKS_PER_CALL
    finally:
        settings.inference_bytes_per_call = old
