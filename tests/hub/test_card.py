"""Criticism reports, model cards and hub directories.

The model is the scvi-hub example card's: synthetic_iid(), n_hidden 128, n_latent 10,
n_layers 1, dropout 0.1, gene dispersion, zinb, normal latent, no batch or labels key,
trained for 1 epoch.
"""

from __future__ import annotations

import json
import os
import re
import types

import numpy as np
import pytest

import jaxvi
from jaxvi import hub
from jaxvi.criticism import (
    PosteriorPredictiveCheck,
    create_criticism_report,
    cv_scores,
    cv_table,
    de_table,
    metrics_report,
)
from jaxvi.data import synthetic_iid
from jaxvi.hub import NA_FIELD, card_info_from_model, model_card

pytest.importorskip("scanpy")
pytest.importorskip("sklearn")
pytest.importorskip("leidenalg")

EXAMPLE = dict(
    n_hidden=128,
    n_latent=10,
    n_layers=1,
    dropout_rate=0.1,
    dispersion="gene",
    gene_likelihood="zinb",
    latent_distribution="normal",
)


@pytest.fixture(scope="module")
def model():
    jaxvi.settings.seed = 0
    adata = synthetic_iid(seed=0, n_proteins=0, n_regions=0)
    jaxvi.SCVI.setup_anndata(adata)
    m = jaxvi.SCVI(adata, **EXAMPLE)
    m.train(max_epochs=1, enable_progress_bar=False)
    return m


@pytest.fixture(scope="module")
def samples(model):
    return model.posterior_predictive_sample(n_samples=5, batch_size=32)


