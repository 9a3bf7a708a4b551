"""scvi-hub directories of SCANVI models (issue 15): written by :func:`jaxvi.hub.save_hub_model`
in jaxvi's and scvi-tools' formats, they carry ``model_cls_name`` SCANVI in the metadata and
the card (with scANVI's description), and :class:`jaxvi.hub.HubModel` loads a SCANVI with the
same predictions; a metadata naming another class is refused. With scvi-tools (skipped
otherwise): for a SCANVI directory saved by scvi-tools, jaxvi's ``HubMetadata`` and
``HubModelCardHelper`` hold what scvi-tools' do, and the model loads as a SCANVI; scvi-tools'
``HubModel`` opens the directory jaxvi wrote in scvi-tools' format."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest

import jaxvi
from jaxvi import SCANVI, hub
from jaxvi.data import synthetic_iid
from jaxvi.hub import HubMetadata, HubModel, HubModelCardHelper

ANNDATA_VERSION = "0.11.4"
UNKNOWN = "Unknown"


def labelled_adata(seed: int = 1):
    """synthetic_iid (60 cells, 30 genes), ``labels`` with every third cell ``Unknown``."""
    adata = synthetic_iid(batch_size=30, n_genes=30, n_proteins=0, n_regions=0, seed=seed)
    labels = adata.obs["labels"].astype(str).to_numpy().copy()
    labels[::3] = UNKNOWN
    adata.obs["labels"] = labels
    return adata


@pytest.fixture(scope="module")
def model():
    """A SCANVI with a class prior. Its initial weights serve (only their transfer is
    checked; training would compile the engine's programs for nothing), marked trained."""
    jaxvi.settings.seed = 0
    adata = labelled_adata()
    SCANVI.setup_anndata(adata, labels_key="labels", unlabeled_category=UNKNOWN, batch_key="batch")
    m = SCANVI(adata, n_hidden=16, n_latent=4, y_prior=[0.25, 0.25, 0.5])
    m.is_trained_ = True
    return m


def _tags(card: str) -> list[str]:
    yaml = pytest.importorskip("yaml")
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match is not None
    return yaml.safe_load(match.group(1))["tags"]


@pytest.mark.parametrize("model_format", ["jaxvi", "scvi-tools"])
def test_hub_round_trip_of_a_scanvi(model, tmp_path, model_format):
    d = tmp_path / "hub"
    h = hub.save_hub_model(model, str(d), model_format=model_format, metrics=None)
    meta = json.loads((d / "_scvi_required_metadata.json").read_text())
    assert meta["model_cls_name"] == "SCANVI"
    assert "model_cls_name:SCANVI" in _tags(h.model_card)
    assert "scANVI (single-cell annotation using variational inference)" in h.model_card
    assert "scVI (single-cell variational inference) is" not in h.model_card
    params = h.model_card.split("<strong>Model Parameters</strong>")[1]
    assert '"linear_classifier": false' in params
    assert '"y_prior": [' in params  # scvi-tools' files hold it as a tensor: shown as a list
    loaded = HubModel(str(d)).model  # the saved adata.h5ad; the class from the files
    assert type(loaded) is SCANVI
    assert loaded.unlabeled_category_ == UNKNOWN
    pd.testing.assert_frame_equal(loaded.predict(soft=True), model.predict(soft=True))
    helper = HubModelCardHelper.from_dir(str(d), "cc-by-4.0", ANNDATA_VERSION)
    assert helper.model_cls_name == "SCANVI"
    assert helper.model_setup_anndata_args["unlabeled_category"] == UNKNOWN
    assert helper.model_summary_stats["n_labels"] == 4  # three types and Unknown
    assert HubMetadata.from_dir(str(d), ANNDATA_VERSION).model_cls_name == "SCANVI"
    # a metadata naming SCVI over SCANVI files is refused when the model loads
    wrong = dataclasses.replace(h.metadata, model_cls_name="SCVI")
    with pytest.raises(ValueError, match="names a SCVI model; the files hold a SCANVI"):
        HubModel(str(d), metadata=wrong).load_model()


@pytest.mark.slow  # the criticism report compiles the posterior predictive sampler and DE
def test_hub_report_and_card_of_a_scanvi(model, tmp_path):
    h = hub.save_hub_model(
        model, str(tmp_path / "hub"), metrics=True, n_samples=2, label_key="labels"
    )
    assert set(h.metrics) >= {"cell_wise_cv", "gene_wise_cv"}
    assert h.metrics["cell_wise_cv"] in h.model_card


def test_scvi_tools_scanvi_hub_directory(model, tmp_path):
    """A SCANVI saved by scvi-tools: jaxvi's metadata and card helper equal scvi-tools' and
    the model loads as a SCANVI with scvi-tools' latent means; scvi-tools' HubModel opens the
    directory jaxvi writes in scvi-tools' format."""
    ref = pytest.importorskip("scvi.hub")
    scvi = pytest.importorskip("scvi")
    adata = labelled_adata(seed=2)
    scvi.model.SCANVI.setup_anndata(
        adata, labels_key="labels", unlabeled_category=UNKNOWN, batch_key="batch"
    )
    ref_model = scvi.model.SCANVI(adata, n_latent=5)
    ref_model.is_trained_ = True  # its initial weights serve: only their transfer is checked
    ref_model.module.eval()
    d = str(tmp_path / "scvi_dir")
    ref_model.save(d, save_anndata=True)
    ours, theirs_meta = (
        HubMetadata.from_dir(d, ANNDATA_VERSION),
        ref.HubMetadata.from_dir(d, ANNDATA_VERSION),
    )
    assert ours.to_dict() == dataclasses.asdict(theirs_meta)
    kw = dict(data_modalities=["rna"], data_is_annotated=True)
    ours = HubModelCardHelper.from_dir(d, "cc-by-4.0", ANNDATA_VERSION, **kw)
    theirs = ref.HubModelCardHelper.from_dir(d, "cc-by-4.0", ANNDATA_VERSION, **kw)
    assert ours.model_cls_name == theirs.model_cls_name == "SCANVI"
    assert ours.model_init_params == theirs.model_init_params
    assert ours.model_setup_anndata_args == theirs.model_setup_anndata_args
    assert ours.model_summary_stats == dict(theirs.model_summary_stats)
    assert ours.model_data_registry == {k: dict(v) for k, v in theirs.model_data_registry.items()}
    assert _tags(ours.model_card) == _tags(str(theirs.model_card))
    h = HubModel(d, metadata=theirs_meta, model_card=theirs)
    assert type(h.model) is SCANVI
    np.testing.assert_allclose(
        h.model.get_latent_representation(),
        ref_model.get_latent_representation(),
        rtol=1e-4,
        atol=1e-5,
    )
    # and the other way: jaxvi's hub directory in scvi-tools' format opens in scvi-tools
    out = tmp_path / "from_jaxvi"
    hub.save_hub_model(model, str(out), model_format="scvi-tools", metrics=None)
    theirs_hub = ref.HubModel(str(out))
    assert type(theirs_hub.model).__name__ == "SCANVI"
    np.testing.assert_allclose(
        theirs_hub.model.predict(soft=True).to_numpy(),
        model.predict(soft=True).to_numpy(),
        rtol=1e-5,
        atol=1e-6,
    )
