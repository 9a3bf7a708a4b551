"""Importance weights (:mod:`jaxvi.posterior`) and their use by ``get_normalized_expression``
and ``differential_expression``.

Without scvi-tools: an exactly solvable case (weights uniform), alignment of the returned draws
with the expression they produced, the resampling wiring, and the error cases. With scvi-tools
1.4.2 (skipped otherwise): the weights equal ``scvi.model.SCVI.get_importance_weights`` for the
same weights, draws and anchor log-likelihoods.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvi import SCVI
from jaxvi import posterior as importance
from jaxvi.module import VAE
from jaxvi.posterior import Query, _importance, expression_and_latent_program, run_query


@pytest.fixture(scope="module")
def adata(make_adata):
    return make_adata(40)


@pytest.fixture(scope="module")
def trained(jaxvi_model, adata):
    model = jaxvi_model(adata)
    model.train(max_epochs=30, batch_size=16, enable_progress_bar=False)
    return model


def test_uniform_when_q_is_the_prior_and_decoder_ignores_z(make_adata, jaxvi_model, set_params):
    """q(z | x) = N(0, I) = p(z) and a decoder blind to z (one batch, observed library):
    p(x_a | z, l_a) = p(x_a) exactly and every q(z | x_a') = p(z), so each log weight is
    ``logsumexp_a(-log A) = 0``: uniform weights, whatever the anchors."""
    model = jaxvi_model(make_adata(30, n_batch=1, seed=3))
    n_latent = model.config.n_latent
    for layer in ("mean_encoder", "var_encoder"):
        set_params(model, ("z_encoder", layer, "kernel"), np.zeros_like)
    set_params(model, ("z_encoder", "mean_encoder", "bias"), np.zeros_like)
    set_params(model, ("z_encoder", "var_encoder", "bias"), lambda b: np.full_like(b, -1e-4))
    set_params(
        model,
        ("decoder", "px_decoder", "layer0_dense", "kernel"),
        lambda k: np.concatenate([np.zeros_like(k[:n_latent]), k[n_latent:]]),
    )
    zs = np.random.default_rng(0).normal(size=(3, 30, n_latent))
    for max_cells in (1024, 7):
        p = model.get_importance_weights(
            zs=zs, max_cells=max_cells, n_mc_samples=4, n_mc_samples_per_pass=2
        )
        assert p.shape == (90,)
        assert p.dtype == np.float64
        np.testing.assert_allclose(p, 1 / 90, rtol=1e-3)


def test_weights_favour_draws_that_explain_the_anchors(trained):
    """A draw at a cell's posterior mean explains the cells better than one far in the tail
    of the prior: it gets almost all the weight; truncation floors the small weights at the
    mean weight."""
    _, idx, source, _ = trained._query_inputs(None, np.arange(10), None)
    inf = trained.module.apply(
        trained.variables, source.minibatch(idx), key=None, method=VAE.inference
    )
    good = np.asarray(inf.qz_m)
    zs = np.stack([good, good + 8.0])  # (2, 10, L)
    p = trained.get_importance_weights(
        indices=np.arange(10), zs=zs, n_mc_samples=20, n_mc_samples_per_pass=20
    )
    assert p[:10].sum() > 0.99
    p_trunc = trained.get_importance_weights(
        indices=np.arange(10), zs=zs, n_mc_samples=20, n_mc_samples_per_pass=20, truncation=True
    )
    np.testing.assert_allclose(p_trunc.sum(), 1.0, rtol=1e-12)
    assert p_trunc[10:].min() > p[10:].min()


def test_normalize_log_weights():
    log_w = np.log(np.array([1.0, 2.0, 5.0]))
    np.testing.assert_allclose(importance.normalize_log_weights(log_w), [0.125, 0.25, 0.625])
    # truncation: the floor is log(mean w) = log(8 / 3)
    expected = np.array([8 / 3, 8 / 3, 5.0])
    np.testing.assert_allclose(
        importance.normalize_log_weights(log_w, truncation=True), expected / expected.sum()
    )
    with pytest.raises(FloatingPointError, match="not finite"):
        importance.normalize_log_weights(np.array([0.0, np.nan]))


@pytest.mark.parametrize("latent", ["normal", "ln"])
def test_draws_are_aligned_with_expression(jaxvi_model, adata, latent):
    """The latent draw returned with each expression row decodes to that row (so the weights
    are computed for the draws that are resampled)."""
    model = jaxvi_model(adata, latent_distribution=latent, use_observed_lib_size=False)
    _, idx, source, bs = model._query_inputs(None, None, 16)
    rows = np.repeat(idx, 3)
    program = expression_and_latent_program(model.module, False)
    genes = jnp.arange(adata.n_vars, dtype=jnp.int32)
    query = Query(model.module, model.variables, source, rows, jax.random.key(1), bs)
    expr, u = run_query(program, query, jnp.int32(-1), genes, 1.0)
    assert expr.shape == (120, adata.n_vars)
    assert u.shape == (120, model.config.n_latent)
    assert not np.allclose(u[0], u[1])  # each row its own draw
    batch = source.minibatch(rows)
    z = jax.nn.softmax(u, -1) if latent == "ln" else u
    gen = model.module.apply(
        model.variables,
        jnp.asarray(z),
        jnp.zeros((120, 1)),
        batch,
        method=VAE.generative,
    )
    np.testing.assert_allclose(expr, gen.px_scale, rtol=1e-5, atol=1e-8)


def test_expression_resamples_with_the_weights(trained, monkeypatch):
    """``weights="importance"`` draws rows with the computed probabilities: with all weight
    on one row, every draw is that row; the kwargs reach the weight function."""
    seen = {}

    def one_hot(model, adata, indices, zs, transform_batch, batch_size, rows, **kwargs):
        seen.update(kwargs, rows=rows, zs=zs)
        p = np.zeros(len(rows))
        p[5] = 1.0
        return p

    monkeypatch.setattr(SCVI, "_importance_weights", one_hot)
    out = trained.get_normalized_expression(
        indices=np.arange(8),
        n_samples_overall=50,
        weights="importance",
        return_numpy=True,
        max_cells=4,
        truncation=True,
    )
    assert out.shape == (50, trained.adata.n_vars)
    np.testing.assert_array_equal(out, np.broadcast_to(out[0], out.shape))
    assert seen["max_cells"] == 4
    assert seen["truncation"] is True
    np.testing.assert_array_equal(seen["rows"], np.repeat(np.arange(8), 50 // 8 + 1))
    assert seen["zs"].shape == (8 * 7, trained.config.n_latent)


def test_importance_expression_and_de_run(trained):
    out = trained.get_normalized_expression(
        indices=np.arange(12),
        n_samples_overall=64,
        weights="importance",
        return_numpy=True,
        n_mc_samples=10,
        n_mc_samples_per_pass=5,
    )
    assert out.shape == (64, trained.adata.n_vars)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out.sum(1), 1.0, rtol=1e-4)
    de = trained.differential_expression(
        groupby="batch",
        weights="importance",
        importance_weighting_kwargs={
            "n_mc_samples": 10,
            "n_mc_samples_per_pass": 10,
            "max_cells": 8,
        },
        n_samples_overall=60,
        silent=True,
        mode="change",
    )
    uniform = trained.differential_expression(
        groupby="batch", n_samples_overall=60, silent=True, mode="change"
    )
    assert list(de.columns) == list(uniform.columns)
    assert de["proba_de"].between(0, 1).all()
    assert np.isfinite(de["lfc_mean"]).all()


def test_bad_input(trained):
    with pytest.raises(NotImplementedError, match="averaged across batches"):
        trained.get_normalized_expression(
            n_samples_overall=10,
            weights="importance",
            transform_batch=["b0", "b1"],
            return_numpy=True,
        )
    with pytest.raises(ValueError, match="weights"):
        trained.get_normalized_expression(weights="heavy")
    with pytest.raises(ValueError, match="zs must be"):
        trained.get_importance_weights(zs=np.zeros((40, 3)))
    with pytest.raises(ValueError, match="indices select"):
        trained.get_importance_weights(zs=np.zeros((39, trained.config.n_latent)))
    with pytest.raises(ValueError, match="max_cells"):
        trained.get_importance_weights(zs=np.zeros((40, trained.config.n_latent)), max_cells=0)


# ========================================================= parity with scvi-tools (same weights)
@pytest.mark.parametrize("truncation", [False, True])
def test_weights_match_scvi(trained, adata, monkeypatch, truncation):
    """Same weights, draws, anchors and anchor log p(x) (the Monte-Carlo part, fed to both):
    the normalised weights agree to 1e-4 relative."""
    scvi = pytest.importorskip("scvi")
    torch = pytest.importorskip("torch")
    from jaxvi.io.bridge import load_into_scvi_tools

    adata_t = adata.copy()
    scvi.model.SCVI.setup_anndata(adata_t, batch_key="batch")
    sm = scvi.model.SCVI(adata_t, n_hidden=16, n_latent=4)
    load_into_scvi_tools(sm, trained)
    sm.module.eval()

    cells = np.arange(5, 35)
    rng = np.random.default_rng(0)
    log_px = trained.get_marginal_ll(indices=cells, n_mc_samples=50, return_mean=False)
    monkeypatch.setattr(_importance, "get_marginal_ll", lambda *a, **k: log_px)
    monkeypatch.setattr(
        sm, "get_marginal_ll", lambda *a, **k: torch.tensor(log_px, dtype=torch.float32)
    )
    # z draws near the cells' posteriors: (3 samples, 30 cells, 4)
    _, idx, source, _ = trained._query_inputs(None, cells, None)
    inf = trained.module.apply(
        trained.variables, source.minibatch(idx), key=None, method=VAE.inference
    )
    zs = np.asarray(inf.qz_m) + np.sqrt(np.asarray(inf.qz_v)) * rng.normal(size=(3, 30, 4))
    zs = zs.astype(np.float32)

    x = torch.from_numpy(np.asarray(adata.X[cells], np.float32))
    bi = torch.from_numpy(adata.obs["batch"].cat.codes.to_numpy()[cells].astype(np.int64))[:, None]
    with torch.no_grad():
        qz = sm.module.inference(x, bi)["qz"]
        library = torch.log(x.sum(1, keepdim=True)).expand(3, -1, -1)
        px = sm.module.generative(torch.from_numpy(zs), library, bi)["px"]
        ref = sm.get_importance_weights(
            adata_t, cells, qz=qz, px=px, zs=torch.from_numpy(zs), truncation=truncation
        )
    ours = trained.get_importance_weights(indices=cells, zs=zs, truncation=truncation)
    assert ours.shape == ref.shape == (90,)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-7)
    assert ours.max() > 2 / 90  # not trivially uniform
