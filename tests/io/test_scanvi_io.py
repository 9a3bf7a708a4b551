"""scvi-tools SCANVI model directories in and out (:mod:`jaxvi.io.scvi_tools`, issue 15).

Without scvi-tools: a jaxvi SCANVI exported as ``model.pt`` reads back identical (weights,
registry, arguments, class count); a directory of the other class is refused naming both
classes; a ``model.pt`` whose labels registry (or class count) is malformed gives a
``ValueError`` naming the problem. With scvi-tools 1.4.2 (skipped otherwise): a SCANVI saved
by ``scvi.model.SCANVI.save`` loads into jaxvi with the same class probabilities and latent
means (1e-5 relative), also in a process without torch, which writes it back for scvi-tools;
a jaxvi SCANVI written as ``model.pt`` loads in ``scvi.model.SCANVI.load`` with the same
predictions, history and split.
"""

from __future__ import annotations

import dataclasses

import anndata
import jax
import numpy as np
import pandas as pd
import pytest

import jaxvi
from jaxvi import SCANVI, SCVI
from jaxvi.io import torchfile

RTOL = 1e-5
UNKNOWN = "Unknown"
SMALL = {"n_hidden": 16, "n_latent": 4}
PRIOR = [0.2, 0.3, 0.5]


def make_adata(n_cells: int = 96, n_genes: int = 16, seed: int = 0) -> anndata.AnnData:
    """NB counts; obs ``batch`` (2), ``lab`` (3 types, every third cell ``Unknown``)."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, n_cells)
    mu = rng.gamma(2.0, 2.0, size=(3, n_genes))[group] * rng.lognormal(0.0, 0.4, (n_cells, 1))
    x = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float32)
    x[:, 0] += 1.0
    lab = np.array([f"t{g}" for g in group], dtype=object)
    lab[::3] = UNKNOWN
    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{i % 2}" for i in range(n_cells)]), "lab": lab},
        index=[f"cell{i}" for i in range(n_cells)],
    )
    return anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


def assert_close(actual, reference) -> None:
    actual, reference = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    scale = float(np.abs(reference).max())
    np.testing.assert_allclose(actual, reference, rtol=RTOL, atol=RTOL * scale)


def assert_same_queries(ours, theirs) -> None:
    """Class probabilities (named columns), hard labels and q(z | x) means agree."""
    soft, ref_soft = ours.predict(soft=True), theirs.predict(soft=True)
    assert [str(c) for c in soft.columns] == [str(c) for c in ref_soft.columns]
    np.testing.assert_allclose(soft.to_numpy(), ref_soft.to_numpy(), rtol=RTOL, atol=1e-6)
    np.testing.assert_array_equal(ours.predict(), theirs.predict())
    assert_close(ours.get_latent_representation(), theirs.get_latent_representation())


def assert_history_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k].index), np.asarray(b[k].index))
        np.testing.assert_array_equal(a[k].iloc[:, 0].to_numpy(float), b[k].iloc[:, 0])


@pytest.fixture(scope="module")
def trained():
    """A jaxvi SCANVI with a linear classifier and a class prior. Its initial weights serve
    (only their transfer is checked; training would compile the engine's programs for
    nothing), marked trained with a history and a split, which the files carry."""
    jaxvi.settings.seed = 0
    adata = make_adata()
    SCANVI.setup_anndata(adata, labels_key="lab", unlabeled_category=UNKNOWN, batch_key="batch")
    model = SCANVI(adata, linear_classifier=True, y_prior=PRIOR, **SMALL)
    model.is_trained_ = True
    epochs = pd.Index([0, 1], name="epoch")
    model.history_ = {
        name: pd.DataFrame({name: [2.5, 1.25]}, index=epochs)
        for name in ("elbo_train", "train_accuracy")
    }
    model.train_indices_, model.validation_indices_ = np.arange(80), np.arange(80, 96)
    model.test_indices_ = np.arange(0)
    return model


# ----------------------------------------------------------------------- without scvi-tools
def test_export_reads_back_identical(trained, tmp_path):
    trained.save(str(tmp_path), format="scvi-tools", save_anndata=True)
    back = SCANVI.load(str(tmp_path))  # model.pt and the saved AnnData
    assert isinstance(back, SCANVI)
    assert back.registry_ == trained.registry_
    # y_prior travels as scvi-tools' float32 tensor: equal up to float32 rounding
    params, prior = dict(back.init_params_), back.init_params_["y_prior"]
    assert {**params, "y_prior": PRIOR} == trained.init_params_
    np.testing.assert_allclose(prior, PRIOR, rtol=1e-7)
    assert back.config == dataclasses.replace(trained.config, y_prior=tuple(prior))
    assert (back.n_labels, back.unlabeled_category_) == (trained.n_labels, UNKNOWN)
    for a, b in zip(
        jax.tree_util.tree_leaves(back.variables),
        jax.tree_util.tree_leaves(trained.variables),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_history_equal(back.history, trained.history)
    pd.testing.assert_frame_equal(back.predict(soft=True), trained.predict(soft=True))
    assert type(jaxvi.model.load_model(str(tmp_path))) is SCANVI
    assert jaxvi.model.saved_model_name(str(tmp_path)) == "SCANVI"


def test_other_class_directories_are_refused(trained, tmp_path):
    trained.save(str(tmp_path / "scanvi"), format="scvi-tools")
    with pytest.raises(ValueError, match="holds a scvi-tools SCANVI model, not SCVI"):
        SCVI.load(str(tmp_path / "scanvi"))
    adata = make_adata(30)
    SCVI.setup_anndata(adata, batch_key="batch")
    SCVI(adata, n_hidden=8, n_latent=2).save(str(tmp_path / "scvi"), format="scvi-tools")
    with pytest.raises(ValueError, match="holds a scvi-tools SCVI model, not SCANVI"):
        SCANVI.load(str(tmp_path / "scvi"))
    assert type(jaxvi.model.load_model(str(tmp_path / "scvi"))) is SCVI


def _labels_state(saved: dict) -> dict:
    return saved["attr_dict"]["registry_"]["field_registries"]["labels"]["state_registry"]


def _set_mapping(values):
    def edit(saved):
        _labels_state(saved)["categorical_mapping"] = values(
            _labels_state(saved)["categorical_mapping"]
        )

    return edit


def _drop_mapping(saved):
    del _labels_state(saved)["categorical_mapping"]


def _other_unlabelled(saved):
    _labels_state(saved)["unlabeled_category"] = "Other"


def _field_not_a_dict(saved):
    saved["attr_dict"]["registry_"]["field_registries"]["labels"] = "labels"


def _no_unlabelled_argument(saved):
    del saved["attr_dict"]["registry_"]["setup_args"]["unlabeled_category"]


HOSTILE_LABELS = {
    "unlabelled category missing": (_set_mapping(lambda m: m[:-1]), "not among its categories"),
    "two-dimensional mapping": (_set_mapping(lambda m: m.reshape(1, -1)), "1-D array"),
    "mapping not an array": (_set_mapping(lambda m: "t0,t1"), "1-D array"),
    "repeated category": (_set_mapping(lambda m: np.append(m[:1], m)), "repeated categories"),
    "more categories than classes": (
        _set_mapping(lambda m: np.array([*m, "x", "y"], dtype=object)),
        "classifies 3 classes",
    ),
    "no mapping": (_drop_mapping, "no categorical_mapping"),
    "field not a dict": (_field_not_a_dict, "no categorical_mapping"),
    "two unlabelled categories": (_other_unlabelled, "names the unlabelled category 'Other'"),
    "no unlabeled_category argument": (_no_unlabelled_argument, "lacks the setup argument"),
}


@pytest.mark.parametrize("case", list(HOSTILE_LABELS))
def test_malformed_labels_registry_is_a_clear_value_error(trained, tmp_path, case):
    edit, match = HOSTILE_LABELS[case]
    trained.save(str(tmp_path / "good"), format="scvi-tools")
    saved = torchfile.load(str(tmp_path / "good" / "model.pt"))
    edit(saved)
    state = saved["model_state_dict"]
    saved["model_state_dict"] = {
        k: torchfile.Tensor(v) if isinstance(v, np.ndarray) else v for k, v in state.items()
    }
    (tmp_path / "bad").mkdir()
    torchfile.save(saved, str(tmp_path / "bad" / "model.pt"))
    with pytest.raises(ValueError, match=match):
        SCANVI.load(str(tmp_path / "bad"), adata=trained.adata.copy())


# ----------------------------------------------------------------------- with scvi-tools
@pytest.fixture(scope="module")
def scvi_saved(tmp_path_factory):
    """A scvi-tools 1.4.2 SCANVI (MLP classifier of its own width, class prior as a tensor)
    trained 2 epochs and saved with its AnnData; its module in evaluation mode."""
    scvi = pytest.importorskip("scvi")
    import torch

    scvi.settings.seed = 0
    adata = make_adata(seed=1)
    scvi.model.SCANVI.setup_anndata(
        adata, labels_key="lab", unlabeled_category=UNKNOWN, batch_key="batch"
    )
    model = scvi.model.SCANVI(
        adata, y_prior=torch.tensor([PRIOR]), classifier_parameters={"n_hidden": 8}, **SMALL
    )
    model.train(max_epochs=2, batch_size=32, check_val_every_n_epoch=1, enable_progress_bar=False)
    model.module.eval()
    path = tmp_path_factory.mktemp("scanvi") / "scvi_model"
    model.save(str(path), save_anndata=True)
    return model, str(path)


def test_scvi_tools_scanvi_loads_with_same_predictions(scvi_saved):
    ref, path = scvi_saved
    model = SCANVI.load(path)  # format detected: model.pt, no model.json
    assert model.is_trained
    assert model.adata is not None
    assert model.unlabeled_category_ == ref.unlabeled_category_ == UNKNOWN
    assert model.original_label_key == "lab"
    assert model.n_labels == ref.n_labels == 3
    assert model.registry_["labels_categories"] == [str(c) for c in ref._label_mapping]
    assert model.init_params_["y_prior"] == pytest.approx(PRIOR)
    assert model.init_params_["classifier_parameters"] == {"n_hidden": 8}
    assert_history_equal(model.history, ref.history)
    np.testing.assert_array_equal(model.train_indices, ref.train_indices)
    np.testing.assert_array_equal(model.validation_indices, ref.validation_indices)
    assert_same_queries(model, ref)
    with pytest.raises(ValueError, match="SCANVI model, not SCVI"):
        SCVI.load(path)


@pytest.mark.slow  # a subprocess with its own JAX
def test_scvi_tools_scanvi_read_and_written_without_torch(scvi_saved, tmp_path, without_torch):
    scvi = pytest.importorskip("scvi")
    ref, path = scvi_saved
    code = f"""
