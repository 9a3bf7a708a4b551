"""The SCVI class: setup, bad input, training outputs, queries, save/load round trip."""

import json
import os

import numpy as np
import pandas as pd
import pytest

import jaxvi
from jaxvi import SCVI


@pytest.fixture(scope="module")
def trained(make_adata):
    adata = make_adata()
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    model = SCVI(adata, n_hidden=32, n_latent=5)
    model.train(max_epochs=3, batch_size=32, check_val_every_n_epoch=1, enable_progress_bar=False)
    return adata, model


# ------------------------------------------------------------------ setup / bad input
def test_setup_writes_codes_and_registry(make_adata):
    adata = make_adata()
    SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    np.testing.assert_array_equal(adata.obs["_scvi_batch"], (np.arange(120) % 2))
    reg = adata.uns["_jaxvi"]
    assert reg["batch_categories"] == ["a", "b"]
    assert reg["summary_stats"]["n_labels"] == 3


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (lambda a: a.X.data.__setitem__(0, -1.0), "negative"),
        (lambda a: a.X.data.__setitem__(0, np.nan), "NaN or infinite"),
        (lambda a: a.X.data.__setitem__(0, np.inf), "NaN or infinite"),
    ],
)
def test_setup_rejects_bad_counts(make_adata, bad, match):
    adata = make_adata()
    bad(adata)
    with pytest.raises(ValueError, match=match):
        SCVI.setup_anndata(adata)


def test_setup_warns_on_non_integer_counts(make_adata):
    adata = make_adata()
    adata.X.data[0] = 0.5
    with pytest.warns(UserWarning, match="non-integer"):
        SCVI.setup_anndata(adata)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_key": "nope"}, "nope"),
        ({"layer": "counts"}, "Layer 'counts' not found"),
        ({"continuous_covariate_keys": ["cell_type"]}, "must be numeric"),
    ],
)
def test_setup_rejects_missing_keys(make_adata, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SCVI.setup_anndata(make_adata(), **kwargs)


def test_setup_rejects_empty_adata(make_adata):
    with pytest.raises(ValueError, match="empty"):
        SCVI.setup_anndata(make_adata()[:0].copy())


def test_model_needs_setup_and_valid_options(make_adata):
    adata = make_adata()
    with pytest.raises(ValueError, match="setup_anndata"):
        SCVI(adata)
    SCVI.setup_anndata(adata)
    with pytest.raises(ValueError, match="gene_likelihood"):
        SCVI(adata, gene_likelihood="negative_binomial")
    with pytest.raises(ValueError, match="dispersion"):
        SCVI(adata, dispersion="gene-sample")
    with pytest.raises(TypeError, match="unexpected"):
        SCVI(adata, n_hiden=3)


def test_train_rejects_unknown_arguments(make_adata):
    adata = make_adata()
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8)
    with pytest.raises(ValueError, match="Unknown plan_kwargs"):
        model.train(max_epochs=1, plan_kwargs={"learning_rate": 1.0})
    with pytest.raises(TypeError, match="unexpected"):
        model.train(max_epochs=1, max_step=3)
    assert not model.is_trained


# ------------------------------------------------------------------ trained model
def test_history_has_reference_keys(trained):
    _, model = trained
    expected = {
        "train_loss",
        "elbo_train",
        "reconstruction_loss_train",
        "kl_local_train",
        "kl_global_train",
        "kl_weight",
        "validation_loss",
        "elbo_validation",
        "reconstruction_loss_validation",
        "kl_local_validation",
        "kl_global_validation",
    }
    assert set(model.history) == expected
    for key, frame in model.history.items():
        assert list(frame.columns) == [key]
        assert frame.index.name == "epoch"
        assert list(frame.index) == [0, 1, 2]
    assert model.is_trained
    assert len(model.train_indices) + len(model.validation_indices) == 120
    assert "Training status: Trained" in repr(model)


def test_latent_representation(trained):
    adata, model = trained
    z = model.get_latent_representation()
    assert z.shape == (120, 5)
    assert z.dtype == np.float32
    np.testing.assert_array_equal(z, model.get_latent_representation())  # deterministic mean
    m, v = model.get_latent_representation(return_dist=True)
    np.testing.assert_array_equal(m, z)
    assert np.all(v > 1e-4)
    s1 = model.get_latent_representation(give_mean=False)
    s2 = model.get_latent_representation(give_mean=False)
    assert not np.array_equal(s1, s2)
    sub = model.get_latent_representation(indices=[5, 3])
    np.testing.assert_array_equal(sub, z[[5, 3]])


