"""The ``jaxvi.SCANVI`` model class: scvi-tools 1.4.2's ``SCANVI`` API on jaxvi's engine.

Without scvi-tools: the API and its defaults, the labels registry (the unlabelled category's
code, the class count) and its errors, the classifier options, semi-supervised training
(history names, the split of labelled and unlabelled cells), ``predict`` (hard labels are the
argmax of the soft probabilities), the queries inherited from scVI (likelihood parameters
and posterior predictive counts consistent with each other, the ELBO terms' signs, the
importance-sampled marginal likelihood growing with its draws), save / load,
``from_scvi_model`` (every scVI weight copied; what ``train`` then hands the engine: the
shorter default epoch count, ``classification_ratio``, ``n_samples_per_label``) and
``load_query_data`` (label transfer: frozen networks unchanged by query training). With
scvi-tools (skipped otherwise): the label codes, the architecture and the semi-supervised
split equal scvi-tools', and the same weights loaded into scvi-tools' ``SCANVI`` give the
same class probabilities, the same validation classification metrics (computed by
scvi-tools over its own validation loader) and the same inherited queries (exact where
deterministic, within Monte-Carlo error otherwise)."""

from __future__ import annotations

import inspect
import itertools
import warnings

import anndata
import jax
import numpy as np
import pandas as pd
import pytest

import jaxvi
from jaxvi import SCANVI, SCVI
from jaxvi.io.bridge import leaf_paths
from jaxvi.io.scanvi_bridge import scanvae_config_from_scvi
from jaxvi.model._scanvi_parts import model_n_labels, scanvi_config, semi_supervised_split
from jaxvi.module import scanvae_model_def

UNKNOWN = "Unknown"
SMALL = {"n_hidden": 16, "n_latent": 4}
BATCH = 32
# Posterior draws per cell of the likelihood-parameter and posterior-predictive queries (the
# same count everywhere: one compiled program each).
N_DRAWS = 40
# scvi-tools 1.4.2's history keys after SCANVI.train(check_val_every_n_epoch=1).
HISTORY_KEYS = {
    "train_loss",
    "elbo_train",
    "reconstruction_loss_train",
    "kl_local_train",
    "kl_global_train",
    "train_classification_loss",
    "train_accuracy",
    "train_f1_score",
    "train_calibration_error",
    "validation_loss",
    "elbo_validation",
    "reconstruction_loss_validation",
    "kl_local_validation",
    "kl_global_validation",
    "validation_classification_loss",
    "validation_accuracy",
    "validation_f1_score",
    "validation_calibration_error",
}


class _Captured(Exception):
    """Raised by a stand-in for the engine once it has seen its arguments."""


def labelled(make_adata, n=120, seed=0) -> anndata.AnnData:
    """``obs["lab"]``: the cell type, every third cell ``Unknown``."""
    adata = make_adata(n=n, g=30, seed=seed)
    lab = adata.obs["cell_type"].astype(str).to_numpy().copy()
    lab[::3] = UNKNOWN
    adata.obs["lab"] = lab
    return adata


@pytest.fixture(scope="module")
def trained(make_adata):
    """A small SCANVI trained 2 epochs with validation (4 steps, labelled batches cycled)."""
    adata = labelled(make_adata)
    SCANVI.setup_anndata(adata, labels_key="lab", unlabeled_category=UNKNOWN, batch_key="batch")
    model = SCANVI(adata, **SMALL)
    model.train(
        max_epochs=2, batch_size=BATCH, check_val_every_n_epoch=1, enable_progress_bar=False
    )
    return model


# ------------------------------------------------------------------------------------ API
def test_api_and_defaults():
    assert jaxvi.SCANVI is jaxvi.model.SCANVI
    init = inspect.signature(SCANVI.__init__).parameters
    expected = {
        "n_hidden": 128,
        "n_latent": 10,
        "n_layers": 1,
        "dropout_rate": 0.1,
        "dispersion": "gene",
        "gene_likelihood": "zinb",
        "use_observed_lib_size": True,
        "linear_classifier": False,
    }
    assert {k: init[k].default for k in expected} == expected
    train = inspect.signature(SCANVI.train).parameters
    assert list(train)[1:8] == [
        "max_epochs",
        "n_samples_per_label",
        "check_val_every_n_epoch",
        "train_size",
        "validation_size",
        "shuffle_set_split",
        "batch_size",
    ]
    assert train["train_size"].default == 0.9
    assert train["batch_size"].default == 128
    assert train["n_samples_per_label"].default is None
    predict = inspect.signature(SCANVI.predict).parameters
    assert list(predict)[1:5] == ["adata", "indices", "soft", "batch_size"]
    assert predict["soft"].default is False
    setup = list(inspect.signature(SCANVI.setup_anndata).parameters)
    assert setup[:4] == ["adata", "labels_key", "unlabeled_category", "layer"]
    scvi_init = list(inspect.signature(SCANVI.from_scvi_model).parameters)
    assert scvi_init[:4] == ["scvi_model", "unlabeled_category", "labels_key", "adata"]


