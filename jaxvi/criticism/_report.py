"""Criticism reports: the three markdown tables of a scvi-hub model card (``metrics.json``).

:func:`create_criticism_report` runs the posterior predictive checks of
:class:`~jaxvi.criticism.PosteriorPredictiveCheck` the way scvi-tools 1.4.2's
``scvi.criticism.create_criticism_report`` does (5 samples for the CVs, the first one for DE,
t-test, adjusted p-value threshold 0.2) and writes the three tables the hub card embeds:

* cell-wise CV: mean absolute error, Pearson r, Spearman rho and R^2 between the model's and
  the observed per-cell CV, with a training and a validation column when the model has both
  splits; R^2 is ``1 - sum((m - o)^2) / sum((m - mean(m))^2)``, i.e. sklearn's
  ``r2_score(model CV, observed CV)`` with the *model* as the reference (the reference's
  argument order, kept so that the numbers compare);
* gene-wise CV: the same four numbers over genes (one column, all cells);
* DE: one row per group, sorted by group size.

The card that shows them is :func:`jaxvi.hub.model_card`.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

from jaxvi.criticism._ppc import (
    METRIC_CV_CELL,
    METRIC_CV_GENE,
    METRIC_DIFF_EXP,
    RAW,
    PosteriorPredictiveCheck,
)

__all__ = [
    "METRICS_FILE",
    "REPORT_KEYS",
    "create_criticism_report",
    "cv_scores",
    "cv_table",
    "de_table",
    "metrics_report",
]

METRICS_FILE = "metrics.json"
REPORT_KEYS = ("cell_wise_cv", "gene_wise_cv", "diff_exp")
_SKIPPABLE = (METRIC_CV_CELL, METRIC_CV_GENE, METRIC_DIFF_EXP)


# ------------------------------------------------------------------ the tables
def cv_scores(model_cv, raw_cv) -> dict[str, float]:
    """Agreement of model and observed CVs.

    Parameters
    ----------
    model_cv, raw_cv
        ``(n,)`` arrays (per cell or per gene).

    Returns
    -------
    dict with ``mae`` (mean ``|m - o|``), ``pearson``, ``spearman`` and ``r2``
    (``1 - sum((m - o)^2) / sum((m - mean(m))^2)``).
    """
    from scipy.stats import pearsonr, spearmanr

    m = np.asarray(model_cv, np.float64)
    o = np.asarray(raw_cv, np.float64)
    if m.shape != o.shape or m.ndim != 1 or m.size < 2:
        raise ValueError(f"CV arrays must be 1-D of equal length >= 2, got {m.shape}, {o.shape}.")
    if not (np.isfinite(m).all() and np.isfinite(o).all()):
        raise ValueError(
            "A coefficient of variation is NaN or infinite (a cell or gene whose every "
            "generated sample is zero); the CV tables cannot be computed."
        )
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = 1.0 - np.sum((m - o) ** 2) / np.sum((m - m.mean()) ** 2)
    return {
        "mae": float(np.mean(np.abs(m - o))),
        "pearson": float(pearsonr(m, o)[0]),
        "spearman": float(spearmanr(m, o)[0]),
        "r2": float(r2),
    }


def cv_table(model_cv, raw_cv, train_indices=None, validation_indices=None) -> str:
    """Markdown table of :func:`cv_scores`, as on scvi-hub cards.

    With non-empty ``train_indices`` and ``validation_indices`` (positions into the CV
    arrays) the table has a "Training Value" and a "Validation Value" column; otherwise one
    "Training Value" column over all entries.
    """
    m = np.asarray(model_cv)
    o = np.asarray(raw_cv)
    tr = [] if train_indices is None else np.asarray(train_indices, np.int64)
    va = [] if validation_indices is None else np.asarray(validation_indices, np.int64)
    if len(tr) > 0 and len(va) > 0:
        a, b = cv_scores(m[tr], o[tr]), cv_scores(m[va], o[va])
        return (
            "| Metric                  | Training Value | Validation Value |\n"
            "|-------------------------|----------------|------------------|\n"
            f"| Mean Absolute Error | {a['mae']:.2f}  | {b['mae']:.2f}           |\n"
            f"| Pearson Correlation | {a['pearson']:.2f}  | {b['pearson']:.2f}  |\n"
            f"| Spearman Correlation | {a['spearman']:.2f} | {b['spearman']:.2f}  |\n"
            f"| R² (R-Squared) | {a['r2']:.2f}  | {b['r2']:.2f}      |"
        )
    a = cv_scores(m, o)
    return (
        "| Metric                  | Training Value |\n"
        "|-------------------------|----------------|\n"
        f"| Mean Absolute Error | {a['mae']:.2f}   |\n"
        f"| Pearson Correlation | {a['pearson']:.2f}  |\n"
        f"| Spearman Correlation | {a['spearman']:.2f} |\n"
        f"| R² (R-Squared) | {a['r2']:.2f}  |"
    )


def de_table(summary: pd.DataFrame, model: str | None = None) -> str:
    """Markdown DE table: one row per group (largest first), columns ``gene_f1`` to ``n_cells``.

    ``summary`` is :meth:`PosteriorPredictiveCheck.differential_expression`'s output; with
    several models pass ``model`` to pick one. Every value is written with two decimals
    (``n_cells`` too, as on scvi-hub cards).
    """
    df = summary if model is None else summary[summary["model"] == model]
    if model is None and df["model"].nunique() > 1:
        raise ValueError("The summary holds several models; pass `model=`.")
    df = df.set_index("group").drop(columns=["model"])
    df = df.sort_values(by="n_cells", ascending=False)
    cols = list(df.columns)
    lines = [
        "| Index | " + " | ".join(cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
    ]
    for group, row in zip(df.index, df.itertuples(index=False), strict=True):
        cells = [str(group)] + [f"{float(v):.2f}" for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_report(
    ppc: PosteriorPredictiveCheck,
    model_name: str = "model",
    train_indices=None,
    validation_indices=None,
    skip_metrics=(),
    label_key: str | None = None,
    p_val_thresh: float = 0.2,
) -> dict[str, str]:
    """The three markdown tables of a criticism report from a PPC object.

    Computes the metrics not yet in ``ppc.metrics`` (cell-wise and gene-wise CV, DE with
    ``label_key`` or Leiden clusters) and returns ``{"cell_wise_cv", "gene_wise_cv",
    "diff_exp"}``; a skipped metric gives an empty string.
    """
    unknown = set(skip_metrics) - set(_SKIPPABLE)
    if unknown:
        raise ValueError(f"Unknown metrics to skip {sorted(unknown)}; choose from {_SKIPPABLE}.")
    if model_name not in ppc.samples:
        raise ValueError(f"No samples for model {model_name!r} (have {list(ppc.samples)}).")
    out = dict.fromkeys(REPORT_KEYS, "")
    if METRIC_CV_CELL not in skip_metrics:
        cv = ppc.metrics.get(METRIC_CV_CELL)
        if cv is None:
            cv = ppc.coefficient_of_variation("features")
        out["cell_wise_cv"] = cv_table(cv[model_name], cv[RAW], train_indices, validation_indices)
    if METRIC_CV_GENE not in skip_metrics:
        cv = ppc.metrics.get(METRIC_CV_GENE)
        if cv is None:
            cv = ppc.coefficient_of_variation("cells")
        out["gene_wise_cv"] = cv_table(cv[model_name], cv[RAW])
    if METRIC_DIFF_EXP not in skip_metrics:
        summary = ppc.differential_expression(de_groupby=label_key, p_val_thresh=p_val_thresh)
        out["diff_exp"] = de_table(summary, model=model_name)
    return out


def _annotate(adata, ppc: PosteriorPredictiveCheck, name: str) -> None:
    """The reference's side effects: CV ratios and log fold changes stored on the AnnData."""
    m = ppc.metrics
    if METRIC_CV_GENE in m:
        cv = m[METRIC_CV_GENE]
        adata.var["cv_gene_ratio"] = (cv[name] / (cv[name] + cv[RAW])).to_numpy()
    if METRIC_CV_CELL in m:
        cv = m[METRIC_CV_CELL]
        adata.obs["cv_cell_ratio"] = (cv[name] / (cv[name] + cv[RAW])).to_numpy()
    if METRIC_DIFF_EXP in m:
        lfc = m[METRIC_DIFF_EXP]["lfc_per_model_per_group"][name]
        genes = list(adata.var_names)
        for side, key in (("approx", "lfc_model"), ("raw", "lfc_raw")):
            frame = pd.DataFrame({g: d[side] for g, d in lfc.items()}).loc[genes]
            frame.index = adata.var_names
            adata.varm[key] = frame


