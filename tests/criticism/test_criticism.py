"""Posterior predictive checks: metric maths by hand, and scvi-tools' numbers on shared samples."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import jaxvi
from jaxvi.criticism import (
    DE_COLUMNS,
    PosteriorPredictiveCheck,
    calibration_error,
    coefficient_of_variation,
    zero_fraction,
)
from jaxvi.data import synthetic_iid

sparse = pytest.importorskip("sparse")


@pytest.fixture(scope="module")
def adata():
    a = synthetic_iid(seed=0, n_proteins=0, n_regions=0)
    jaxvi.SCVI.setup_anndata(a, labels_key="labels")
    return a


@pytest.fixture(scope="module")
def models(adata):
    """Two untrained jaxvi models with different initialisations (no training needed)."""
    out = {}
    for seed, name in ((0, "scvi_a"), (1, "scvi_b")):
        jaxvi.settings.seed = seed
        out[name] = jaxvi.SCVI(adata, n_latent=5)
    jaxvi.settings.seed = 0
    return out


@pytest.fixture(scope="module")
def samples(adata, models):
    """Posterior predictive samples of the jaxvi models, (cells, genes, 5) GCXS."""
    return {
        name: m.posterior_predictive_sample(adata, n_samples=5, batch_size=32)
        for name, m in models.items()
    }


# ----------------------------------------------------------------- maths by hand
def test_cv_by_hand_and_nan_handling():
    x = np.array([[1.0, 3.0, 0.0], [2.0, 2.0, 0.0]])
    # per gene (over cells): gene0 mean 1.5 std 0.5; gene1 std 0.5 / mean 2.5; gene2 0/0
    per_gene = coefficient_of_variation(x, "cells")
    assert per_gene[:2] == pytest.approx([0.5 / 1.5, 0.5 / 2.5])
    assert np.isnan(per_gene[2])
    assert coefficient_of_variation(x, "cells", raw=True)[2] == 0.0
    per_cell = coefficient_of_variation(x, "features")
    assert per_cell == pytest.approx([np.std([1, 3, 0]) / (4 / 3), np.std([2, 2, 0]) / (4 / 3)])
    # over samples: NaN samples are skipped, the rest averaged
    s = np.stack([x, 2 * x + np.array([[0, 0, 1], [0, 0, 1]])], axis=2)
    cv2 = coefficient_of_variation(s, "cells")
    assert cv2[2] == 0.0  # sample 0 NaN (skipped), sample 1 constant 1 -> 0
    assert cv2[0] == pytest.approx(0.5 / 1.5)
    with pytest.raises(ValueError, match="dim"):
        coefficient_of_variation(x, "genes")


def test_zero_fraction_is_the_fraction_of_zeros():
    x = np.array([[0, 1, 0], [0, 2, 5]])
    s = np.stack([x, np.ones_like(x)], axis=2)
    assert zero_fraction(x) == pytest.approx([1.0, 0.0, 0.5])
    assert zero_fraction(s) == pytest.approx([0.5, 0.0, 0.25])


def test_calibration_error_by_hand():
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 5, size=(20, 7)).astype(float)
    # every sample equals the observation: every interval covers every entry
    same = np.repeat(raw[:, :, None], 4, axis=2)
    widths = [0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65]
    assert calibration_error(same, raw) == pytest.approx(sum((1 - w) ** 2 for w in widths))
    # samples far above the observation: nothing covered
    assert calibration_error(same + 100, raw) == pytest.approx(sum(w**2 for w in widths))
    assert calibration_error(same, raw, [0.25, 0.75]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="even"):
        calibration_error(same, raw, [0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="cells, genes, n_samples"):
        calibration_error(raw, raw)


# ------------------------------------------------------------------- the class
def test_ppc_from_jaxvi_models(adata, models, samples):
    # the fixture's n_samples and batch_size: the sampler compiles once for all tests
    ppc = PosteriorPredictiveCheck(adata, models, n_samples=5, batch_size=32)
    assert set(ppc.samples) == set(models)
    assert ppc.samples["scvi_a"].shape == (400, 100, 5)
    assert ppc.raw_counts.shape == (400, 100)
    cell = ppc.coefficient_of_variation("features")
    gene = ppc.coefficient_of_variation("cells")
    assert list(cell.columns) == ["scvi_a", "scvi_b", "Raw"]
    assert cell.index.name == "cells"
    assert len(cell) == 400
    assert gene.index.name == "features"
    assert list(gene.index) == list(adata.var_names)
    assert np.isfinite(cell.to_numpy()).all()
    zf = ppc.zero_fraction()
    assert zf["Raw"].to_numpy() == pytest.approx((adata.X == 0).mean(axis=0))
    cal = ppc.calibration_error()
    assert list(cal.columns) == ["scvi_a", "scvi_b"]
    assert list(cal.index) == ["features"]
    assert "scvi_a" in repr(ppc)
    idx = np.arange(100, 400)
    sub = PosteriorPredictiveCheck(adata, {"m": models["scvi_a"]}, n_samples=5, indices=idx)
    assert sub.samples["m"].shape == (300, 100, 5)
    assert sub.raw_counts.shape == (300, 100)
    assert list(sub.adata.obs_names) == list(adata.obs_names[100:])


def test_ppc_errors(adata, models):
    with pytest.raises(ValueError, match="empty"):
        PosteriorPredictiveCheck(adata, {})
    with pytest.raises(ValueError, match="reserved"):
        PosteriorPredictiveCheck(adata, {"Raw": models["scvi_a"]})
    with pytest.raises(ValueError, match="n_samples"):
        PosteriorPredictiveCheck(adata, models, n_samples=0)
    with pytest.raises(ValueError, match="shape"):
        PosteriorPredictiveCheck.from_samples(adata, {"m": np.zeros((3, 100, 2))})
    with pytest.raises(ValueError, match="Layer"):
        PosteriorPredictiveCheck.from_samples(
            adata, {"m": np.zeros((400, 100, 2))}, count_layer_key="counts"
        )
    mini = adata.copy()
    mini.uns["_scvi_adata_minify_type"] = "latent_posterior_parameters"
    with pytest.raises(ValueError, match="minified"):
        PosteriorPredictiveCheck.from_samples(mini, {"m": np.zeros((400, 100, 2))})
    ppc = PosteriorPredictiveCheck.from_samples(adata, {"m": np.ones((400, 100, 2))})
    with pytest.raises(ValueError, match="not found"):
        ppc.differential_expression(de_groupby="cell_type")
    with pytest.raises(ValueError, match="exceeds"):
        ppc.differential_expression(de_groupby="labels", n_samples=3)


def test_several_models_each_get_their_own_rows(adata, samples):
    pytest.importorskip("scanpy")
    both = PosteriorPredictiveCheck.from_samples(adata, samples)
    summary = both.differential_expression(de_groupby="labels", p_val_thresh=0.2)
    assert list(summary.columns) == list(DE_COLUMNS)
    assert len(summary) == 2 * 3
    assert not summary.isna().any().any()
    for name, x in samples.items():
        alone = PosteriorPredictiveCheck.from_samples(adata, {name: x})
        ref = alone.differential_expression(de_groupby="labels", p_val_thresh=0.2)
        mine = summary[summary["model"] == name].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine, ref)
    assert (
        summary["n_cells"].tolist()[:3]
        == adata.obs["labels"].value_counts()[["label_0", "label_1", "label_2"]].tolist()
    )
    lfc = both.metrics["diff_exp"]["lfc_per_model_per_group"]
    assert set(lfc) == set(samples)
    assert list(lfc["scvi_a"]["label_0"].columns) == ["raw", "approx"]


# ------------------------------------------------------- parity with scvi-tools
class _SamplesModel:
    """Hands fixed samples to scvi-tools' PosteriorPredictiveCheck."""

    def __init__(self, adata, x):
        self.adata, self.x = adata, x

    def posterior_predictive_sample(self, adata, n_samples, batch_size, indices):
        return self.x