def test_label_codes_put_the_unlabelled_category_last(make_adata):
    adata = make_adata(n=40, g=10)
    adata.obs["lab"] = pd.Categorical(
        np.array([UNKNOWN, "a", "b", "c"])[np.arange(40) % 4], categories=[UNKNOWN, "a", "b", "c"]
    )
    SCANVI.setup_anndata(adata, labels_key="lab", unlabeled_category=UNKNOWN)
    assert adata.uns["_jaxvi"]["labels_categories"] == ["c", "a", "b", UNKNOWN]  # a swap
    codes = dict(zip(adata.obs["lab"].astype(str), adata.obs["_scvi_labels"], strict=True))
    assert codes == {"c": 0, "a": 1, "b": 2, UNKNOWN: 3}
    registry = adata.uns["_jaxvi"]
    assert registry["setup_args"]["unlabeled_category"] == UNKNOWN
    assert model_n_labels(registry, adata.obs["lab"].astype(str).to_numpy()) == 3


def test_absent_unlabelled_category_is_appended(make_adata):
    """scvi-tools' behaviour (kept: a fully labelled reference set up with a placeholder is
    common), with a warning naming the category and the column: every cell is labelled."""
    adata = make_adata(n=40, g=10)
    absent = r"unlabeled_category 'none' labels no cell of adata.obs\['{}'\]: every cell is "
    with pytest.warns(UserWarning, match=absent.format("cell_type") + "treated as labelled"):
        SCANVI.setup_anndata(adata, labels_key="cell_type", unlabeled_category="none")
    registry = adata.uns["_jaxvi"]
    assert registry["labels_categories"] == ["t0", "t1", "t2", "none"]
    assert model_n_labels(registry, adata.obs["cell_type"].astype(str).to_numpy()) == 3
    np.testing.assert_array_equal(
        adata.obs["_scvi_labels"], adata.obs["cell_type"].map({"t0": 0, "t1": 1, "t2": 2})
    )
    # scvi-tools' quirk: no unlabelled cell and an unused category: every category counts
    adata.obs["lab"] = pd.Categorical(adata.obs["cell_type"], categories=["t0", "t1", "t2", "t3"])
    with pytest.warns(UserWarning, match=absent.format("lab")):
        SCANVI.setup_anndata(adata, labels_key="lab", unlabeled_category="none")
    assert model_n_labels(adata.uns["_jaxvi"], adata.obs["lab"].astype(str).to_numpy()) == 5
    # an unused category of the column: kept in place, the same warning
    unused = ["none", "t0", "t1", "t2"]
    adata.obs["lab"] = pd.Categorical(adata.obs["cell_type"], categories=unused)
    with pytest.warns(UserWarning, match=absent.format("lab")):
        SCANVI.setup_anndata(adata, labels_key="lab", unlabeled_category="none")
    assert adata.uns["_jaxvi"]["labels_categories"] == unused
    # a category some cell carries: no warning
    adata.obs["lab"] = adata.obs["cell_type"].astype(str).where(np.arange(40) % 4 > 0, "none")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SCANVI.setup_anndata(adata, labels_key="lab", unlabeled_category="none")
    assert not [w for w in caught if "unlabeled_category" in str(w.message)]
    assert adata.uns["_jaxvi"]["labels_categories"][-1] == "none"


def test_setup_and_constructor_errors(make_adata):
    adata = make_adata(n=40, g=10)
    adata.obs["lab"] = adata.obs["cell_type"].astype(object)
    adata.obs.iloc[3, adata.obs.columns.get_loc("lab")] = np.nan
    with pytest.raises(ValueError, match="missing values"):
        SCANVI.setup_anndata(adata, labels_key="lab", unlabeled_category=UNKNOWN)
    with pytest.raises(KeyError, match="nope"):
        SCANVI.setup_anndata(adata, labels_key="nope", unlabeled_category=UNKNOWN)
    with pytest.raises(ValueError, match="labels_key"):
        SCANVI.setup_anndata(adata, labels_key=None, unlabeled_category=UNKNOWN)
    SCVI.setup_anndata(adata, labels_key="cell_type")
    with pytest.raises(ValueError, match="not set up for scANVI"):
        SCANVI(adata)
    with pytest.warns(UserWarning, match="every cell is treated as labelled"):
        SCANVI.setup_anndata(adata, labels_key="cell_type", unlabeled_category=UNKNOWN)
    with pytest.raises(ValueError, match="classifier_parameters"):
        SCANVI(adata, classifier_parameters={"activation_fn": None})
    with pytest.raises(ValueError, match="label groups"):
        SCANVI(adata, use_labels_groups=True, labels_groups=[0, 0, 1])
    with pytest.raises(ValueError, match="gene-label"):
        SCANVI(adata, dispersion="gene-label")
    with pytest.raises(TypeError, match="unexpected"):
        SCANVI(adata, not_an_option=1)
    with pytest.raises(TypeError, match="reference_model"):
        SCANVI.load_query_data(adata, object())
    only = make_adata(n=20, g=10)
    only.obs["lab"] = UNKNOWN
    SCANVI.setup_anndata(only, labels_key="lab", unlabeled_category=UNKNOWN)
    with pytest.raises(ValueError, match="at least one class"):
        SCANVI(only)