def test_normalized_expression_defaults_and_shapes(trained):
    adata, model = trained
    e = model.get_normalized_expression()
    assert isinstance(e, pd.DataFrame)
    assert e.shape == (120, 40)
    assert list(e.index) == list(adata.obs_names)
    assert list(e.columns) == list(adata.var_names)
    np.testing.assert_allclose(e.sum(1), 1.0, rtol=1e-5)
    assert not np.array_equal(e.to_numpy(), model.get_normalized_expression().to_numpy())
    s = model.get_normalized_expression(n_samples=4, return_mean=False, return_numpy=True)
    assert s.shape == (4, 120, 40)
    g = model.get_normalized_expression(gene_list=["gene3", "gene1"], library_size=1e4)
    assert list(g.columns) == ["gene3", "gene1"]
    assert g.to_numpy().max() > 1.0
    lat = model.get_normalized_expression(library_size="latent", return_numpy=True)
    lib = np.asarray(adata.X.sum(1)).ravel()
    np.testing.assert_allclose(lat.sum(1), lib, rtol=1e-4)  # px_rate sums to the library
    overall = model.get_normalized_expression(n_samples_overall=50, return_numpy=True)
    assert overall.shape == (50, 40)
    with pytest.raises(ValueError, match="gene_list"):
        model.get_normalized_expression(gene_list=["nope"])


def test_transform_batch(trained):
    _, model = trained
    a = model.get_normalized_expression(transform_batch="a", n_samples=1, return_numpy=True)
    assert a.shape == (120, 40)
    with pytest.raises(ValueError, match="not a batch category"):
        model.get_normalized_expression(transform_batch="zzz")
    both = model.get_normalized_expression(transform_batch=["a", "b"], return_numpy=True)
    np.testing.assert_allclose(both.sum(1), 1.0, rtol=1e-5)


def test_elbo_and_reconstruction_signs(trained):
    _, model = trained
    elbo = model.get_elbo(indices=model.validation_indices)
    rec = model.get_reconstruction_error()["reconstruction_loss"]
    assert elbo < 0
    assert rec > 0
    per_cell = model.get_elbo(return_mean=False)
    assert per_cell.shape == (120,)


def test_inference_on_new_adata_with_same_genes(make_adata, trained):
    adata, model = trained
    new = make_adata(n=30, seed=5)
    z = model.get_latent_representation(new)
    assert z.shape == (30, 5)
    other = make_adata(n=30, g=41, seed=5)
    with pytest.raises(ValueError, match="genes"):
        model.get_latent_representation(other)
    unseen = make_adata(n=30, seed=5)
    unseen.obs["batch"] = "c"
    with pytest.raises(ValueError, match="categories the model was not set up with"):
        model.get_latent_representation(unseen)


def test_save_load_round_trip_is_exact(trained, tmp_path):
    adata, model = trained
    path = str(tmp_path / "m")
    model.save(path, save_anndata=True)
    with pytest.raises(ValueError, match="overwrite"):
        model.save(path)
    model.save(path, overwrite=True, save_anndata=True)
    assert sorted(os.listdir(path)) == ["adata.h5ad", "model.json", "model.npz"]
    with open(os.path.join(path, "model.json")) as f:
        assert json.load(f)["model_name"] == "SCVI"
    for loaded in (SCVI.load(path, adata=adata), SCVI.load(path)):
        np.testing.assert_array_equal(
            loaded.get_latent_representation(), model.get_latent_representation()
        )
        assert loaded.is_trained
        assert repr(loaded) == repr(model)
        for k in model.history:
            pd.testing.assert_frame_equal(loaded.history[k], model.history[k])
        np.testing.assert_array_equal(loaded.train_indices, model.train_indices)
    # Same key stream after loading: stochastic outputs match too.
    a = SCVI.load(path, adata=adata).get_normalized_expression(return_numpy=True)
    b = SCVI.load(path, adata=adata).get_normalized_expression(return_numpy=True)
    np.testing.assert_array_equal(a, b)


