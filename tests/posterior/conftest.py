"""Data and model builders shared by the posterior tests."""

import anndata
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


@pytest.fixture(scope="session")
def make_adata():
    """:func:`_make_adata`, shared by this folder's tests."""
    return _make_adata


@pytest.fixture(scope="session")
def jaxvi_model():
    """:func:`_jaxvi_model`, shared by this folder's tests."""
    return _jaxvi_model