def test_untrained_model_does_not_predict(trained):
    model = SCANVI(trained.adata, **SMALL)  # the fixture's configuration: nothing compiles
    assert model.n_labels == 3
    assert model.unlabeled_category_ == UNKNOWN
    assert not model.is_trained
    with pytest.raises(RuntimeError, match="not been trained"):
        model.predict()


def params(**options) -> dict:
    """``SCANVI`` arguments as the model keeps them: the defaults, ``SMALL`` and ``options``."""
    defaults = {
        "n_layers": 1,
        "dropout_rate": 0.1,
        "dispersion": "gene",
        "gene_likelihood": "zinb",
        "use_observed_lib_size": True,
        "linear_classifier": False,
    }
    return {**defaults, **SMALL, **options}


def test_classifier_options_reach_the_config(make_adata):
    adata = make_adata(n=40, g=10)
    with pytest.warns(UserWarning, match="every cell is treated as labelled"):
        SCANVI.setup_anndata(adata, labels_key="cell_type", unlabeled_category=UNKNOWN)
    registry = adata.uns["_jaxvi"]
    c = scanvi_config(
        registry,
        params(
            linear_classifier=True,
            y_prior=[0.5, 0.25, 0.25],
            classifier_parameters={"dropout_rate": 0.3, "logits": False},
        ),
        3,
    )
    assert c.linear_classifier
    assert c.classifier_hidden == 0
    assert c.classifier_dropout == 0.3
    assert not c.classifier_logits
    assert c.y_prior == (0.5, 0.25, 0.25)
    assert c.n_labels == 3
    assert c.n_input == 10
    with pytest.raises(ValueError, match="y_prior"):
        scanvi_config(registry, params(y_prior=[0.5, 0.5]), 3)


# ------------------------------------------------------------------------------- training
def test_training_history_and_split(trained):
    h = trained.history
    assert set(h) == HISTORY_KEYS  # scvi-tools' names; no kl_weight for scANVI
    assert all(len(v) == 2 and np.all(np.isfinite(v.to_numpy())) for v in h.values())
    assert np.all(h["train_accuracy"].to_numpy() <= 1.0)
    np.testing.assert_allclose(h["train_f1_score"].to_numpy(), h["train_accuracy"].to_numpy())
    # train_loss = ELBO + 50 * classification loss, each an epoch mean over the same cells
    elbo = h["elbo_train"].to_numpy()[:, 0]
    ce = h["train_classification_loss"].to_numpy()[:, 0]
    assert np.all(h["train_loss"].to_numpy()[:, 0] > elbo - 1.0)
    assert np.all(ce > 0)
    lab = trained.adata.obs["lab"].to_numpy() != UNKNOWN
    tr, va = trained.train_indices, trained.validation_indices
    assert len(tr) + len(va) == trained.adata.n_obs
    assert lab[tr].sum() == 72
    assert (~lab[tr]).sum() == 36
    n_lab = int(lab[tr].sum())
    assert lab[tr[:n_lab]].all()
    assert not lab[tr[n_lab:]].any()


# -------------------------------------------------------------------------------- queries
def test_predict_hard_and_soft(trained):
    soft = trained.predict(soft=True)
    assert list(soft.columns) == ["t2", "t0", "t1"]  # the mapping without Unknown
    assert list(soft.index) == list(trained.adata.obs_names)
    np.testing.assert_allclose(soft.to_numpy().sum(axis=1), 1.0, rtol=1e-5)
    hard = trained.predict()
    assert isinstance(hard, np.ndarray)
    assert hard.shape == (trained.adata.n_obs,)
    np.testing.assert_array_equal(hard, soft.columns.to_numpy()[soft.to_numpy().argmax(1)])
    sub = trained.predict(indices=[5, 1, 7], soft=True, batch_size=2)
    np.testing.assert_allclose(sub.to_numpy(), soft.to_numpy()[[5, 1, 7]], rtol=1e-5, atol=1e-7)
    drawn = trained.predict(soft=True, use_posterior_mean=False).to_numpy()
    np.testing.assert_allclose(drawn.sum(axis=1), 1.0, rtol=1e-5)
    assert not np.allclose(drawn, soft.to_numpy())


def test_scvi_tools_label_attributes_and_attribution_arguments(trained):
    """scvi-tools' ``labels_`` (the labels column as given) and its two declared histories;
    ``predict``'s integrated-gradients arguments are accepted off and refused on."""
    labels = trained.adata.obs[trained.original_label_key].to_numpy()
    np.testing.assert_array_equal(trained.labels_, labels)
    assert trained.unsupervised_history_ is None
    assert trained.semisupervised_history_ is None
    np.testing.assert_array_equal(
        trained.predict(ig_interpretability=False, ig_args={"n_steps": 5}), trained.predict()
    )
    with pytest.raises(NotImplementedError, match="captum"):
        trained.predict(ig_interpretability=True)


