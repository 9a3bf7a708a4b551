"""jaxvi.data.synthetic_iid: scvi-tools' generator, its distributions, and the bundled files."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import scipy.sparse as sp

import jaxvi
from jaxvi.data import synthetic_iid


def test_defaults_shapes_and_fields():
    a = synthetic_iid(seed=0)
    assert a.shape == (400, 100)
    assert isinstance(a.X, np.ndarray)
    assert a.X.dtype == np.int64
    assert list(a.var_names[:2]) == ["gene_0", "gene_1"]
    assert list(a.obs["batch"].cat.categories) == ["batch_0", "batch_1"]
    assert (a.obs["batch"].iloc[:200] == "batch_0").all()
    assert (a.obs["batch"].iloc[200:] == "batch_1").all()
    assert set(a.obs["labels"].cat.categories) == {"label_0", "label_1", "label_2"}
    assert a.obsm["protein_expression"].shape == (400, 100)
    assert a.obsm["accessibility"].shape == (400, 100)
    assert a.uns["protein_names"][0] == "protein_0"


def test_distributions_match_the_reference_formulas():
    # NB(5, 0.3): mean 5 * 0.7 / 0.3, P(0) = 0.3^5; kept with probability 0.7
    a = synthetic_iid(batch_size=5000, n_batches=2, n_proteins=0, n_regions=0, seed=1)
    x = a.X
    keep = 0.7
    nb_mean, nb_p0 = 5 * 0.7 / 0.3, 0.3**5
    assert x.mean() == pytest.approx(keep * nb_mean, rel=0.01)
    assert (x == 0).mean() == pytest.approx(1 - keep + keep * nb_p0, abs=0.003)
    nonzero = x[x > 0]
    assert nonzero.var() == pytest.approx(
        (5 * 0.7 / 0.09 + nb_mean**2) / (1 - nb_p0) - (nb_mean / (1 - nb_p0)) ** 2, rel=0.03
    )
    counts = a.obs["labels"].value_counts(normalize=True)
    assert np.allclose(counts.to_numpy(), 1 / 3, atol=0.02)


def test_dropout_ratio_is_the_probability_of_keeping():
    a = synthetic_iid(dropout_ratio=0.2, n_proteins=0, n_regions=0, seed=2)
    assert (a.X == 0).mean() == pytest.approx(0.8, abs=0.02)


def test_seed_reproduces_and_differs():
    a, b, c = synthetic_iid(seed=5), synthetic_iid(seed=5), synthetic_iid(seed=6)
    assert np.array_equal(a.X, b.X)
    assert not np.array_equal(a.X, c.X)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"sparse_format": "csr_matrix", "n_labels": 5, "batch_size": 30, "n_batches": 3},
        {"n_proteins": 0, "n_regions": 0, "n_labels": 0, "generate_coordinates": True},
    ],
)
def test_equals_scvi_tools_with_the_same_numpy_seed(kwargs):
    scvi = pytest.importorskip("scvi")
    ours = synthetic_iid(seed=11, **kwargs)
    np.random.seed(11)  # noqa: NPY002 - scvi-tools draws from the global generator
    ref = scvi.data.synthetic_iid(**kwargs)
    xa, xb = ours.X, ref.X
    assert type(xa) is type(xb)
    if sp.issparse(xa):
        xa, xb = xa.toarray(), xb.toarray()
    assert np.array_equal(xa, xb)
    assert list(ours.var_names) == list(ref.var_names)
    assert ours.obs.columns.tolist() == ref.obs.columns.tolist()
    for col in ref.obs.columns:
        assert ours.obs[col].tolist() == ref.obs[col].tolist()
        assert list(ours.obs[col].cat.categories) == list(ref.obs[col].cat.categories)
    assert sorted(ours.obsm.keys()) == sorted(ref.obsm.keys())
    for key in ref.obsm:
        va, vb = ours.obsm[key], ref.obsm[key]
        if sp.issparse(va):
            va, vb = va.toarray(), vb.toarray()
        assert np.array_equal(va, vb)


def test_mudata_output():
    pytest.importorskip("mudata")
    md = synthetic_iid(return_mudata=True, seed=0)
    assert set(md.mod) == {"rna", "accessibility", "protein_expression"}
    assert md.mod["rna"].shape == (400, 100)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout_ratio": 1.5}, "probability of keeping"),
        ({"sparse_format": "coo"}, "sparse_format"),
        ({"batch_size": 0}, "batch_size"),
        ({"n_labels": -1}, "n_labels"),
        ({"rna_dist": "poisson"}, "rna_dist"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_iid(**kwargs)


def test_bundled_files_and_datasets_still_load():
    files = {p.name for p in (resources.files("jaxvi") / "data").iterdir()}
    assert {"pbmc68k_reduced_counts.h5ad", "pbmc_small.h5ad", "README.md"} <= files
    assert jaxvi.data.pbmc_small().shape == (80, 230)
    assert jaxvi.data.synthetic_iid is synthetic_iid
