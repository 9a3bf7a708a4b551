"""Data builders shared by the model tests."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def _make_adata(n=120, g=40, seed=0, sparse=True):
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, n)
    means = rng.gamma(2.0, 2.0, size=(3, g))
    x = rng.poisson(means[group] * rng.gamma(5.0, 0.2, size=(n, 1))).astype(np.float32)
    x[:, 0] += 1  # no empty cells
    obs = pd.DataFrame(
        {
            "batch": np.where(np.arange(n) % 2 == 0, "a", "b"),
            "cell_type": [f"t{i}" for i in group],
            "donor": rng.choice(["d1", "d2", "d3"], n),
            "age": rng.normal(40, 10, n),
            "sf": x.sum(1) / x.sum(1).mean(),
        },
        index=[f"cell{i}" for i in range(n)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(g)])
    return anndata.AnnData(sp.csr_matrix(x) if sparse else x, obs=obs, var=var)


@pytest.fixture(scope="session")
def make_adata():
    """:func:`_make_adata`, shared by this folder's tests."""
    return _make_adata