def test_inherited_queries(trained):
    n, g = trained.adata.n_obs, trained.adata.n_vars
    assert trained.get_latent_representation().shape == (n, SMALL["n_latent"])
    assert np.isfinite(trained.get_elbo())
    assert trained.get_normalized_expression(n_samples=2).shape == (n, g)
    assert np.isfinite(trained.get_marginal_ll(indices=np.arange(8), n_mc_samples=4))
    de = trained.differential_expression(groupby="cell_type", group1="t0", silent=True)
    assert len(de) == g
    assert np.all(np.isfinite(de["bayes_factor"]))
    assert "ScanVI Model" in repr(trained)
    assert "Trained" in repr(trained)


def test_likelihood_parameters_and_posterior_predictive(trained):
    """p(x | z1) at draws of q(z1 | x): scvi-tools' keys for zinb, a leading sample axis
    averaged by ``give_mean`` (the same draws, the call count reset), the gene dispersion in
    every cell; posterior predictive counts (non-negative integers) whose per-gene mean is the
    likelihood's E[x | z1] = mean * (1 - dropout) within Monte-Carlo error."""
    sparse = pytest.importorskip("sparse")
    n, g = trained.adata.n_obs, trained.adata.n_vars
    n_calls = trained._n_calls
    draws = trained.get_likelihood_parameters(n_samples=N_DRAWS)
    assert list(draws) == ["mean", "dropout", "dispersions"]
    for value in draws.values():
        assert value.shape == (N_DRAWS, n, g)
        assert value.dtype == np.float32
    theta = np.exp(np.asarray(trained.variables["params"]["px_r"]))
    np.testing.assert_allclose(
        draws["dispersions"], np.broadcast_to(theta, (N_DRAWS, n, g)), rtol=1e-6
    )
    assert np.all((draws["dropout"] > 0) & (draws["dropout"] < 1))
    assert not np.allclose(draws["mean"][0], draws["mean"][1])  # z1 is drawn
    trained._n_calls = n_calls
    mean = trained.get_likelihood_parameters(n_samples=N_DRAWS, give_mean=True)
    for k, value in draws.items():
        assert mean[k].shape == (n, g)
        np.testing.assert_allclose(mean[k], value.mean(0), rtol=1e-6, err_msg=k)

    counts = trained.posterior_predictive_sample(n_samples=N_DRAWS)
    assert isinstance(counts, sparse.GCXS)
    assert counts.shape == (n, g, N_DRAWS)
    assert counts.dtype == np.float32
    x = counts.todense()
    assert x.min() >= 0
    np.testing.assert_array_equal(x, np.round(x))
    expected = np.mean(draws["mean"] * (1 - draws["dropout"]), axis=(0, 1), dtype=np.float64)
    per_gene = np.moveaxis(x, -1, 1).reshape(-1, g).astype(np.float64)  # (cells x draws, g)
    z = (per_gene.mean(0) - expected) / (per_gene.std(0) / np.sqrt(len(per_gene)))
    assert np.abs(z).max() < 5.0


def test_reconstruction_error_and_elbo(trained):
    """scANVI's ELBO terms (the labels enumerated): 0-d floats like scvi-tools' 0-d tensors,
    or per cell; with the same draws (the call count reset), ``-ELBO - reconstruction_loss``
    is ``kl_local``, a sum of KL divergences, so non-negative in every cell, and the mean is
    the mean over cells of the per-cell values."""
    rec = trained.get_reconstruction_error()
    assert list(rec) == ["reconstruction_loss"]
    value = rec["reconstruction_loss"]
    assert value.ndim == 0
    assert isinstance(value, float)
    assert np.isfinite(value)
    n_calls = trained._n_calls
    per_cell = trained.get_reconstruction_error(return_mean=False)["reconstruction_loss"]
    trained._n_calls = n_calls
    elbo = trained.get_elbo(return_mean=False)
    trained._n_calls = n_calls
    mean = trained.get_reconstruction_error()["reconstruction_loss"]
    assert per_cell.shape == elbo.shape == (trained.adata.n_obs,)
    assert np.all(-elbo - per_cell >= 0)
    np.testing.assert_allclose(mean, per_cell.mean(), rtol=1e-6)


def test_marginal_ll_grows_with_importance_samples(trained):
    """``get_marginal_ll`` is importance-sampled (scVI's ``log p(x)`` on ``z1``): one draw
    gives a single-sample ELBO of that model and averaging more draws inside the log raises
    the estimate in expectation (by ~0.7 nats here, 20 standard errors of the mean of the
    eight one-draw estimates)."""
    one = np.array([trained.get_marginal_ll(n_mc_samples=1) for _ in range(8)])
    many = trained.get_marginal_ll(n_mc_samples=200)
    assert many.ndim == 0
    assert isinstance(many, float)
    assert many > one.mean() + 3 * one.std(ddof=1) / np.sqrt(len(one))
    per_cell = trained.get_marginal_ll(indices=np.arange(8), n_mc_samples=4, return_mean=False)
    assert per_cell.shape == (8,)
    assert np.all(np.isfinite(per_cell))