def test_load_refuses_pickles_and_garbage(trained, tmp_path):
    _, model = trained
    path = str(tmp_path / "m")
    model.save(path)
    np.savez(os.path.join(path, "model.npz"), evil=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        SCVI.load(path)
    with open(os.path.join(path, "model.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="corrupted"):
        SCVI.load(path)
    with pytest.raises(FileNotFoundError):
        SCVI.load(str(tmp_path / "nothing"))


# ------------------------------------------------------------------ options
@pytest.mark.parametrize(
    ("setup", "init"),
    [
        ({"batch_key": "batch"}, {"gene_likelihood": "nb", "dispersion": "gene-batch"}),
        (
            {
                "batch_key": "batch",
                "categorical_covariate_keys": ["donor"],
                "continuous_covariate_keys": ["age"],
            },
            {"use_observed_lib_size": False, "n_layers": 2, "latent_distribution": "ln"},
        ),
        ({"size_factor_key": "sf"}, {"gene_likelihood": "poisson"}),
        (
            {"batch_key": "batch", "labels_key": "cell_type"},
            {
                "dispersion": "gene-label",
                "batch_representation": "embedding",
                "use_layer_norm": "both",
                "use_batch_norm": "none",
                "encode_covariates": True,
            },
        ),
    ],
)
def test_options_train_and_round_trip(make_adata, setup, init, tmp_path):
    adata = make_adata(n=64, sparse=False)
    SCVI.setup_anndata(adata, **setup)
    model = SCVI(adata, n_hidden=16, n_latent=3, **init)
    model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
    z = model.get_latent_representation()
    assert np.all(np.isfinite(z))
    assert z.shape == (64, 3)
    assert np.isfinite(model.get_elbo())
    model.save(str(tmp_path / "m"))
    loaded = SCVI.load(str(tmp_path / "m"), adata=adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(), z)


def test_same_seed_same_model(make_adata):
    def run():
        adata = make_adata(n=64)
        SCVI.setup_anndata(adata)
        m = SCVI(adata, n_hidden=16, n_latent=3)
        m.train(max_epochs=2, batch_size=32, enable_progress_bar=False)
        return m.get_latent_representation(), m.history["train_loss"]

    (z1, h1), (z2, h2) = run(), run()
    np.testing.assert_array_equal(z1, z2)
    pd.testing.assert_frame_equal(h1, h2)


def test_builtin_dataset():
    adata = jaxvi.data.pbmc68k_reduced()
    assert adata.shape == (700, 765)
    assert adata.obs["bulk_labels"].nunique() == 10
    x = adata.X.data
    assert np.all(x == np.round(x))
    assert np.all(x >= 0)


def test_registered_likelihood_plugs_into_the_model(make_adata):
    import jax.numpy as jnp

    from jaxvi import likelihoods as lk

    lik = lk.Likelihood(
        "test-geometric",
        log_prob=lambda x, p: lk.nb_log_prob(x, p.mu, 1.0),
        sample=lambda key, p: lk.get_likelihood("nb").sample(
            key, p._replace(theta=jnp.ones_like(p.mu))
        ),
        mean=lambda p: p.mu,
        variance=lambda p: p.mu + p.mu**2,
        uses_theta=False,
    )
    lk.register_likelihood(lik)
    try:
        adata = make_adata(n=64)
        SCVI.setup_anndata(adata)
        model = SCVI(adata, n_hidden=16, n_latent=3, gene_likelihood="test-geometric")
        model.train(max_epochs=1, batch_size=32, enable_progress_bar=False)
        from scipy import stats

        from jaxvi.data import gather, to_device
        from jaxvi.data.registry import registry_arrays
        from jaxvi.module import VAE, vae_loss

        batch = gather(to_device(registry_arrays(adata, model.registry_)), jnp.arange(64))
        out, _ = vae_loss(model.module, model.variables, batch, key=None, training=False)
        inf = model.module.apply(model.variables, batch, key=None, method=VAE.inference)
        gen = model.module.apply(model.variables, inf.z, inf.library, batch, method=VAE.generative)
        mu = np.asarray(gen.px_rate, np.float64)
        x = adata.X.toarray()
        expected = -stats.nbinom.logpmf(x, 1, 1.0 / (1.0 + mu)).sum(1)  # geometric NLL
        np.testing.assert_allclose(out.reconstruction_loss, expected, rtol=1e-4)
    finally:
        if "test-geometric" in lk.available_likelihoods():
            lk.unregister_likelihood("test-geometric")


def test_posterior_methods_are_wired(trained):
    adata, model = trained
    params = model.get_likelihood_parameters()
    assert set(params) == {"mean", "dropout", "dispersions"}
    assert params["mean"].shape == (120, 40)
    pp = model.posterior_predictive_sample(n_samples=2)
    assert pp.shape == (120, 40, 2)
    ll = model.get_marginal_ll(n_mc_samples=20, n_mc_samples_per_pass=10)
    assert ll < 0
    lib = model.get_latent_library_size(give_mean=False)
    np.testing.assert_allclose(lib[:, 0], np.asarray(adata.X.sum(1)).ravel(), rtol=1e-5)
    corr = model.get_feature_correlation_matrix(n_samples=2)
    assert corr.shape == (40, 40)