@pytest.fixture(scope="module")
def report(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    out = create_criticism_report(model, save_folder=str(folder))
    with open(folder / "metrics.json") as f:
        assert json.load(f) == out
    return out


def _table_values(table: str) -> dict[str, list[float]]:
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = [float(c) for c in cells[1:]]
    return rows


def test_one_epoch_card_numbers_look_like_the_example_card(report):
    # the example card: cell-wise MAE 1.00 / 0.98, R² -16 / -19; gene-wise MAE 1.06, R² -2.47
    cell = _table_values(report["cell_wise_cv"])
    gene = _table_values(report["gene_wise_cv"])
    assert len(cell["Mean Absolute Error"]) == 2  # training and validation
    assert len(gene["Mean Absolute Error"]) == 1
    for mae in cell["Mean Absolute Error"]:
        assert 0.85 < mae < 1.2
    assert 0.9 < gene["Mean Absolute Error"][0] < 1.25
    assert all(r2 < -1 for r2 in cell["R² (R-Squared)"] + gene["R² (R-Squared)"])
    assert all(abs(r) < 0.5 for r in cell["Pearson Correlation"])
    de_lines = report["diff_exp"].splitlines()
    assert de_lines[0] == (
        "| Index | gene_f1 | lfc_mae | lfc_pearson | lfc_spearman | roc_auc | pr_auc | n_cells |"
    )
    n_cells = [float(line.split("|")[-2]) for line in de_lines[2:]]
    assert sum(n_cells) == 400  # Leiden clusters of all cells, largest first
    assert n_cells == sorted(n_cells, reverse=True)


def test_report_equals_scvi_tools_report_on_the_same_samples(
    model, samples, report, monkeypatch, tmp_path
):
    criticism = pytest.importorskip("scvi.criticism")
    ref_adata = model.adata.copy()
    stub = types.SimpleNamespace(
        adata=ref_adata,
        train_indices=model.train_indices,
        validation_indices=model.validation_indices,
        _validate_anndata=lambda adata=None: ref_adata if adata is None else adata,
        adata_manager=types.SimpleNamespace(
            get_state_registry=lambda key: types.SimpleNamespace(original_key="_scvi_labels")
        ),
        posterior_predictive_sample=lambda *a, **k: samples,
    )
    criticism.create_criticism_report(stub, save_folder=str(tmp_path))
    with open(tmp_path / "metrics.json") as f:
        ref = json.load(f)
    # jaxvi's report on the very same samples
    monkeypatch.setattr(model, "posterior_predictive_sample", lambda *a, **k: samples)
    ours = create_criticism_report(model)
    assert ours == ref
    np.testing.assert_allclose(
        model.adata.var["cv_gene_ratio"], ref_adata.var["cv_gene_ratio"], rtol=1e-5
    )
    np.testing.assert_allclose(
        model.adata.obs["cv_cell_ratio"], ref_adata.obs["cv_cell_ratio"], rtol=1e-5
    )
    np.testing.assert_allclose(
        model.adata.varm["lfc_model"].to_numpy(),
        ref_adata.varm["lfc_model"].to_numpy(float),
        rtol=1e-5,
        atol=1e-6,
    )


def test_single_column_cv_table_equals_scvi_tools(samples, model):
    pytest.importorskip("scvi.criticism")
    from scvi.criticism._create_criticism_report import _cv_metrics

    ppc = PosteriorPredictiveCheck.from_samples(model.adata, {"model": samples})
    cv = ppc.coefficient_of_variation("features")
    no_split = types.SimpleNamespace(train_indices=None, validation_indices=None)
    assert cv_table(cv["model"], cv["Raw"]) == _cv_metrics(ppc, no_split, cell_wise=True)


def test_cv_scores_by_hand_and_errors():
    m = np.array([1.0, 2.0, 3.0])
    o = np.array([1.0, 2.0, 5.0])
    s = cv_scores(m, o)
    assert s["mae"] == pytest.approx(2 / 3)
    assert s["r2"] == pytest.approx(1 - 4 / 2)  # model CV is the reference of R²
    assert s["spearman"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="NaN"):
        cv_scores([1.0, np.nan, 2.0], o)
    with pytest.raises(ValueError, match="equal length"):
        cv_scores(m, o[:2])


def test_de_table_needs_a_model_when_several(model, samples):
    ppc = PosteriorPredictiveCheck.from_samples(
        model.adata, {"a": samples, "b": samples[:, :, :1]}
    )
    ppc.adata.obs["half"] = np.where(np.arange(400) < 200, "x", "y")
    summary = ppc.differential_expression(de_groupby="half")
    with pytest.raises(ValueError, match="model="):
        de_table(summary)
    assert de_table(summary, model="a") == de_table(summary, model="b")
    with pytest.raises(ValueError, match="Unknown metrics"):
        metrics_report(ppc, "a", skip_metrics=("cv",))


# ----------------------------------------------------------------------- card
def _header(card: str) -> dict:
    yaml = pytest.importorskip("yaml")
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match is not None
    return yaml.safe_load(match.group(1))


def _json_block(card: str, title: str):
    section = card.split(f"<strong>{title}</strong>")[1]
    return json.loads(section.split("```json\n")[1].split("```")[0])


def test_card_renders_in_the_scvi_hub_format(model, report):
    card = model_card(card_info_from_model(model, metrics_report=report, tissues=["blood"]))
    header = _header(card)
    assert header["library_name"] == "jaxvi"
    assert header["license"] == "cc-by-4.0"
    tags = header["tags"]
    assert tags[:4] == ["biology", "genomics", "single-cell", "model_cls_name:SCVI"]
    assert f"jaxvi_version:{jaxvi.__version__}" in tags
    assert any(t.startswith("anndata_version:") for t in tags)
    assert tags[-3:] == ["modality:rna", "tissue:blood", "annotated:False"]
    for section in ("# Model Description", "# Metrics", "# Model Properties", "# References"):
        assert f"\n{section}\n" in card
    assert report["cell_wise_cv"] in card
    assert report["gene_wise_cv"] in card
    assert report["diff_exp"] in card
    assert "| Metric                  | Training Value | Validation Value |" in card
    assert _json_block(card, "Model Parameters") == model.init_params_
    assert _json_block(card, "Setup Data Arguments") == model.registry_["setup_args"]
    assert "| X                         | adata.X                              |" in card
    assert "| batch                     | adata.obs['_scvi_batch']             |" in card
    assert "- **Data is Minified**: False" in card
    assert "| n_cells                   | 400 |" in card
    assert f"**Training data url**: {NA_FIELD}" in card
    assert "t-test" in card  # the test the code runs (the reference's text says Wilcoxon)


def test_card_without_metrics_and_with_urls(model):
    card = model_card(
        card_info_from_model(
            model,
            training_data_url="https://example.org/data.h5ad",
            training_code_url="https://example.org/train.py",
            description="A test model.",
            references="Lopez et al. 2018.",
            data_is_annotated=True,
        )
    )
    assert card.count(NA_FIELD) == 3  # the three metric tables
    assert "**Training data url**: https://example.org/data.h5ad" in card
    assert "# Model Description\n\nA test model.\n" in card
    assert "annotated:True" in _header(card)["tags"]


# ------------------------------------------------------------------------ hub
def _same_outputs(a, b):
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())
    a._n_calls = b._n_calls = 7
    x = a.posterior_predictive_sample(n_samples=5, batch_size=32)
    y = b.posterior_predictive_sample(n_samples=5, batch_size=32)
    np.testing.assert_array_equal(np.asarray(x.todense()), np.asarray(y.todense()))


