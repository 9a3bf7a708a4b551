"""Differential expression (:mod:`jaxvi.analysis.de`): the statistics on hand-made samples, the
API on a small trained model, and agreement with scvi-tools 1.4.2 on shared weights.

The agreement tests train jaxvi briefly on ``pbmc68k_reduced`` (700 cells, 10 cell types),
copy the weights into an ``scvi.model.SCVI`` with :func:`jaxvi.io.bridge.load_into_scvi_tools`
and run one-vs-rest DE for every cell type in both libraries with the default 5000 samples per
group. The two only differ by Monte-Carlo noise, so the per-gene Bayes factors and mean LFCs
must rank the genes alike (Spearman >= 0.95 per cell type); columns, dtypes, index, sorting
and the raw-count statistics must be identical. They are skipped without scvi-tools.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import jaxvi
from jaxvi.analysis import de as de
from jaxvi.analysis.de import (
    change_test,
    credible_intervals,
    differential_expression,
    estimate_delta,
    estimate_pseudocounts_offset,
    fdr_de_prediction,
    raw_counts_properties,
    vanilla_test,
)

VANILLA_COLS = ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"]
CHANGE_COLS = [
    "proba_de",
    "proba_not_de",
    "bayes_factor",
    "scale1",
    "scale2",
    "pseudocounts",
    "delta",
    "lfc_mean",
    "lfc_median",
    "lfc_std",
    "lfc_min",
    "lfc_max",
]
RAW_COLS = [
    "raw_mean1",
    "raw_mean2",
    "non_zeros_proportion1",
    "non_zeros_proportion2",
    "raw_normalized_mean1",
    "raw_normalized_mean2",
]
GROUP_COLS = ["comparison", "group1", "group2"]


# ------------------------------------------------------------------------- pure statistics
def test_vanilla_probabilities_and_bayes_factor():
    s1 = np.array([[1.0, 2.0, 1.0], [3.0, 0.0, 1.0], [2.0, 2.0, 0.0], [2.0, 1.0, 5.0]])
    s2 = np.array([[0.0, 3.0, 1.0], [1.0, 1.0, 0.0], [1.0, 2.0, 1.0], [1.0, 2.0, 1.0]])
    out = vanilla_test(s1, s2)
    np.testing.assert_allclose(out["proba_m1"], [1.0, 0.0, 0.5])  # ties count for M2
    np.testing.assert_allclose(out["proba_m2"], [0.0, 1.0, 0.5])
    expected = np.log(np.array([1.0, 0.0, 0.5]) + 1e-8) - np.log(np.array([0.0, 1.0, 0.5]) + 1e-8)
    np.testing.assert_allclose(out["bayes_factor"], expected)
    assert out["bayes_factor"][0] == pytest.approx(np.log(1 + 1e-8) - np.log(1e-8))


def test_change_lfc_pseudocounts_delta_and_test_modes():
    rng = np.random.default_rng(0)
    s1 = rng.uniform(0.05, 0.1, size=(400, 5))
    s2 = rng.uniform(0.05, 0.1, size=(400, 5))
    s1[:, 0] *= 4.0  # up in group 1
    s2[:, 1] *= 4.0  # down in group 1
    pc, delta = 1e-3, 0.25
    out = change_test(s1, s2, pc, delta=delta, cred_interval_lvls=[0.5, 0.9])
    r = np.log2(s1 + pc) - np.log2(s2 + pc)
    p_plus, p_minus = (r >= delta).mean(0), (r < -delta).mean(0)
    np.testing.assert_allclose(out["proba_de"], np.maximum(p_plus, p_minus))
    np.testing.assert_allclose(out["proba_not_de"], 1 - out["proba_de"])
    bf = np.log(out["proba_de"] + 1e-8) - np.log(1 - out["proba_de"] + 1e-8)
    np.testing.assert_allclose(out["bayes_factor"], bf)
    assert out["proba_de"][0] > 0.9
    assert out["proba_de"][1] > 0.9
    # LFC summaries use 1e-3 * pseudocounts; the sign is group 1 minus group 2.
    lfc = np.log2(s1 + 1e-3 * pc) - np.log2(s2 + 1e-3 * pc)
    np.testing.assert_allclose(out["lfc_mean"], lfc.mean(0))
    np.testing.assert_allclose(out["lfc_median"], np.median(lfc, 0))
    np.testing.assert_allclose(out["lfc_std"], lfc.std(0))
    np.testing.assert_allclose(out["lfc_min"], lfc.min(0))
    np.testing.assert_allclose(out["lfc_max"], lfc.max(0))
    assert out["lfc_mean"][0] > 1.0 > -1.0 > out["lfc_mean"][1]
    assert out["delta"] == delta
    for lvl in ("0.5", "0.9"):
        lo, hi = (
            out[f"lfc_confidence_interval_{lvl}_min"],
            out[f"lfc_confidence_interval_{lvl}_max"],
        )
        assert np.all(out["lfc_min"] <= lo)
        assert np.all(lo <= hi)
        assert np.all(hi <= out["lfc_max"])
    two = change_test(s1, s2, pc, delta=delta, test_mode="two")
    np.testing.assert_allclose(two["proba_de"], p_plus + p_minus)
    # r == -delta is not "down", r == delta is "up".
    edge1 = np.array([[2.0, 1.0]])
    edge2 = np.array([[1.0, 2.0]])
    edge = change_test(edge1, edge2, 0.0, delta=1.0, test_mode="two")
    np.testing.assert_array_equal(edge["proba_de"], [1.0, 0.0])
    with pytest.raises(ValueError, match="test_mode"):
        change_test(s1, s2, pc, test_mode="four")


def test_change_custom_functions():
    s1 = np.full((10, 2), 0.3)
    s2 = np.full((10, 2), 0.1)
    out = change_test(
        s1,
        s2,
        0.0,
        change_fn=lambda x, y, pc: x - y,
        m1_domain_fn=lambda r: (r > 0.15, r < -0.15),
    )
    np.testing.assert_allclose(out["proba_de"], [1.0, 1.0])
    np.testing.assert_allclose(out["lfc_mean"], [0.2, 0.2])


def test_pseudocounts_offset():
    scales_a = np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.1, 0.1, 0.1]])
    scales_b = np.array([[0.2, 0.2, 0.2, 0.2], [0.1, 0.3, 0.1, 0.1]])
    zero_a = np.array([True, False, True, False])
    zero_b = np.array([False, True, False, False])
    eps_a = np.quantile([0.5, 0.3], 0.9)  # max over samples of genes 0 and 2
    eps_b = 0.3
    got = estimate_pseudocounts_offset(scales_a, scales_b, zero_a, zero_b)
    assert got == pytest.approx(max(eps_a, eps_b) / 4)
    none = np.zeros(4, bool)
    assert estimate_pseudocounts_offset(scales_a, scales_b, none, none) == pytest.approx(1e-10)
    with pytest.raises(ValueError, match="Shapes"):
        estimate_pseudocounts_offset(scales_a, scales_b, zero_a[:3], zero_b)


def test_estimate_delta():
    rng = np.random.default_rng(0)
    means = np.concatenate([rng.normal(m, 0.05, 200) for m in (-2.0, 0.0, 2.0)])
    assert estimate_delta(means, seed=0) == pytest.approx(0.6 * 2.0, abs=0.03)
    assert estimate_delta(rng.normal(0, 0.01, 300), seed=0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="1-D"):
        estimate_delta(means[:, None])


def _hpd_loop(x, level):
    x = np.sort(x)
    k = int(np.floor(level * len(x)))
    widths = x[k:] - x[: len(x) - k]
    i = int(np.argmin(widths))
    return x[i], x[i + k]


def test_credible_intervals_are_shortest_intervals():
    np.testing.assert_allclose(credible_intervals(np.arange(100.0), 0.5), [0.0, 50.0])
    rng = np.random.default_rng(1)
    samples = np.concatenate([rng.normal(size=(300, 4)), rng.exponential(size=(300, 2))], 1)
    got = credible_intervals(samples, 0.8)
    assert got.shape == (6, 2)
    for j in range(6):
        np.testing.assert_allclose(got[j], _hpd_loop(samples[:, j], 0.8))
        inside = np.mean((samples[:, j] >= got[j, 0]) & (samples[:, j] <= got[j, 1]))
        assert inside >= 0.8
    with pytest.raises(ValueError, match="Too few"):
        credible_intervals(np.arange(3.0), 1.0)


def test_fdr_flag():
    p = np.array([0.99, 0.2, 0.97, 0.9, 0.5])
    # sorted: .99 .97 .9 .5 .2 -> cumulative FDR .01 .02 .0467 .16 .288
    np.testing.assert_array_equal(fdr_de_prediction(p, 0.05), [True, False, True, True, False])
    np.testing.assert_array_equal(fdr_de_prediction(p, 0.015), [True, False, False, False, False])
    assert not fdr_de_prediction(p, 0.001).any()
    assert fdr_de_prediction(p, 1.0).all()


@pytest.mark.parametrize("sparse", [False, True])
def test_raw_counts_properties(sparse):
    x = np.array([[1, 0, 3], [0, 0, 1], [2, 2, 0], [4, 0, 0]], dtype=np.float32)
    m1 = np.array([True, True, False, False])
    m2 = ~m1
    got = raw_counts_properties(sp.csr_matrix(x) if sparse else x, m1, m2)
    assert list(got) == RAW_COLS
    norm = x * (1e4 / x.sum(1, keepdims=True))
    np.testing.assert_allclose(got["raw_mean1"], x[:2].mean(0))
    np.testing.assert_allclose(got["raw_mean2"], x[2:].mean(0))
    np.testing.assert_allclose(got["non_zeros_proportion1"], [0.5, 0.0, 1.0])
    np.testing.assert_allclose(got["non_zeros_proportion2"], [1.0, 0.5, 0.0])
    np.testing.assert_allclose(got["raw_normalized_mean1"], norm[:2].mean(0), rtol=1e-6)
    np.testing.assert_allclose(got["raw_normalized_mean2"], norm[2:].mean(0), rtol=1e-6)


# ------------------------------------------------------------------- API on a small model
N_SMALL = 1000  # samples per group on pbmc_small


@pytest.fixture(scope="module")
def small():
    adata = jaxvi.data.pbmc_small()
    adata.obs["batch"] = np.where(np.arange(adata.n_obs) % 2 == 0, "a", "b")
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = jaxvi.SCVI(adata, n_hidden=32, n_latent=5)
    model.train(max_epochs=50, enable_progress_bar=False)  # one minibatch per epoch
    return adata, model


def _check_block(block: pd.DataFrame, adata, sort_key: str):
    assert sorted(block.index) == sorted(adata.var_names)
    assert block[sort_key].is_monotonic_decreasing


def test_one_vs_rest_all_groups(small):
    adata, model = small
    df = differential_expression(model, groupby="groups", silent=True, n_samples_overall=N_SMALL)
    assert list(df.columns) == VANILLA_COLS + RAW_COLS + GROUP_COLS
    assert df.shape[0] == 2 * adata.n_vars
    assert list(df["comparison"].unique()) == ["g1 vs Rest", "g2 vs Rest"]
    assert set(df["group2"]) == {"Rest"}
    for g in ("g1", "g2"):
        block = df[df["group1"] == g]
        _check_block(block, adata, "bayes_factor")
        np.testing.assert_allclose(block["proba_m1"] + block["proba_m2"], 1.0)
        np.testing.assert_allclose(block["scale1"].sum(), 1.0, rtol=1e-4)  # px_scale sums to 1
        # raw statistics straight from the counts
        x = adata.X.toarray()
        m1 = (adata.obs["groups"] == g).to_numpy()
        raw = block.loc[adata.var_names]
        np.testing.assert_allclose(raw["raw_mean1"], x[m1].mean(0), rtol=1e-5)
        np.testing.assert_allclose(raw["non_zeros_proportion2"], (x[~m1] > 0).mean(0))
        norm = x / x.sum(1, keepdims=True) * 1e4
        np.testing.assert_allclose(raw["raw_normalized_mean2"], norm[~m1].mean(0), rtol=1e-4)
    assert "_scvi_raw_norm_scaling" in adata.obs  # cached, as scvi-tools
    # g2 vs Rest mirrors g1 vs Rest: the Bayes factors are roughly opposite.
    bf1 = df[df["group1"] == "g1"].loc[adata.var_names, "bayes_factor"].to_numpy()
    bf2 = df[df["group1"] == "g2"].loc[adata.var_names, "bayes_factor"].to_numpy()
    assert np.corrcoef(bf1, bf2)[0, 1] < -0.8


def test_change_mode_group1_group2(small):
    adata, model = small
    df = differential_expression(
        model,
        groupby="groups",
        group1="g1",
        group2="g2",
        mode="change",
        delta=None,
        fdr_target=0.1,
        silent=True,
        n_samples_overall=N_SMALL,
        cred_interval_lvls=[0.5],
    )
    ci = ["lfc_confidence_interval_0.5_min", "lfc_confidence_interval_0.5_max"]
    assert list(df.columns) == CHANGE_COLS + ci + RAW_COLS + ["is_de_fdr_0.1"] + GROUP_COLS
    assert df.shape[0] == adata.n_vars
    assert set(df["comparison"]) == {"g1 vs g2"}
    assert set(df["group2"]) == {"g2"}
    _check_block(df, adata, "proba_de")
    assert df["delta"].nunique() == 1
    assert df["delta"].iloc[0] >= 0.1
    assert df["pseudocounts"].nunique() == 1
    assert df["pseudocounts"].iloc[0] >= 1e-10
    np.testing.assert_array_equal(df["is_de_fdr_0.1"], fdr_de_prediction(df["proba_de"], 0.1))
    flags = df["is_de_fdr_0.1"].to_numpy()
    assert not np.any(flags[1:] & ~flags[:-1])  # a prefix of the sorted table
    assert np.all(df["lfc_min"] <= df[ci[0]])
    assert np.all(df[ci[1]] <= df["lfc_max"])


def test_idx1_idx2(small):
    adata, model = small
    g1 = (adata.obs["groups"] == "g1").to_numpy()
    cols = VANILLA_COLS + RAW_COLS
    # More samples than elsewhere: the Bayes factors of the two calls are compared below.
    by_mask = differential_expression(
        model, idx1=g1, idx2=~g1, silent=True, n_samples_overall=5000
    )
    assert list(by_mask.columns) == cols
    by_list = differential_expression(
        model, idx1=list(np.flatnonzero(g1)), silent=True, n_samples_overall=N_SMALL
    )
    by_query = differential_expression(
        model, idx1="groups == 'g1'", idx2="groups == 'g2'", silent=True, n_samples_overall=5000
    )
    for df in (by_list, by_query):
        assert list(df.columns) == cols
        pd.testing.assert_frame_equal(
            df.loc[adata.var_names, RAW_COLS], by_mask.loc[adata.var_names, RAW_COLS]
        )
    a = by_mask.loc[adata.var_names, "bayes_factor"]
    b = by_query.loc[adata.var_names, "bayes_factor"]
    r = np.corrcoef(a, b)[0, 1]
    assert r > 0.9, r  # same comparison, Monte-Carlo noise only


def test_batch_correction(small):
    adata, model = small
    df = differential_expression(
        model,
        groupby="groups",
        group1="g1",
        mode="change",
        batch_correction=True,
        silent=True,
        n_samples_overall=N_SMALL,
    )
    assert df.shape[0] == adata.n_vars
    assert list(df.columns[:12]) == CHANGE_COLS
    one = differential_expression(
        model,
        groupby="groups",
        group1="g1",
        batch_correction=True,
        batchid1=["a"],
        batchid2=["a"],
        use_permutation=True,
        m_permutation=500,
        silent=True,
        n_samples_overall=N_SMALL,
    )
    assert one.shape[0] == adata.n_vars
    with pytest.warns(UserWarning, match="intersect"):
        differential_expression(
            model,
            groupby="groups",
            group1="g1",
            batch_correction=True,
            batchid1=["a", "b"],
            batchid2=["a"],
            use_permutation=True,
            silent=True,
            n_samples_overall=N_SMALL,
        )


def test_filter_outlier_cells(small):
    _, model = small
    df = differential_expression(
        model,
        groupby="groups",
        group1="g2",
        filter_outlier_cells=True,
        silent=True,
        n_samples_overall=N_SMALL,
    )
    assert np.isfinite(df["bayes_factor"]).all()


def test_sampler_uses_normalized_expression(small, monkeypatch):
    """Posterior samples come from get_normalized_expression(n_samples_overall=...), one call
    per group and batch, with the batch category as transform_batch."""
    _, model = small
    calls = []
    original = model.get_normalized_expression

    def spy(*args, **kwargs):
        calls.append((kwargs["transform_batch"], kwargs["n_samples_overall"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "get_normalized_expression", spy)
    differential_expression(
        model, groupby="groups", group1="g1", silent=True, n_samples_overall=N_SMALL
    )
    assert calls == [(None, N_SMALL), (None, N_SMALL)]
    calls.clear()
    differential_expression(
        model,
        groupby="groups",
        group1="g1",
        batch_correction=True,
        silent=True,
        n_samples_overall=N_SMALL,
    )
    assert calls == [("a", N_SMALL // 2), ("b", N_SMALL // 2)] * 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"groupby": "groups", "group1": "nope"}, ValueError, "'nope' has no cells"),
        ({"groupby": "groups", "group1": "g1", "group2": "nope"}, ValueError, "group2"),
        ({"groupby": "missing"}, ValueError, "not found"),
        ({}, ValueError, "groupby"),
        ({"groupby": "groups", "mode": "fancy"}, ValueError, "mode"),
        ({"groupby": "groups", "weights": "heavy"}, ValueError, "weights"),
        ({"groupby": "groups", "n_samples": 10}, TypeError, "n_samples"),
        ({"groupby": "groups", "test_mode": "one"}, ValueError, "test_mode"),
        ({"groupby": "groups", "batchid1": ["a"]}, ValueError, "batch_correction"),
        ({"idx1": np.zeros(80, bool)}, ValueError, "no cells"),
        ({"idx1": np.ones(5, bool)}, ValueError, "length"),
        ({"groupby": "batch", "batch_correction": True, "batchid1": ["zz"]}, ValueError, "zz"),
    ],
)
def test_bad_input(small, kwargs, error, match):
    _, model = small
    with pytest.raises(error, match=match):
        differential_expression(model, silent=True, n_samples_overall=100, **kwargs)


def test_single_group_raises(small):
    adata, model = small
    adata.obs["one"] = "x"
    try:
        with pytest.raises(ValueError, match="single group"):
            differential_expression(model, groupby="one", silent=True)
    finally:
        del adata.obs["one"]


# ------------------------------------------------------ agreement with scvi-tools 1.4.2
@pytest.fixture(scope="module")
def shared():
    """jaxvi trained on pbmc68k_reduced and an scvi-tools SCVI holding the same weights."""
    scvi = pytest.importorskip("scvi")
    pytest.importorskip("torch")
    from jaxvi.io.bridge import load_into_scvi_tools

    base = jaxvi.data.pbmc68k_reduced()
    adata_j, adata_t = base.copy(), base.copy()
    jaxvi.SCVI.setup_anndata(adata_j)
    model_j = jaxvi.SCVI(adata_j)
    model_j.train(max_epochs=25, enable_progress_bar=False)
    scvi.model.SCVI.setup_anndata(adata_t)
    model_t = scvi.model.SCVI(adata_t)
    load_into_scvi_tools(model_t, model_j)
    model_t.module.eval()
    model_t.is_trained_ = True
    return model_j, model_t


@pytest.mark.parametrize("mode", ["vanilla", "change"])
def test_agreement_with_scvi_tools(shared, mode):
    from scipy.stats import spearmanr

    model_j, model_t = shared
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002 (scvi-tools samples with the global RNG)
    ours = differential_expression(model_j, groupby="bulk_labels", mode=mode, silent=True)
    ref = model_t.differential_expression(groupby="bulk_labels", mode=mode, silent=True)
    assert list(ours.columns) == list(ref.columns)
    pd.testing.assert_series_equal(ours.dtypes, ref.dtypes)
    assert ours.index.name == ref.index.name
    assert list(ours["comparison"].unique()) == list(ref["comparison"].unique())
    assert ours["group1"].nunique() == 10
    sort_key = "proba_de" if mode == "change" else "bayes_factor"
    compared = ["bayes_factor"] + (["lfc_mean"] if mode == "change" else [])
    rho = {}
    for g in ref["group1"].unique():
        a = ours[ours["group1"] == g]
        b = ref[ref["group1"] == g]
        assert a[sort_key].is_monotonic_decreasing
        b = b.loc[a.index]
        pd.testing.assert_frame_equal(a[RAW_COLS], b[RAW_COLS])
        for col in compared:
            rho[g, col] = spearmanr(a[col], b[col])[0]
        if mode == "change":
            assert a["pseudocounts"].iloc[0] == pytest.approx(b["pseudocounts"].iloc[0], rel=0.2)
            np.testing.assert_allclose(a["scale1"], b["scale1"], rtol=0.1, atol=1e-6)
    print({k: round(v, 4) for k, v in rho.items()})
    assert min(rho.values()) >= 0.95, rho


def test_columns_match_scvi_tools_for_idx_and_options(shared):
    """idx1/idx2 (no comparison columns), HPD columns, estimated delta and FDR target."""
    model_j, model_t = shared
    labels = model_j.adata.obs["bulk_labels"]
    idx1 = (labels == "CD14+ Monocyte").to_numpy()
    idx2 = (labels == "Dendritic").to_numpy()
    opts = {
        "idx1": idx1,
        "idx2": idx2,
        "mode": "change",
        "delta": None,
        "fdr_target": 0.1,
        "silent": True,
        "n_samples_overall": 500,
        "cred_interval_lvls": [0.5, 0.95],
    }
    ours = differential_expression(model_j, **opts)
    ref = model_t.differential_expression(**opts)
    assert list(ours.columns) == list(ref.columns)
    pd.testing.assert_series_equal(ours.dtypes, ref.dtypes)
    ours_v = differential_expression(model_j, idx1=idx1, silent=True, n_samples_overall=500)
    ref_v = model_t.differential_expression(idx1=idx1, silent=True, n_samples_overall=500)
    assert list(ours_v.columns) == list(ref_v.columns)


def test_module_exports():
    assert set(de.__all__) <= set(dir(de))
