"""The latent space handed to scanpy at a realistic size, and the pin that keeps it working.

scanpy 1.11 finds neighbours exactly below 4,096 cells and with pynndescent above. pynndescent
0.7.0 returns a ``scipy.sparse.csr_array``, which scanpy 1.11.5 calls ``getnnz`` on:
``sc.pp.neighbors`` and jaxvi.criticism's Leiden clustering crash on 20,000 cells with
``AttributeError: 'csr_array' object has no attribute 'getnnz'``. The ``criticism`` and
``test`` extras pin ``pynndescent<0.7`` until scanpy handles it.
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

PIN = "pynndescent<0.7"
ROOT = Path(__file__).resolve().parents[2]


def test_extras_pin_pynndescent_and_the_environment_honours_it():
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for extra in ("criticism", "test"):
        assert PIN in extras[extra], f"[{extra}] lacks {PIN!r}: {extras[extra]}"
    try:
        installed = metadata.version("pynndescent")
    except metadata.PackageNotFoundError:
        pytest.skip("pynndescent is not installed")
    assert Requirement(PIN).specifier.contains(installed), (
        f"pynndescent {installed} is installed; scanpy's neighbours crash with it above "
        f"4,096 cells. Install {PIN!r}."
    )


@pytest.mark.slow  # pynndescent's numba compilation and nearest-neighbour descent on 20k cells
def test_neighbours_and_leiden_on_20k_cells():
    sc = pytest.importorskip("scanpy")
    pytest.importorskip("pynndescent")
    pytest.importorskip("leidenalg")
    import anndata

    from jaxvi.criticism import de_agreement

    rng = np.random.default_rng(0)
    n_cells, n_latent, k = 20_000, 10, 15
    adata = anndata.AnnData(np.zeros((n_cells, 1), np.float32))
    # Clustered like a trained latent space (cell types apart, cells spread within them),
    # rather than one isotropic Gaussian, on which nearest-neighbour descent converges slowest.
    centres = rng.normal(scale=3.0, size=(12, n_latent))
    z = centres[rng.integers(0, 12, n_cells)] + rng.normal(size=(n_cells, n_latent))
    adata.obsm["X_scVI"] = z.astype(np.float32)
    sc.pp.neighbors(adata, use_rep="X_scVI", n_neighbors=k, random_state=0)

    dist, conn = adata.obsp["distances"].tocsr(), adata.obsp["connectivities"]
    assert dist.shape == conn.shape == (n_cells, n_cells)
    assert conn.nnz >= n_cells * (k - 1)
    assert abs(conn - conn.T).max() < 1e-6  # the fuzzy union is symmetric
    # Approximate neighbours found by pynndescent against exact ones, on 500 cells.
    z = adata.obsm["X_scVI"]
    rows = rng.choice(n_cells, 500, replace=False)
    d2 = ((z[rows, None, :] - z[None, :, :]) ** 2).sum(-1)
    d2[np.arange(rows.size), rows] = np.inf
    exact = np.argsort(d2, axis=1)[:, : k - 1]
    hits = [len(set(dist[r].indices) - {r} & set(e)) for r, e in zip(rows, exact, strict=True)]
    assert np.mean(hits) / (k - 1) > 0.9, np.mean(hits)

    # jaxvi.criticism's differential-expression metrics cluster the observed cells with
    # Leiden (scanpy's PCA, neighbours, Leiden) when no groups are given. (On 6,000 cells this
    # passed with pynndescent 0.7.0 too; on 20,000 it crashed.)
    n_genes, n_types = 60, 4
    types = rng.integers(0, n_types, n_cells)
    means = rng.gamma(2.0, 2.0, size=(n_types, n_genes))
    raw = rng.poisson(means[types]).astype(np.float32)
    generated = rng.poisson(means[types]).astype(np.float32)
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"g{i}" for i in range(n_genes)])
    summary, lfc = de_agreement(raw, {"m": generated}, obs, var)
    # Leiden finds the four planted cell types (up to a few misassigned cells).
    assert len(summary) == n_types == len(lfc["m"])
    sizes = np.sort(summary["n_cells"].to_numpy())
    np.testing.assert_allclose(sizes, np.sort(np.bincount(types)), atol=100)
    assert (summary["lfc_pearson"] > 0.9).all()