def test_save_load_round_trip(trained, tmp_path):
    trained.save(str(tmp_path / "m"), save_anndata=True)
    loaded = SCANVI.load(str(tmp_path / "m"))
    assert loaded.config == trained.config
    assert loaded.n_labels == trained.n_labels
    assert loaded.unlabeled_category_ == UNKNOWN
    assert loaded.is_trained
    pd.testing.assert_frame_equal(loaded.predict(soft=True), trained.predict(soft=True))
    assert set(loaded.history) == HISTORY_KEYS
    with pytest.raises(ValueError, match="SCANVI"):
        SCVI.load(str(tmp_path / "m"))
    # scvi-tools' format: the same model back (its tests are in tests/io/test_scanvi_io.py)
    trained.save(str(tmp_path / "pt"), format="scvi-tools")
    back = SCANVI.load(str(tmp_path / "pt"), adata=trained.adata)
    assert back.config == trained.config
    pd.testing.assert_frame_equal(back.predict(soft=True), trained.predict(soft=True))
    # minified (q(z | x) kept, counts dropped): the classifier reads the cached posterior
    qzm, qzv = loaded.get_latent_representation(return_dist=True)
    loaded.adata.obsm["X_latent_qzm"], loaded.adata.obsm["X_latent_qzv"] = qzm, qzv
    loaded.minify_adata()
    assert loaded.minified_data_type == "latent_posterior_parameters"
    np.testing.assert_allclose(
        loaded.predict(soft=True).to_numpy(), trained.predict(soft=True).to_numpy(), atol=1e-6
    )


