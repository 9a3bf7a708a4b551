"""Data and model builders shared by the posterior tests."""

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from jaxvi import SCVI

N_GENES = 24


def _make_adata(n_cells: int, n_genes: int = N_GENES, n_batch: int = 2, seed: int = 0):
    """NB counts of three cell groups; obs ``batch`` with ``n_batch`` categories; no empty cell."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, n_cells)
    mu = rng.gamma(2.0, 2.0, size=(3, n_genes))[group] * rng.lognormal(0.0, 0.4, (n_cells, 1))
    x = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float32)
    x[:, 0] += 1.0
    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{i % n_batch}" for i in range(n_cells)])},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    return anndata.AnnData(x, obs=obs, var=var)


def _jaxvi_model(adata, **options) -> SCVI:
    adata = adata.copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_hidden=16, n_latent=4, **options)


def _set_params(model: SCVI, path: tuple[str, ...], fn) -> None:
    """Replace the parameter at ``path`` by ``fn(value)``."""
    params = jax.tree_util.tree_map(lambda a: a, model.variables["params"])
    node = params
    for name in path[:-1]:
        node = node[name]
    node[path[-1]] = jnp.asarray(fn(np.asarray(node[path[-1]])), jnp.float32)
    model.variables = {**model.variables, "params": params}


def _tighten_posterior(model: SCVI) -> None:
    """q(z | x) and q(l | x) at their floor variance 1e-4 (``exp(-30) + 1e-4``), so that
    draws differ from the posterior mean by ~0.01 and the decoded parameters by much less
    than the Monte-Carlo error of the tests below."""
    for enc in ("z_encoder", "l_encoder"):
        _set_params(model, (enc, "var_encoder", "kernel"), np.zeros_like)
        _set_params(model, (enc, "var_encoder", "bias"), lambda b: np.full_like(b, -30.0))


@pytest.fixture(scope="session")
def make_adata():
    """:func:`_make_adata`, shared by this folder's tests."""
    return _make_adata


@pytest.fixture(scope="session")
def jaxvi_model():
    """:func:`_jaxvi_model`, shared by this folder's tests."""
    return _jaxvi_model


@pytest.fixture(scope="session")
def set_params():
    """:func:`_set_params`, shared by this folder's tests."""
    return _set_params


@pytest.fixture(scope="session")
def tighten_posterior():
    """:func:`_tighten_posterior`, shared by this folder's tests."""
    return _tighten_posterior