def create_criticism_report(
    model,
    adata=None,
    skip_metrics=(),
    n_samples: int = 5,
    label_key: str | None = None,
    save_folder: str | None = None,
    batch_size: int = 32,
) -> dict[str, str]:
    """Posterior predictive checks of ``model`` as the tables of a scvi-hub card.

    Parameters
    ----------
    model
        A trained jaxvi ``SCVI`` (anything with ``posterior_predictive_sample``,
        ``registry_``, ``train_indices``, ``validation_indices``).
    adata
        Data to check (default: the model's AnnData, all cells: train, validation and test).
    skip_metrics
        Any of ``"cv_cell"``, ``"cv_gene"``, ``"diff_exp"``.
    n_samples
        Posterior predictive samples for the CVs (DE uses the first).
    label_key
        obs column with the DE groups; default the model's registered ``labels_key``, and
        Leiden clusters of the counts when there is none.
    save_folder
        Where to write ``metrics.json`` (created if needed); None writes nothing.
    batch_size
        Cells per chunk when sampling.

    Returns
    -------
    ``{"cell_wise_cv", "gene_wise_cv", "diff_exp"}`` markdown tables (empty when skipped).
    As the reference, the checked AnnData gains ``var["cv_gene_ratio"]``,
    ``obs["cv_cell_ratio"]`` (model CV / (model CV + observed CV)) and ``varm["lfc_model"]``,
    ``varm["lfc_raw"]`` (genes x groups).
    """
    own = adata is None or adata is model.adata
    adata = model.adata if adata is None else adata
    if adata is None:
        raise ValueError("The model has no AnnData; pass `adata=`.")
    if model.minified_data_type is not None and own:
        raise ValueError(
            "The model's AnnData is minified (no counts): pass the full AnnData as `adata=`."
        )
    setup = model.registry_["setup_args"]
    if label_key is None:
        label_key = setup.get("labels_key")
    ppc = PosteriorPredictiveCheck(
        adata,
        {"model": model},
        count_layer_key=setup.get("layer"),
        n_samples=n_samples,
        batch_size=batch_size,
    )
    train = model.train_indices if own else None
    val = model.validation_indices if own else None
    report = metrics_report(ppc, "model", train, val, skip_metrics, label_key)
    _annotate(adata, ppc, "model")
    if save_folder is not None:
        os.makedirs(save_folder, exist_ok=True)
        with open(os.path.join(save_folder, METRICS_FILE), "w") as f:
            json.dump(report, f, indent=4)
    return report
