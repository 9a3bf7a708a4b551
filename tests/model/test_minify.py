"""Minified models: the AnnData keeps q(z | x) and library sizes instead of the counts."""

import numpy as np
import pytest

from jaxvi import SCVI


@pytest.fixture(scope="module")
def saved(make_adata, tmp_path_factory):
    adata = make_adata(n=64)
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=2, batch_size=32, enable_progress_bar=False)
    path = str(tmp_path_factory.mktemp("m") / "model")
    model.save(path, save_anndata=True)
    return path


def _with_posterior(path):
    model = SCVI.load(path)
    qzm, qzv = model.get_latent_representation(return_dist=True)
    model.adata.obsm["X_latent_qzm"] = qzm
    model.adata.obsm["X_latent_qzv"] = qzv
    return model


def test_minified_model_gives_the_same_outputs(saved):
    full, mini = _with_posterior(saved), _with_posterior(saved)
    lib = np.asarray(full.adata.X.sum(1)).ravel()
    mini.minify_adata()
    assert mini.minified_data_type == "latent_posterior_parameters"
    assert full.minified_data_type is None
    assert mini.adata.X.nnz == 0
    np.testing.assert_allclose(mini.adata.obs["observed_lib_size"], lib)
    np.testing.assert_array_equal(
        mini.get_latent_representation(), full.get_latent_representation()
    )
    # Same key stream, same posterior: the same z samples, so the same expression.
    a = full.get_normalized_expression(library_size="latent", return_numpy=True)
    b = mini.get_normalized_expression(library_size="latent", return_numpy=True)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b.sum(1), lib, rtol=1e-4)


def test_minified_model_refuses_what_needs_counts(saved, tmp_path):
    mini = _with_posterior(saved)
    mini.minify_adata()
    for call in (mini.get_elbo, mini.get_reconstruction_error):
        with pytest.raises(ValueError, match="does not support minified data"):
            call()
    with pytest.raises(ValueError, match="cannot be trained"):
        mini.train(max_epochs=1)
    mini.save(str(tmp_path / "mini"), save_anndata=True)
    again = SCVI.load(str(tmp_path / "mini"))
    assert again.minified_data_type == "latent_posterior_parameters"
    np.testing.assert_array_equal(
        again.get_latent_representation(), mini.get_latent_representation()
    )


def test_minify_with_counts_keeps_x_and_evidence(saved):
    model = _with_posterior(saved)
    model.minify_adata("latent_posterior_parameters_with_counts")
    assert model.adata.X.nnz > 0
    assert np.isfinite(model.get_elbo())


def test_minify_bad_requests(make_adata, saved):
    model = SCVI.load(saved)
    with pytest.raises(ValueError, match="X_latent_qzm"):
        model.minify_adata()
    with pytest.raises(NotImplementedError, match="not supported"):
        model.minify_adata("everything")
    adata = make_adata(n=32)
    SCVI.setup_anndata(adata)
    latent_lib = SCVI(adata, n_hidden=8, use_observed_lib_size=False)
    with pytest.raises(ValueError, match="observed library size"):
        latent_lib.minify_adata()