def test_metrics_equal_scvi_tools_on_the_same_samples(adata, samples):
    criticism = pytest.importorskip("scvi.criticism")
    x = samples["scvi_a"]
    # scvi-tools' calibration error only works for a model named "model1"
    ref = criticism.PosteriorPredictiveCheck(
        adata, {"model1": _SamplesModel(adata, x)}, n_samples=5
    )
    ours = PosteriorPredictiveCheck.from_samples(adata, {"model1": x})
    for dim, key in (("features", "cv_cell"), ("cells", "cv_gene")):
        ref.coefficient_of_variation(dim)
        ours.coefficient_of_variation(dim)
        a, b = ref.metrics[key], ours.metrics[key]
        assert list(a.index) == list(b.index)
        np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)
    ref.zero_fraction()
    ours.zero_fraction()
    # the reference reports the fraction of non-zeros
    np.testing.assert_allclose(
        ours.metrics["zero_fraction"].to_numpy(),
        1 - ref.metrics["zero_fraction"].to_numpy(),
        atol=1e-12,
    )
    ref.calibration_error()
    ours.calibration_error()
    assert ours.metrics["calibration"].loc["features", "model1"] == pytest.approx(
        float(ref.metrics["calibration"].loc["features", "model1"]), rel=1e-12
    )
    ref.differential_expression(de_groupby="labels", p_val_thresh=0.2)
    ours.differential_expression(de_groupby="labels", p_val_thresh=0.2)
    a = ref.metrics["diff_exp"]["summary"]
    b = ours.metrics["diff_exp"]["summary"]
    assert list(a.columns) == list(b.columns)
    num = list(DE_COLUMNS[:6])
    np.testing.assert_allclose(b[num].to_numpy(), a[num].to_numpy(float), rtol=1e-6, atol=1e-6)
    assert b["group"].tolist() == a["group"].tolist()
    assert b["n_cells"].tolist() == a["n_cells"].tolist()
    lfc_a = ref.metrics["diff_exp"]["lfc_per_model_per_group"]["model1"]["label_1"]
    lfc_b = ours.metrics["diff_exp"]["lfc_per_model_per_group"]["model1"]["label_1"]
    np.testing.assert_allclose(lfc_b.to_numpy(), lfc_a.to_numpy(), rtol=1e-6, atol=1e-6)
