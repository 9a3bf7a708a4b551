"""The statistics of Bayesian differential expression: pure functions of arrays, vectorised
over genes (used by :func:`jaxvi.analysis.de.differential_expression`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp

__all__ = [
    "EPS",
    "change_test",
    "credible_intervals",
    "estimate_delta",
    "estimate_pseudocounts_offset",
    "fdr_de_prediction",
    "library_scaling",
    "raw_counts_properties",
    "vanilla_test",
]

EPS = 1e-8


def vanilla_test(scales1: np.ndarray, scales2: np.ndarray) -> dict[str, np.ndarray]:
    """The vanilla test on paired posterior samples.

    Parameters
    ----------
    scales1, scales2
        ``(n_pairs, genes)`` paired posterior samples of the normalized expression.

    Returns
    -------
    ``{"proba_m1", "proba_m2", "bayes_factor"}``, each ``(genes,)`` float64:
    ``P(scale1 > scale2)``, its complement and ``log(p1 + 1e-8) - log(p2 + 1e-8)``.
    """
    p1 = np.mean(np.asarray(scales1) > np.asarray(scales2), axis=0)
    p2 = 1.0 - p1
    return {"proba_m1": p1, "proba_m2": p2, "bayes_factor": np.log(p1 + EPS) - np.log(p2 + EPS)}


def _log2_fold_change(x: np.ndarray, y: np.ndarray, pseudocounts) -> np.ndarray:
    return np.log2(x + pseudocounts) - np.log2(y + pseudocounts)


def change_test(
    scales1: np.ndarray,
    scales2: np.ndarray,
    pseudocounts,
    delta: float | None = 0.25,
    test_mode: str = "three",
    cred_interval_lvls: Sequence[float] | None = None,
    change_fn: str | Callable | None = None,
    m1_domain_fn: Callable | None = None,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """The change (effect-size) test on paired posterior samples.

    Parameters
    ----------
    scales1, scales2
        ``(n_pairs, genes)`` paired posterior samples of the normalized expression.
    pseudocounts
        Offset added to both scales before the log fold change (a scalar).
    delta
        LFC threshold: DE means ``r >= delta`` or ``r < -delta``. ``None`` estimates it from
        the per-gene mean LFCs with :func:`estimate_delta`.
    test_mode
        ``"three"``: ``proba_de = max(P+, P-)``; ``"two"``: ``P+ + P-``.
    cred_interval_lvls
        Levels of highest-posterior-density intervals of the LFC to add.
    change_fn
        ``None`` or ``"log-fold"`` (log2 fold change), or ``f(x, y, pseudocounts)`` returning
        ``(n_pairs, genes)`` effect sizes.
    m1_domain_fn
        ``f(r) -> (is_de_plus, is_de_minus)``, boolean ``(n_pairs, genes)`` arrays; default
        the two tails beyond ``delta``.
    seed
        Seed of the Gaussian mixture when ``delta`` is None.

    Returns
    -------
    ``proba_de, proba_not_de, bayes_factor`` ``(genes,)``; ``delta`` (the threshold used);
    ``lfc_mean, lfc_median, lfc_std, lfc_min, lfc_max`` and, per level ``L``,
    ``lfc_confidence_interval_{L}_min/max``, all ``(genes,)`` and computed with
    ``1e-3 * pseudocounts`` (the smaller offset estimates the fold change itself).
    """
    if test_mode not in ("two", "three"):
        raise ValueError(f"test_mode must be 'two' or 'three', got {test_mode!r}.")
    if change_fn is None or change_fn == "log-fold":
        change_fn = _log2_fold_change
    elif not callable(change_fn):
        raise ValueError(f"change_fn must be None, 'log-fold' or a callable, got {change_fn!r}.")
    r = np.asarray(change_fn(scales1, scales2, pseudocounts))
    if delta is None:
        delta = estimate_delta(r.mean(axis=0), seed=seed)
    if m1_domain_fn is None:
        plus, minus = r >= delta, r < -delta
    else:
        plus, minus = m1_domain_fn(r)
    del r
    p_plus = np.mean(plus, axis=0)
    p_minus = np.mean(minus, axis=0)
    proba_de = p_plus + p_minus if test_mode == "two" else np.maximum(p_plus, p_minus)
    lfc = np.asarray(change_fn(scales1, scales2, 1e-3 * pseudocounts))
    out = {
        "proba_de": proba_de,
        "proba_not_de": 1.0 - proba_de,
        "bayes_factor": np.log(proba_de + EPS) - np.log(1.0 - proba_de + EPS),
        "delta": delta,
        "lfc_mean": lfc.mean(axis=0),
        "lfc_median": np.median(lfc, axis=0),
        "lfc_std": lfc.std(axis=0),
        "lfc_min": lfc.min(axis=0),
        "lfc_max": lfc.max(axis=0),
    }
    for level in cred_interval_lvls or []:
        hpd = credible_intervals(lfc, level)
        name = str(level)[:5]
        out[f"lfc_confidence_interval_{name}_min"] = hpd[:, 0]
        out[f"lfc_confidence_interval_{name}_max"] = hpd[:, 1]
    return out


def credible_intervals(samples: np.ndarray, level: float = 0.94) -> np.ndarray:
    """Highest-posterior-density interval of each column (shortest interval, unimodal case).

    Parameters
    ----------
    samples
        ``(n_samples,)`` or ``(n_samples, genes)`` posterior samples.
    level
        Credible level in ``[0, 1)``.

    Returns
    -------
    ``(2,)`` or ``(genes, 2)``: interval minimum and maximum.
    """
    samples = np.asarray(samples)
    one = samples.ndim == 1
    s = np.sort(samples[:, None] if one else samples, axis=0)
    n = s.shape[0]
    k = int(np.floor(level * n))
    widths = s[k:] - s[: n - k]
    if widths.shape[0] == 0:
        raise ValueError(f"Too few samples ({n}) for a credible interval at level {level}.")
    start = np.argmin(widths, axis=0)
    cols = np.arange(s.shape[1])
    out = np.stack([s[start, cols], s[start + k, cols]], axis=1)
    return out[0] if one else out


def estimate_pseudocounts_offset(
    scales_a: np.ndarray,
    scales_b: np.ndarray,
    where_zero_a: np.ndarray,
    where_zero_b: np.ndarray,
    quantile: float = 0.9,
):
    """Pseudocount offset that shrinks the LFCs of genes not expressed in a group.

    Parameters
    ----------
    scales_a, scales_b
        ``(n_samples, genes)`` posterior samples of the two groups.
    where_zero_a, where_zero_b
        ``(genes,)`` boolean: genes whose mean raw count in the group is below threshold.
    quantile
        Quantile of the per-gene maximal scale over those genes.

    Returns
    -------
    Scalar ``max(1e-10, max(eps_a, eps_b) / genes)``, where ``eps`` is the quantile of the
    per-gene maximum scale over a group's non-expressed genes (1e-10 if there are none).
    """
    max_a = np.max(scales_a, axis=0)
    max_b = np.max(scales_b, axis=0)
    where_zero_a = np.asarray(where_zero_a, bool)
    where_zero_b = np.asarray(where_zero_b, bool)
    if not (max_a.shape == where_zero_a.shape == max_b.shape == where_zero_b.shape):
        raise ValueError(
            f"Shapes differ: scales {max_a.shape} / {max_b.shape}, "
            f"masks {where_zero_a.shape} / {where_zero_b.shape}."
        )
    eps_a = np.quantile(max_a[where_zero_a], q=quantile) if where_zero_a.any() else 1e-10
    eps_b = np.quantile(max_b[where_zero_b], q=quantile) if where_zero_b.any() else 1e-10
    return np.maximum(1e-10, np.maximum(eps_a, eps_b) / len(max_a))


def estimate_delta(
    lfc_means: np.ndarray, coef: float = 0.6, min_thres: float = 0.1, seed: int | None = None
):
    """LFC threshold from the modes of the per-gene mean LFCs.

    A 3-component Gaussian mixture is fitted to ``lfc_means`` (scikit-learn); the threshold is
    ``max(min_thres, coef * mean(|lowest mean|, |highest mean|))``.

    Parameters
    ----------
    lfc_means
        ``(genes,)`` mean LFC of each gene.
    coef, min_thres
        0.6 and 0.1, as scvi-tools.
    seed
        ``random_state`` of the mixture (scvi-tools leaves it unseeded).
    """
    from sklearn.mixture import GaussianMixture

    lfc_means = np.asarray(lfc_means)
    if lfc_means.ndim != 1:
        raise ValueError(f"lfc_means must be 1-D (genes,), got shape {lfc_means.shape}.")
    gmm = GaussianMixture(n_components=3, random_state=seed).fit(lfc_means[:, None])
    modes = np.sort(gmm.means_.squeeze())
    return np.maximum(min_thres, coef * np.abs(modes[[0, -1]]).mean())


def fdr_de_prediction(proba_de, fdr: float = 0.05) -> np.ndarray:
    """Flag the largest set of top genes whose posterior expected FDR is at most ``fdr``.

    Genes are ranked by ``proba_de`` (descending, ties in input order); the flagged set is the
    top ``k`` with ``k`` the number of ranks at which ``sum_{i<=k}(1 - p_i) / k <= fdr``.

    Parameters
    ----------
    proba_de
        ``(genes,)`` posterior probabilities of DE.
    fdr
        Target false discovery rate.

    Returns
    -------
    ``(genes,)`` bool, aligned with ``proba_de``.
    """
    p = np.asarray(proba_de, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"proba_de must be 1-D, got shape {p.shape}.")
    order = np.argsort(-p, kind="stable")
    cum_fdr = np.cumsum(1.0 - p[order]) / (1.0 + np.arange(len(p)))
    n_de = int(np.sum(cum_fdr <= fdr))
    out = np.zeros(len(p), bool)
    out[order[:n_de]] = True
    return out


def raw_counts_properties(x, mask1, mask2, scaling=None) -> dict[str, np.ndarray]:
    """Raw-count statistics of two cell groups.

    Parameters
    ----------
    x
        ``(cells, genes)`` raw counts, dense or scipy sparse.
    mask1, mask2
        ``(cells,)`` boolean masks (or index arrays) of the two groups.
    scaling
        ``(cells,)`` per-cell normalisation factor; default ``1e4 / library size``.

    Returns
    -------
    ``raw_mean1/2`` (mean count), ``non_zeros_proportion1/2`` and ``raw_normalized_mean1/2``
    (mean of ``counts * scaling``), each ``(genes,)``.
    """
    if scaling is None:
        scaling = library_scaling(x)
    scaling = np.asarray(scaling).reshape(-1, 1)

    def col_mean(a) -> np.ndarray:
        return np.asarray(a.mean(axis=0)).ravel()

    groups = {"1": (x[mask1], scaling[mask1]), "2": (x[mask2], scaling[mask2])}
    normed = {g: xg.multiply(f) if sp.issparse(xg) else xg * f for g, (xg, f) in groups.items()}
    return {
        **{f"raw_mean{g}": col_mean(xg) for g, (xg, _) in groups.items()},
        **{f"non_zeros_proportion{g}": col_mean(xg != 0) for g, (xg, _) in groups.items()},
        **{f"raw_normalized_mean{g}": col_mean(v) for g, v in normed.items()},
    }


def library_scaling(x) -> np.ndarray:
    """``(cells,)`` factor ``1e4 / library size`` (``inf`` for empty cells)."""
    with np.errstate(divide="ignore"):
        return (1 / np.asarray(x.sum(axis=1)).ravel()) * 1e4
