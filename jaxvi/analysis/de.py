"""Bayesian differential expression, as scvi-tools' ``SCVI.differential_expression``.

Two cell groups are compared through posterior samples of the normalized expression
``px_scale`` (each row sums to 1), drawn with
:meth:`jaxvi.SCVI.get_normalized_expression` (``n_samples_overall`` draws per group, 5000 by
default). Two tests are available:

* ``mode="vanilla"`` (Lopez et al. 2018): ``p1 = P(scale1 > scale2)`` per gene and the
  natural-log Bayes factor ``log(p1 + 1e-8) - log(1 - p1 + 1e-8)``;
* ``mode="change"`` (Boyeau et al. 2019): the log2 fold change
  ``r = log2(scale1 + pc) - log2(scale2 + pc)`` (group 1 minus group 2), the probability
  ``proba_de`` that ``|r|`` exceeds ``delta``, its Bayes factor, summaries of ``r`` and a
  posterior expected FDR flag ``is_de_fdr_<target>``.

The statistics are vectorised NumPy over genes: :func:`vanilla_test`, :func:`change_test`,
:func:`estimate_pseudocounts_offset`, :func:`estimate_delta`, :func:`credible_intervals`,
:func:`fdr_de_prediction` and :func:`raw_counts_properties` are pure functions of arrays.
:func:`differential_expression` draws the samples, runs them for every comparison and
assembles scvi-tools' table (same columns, dtypes, sorting and gene-name index).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from jaxvi._settings import settings
from jaxvi.analysis._de_stats import (
    change_test,
    credible_intervals,
    estimate_delta,
    estimate_pseudocounts_offset,
    fdr_de_prediction,
    library_scaling,
    raw_counts_properties,
    vanilla_test,
)
from jaxvi.data import registry as reglib

__all__ = [
    "change_test",
    "credible_intervals",
    "differential_expression",
    "estimate_delta",
    "estimate_pseudocounts_offset",
    "fdr_de_prediction",
    "library_scaling",
    "raw_counts_properties",
    "vanilla_test",
]

RAW_NORM_KEY = "_scvi_raw_norm_scaling"
_BAYES_KWARGS = {
    "n_samples_overall": 5000,
    "use_permutation": False,
    "m_permutation": 10000,
    "change_fn": None,
    "m1_domain_fn": None,
    "pseudocounts": None,
    "threshold_counts": 0.01,
    "test_mode": "three",
    "cred_interval_lvls": None,
}


# ------------------------------------------------------------------------------ the method
def differential_expression(
    model,
    adata=None,
    groupby: str | None = None,
    group1: str | Iterable[str] | None = None,
    group2: str | None = None,
    idx1=None,
    idx2=None,
    mode: str = "vanilla",
    delta: float | None = 0.25,
    batch_size: int | None = None,
    all_stats: bool = True,
    batch_correction: bool = False,
    batchid1: Sequence[str] | None = None,
    batchid2: Sequence[str] | None = None,
    fdr_target: float = 0.05,
    silent: bool = False,
    weights: str | None = "uniform",
    filter_outlier_cells: bool = False,
    importance_weighting_kwargs: dict | None = None,
    **kwargs,
) -> pd.DataFrame:
    """Bayesian differential expression between cell groups, as scvi-tools.

    Parameters
    ----------
    model
        A trained :class:`jaxvi.SCVI`.
    adata
        AnnData set up like the model's (default ``model.adata``).
    groupby
        ``adata.obs`` column defining the groups.
    group1
        Group(s) to test, each against ``group2``; default every category of ``groupby``.
    group2
        Reference group; default the rest of the cells (``"Rest"``).
    idx1, idx2
        Instead of ``groupby``: boolean mask, integer positions or ``obs.query`` string of
        group 1 and group 2 (default the other cells). No ``comparison`` / ``group1`` /
        ``group2`` columns are then added; a cell in both goes to group 2.
    mode
        ``"vanilla"`` or ``"change"``.
    delta
        LFC threshold of the change mode (0.25); None estimates it (:func:`estimate_delta`).
    batch_size
        Rows (cell, sample) per chunk of the sampling (default ``settings.batch_size``).
    all_stats
        Add the raw-count columns (:func:`raw_counts_properties`). Caches the normalisation
        in ``adata.obs["_scvi_raw_norm_scaling"]``, as scvi-tools.
    batch_correction
        Decode the samples of both groups with each batch of ``batchid1`` / ``batchid2``
        (default all) in turn, ``n_samples_overall / n_batches`` per batch, and pair samples
        of the same batch; otherwise use each cell's observed batch.
    batchid1, batchid2
        Batch categories for ``batch_correction=True``.
    fdr_target
        Target of the change mode's ``is_de_fdr_<fdr_target>`` column.
    silent
        Hide the progress bar.
    weights
        ``"uniform"`` (or None), or ``"importance"``: each group's draws are resampled with
        :meth:`jaxvi.SCVI.get_importance_weights` (anchors from the group's cells).
    filter_outlier_cells
        Drop cells flagged by scikit-learn's ``EllipticEnvelope`` on the latent mean before
        sampling (the raw statistics still use all cells).
    importance_weighting_kwargs
        ``max_cells``, ``truncation``, ``n_mc_samples``, ``n_mc_samples_per_pass`` of the
        importance weights (unused with uniform weights).
    **kwargs
        Options of scvi-tools' ``get_bayes_factors``: ``n_samples_overall`` (5000 samples per
        group), ``use_permutation`` (False), ``m_permutation`` (10000), ``change_fn``,
        ``m1_domain_fn``, ``pseudocounts`` (None: estimated), ``threshold_counts`` (0.01),
        ``test_mode`` (``"three"``), ``cred_interval_lvls`` (None).

    Returns
    -------
    DataFrame indexed by gene name, one block of ``genes`` rows per comparison, concatenated
    in the order of ``group1``. Vanilla columns: ``proba_m1, proba_m2, bayes_factor, scale1,
    scale2``; change columns: ``proba_de, proba_not_de, bayes_factor, scale1, scale2,
    pseudocounts, delta, lfc_mean, lfc_median, lfc_std, lfc_min, lfc_max`` [, HPD columns];
    then the raw statistics, ``is_de_fdr_<fdr_target>`` (change mode) and ``comparison,
    group1, group2`` (with ``groupby``). Blocks are sorted by ``bayes_factor`` (vanilla) or
    ``proba_de`` (change), descending.
    """
    unknown = sorted(set(kwargs) - set(_BAYES_KWARGS))
    if unknown:
        raise TypeError(
            f"differential_expression got unexpected keyword arguments {unknown}; "
            f"allowed: {sorted(_BAYES_KWARGS)}."
        )
    opts = {**_BAYES_KWARGS, **kwargs}
    if mode not in ("vanilla", "change"):
        raise ValueError(f"mode must be 'vanilla' or 'change', got {mode!r}.")
    if opts["test_mode"] not in ("two", "three"):
        raise ValueError(f"test_mode must be 'two' or 'three', got {opts['test_mode']!r}.")
    if weights not in (None, "uniform", "importance"):
        raise ValueError(f"weights must be 'uniform' or 'importance', got {weights!r}.")
    if not batch_correction and (batchid1 is not None or batchid2 is not None):
        raise ValueError("batchid1 / batchid2 need batch_correction=True.")
    adata = model.adata if adata is None else adata
    if adata is None:
        raise ValueError("This model has no AnnData; pass `adata=`.")
    if all_stats and getattr(model, "minified_data_type", None) == "latent_posterior_parameters":
        warnings.warn(
            "Count statistics make no sense for a minified model (its counts are zeros); "
            "consider all_stats=False.",
            UserWarning,
            stacklevel=2,
        )

    comparisons = _comparisons(adata, groupby, group1, group2, idx1, idx2)
    rng = np.random.default_rng(settings.seed)
    layer = model.registry_["setup_args"]["layer"]
    # A backed AnnData's counts stay on disk: its statistics come from bounded passes.
    counts = None if getattr(adata, "isbacked", False) else _registered_counts(adata, layer)
    if batch_correction:
        all_batches = list(model.registry_["batch_categories"])
        batches1 = all_batches if batchid1 is None else list(batchid1)
        batches2 = all_batches if batchid2 is None else list(batchid2)
    else:
        batches1 = batches2 = [None]

    def sample(mask, batches):
        cells = np.flatnonzero(mask)
        if filter_outlier_cells:
            cells = _filter_outliers(model, adata, cells, int(rng.integers(2**31 - 1)))
        scales, labels = _sample_scales(
            model,
            adata,
            cells,
            batches,
            opts["n_samples_overall"],
            batch_size,
            weights,
            importance_weighting_kwargs or {},
        )
        return cells, scales, labels

    results = []
    for label1, label2, mask1, mask2 in tqdm(comparisons, desc="DE...", disable=silent):
        cells1, s1, b1 = sample(mask1, batches1)
        cells2, s2, b2 = sample(mask2, batches2)
        on_disk = None
        if counts is None and (all_stats or (mode == "change" and opts["pseudocounts"] is None)):
            scaling = _cached_scaling(adata, None, layer) if all_stats else None
            on_disk = _counts_statistics(adata, layer, mask1, mask2, cells1, cells2, scaling)
        pair1, pair2 = _pair_samples(
            s1, b1, s2, b2, batch_correction, opts["use_permutation"], opts["m_permutation"], rng
        )
        if mode == "vanilla":
            stats = vanilla_test(pair1, pair2)
            info = {**stats, "scale1": s1.mean(axis=0), "scale2": s2.mean(axis=0)}
        else:
            pseudocounts = opts["pseudocounts"]
            if pseudocounts is None:
                thr = opts["threshold_counts"]
                if counts is None:
                    mean1, mean2 = on_disk["cells_mean1"], on_disk["cells_mean2"]
                else:
                    mean1 = np.asarray(counts[cells1].mean(axis=0)).ravel()
                    mean2 = np.asarray(counts[cells2].mean(axis=0)).ravel()
                pseudocounts = estimate_pseudocounts_offset(
                    pair1, pair2, mean1 < thr, mean2 < thr, quantile=0.9
                )
            stats = change_test(
                pair1,
                pair2,
                pseudocounts,
                delta=delta,
                test_mode=opts["test_mode"],
                cred_interval_lvls=opts["cred_interval_lvls"],
                change_fn=opts["change_fn"],
                m1_domain_fn=opts["m1_domain_fn"],
                seed=int(rng.integers(2**31 - 1)),
            )
            info = {
                "proba_de": stats.pop("proba_de"),
                "proba_not_de": stats.pop("proba_not_de"),
                "bayes_factor": stats.pop("bayes_factor"),
                "scale1": s1.mean(axis=0),
                "scale2": s2.mean(axis=0),
                "pseudocounts": pseudocounts,
                "delta": stats.pop("delta"),
                **stats,
            }
        if all_stats and counts is None:
            info.update({k: v for k, v in on_disk.items() if not k.startswith("cells_")})
        elif all_stats:
            info.update(
                raw_counts_properties(counts, mask1, mask2, _cached_scaling(adata, counts))
            )
        res = pd.DataFrame(info, index=adata.var_names)
        sort_key = "proba_de" if mode == "change" else "bayes_factor"
        res = res.sort_values(by=sort_key, ascending=False)
        if mode == "change":
            res[f"is_de_fdr_{fdr_target}"] = fdr_de_prediction(
                res["proba_de"].to_numpy(), fdr_target
            )
        if label1 is not None:
            res["comparison"] = f"{label1} vs {label2}"
            res["group1"] = label1
            res["group2"] = label2
        results.append(res)
    return pd.concat(results, axis=0)


# ---------------------------------------------------------------------------------- helpers
def _comparisons(adata, groupby, group1, group2, idx1, idx2) -> list[tuple]:
    """``[(label1, label2, mask1, mask2)]``; labels are None for ``idx1`` comparisons."""
    if idx1 is not None:
        mask1 = _as_mask(idx1, adata.obs, "idx1")
        if idx2 is None:
            mask2 = ~mask1
        else:
            mask2 = _as_mask(idx2, adata.obs, "idx2")
            mask1 = mask1 & ~mask2
        if not mask1.any() or not mask2.any():
            raise ValueError("One of idx1 or idx2 selects no cells.")
        return [(None, None, mask1, mask2)]
    if idx2 is not None:
        raise ValueError("idx2 needs idx1.")
    if groupby is None:
        raise ValueError("Pass `groupby` (an adata.obs column) or `idx1`.")
    if groupby not in adata.obs:
        raise ValueError(f"groupby column {groupby!r} not found in adata.obs.")
    col = adata.obs[groupby]
    categories = col.astype("category").cat.categories.tolist()
    if group1 is None:
        group1 = categories
        if len(group1) == 1:
            raise ValueError("Only a single group in the data. Can't run DE on a single group.")
    elif isinstance(group1, str) or not isinstance(group1, Iterable):
        group1 = [group1]
    else:
        group1 = list(group1)

    def mask_of(g, arg):
        m = (col == g).to_numpy().ravel()
        if not m.any():
            raise ValueError(
                f"{arg} {g!r} has no cells in adata.obs[{groupby!r}]; "
                f"categories are {categories[:20]}."
            )
        return m

    mask2 = None if group2 is None else mask_of(group2, "group2")
    out = []
    for g in group1:
        m1 = mask_of(g, "group1")
        m2 = ~m1 if mask2 is None else mask2
        if not m2.any():
            raise ValueError(f"No cells left to compare group {g!r} with.")
        out.append((g, "Rest" if group2 is None else group2, m1, m2))
    return out


def _as_mask(idx, obs: pd.DataFrame, name: str) -> np.ndarray:
    n = len(obs)
    if isinstance(idx, str):
        return obs.index.isin(obs.query(idx).index)
    arr = np.asarray(idx).ravel()
    if arr.dtype == bool:
        if arr.shape[0] != n:
            raise ValueError(f"Boolean {name} has length {arr.shape[0]}, expected {n} cells.")
        return arr.copy()
    mask = np.zeros(n, bool)
    mask[arr.astype(np.int64)] = True
    return mask


def _registered_counts(adata, layer):
    x = adata.X if layer is None else adata.layers[layer]
    if hasattr(x, "to_memory"):  # backed datasets
        x = x.to_memory()
    return x


def _cached_scaling(adata, counts, layer=None) -> np.ndarray:
    """``library_scaling`` of ``counts`` (None: of ``adata``'s counts, read in bounded
    pieces), cached in ``adata.obs``."""
    if RAW_NORM_KEY in adata.obs:
        return adata.obs[RAW_NORM_KEY].to_numpy()
    if counts is None:
        with np.errstate(divide="ignore"):
            scaling = 1e4 / reglib.cell_totals(adata, layer)
    else:
        scaling = library_scaling(counts)
    adata.obs[RAW_NORM_KEY] = scaling
    return scaling


def _counts_statistics(adata, layer, mask1, mask2, cells1, cells2, scaling) -> dict:
    """What DE needs from the counts of a backed AnnData, in one bounded pass
    (:func:`jaxvi.data.registry.column_sums`): :func:`raw_counts_properties` of ``mask1`` /
    ``mask2`` (when ``scaling`` is given) and the mean counts ``cells_mean1/2`` of the
    sampled cells ``cells1`` / ``cells2``, each ``(genes,)``."""
    n = int(adata.n_obs)

    def weight(sel) -> np.ndarray:  # a mask, or cell indices counted with repeats
        w = np.zeros(n)
        sel = np.asarray(sel)
        if sel.dtype == bool:
            w[sel] = 1.0
        else:
            np.add.at(w, sel, 1.0)
        return w

    w = [weight(mask1), weight(mask2), weight(cells1), weight(cells2)]
    if scaling is not None:
        # empty cells (scaling inf) hold no counts: they add nothing, as for sparse counts
        finite = np.where(np.isfinite(scaling), scaling, 0.0)
        w += [w[0] * finite, w[1] * finite]
    sums, nonzero = reglib.column_sums(adata, layer, np.stack(w))
    size = np.array([max(a.sum(), 1.0) for a in w[:4]] * 2)[: len(w), None]  # cells per row
    means = sums / size
    out = {"cells_mean1": means[2], "cells_mean2": means[3]}
    if scaling is not None:
        out.update(
            raw_mean1=means[0],
            raw_mean2=means[1],
            non_zeros_proportion1=nonzero[0] / size[0],
            non_zeros_proportion2=nonzero[1] / size[1],
            raw_normalized_mean1=means[4],
            raw_normalized_mean2=means[5],
        )
    return out


def _filter_outliers(model, adata, cells: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.covariance import EllipticEnvelope

    reps = model.get_latent_representation(adata, indices=cells)
    try:
        keep = EllipticEnvelope(random_state=seed).fit_predict(reps) == 1
    except ValueError:
        warnings.warn(
            "Could not estimate the covariance for outlier filtering; using all cells.",
            UserWarning,
            stacklevel=3,
        )
        return cells
    return cells[keep]


def _sample_scales(
    model, adata, cells, batches, n_samples_overall, batch_size, weights=None, iw_kwargs=None
):
    """``(scales (N, genes) float32, batch labels (N,))``: ``n_samples_overall / len(batches)``
    draws per batch of ``batches`` (``[None]``: observed batches)."""
    n = int(n_samples_overall / len(batches))
    if n == 0:
        warnings.warn(
            "Very small sample size; consider increasing `n_samples_overall`.",
            UserWarning,
            stacklevel=3,
        )
        n = 2
    bs = settings.batch_size if batch_size is None else int(batch_size)
    scales, labels = [], []
    for b in batches:
        s = model.get_normalized_expression(
            adata,
            indices=cells,
            transform_batch=b,
            n_samples_overall=n,
            batch_size=bs,
            return_numpy=True,
            weights=weights,
            **(iw_kwargs or {}),
        )
        scales.append(np.asarray(s))
        labels.append(np.full(len(s), b, dtype=object))
    return np.concatenate(scales), np.concatenate(labels)


def _pair_samples(s1, b1, s2, b2, batch_correction, use_permutation, m_permutation, rng):
    """Pair the samples of the two groups (within batches when both use the same ones)."""
    batches1 = list(dict.fromkeys(b1.tolist()))
    batches2 = list(dict.fromkeys(b2.tolist()))
    if batch_correction and set(batches1) == set(batches2):
        m = m_permutation // len(batches1) if m_permutation is not None else None
        pairs = [_pairs(s1[b1 == b], s2[b2 == b], use_permutation, m, rng) for b in batches1]
        return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs])
    if batch_correction and set(batches1) & set(batches2):
        warnings.warn(
            "batchid1 and batchid2 differ but intersect; this case has no specific handling "
            "and batch correction is not trustworthy.",
            UserWarning,
            stacklevel=3,
        )
    return _pairs(s1, s2, use_permutation, m_permutation, rng)


def _pairs(a1, a2, use_permutation, m, rng):
    if use_permutation:
        return a1[rng.choice(len(a1), size=m)], a2[rng.choice(len(a2), size=m)]
    if a1.shape != a2.shape:
        raise ValueError(
            f"The groups have {len(a1)} and {len(a2)} samples, which cannot be paired; "
            "use use_permutation=True or the same number of batches in batchid1 and batchid2."
        )
    return a1, a2
