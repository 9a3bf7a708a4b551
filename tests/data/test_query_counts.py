"""Issue 17, defect 6 (and 4 on the query path): counts that reach a query without going
through ``setup_anndata`` are checked where they are read. NaN, infinite or negative values
and broken CSR structure give a ``ValueError`` naming the matrix in every query method, in
memory and backed, instead of NaN results, -1 samples or an out-of-bounds densification."""

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jaxvi import SCVI


def _adata(n=40, g=12, seed=0):
    rng = np.random.default_rng(seed)
    a = ad.AnnData(rng.negative_binomial(3, 0.3, size=(n, g)).astype(np.float32))
    a.obs["batch"] = pd.Categorical(np.where(np.arange(n) % 2, "a", "b"))
    return a


@pytest.fixture(scope="module")
def model():
    a = _adata()
    SCVI.setup_anndata(a, batch_key="batch")
    m = SCVI(a, n_hidden=8, n_latent=3)
    m.train(max_epochs=1, batch_size=16, enable_progress_bar=False)
    return m


QUERIES = {
    "get_latent_representation": lambda m, q: m.get_latent_representation(q),
    "get_normalized_expression": lambda m, q: m.get_normalized_expression(q),
    "get_elbo": lambda m, q: m.get_elbo(q),
    "get_marginal_ll": lambda m, q: m.get_marginal_ll(q, n_mc_samples=2),
    "get_reconstruction_error": lambda m, q: m.get_reconstruction_error(q),
    "posterior_predictive_sample": lambda m, q: m.posterior_predictive_sample(q),
    "get_likelihood_parameters": lambda m, q: m.get_likelihood_parameters(q),
    "get_latent_library_size": lambda m, q: m.get_latent_library_size(q),
    "differential_expression": lambda m, q: m.differential_expression(q, groupby="batch"),
}


def _bad(kind: str, sparse: bool) -> ad.AnnData:
    q = _adata(seed=1)
    x = q.X.copy()
    x[3, 2] = {"nan": np.nan, "inf": np.inf, "negative": -1.0}[kind]
    q.X = sp.csr_matrix(x) if sparse else x
    return q


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_every_query_refuses_bad_counts(model, name):
    """The counts the table in the issue reported as silent NaN (8 of 9 methods) or -1
    samples: each method raises, for dense and CSR input."""
    for kind, match in (("nan", "NaN or infinite"), ("negative", "negative values")):
        for sparse in (False, True):
            with pytest.raises(ValueError, match=f"adata.X contains {match}"):
                QUERIES[name](model, _bad(kind, sparse))
    with pytest.raises(ValueError, match="NaN or infinite"):
        QUERIES[name](model, _bad("inf", False))


def test_query_refuses_broken_csr_structure(model):
    q = _adata(seed=1)
    x = sp.csr_matrix(q.X)
    x.indices[5] = q.n_vars + 3  # past the last gene: scipy's toarray would write out of bounds
    q.X = x
    with pytest.raises(ValueError, match=r"broken CSR matrix: it holds column index 15"):
        model.get_latent_representation(q)


@pytest.mark.parametrize("layout", ["csr", "dense"])
def test_backed_query_refuses_bad_counts(model, tmp_path, layout):
    """A backed AnnData is read in bounded pieces; each piece is checked as it is read."""
    q = _bad("negative", sparse=layout == "csr")
    path = tmp_path / "q.h5ad"
    q.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match="adata.X contains negative values"):
        model.get_latent_representation(backed)
    backed.file.close()


def test_backed_query_refuses_an_index_past_the_last_gene(model, tmp_path):
    q = _adata(seed=1)
    q.X = sp.csr_matrix(q.X)
    path = tmp_path / "q.h5ad"
    q.write_h5ad(path)
    with h5py.File(path, "r+") as f:
        f["X/indices"][0] = q.n_vars + 100
    backed = ad.read_h5ad(path, backed="r")
    with pytest.raises(ValueError, match="broken CSR matrix: it holds column index 112"):
        model.get_latent_representation(backed)
    backed.file.close()


def test_clean_query_still_works(model):
    z = model.get_latent_representation(_adata(seed=1))
    assert z.shape == (40, 3)
    assert np.all(np.isfinite(z))