import numpy as np, jaxvi
m = jaxvi.SCANVI.load({path!r})
np.save("soft.npy", m.predict(soft=True).to_numpy())
m.save("exported", format="scvi-tools", save_anndata=True)
assert "torch" not in [k for k, v in sys.modules.items() if v is not None]
"""
    without_torch(code, tmp_path)
    soft = np.load(tmp_path / "soft.npy")
    np.testing.assert_allclose(soft, ref.predict(soft=True).to_numpy(), rtol=RTOL, atol=1e-6)
    back = scvi.model.SCANVI.load(str(tmp_path / "exported"))
    assert back.is_trained
    assert back.n_labels == ref.n_labels
    np.testing.assert_array_equal(back.module.y_prior.numpy(), ref.module.y_prior.numpy())
    assert_same_queries(back, ref)  # scvi-tools on both sides: the files carry the same weights


def test_export_loads_in_scvi_tools_with_same_predictions(trained, tmp_path):
    scvi = pytest.importorskip("scvi")
    trained.save(str(tmp_path), format="scvi-tools", save_anndata=True)
    fresh = make_adata()
    for adata in (None, fresh):  # the saved AnnData, and a fresh one set up by scvi-tools
        ref = scvi.model.SCANVI.load(str(tmp_path), adata=adata)
        assert ref.is_trained
        assert (ref.n_labels, ref.unlabeled_category_) == (trained.n_labels, UNKNOWN)
        assert list(ref._label_mapping) == trained.registry_["labels_categories"]
        assert_same_queries(trained, ref)
    np.testing.assert_allclose(ref.module.y_prior.numpy().ravel(), PRIOR, rtol=1e-6)
    assert type(ref.module.classifier.classifier[0]).__name__ == "Linear"  # linear_classifier
    assert_history_equal(ref.history, trained.history)
    np.testing.assert_array_equal(ref.train_indices, trained.train_indices)
    np.testing.assert_array_equal(ref.validation_indices, trained.validation_indices)