def test_hub_directory_round_trip(model, report, tmp_path):
    d = str(tmp_path / "hub")
    h = hub.save_hub_model(model, d, metrics=report, description="1 epoch on synthetic data")
    files = set(os.listdir(d))
    assert {
        "model.json",
        "model.npz",
        "adata.h5ad",
        "_scvi_required_metadata.json",
        "metrics.json",
        "README.md",
    } <= files
    with open(os.path.join(d, "_scvi_required_metadata.json")) as f:
        meta = json.load(f)
    assert list(meta)[:5] == [
        "scvi_version",
        "anndata_version",
        "model_cls_name",
        "training_data_url",
        "model_parent_module",
    ]
    assert meta["model_cls_name"] == "SCVI"
    assert meta["model_format"] == "jaxvi"
    loaded = hub.HubModel(d)
    assert loaded.metrics == report
    assert loaded.model_card == h.model_card
    assert "1 epoch on synthetic data" in loaded.model_card
    assert loaded.adata.shape == (400, 100)
    m2 = loaded.model
    assert m2.init_params_ == model.init_params_
    np.testing.assert_array_equal(m2.train_indices, model.train_indices)
    _same_outputs(model, m2)
    _same_outputs(model, hub.load_hub_model(d, adata=model.adata.copy()))
    with pytest.raises(FileExistsError, match="overwrite"):
        hub.save_hub_model(model, d, metrics=None)
    hub.save_hub_model(model, d, metrics=None, save_anndata=False, overwrite=True)
    assert hub.HubModel(d).metrics == report  # the existing metrics.json is kept and used
    assert "HubModel(" in repr(loaded)


def test_hub_takes_another_model_format(model, tmp_path):
    sub = "toy_files"
    fmt = hub.ModelFormat(
        name="toy",
        files=(f"{sub}/model.json",),
        save=lambda m, d, ow: m.save(os.path.join(d, sub), overwrite=ow),
        load=lambda d, adata: jaxvi.SCVI.load(os.path.join(d, sub), adata=adata),
        library_name="toy-lib",
        versions=lambda m: {"toy_version": "9"},
        scvi_version=lambda m: "0.0.1",
    )
    hub.register_model_format(fmt)
    try:
        with pytest.raises(ValueError, match="already registered"):
            hub.register_model_format(fmt)
        d = str(tmp_path / "toy")
        h = hub.save_hub_model(model, d, model_format="toy", metrics=None, save_anndata=False)
        assert h.metadata.model_format == "toy"
        assert h.metadata.scvi_version == "0.0.1"
        header = _header(h.model_card)
        assert header["library_name"] == "toy-lib"
        assert "toy_version:9" in header["tags"]
        assert h.adata is None
        _same_outputs(model, h.load_model(adata=model.adata.copy()))
    finally:
        hub.unregister_model_format("toy")