# ------------------------------------------------------------------------- from scVI
def test_from_scvi_model(make_adata, monkeypatch):
    adata = labelled(make_adata, n=100, seed=2)
    SCVI.setup_anndata(adata, batch_key="batch")
    scvi_model = SCVI(adata, **SMALL)
    # weights unlike a fresh initialisation (a trained model's, without compiling a training)
    rng = np.random.default_rng(0)
    variables = jax.device_get(scvi_model.variables)
    variables["params"] = jax.tree_util.tree_map(
        lambda v: v + 0.1 * rng.normal(size=np.shape(v)).astype(np.float32), variables["params"]
    )
    scvi_model.variables = variables
    with pytest.raises(ValueError, match="labels_key"):
        SCANVI.from_scvi_model(scvi_model, UNKNOWN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = SCANVI.from_scvi_model(scvi_model, UNKNOWN, labels_key="lab", n_latent=7)
    messages = [str(w.message) for w in caught]
    assert any("Ignoring param 'n_latent'" in m for m in messages)
    assert any("hasn't been trained" in m for m in messages)
    assert model.was_pretrained
    assert model.config.n_latent == SMALL["n_latent"]
    assert model.registry_["setup_args"]["batch_key"] == "batch"
    ref = dict(leaf_paths(scvi_model.variables))
    got = dict(leaf_paths(jax.device_get(model.variables)))
    assert any(p[1] == "z_encoder" for p in ref)
    for path, value in ref.items():  # every scVI weight, the z encoder's included
        np.testing.assert_array_equal(got[path], value, err_msg="/".join(path))
    assert any(p[1] == "classifier" for p in got)
    assert not any(p[1] == "classifier" for p in ref)
    # What train() hands the engine (captured, nothing compiled): the default epochs after
    # from_scvi_model, min(10, max(2, round(400 / 3))) = 10 here; the loss with the plan's
    # classification_ratio; labelled cells per class, at most n_samples_per_label per epoch.
    captured = {}

    def run_training(engine_model, **kwargs):
        captured.update(kwargs, engine_model=engine_model)
        raise _Captured

    monkeypatch.setattr("jaxvi.model._base.run_training", run_training)
    with pytest.raises(_Captured):
        model.train(
            batch_size=BATCH, n_samples_per_label=5, plan_kwargs={"classification_ratio": 7}
        )
    assert captured["max_epochs"] == 10
    assert captured["engine_model"] is scanvae_model_def(model.config, 7.0)
    assert "classification_ratio" not in captured["plan_kwargs"]
    train, val, _ = captured["split_fn"](
        100, 0.9, None, batch_size=BATCH, shuffle=True, seed=0, drop_last=False
    )
    paired = captured["paired_fn"](train, val)
    lab = adata.obs["lab"].to_numpy()
    assert [sorted(set(lab[g])) for g in paired.train_groups] == [["t0"], ["t1"], ["t2"]]
    assert paired.n_per_group == 5
    assert sum(map(len, paired.train_groups)) == int(np.sum(lab[train] != UNKNOWN))


# --------------------------------------------------------------------------- scArches
def test_load_query_data_label_transfer(trained, make_adata):
    query = make_adata(n=64, g=30, seed=5)
    query.obs["batch"] = "c"
    lab = query.obs["cell_type"].astype(str).to_numpy().copy()
    lab[lab != "t0"] = UNKNOWN
    query.obs["lab"] = lab
    model = SCANVI.load_query_data(query, trained)
    reg = model.registry_
    assert reg["batch_categories"] == ["a", "b", "c"]
    assert reg["labels_categories"] == trained.registry_["labels_categories"]
    assert model.n_labels == trained.n_labels
    assert not model.is_trained
    mask = model._query_training.update_mask
    assert not any(m.any() for _, m in leaf_paths(mask["classifier"]))
    assert not any(m.any() for _, m in leaf_paths(mask["encoder_z2_z1"]))
    z1 = dict(leaf_paths(mask["decoder_z1_z2"]))
    assert all(m.all() == p[-2].endswith("_bn") for p, m in z1.items())  # affine BN only
    unfrozen = SCANVI.load_query_data(query.copy(), trained, freeze_classifier=False)
    assert all(m.all() for _, m in leaf_paths(unfrozen._query_training.update_mask["classifier"]))
    model.train(
        max_epochs=1,
        batch_size=BATCH,
        n_samples_per_label=8,
        plan_kwargs={"classification_ratio": 0.0, "n_epochs_kl_warmup": None},
        enable_progress_bar=False,
    )
    h = model.history  # ratio 0, KL weight 1: the loss is the ELBO alone
    np.testing.assert_allclose(h["train_loss"].to_numpy(), h["elbo_train"].to_numpy(), rtol=1e-5)
    assert np.all(h["train_classification_loss"].to_numpy() > 0)
    with pytest.raises(ValueError, match="n_samples_per_label"):
        model.train(max_epochs=1, n_samples_per_label=0, enable_progress_bar=False)
    before = dict(leaf_paths(jax.device_get(trained.variables["params"])))
    after = dict(leaf_paths(jax.device_get(model.variables["params"])))
    for path, value in before.items():
        if path[0] in ("classifier", "encoder_z2_z1"):
            np.testing.assert_array_equal(after[path], value, err_msg="/".join(path))
    assert assert_moved(before, after, ("decoder_z1_z2", "decoder", "layer0_bn", "scale"))
    predicted = model.predict()
    assert predicted.shape == (64,)
    assert set(predicted) <= {"t0", "t1", "t2"}
    bad = make_adata(n=20, g=30, seed=6)
    bad.obs["lab"] = "t9"
    with pytest.raises(ValueError, match="never saw"):
        SCANVI.load_query_data(bad, trained)
    missing = make_adata(n=20, g=30, seed=7)
    with pytest.warns(UserWarning, match="Missing labels key"):
        filled = SCANVI.load_query_data(missing, trained)
    assert set(filled.adata.obs["lab"]) == {UNKNOWN}


def assert_moved(before: dict, after: dict, path: tuple) -> bool:
    """Whether the parameter at ``path`` changed in training."""
    return not np.array_equal(before[path], after[path])


# ----------------------------------------------------------------- scvi-tools parity
@pytest.fixture(scope="module")
def scvi_tools(scvi_ref):
    """:func:`scvi_ref` (torch on one thread) with its seed set: scvi-tools' split draws from
    ``settings.seed`` (None: random)."""
    scvi_ref.settings.seed = 0
    return scvi_ref


@pytest.fixture(scope="module")
def scvi_twin(trained, scvi_tools):
    """scvi-tools' ``SCANVI`` on a copy of ``trained``'s data, holding its weights, in
    evaluation mode."""
    from jaxvi.io.scanvi_bridge import load_scanvae_into_scvi_tools

    ref = trained.adata.copy()
    scvi_tools.model.SCANVI.setup_anndata(
        ref, labels_key="lab", unlabeled_category=UNKNOWN, batch_key="batch"
    )
    theirs = scvi_tools.model.SCANVI(ref, **SMALL)
    load_scanvae_into_scvi_tools(theirs, jax.device_get(trained.variables), trained.config)
    theirs.module.eval()
    return theirs


def test_label_codes_and_split_match_scvi_tools(make_adata, scvi_tools):
    import torch
    from scvi.dataloaders import SemiSupervisedDataSplitter

    adata = labelled(make_adata, n=150, seed=3)
    adata.obs["lab"] = pd.Categorical(adata.obs["lab"], categories=[UNKNOWN, "t0", "t1", "t2"])
    ref = adata.copy()
    SCANVI.setup_anndata(adata, labels_key="lab", unlabeled_category=UNKNOWN)
    scvi_tools.model.SCANVI.setup_anndata(ref, labels_key="lab", unlabeled_category=UNKNOWN)
    np.testing.assert_array_equal(adata.obs["_scvi_labels"], ref.obs["_scvi_labels"])
    options = {"classifier_parameters": {"n_hidden": 8, "dropout_rate": 0.2}}
    prior = [0.2, 0.3, 0.5]
    theirs = scvi_tools.model.SCANVI(ref, y_prior=torch.tensor([prior]), **options, **SMALL)
    registry = adata.uns["_jaxvi"]
    n_labels = model_n_labels(registry, adata.obs["lab"].astype(str).to_numpy())
    assert n_labels == theirs.n_labels
    assert registry["labels_categories"] == list(theirs._label_mapping)
    # the same architecture: jaxvi's config and the one read from scvi-tools' module
    ours = scanvi_config(registry, params(y_prior=prior, **options), n_labels)
    assert ours == scanvae_config_from_scvi(theirs)
    is_labelled = adata.obs["lab"].to_numpy() != UNKNOWN
    for train_size, validation_size, shuffle in (
        (0.9, None, True),
        (0.7, 0.2, True),
        (None, None, True),
        (0.8, None, False),
    ):
        splitter = SemiSupervisedDataSplitter(
            adata_manager=theirs.adata_manager,
            train_size=train_size,
            validation_size=validation_size,
            shuffle_set_split=shuffle,
            batch_size=BATCH,
        )
        splitter.setup()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # both warn about small last minibatches
            split = semi_supervised_split(
                is_labelled, train_size, validation_size, BATCH, shuffle, 0, False
            )
        for ours_idx, theirs_idx in zip(
            split, (splitter.train_idx, splitter.val_idx, splitter.test_idx), strict=True
        ):
            np.testing.assert_array_equal(ours_idx, theirs_idx)


def test_same_weights_same_predictions_and_validation_metrics(trained, scvi_twin):
    import torch
    import torchmetrics.functional as tmf
    from scvi.dataloaders import SemiSupervisedDataSplitter

    theirs = scvi_twin
    ours_soft, theirs_soft = trained.predict(soft=True), theirs.predict(soft=True)
    assert list(ours_soft.columns) == list(theirs_soft.columns)
    np.testing.assert_allclose(ours_soft.to_numpy(), theirs_soft.to_numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(trained.predict(), theirs.predict())
    # Validation classification metrics over scvi-tools' own validation loader (labelled
    # validation cells paired with every validation minibatch, cycled): deterministic, as the
    # classifier sees posterior means.
    splitter = SemiSupervisedDataSplitter(
        adata_manager=theirs.adata_manager, train_size=0.9, batch_size=BATCH
    )
    splitter.setup()
    np.testing.assert_array_equal(trained.validation_indices, splitter.val_idx)
    sums, n = {"classification_loss": 0.0, "accuracy": 0.0}, 0
    loader = splitter.val_dataloader()
    with torch.no_grad():  # Lightning takes len(loader) batches (the labelled loader cycles)
        for full, lab in itertools.islice(loader, len(loader)):
            _, _, out = theirs.module(
                full, loss_kwargs={"labelled_tensors": lab, "classification_ratio": 50}
            )
            size = out.n_obs_minibatch
            pred = out.logits.argmax(-1)
            acc = tmf.classification.multiclass_accuracy(
                pred, out.true_labels.squeeze(-1), theirs.n_labels, average="micro"
            )
            sums["classification_loss"] += float(out.classification_loss) * size
            sums["accuracy"] += float(acc) * size
            n += size
    for name, total in sums.items():
        ours = trained.history[f"validation_{name}"].iloc[-1, 0]
        np.testing.assert_allclose(ours, total / n, rtol=1e-5, err_msg=name)


def paired_z(ours: np.ndarray, theirs: np.ndarray, axis: int) -> np.ndarray:
    """z-scores of the difference of two sets of draws (axis 0), entry by entry averaged,
    summed along ``axis`` of the remaining ``(cells, genes)`` (cells are independent, so
    the variances add)."""
    n = len(ours)
    d = ours.mean(0) - theirs.mean(0)
    var = (ours.var(0, ddof=1) + theirs.var(0, ddof=1)) / n
    return d.sum(axis) / np.sqrt(var.sum(axis))


def mean_z(ours: np.ndarray, theirs: np.ndarray) -> float:
    """z-score of the difference of the means of two sets of repeated estimates."""
    se = np.sqrt((ours.var(ddof=1) + theirs.var(ddof=1)) / len(ours))
    return float((ours.mean() - theirs.mean()) / se)


def test_same_weights_same_vae_queries(trained, scvi_twin, scvi_tools):
    """The queries scANVI inherits from scVI, against scvi-tools' SCANVI with the same
    weights: the same keys, shapes, dtypes and return types; the dispersions (deterministic
    here) to 1e-5; what depends on z1 draws within Monte-Carlo error (|z| < 5): likelihood
    parameters and posterior predictive counts (per gene and per cell, 40 draws on each
    side), reconstruction error and ELBO (30 calls on each side; their standard error is
    ~0.04 nats, where leaving out a term of scANVI's ELBO moves them by nats).

    ``get_marginal_ll`` is compared with scvi-tools' ``SCVI`` holding the SCANVI's scVI
    weights, to 0.1 %: scvi-tools' ``SCANVI.get_marginal_ll`` runs ``VAE.marginal_ll`` on
    ``SCANVAE.loss``'s ``reconstruction_loss``, which also holds ``log q(z1 | x)`` and the
    ``z1`` prior term, so its value is no estimate of ``log p(x)`` (here ~0.8 % above)."""
    theirs = scvi_twin
    ref = theirs.get_likelihood_parameters(n_samples=N_DRAWS)
    ours = trained.get_likelihood_parameters(n_samples=N_DRAWS)
    assert list(ours) == list(ref)
    for k in ref:
        assert type(ours[k]) is type(ref[k]), k
        assert ours[k].shape == ref[k].shape, k
        assert ours[k].dtype == ref[k].dtype, k
    np.testing.assert_allclose(ours["dispersions"], ref["dispersions"], rtol=1e-5)
    for k in ("mean", "dropout"):
        a, b = ours[k].astype(np.float64), ref[k].astype(np.float64)
        for axis in (0, 1):
            assert np.abs(paired_z(a, b, axis)).max() < 5.0, (k, axis)

    ref = theirs.posterior_predictive_sample(n_samples=N_DRAWS)
    ours = trained.posterior_predictive_sample(n_samples=N_DRAWS)
    assert type(ours) is type(ref)
    assert ours.shape == ref.shape
    assert ours.dtype == ref.dtype
    assert ours.compressed_axes == ref.compressed_axes
    a = np.moveaxis(ours.todense(), -1, 0).astype(np.float64)
    b = np.moveaxis(ref.todense(), -1, 0).astype(np.float64)
    for axis in (0, 1):
        assert np.abs(paired_z(a, b, axis)).max() < 5.0, axis

    n_calls = 30
    for name, get in (
        ("reconstruction", lambda m: m.get_reconstruction_error()["reconstruction_loss"]),
        ("elbo", lambda m: m.get_elbo()),
    ):
        ref_value, our_value = get(theirs), get(trained)
        assert ref_value.ndim == our_value.ndim == 0, name
        ref_values = np.array([float(get(theirs)) for _ in range(n_calls)])
        our_values = np.array([float(get(trained)) for _ in range(n_calls)])
        assert abs(mean_z(our_values, ref_values)) < 5.0, name

    vae_data = trained.adata.copy()
    scvi_tools.model.SCVI.setup_anndata(vae_data, batch_key="batch")
    vae = scvi_tools.model.SCVI(vae_data, **SMALL)
    vae.module.load_state_dict(theirs.module.state_dict(), strict=False)  # the scVI part
    vae.module.eval()
    ref = vae.get_marginal_ll(n_mc_samples=1000, n_mc_samples_per_pass=250)
    ours = trained.get_marginal_ll(n_mc_samples=1000)
    assert abs(ours - ref) / abs(ref) < 1e-3


# ------------------------------------------------------------------------ backed AnnData
def test_streamed_training_pairs_labelled_cells(make_adata, tmp_path, monkeypatch):
    """Training from a backed AnnData streams it (one block of the training cells in disk
    order, not the order of the training indices): every cell of the labelled minibatches
    is a labelled training cell, found at its own position in the block, and the model
    trains to finite losses and predicts."""
    from jaxvi.train import _fit

    adata = labelled(make_adata)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = anndata.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    SCANVI.setup_anndata(backed, labels_key="lab", unlabeled_category=UNKNOWN, batch_key="batch")
    model = SCANVI(backed, **SMALL)
    seen = []
    real = _fit.paired_positions

    def spy(idx, mask, rows, positions):
        out = real(idx, mask, rows, positions)
        where = np.asarray(positions)
        lookup = dict(zip(where.tolist(), np.asarray(rows).tolist(), strict=True))
        real_entries = np.asarray(mask) > 0
        seen.append((np.asarray(idx)[real_entries], [lookup[p] for p in out[real_entries]]))
        return out

    monkeypatch.setattr(_fit, "paired_positions", spy)
    model.train(max_epochs=2, batch_size=BATCH, streaming=True, enable_progress_bar=False)
    assert len(seen) == 2  # one block per epoch
    is_labelled = adata.obs["lab"].to_numpy() != UNKNOWN
    train = set(model.train_indices.tolist())
    for asked, found in seen:
        assert list(asked) == found  # each paired row read back from its own position
        assert is_labelled[asked].all()
        assert set(asked.tolist()) <= train
    assert np.isfinite(model.history["train_classification_loss"].to_numpy()).all()
    assert set(model.predict()) <= {"t0", "t1", "t2"}


def test_registry_view_shows_the_labels_field(trained, capsys):
    """``adata_manager`` (scvi-tools' ``AnnDataManager`` calls) of a scANVI model: the
    labels field with the unlabelled category last, its codes, the class count."""
    manager = trained.adata_manager
    mapping = list(manager.get_state_registry("labels").categorical_mapping)
    assert mapping[-1] == UNKNOWN
    assert len(mapping) == trained.n_labels + 1
    codes = manager.get_from_registry("labels")
    assert codes.shape == (trained.adata.n_obs, 1)
    names = np.asarray(mapping)[codes.ravel()]
    np.testing.assert_array_equal(names, trained.adata.obs["lab"].astype(str).to_numpy())
    assert manager.summary_stats.n_labels == trained.n_labels + 1
    assert manager.data_registry.labels.attr_name == "obs"
    trained.view_anndata_setup()
    assert "Setup via `SCANVI.setup_anndata`" in capsys.readouterr().out