def test_hub_errors(model, tmp_path):
    with pytest.raises(ValueError, match="Unknown model format"):
        hub.save_hub_model(model, str(tmp_path / "x"), model_format="nope", metrics=None)
    with pytest.raises(FileNotFoundError, match="_scvi_required_metadata.json"):
        hub.HubModel(str(tmp_path))
    # a directory written by scvi-tools: its metadata has no model_format
    d = tmp_path / "scvi_dir"
    d.mkdir()
    (d / "README.md").write_text("---\nlibrary_name: scvi-tools\n---\n")
    (d / "_scvi_required_metadata.json").write_text(
        json.dumps(
            {
                "scvi_version": "1.4.2",
                "anndata_version": "0.11.1",
                "model_cls_name": "SCVI",
                "training_data_url": None,
                "model_parent_module": "scvi.model",
            }
        )
    )
    h = hub.HubModel(str(d))
    assert h.metadata.model_format == "scvi-tools"
    if "scvi-tools" not in hub.registered_model_formats():
        with pytest.raises(ValueError, match="no reader"):
            h.load_model()
    (d / "_scvi_required_metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hub.HubModel(str(d))


def test_same_weights_give_the_same_cv_metrics_within_sampling_noise(model):
    """jaxvi's weights in scvi-tools: its own sampler and PPC agree with jaxvi's."""
    scvi = pytest.importorskip("scvi")
    pytest.importorskip("torch")
    from scvi.criticism import PosteriorPredictiveCheck as RefPPC

    from jaxvi.io.bridge import load_into_scvi_tools

    ref_adata = synthetic_iid(seed=0, n_proteins=0, n_regions=0)
    scvi.model.SCVI.setup_anndata(ref_adata)
    ref = scvi.model.SCVI(ref_adata, **EXAMPLE)
    load_into_scvi_tools(ref, model)
    ref.module.eval()
    ref.is_trained_ = True
    theirs = RefPPC(ref_adata, {"model": ref}, n_samples=5)
    ours = PosteriorPredictiveCheck(model.adata, {"model": model}, n_samples=5)
    for dim, key in (("features", "cv_cell"), ("cells", "cv_gene")):
        theirs.coefficient_of_variation(dim)
        a = theirs.metrics[key]
        b = ours.coefficient_of_variation(dim)
        np.testing.assert_allclose(a["Raw"].to_numpy(), b["Raw"].to_numpy(), rtol=1e-12)
        # independent draws from the same model: single CVs are noisy (5 samples), their
        # average over cells or genes and the card's MAE are not
        # (observed: 0.9% and 1.3% apart; MAEs 0.018 and 0.026 apart)
        assert b["model"].mean() == pytest.approx(a["model"].mean(), rel=0.04)
        mae_a = cv_scores(a["model"], a["Raw"])["mae"]
        mae_b = cv_scores(b["model"], b["Raw"])["mae"]
        assert mae_b == pytest.approx(mae_a, abs=0.05)
        assert mae_a > 0.5  # 1 epoch: far from the data, so agreement is not trivial


def test_hub_directory_in_scvi_tools_format(model, tmp_path):
    """A hub directory whose model files are scvi-tools' (``model.pt``, written without
    torch): its metadata holds exactly scvi-tools' fields, and it loads back, through the
    metadata, into a model with the same outputs; scvi-tools itself reads the model files."""
    d = tmp_path / "hub_scvi"
    hub.save_hub_model(model, str(d), model_format="scvi-tools", metrics=None)
    assert (d / "model.pt").exists()
    meta = json.loads((d / "_scvi_required_metadata.json").read_text())
    assert sorted(meta) == sorted(hub.HubMetadata.SCVI_FIELDS)
    assert meta["model_parent_module"] == "scvi.model"
    assert meta["scvi_version"] == "1.4.2"
    h = hub.HubModel(str(d))
    assert h.metadata.model_format == "scvi-tools"
    assert "library_name: scvi-tools" in h.model_card
    _same_outputs(model, h.load_model(adata=model.adata.copy()))
    scvi = pytest.importorskip("scvi")
    adata = model.adata.copy()
    reference = scvi.model.SCVI.load(str(d), adata=adata)
    np.testing.assert_allclose(
        reference.get_latent_representation(),
        model.get_latent_representation(),
        rtol=1e-4,
        atol=1e-5,
    )
