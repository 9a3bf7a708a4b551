"""Criticism reports (``metrics.json``) and scvi-hub model cards (``README.md``).

:func:`create_criticism_report` runs the posterior predictive checks of
:mod:`jaxvi.criticism` the way scvi-tools 1.4.2's ``scvi.criticism.create_criticism_report``
does (5 samples for the CVs, the first one for DE, t-test, adjusted p-value threshold 0.2)
and writes the three markdown tables the hub card embeds:

* cell-wise CV: mean absolute error, Pearson r, Spearman rho and R^2 between the model's and
  the observed per-cell CV, with a training and a validation column when the model has both
  splits; R^2 is ``1 - sum((m - o)^2) / sum((m - mean(m))^2)``, i.e. sklearn's
  ``r2_score(model CV, observed CV)`` with the *model* as the reference (the reference's
  argument order, kept so that the numbers compare);
* gene-wise CV: the same four numbers over genes (one column, all cells);
* DE: one row per group, sorted by group size.

:func:`model_card` renders the card: a YAML header (``library_name``, ``license``, tags with
the model class, versions, modalities, tissues, ``annotated``), a description, the metrics,
the model properties (init parameters, setup arguments, data registry, minified flag,
summary statistics), training data / code URLs and references. The section layout and
table formats are scvi-hub's; the prose is jaxvi's and states what the numbers are (the
reference's template mentions a squared Pearson correlation and a Wilcoxon test while its
code reports Pearson r and runs a t-test).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np
import pandas as pd

from jaxvi.criticism import (
    METRIC_CV_CELL,
    METRIC_CV_GENE,
    METRIC_DIFF_EXP,
    RAW,
    PosteriorPredictiveCheck,
)

__all__ = [
    "METRICS_FILE",
    "NA_FIELD",
    "HubModelCardHelper",
    "ModelCard",
    "ModelCardInfo",
    "card_info_from_model",
    "create_criticism_report",
    "cv_scores",
    "cv_table",
    "de_table",
    "h5ad_is_minified",
    "metrics_report",
    "model_card",
    "validate_url_format",
]

METRICS_FILE = "metrics.json"
NA_FIELD = "Not provided by uploader"
MISSING_FIELD = "To be added..."
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


# ------------------------------------------------------------------- the card
_PRETEXT = """\
scVI (single-cell variational inference) is a deep generative model of single-cell RNA-seq
counts. An encoder maps each cell's expression to a low-dimensional latent representation; a
decoder maps it back to the parameters of a count distribution per gene, accounting for
library size and technical batches. The latent space serves visualisation, clustering and
batch integration; the decoder gives denoised expression and differential expression.

This model was trained with jaxvi, a JAX/Flax implementation of scvi-tools' `SCVI` (same
model, same defaults).

- The scVI paper: [Lopez et al., Nature Methods 2018](https://www.nature.com/articles/s41592-018-0229-2).
- scvi-hub, for sharing and reusing pre-trained models:
[Ergen et al., bioRxiv 2024](https://www.biorxiv.org/content/10.1101/2024.03.01.582887v2).
- scvi-tools' [scVI user guide](https://docs.scvi-tools.org/en/stable/user_guide/models/scvi.html)
and [reference mapping with scArches](https://docs.scvi-tools.org/en/stable/tutorials/notebooks/scrna/scarches_scvi_tools.html).
"""

_TEMPLATE = """\
---
{header}
---

{pretext}
# Model Description

{description}

# Metrics

Key performance metrics of the uploaded model, when the uploader computed them. They come
from posterior predictive checks: counts generated by the model for the training cells are
compared with the observed counts.

<details>
<summary><strong>Coefficient of variation</strong></summary>

The cell-wise coefficient of variation (CV, standard deviation over mean of a cell's counts
across genes) measures how well the generated counts keep the variation between cells. The
table compares the model's CV with the observed one: mean absolute error, Pearson and
Spearman correlation, and R² computed with the model CV as the reference. A Pearson
correlation below about 0.4 suggests not using generated counts for downstream analysis;
the latent space may still be useful.

**Cell-wise Coefficient of Variation**:

{cell_wise_cv}

The gene-wise coefficient of variation (across cells, per gene) measures how well the
variation of each gene is kept. It is usually well reproduced.

**Gene-wise Coefficient of Variation**:

{gene_wise_cv}

</details>

<details>
<summary><strong>Differential expression metric</strong></summary>

One-vs-rest differential expression (Welch t-test on log-normalised counts) for each cell
type or cluster, on observed and on generated counts, compared per group: F1 score of the
top-gene overlap, mean absolute error, Pearson and Spearman correlation of the log fold
changes, and ROC AUC and precision-recall AUC of the generated-data scores against the genes
found differentially expressed in the observed data.

**Differential expression**:

{de_metrics}

</details>

# Model Properties

The parameters used to set up and train the model.

<details>
<summary><strong>Model Parameters</strong></summary>

Arguments of the model's constructor:
```json
{model_init_params}
```

</details>

<details>
<summary><strong>Setup Data Arguments</strong></summary>

Arguments of `setup_anndata` for the training data:
```json
{model_setup_anndata_args}
```

</details>

<details>
<summary><strong>Data Registry</strong></summary>

Where the model reads each registered field of the AnnData:
{model_data_registry}

- **Data is Minified**: {data_is_minified}

</details>

<details>
<summary><strong>Summary Statistics</strong></summary>

{model_summary_stats}

</details>

<details>
<summary><strong>Training</strong></summary>

**Training data url**: {training_data_url}

Code used to train the model, if the uploader provided it:

**Training Code URL**: {training_code_url}

</details>

# References

{references}
"""


@dataclasses.dataclass
class ModelCardInfo:
    """Everything a model card shows.

    Parameters
    ----------
    license_info
        License identifier of the model (e.g. ``"cc-by-4.0"``).
    model_cls_name
        ``"SCVI"``.
    model_init_params
        Constructor arguments (flat dict; nested ``kwargs`` dicts are flattened).
    model_setup_anndata_args
        ``setup_anndata`` arguments.
    model_summary_stats
        ``{n_batch, n_cells, n_extra_categorical_covs, n_extra_continuous_covs, n_labels,
        n_vars}``.
    model_data_registry
        ``{registry key: location}``, e.g. ``{"X": "adata.X"}``.
    library_name
        The hub's ``library_name`` (``"jaxvi"``; ``"scvi-tools"`` for a scvi-tools model file).
    versions
        Ordered ``{name: version}`` written as ``name:version`` tags, e.g.
        ``{"jaxvi_version": "0.1.0", "anndata_version": "0.12.2"}``.
    data_modalities, tissues
        Tags ``modality:...``, ``tissue:...``.
    data_is_annotated, data_is_minified
        Tag ``annotated:...`` and the minified flag (None: not stated).
    training_data_url, training_code_url, description, references
        Free text; missing URLs read "Not provided by uploader".
    metrics_report
        ``{"cell_wise_cv", "gene_wise_cv", "diff_exp"}`` tables (``metrics.json``).
    """

    license_info: str
    model_cls_name: str
    model_init_params: dict
    model_setup_anndata_args: dict
    model_summary_stats: dict
    model_data_registry: dict
    library_name: str = "jaxvi"
    versions: dict = dataclasses.field(default_factory=dict)
    data_modalities: list = dataclasses.field(default_factory=list)
    tissues: list = dataclasses.field(default_factory=list)
    data_is_annotated: bool | None = None
    data_is_minified: bool | None = None
    training_data_url: str | None = None
    training_code_url: str | None = None
    description: str = MISSING_FIELD
    references: str = MISSING_FIELD
    metrics_report: dict | None = None

    def tags(self) -> list[str]:
        """The card's tags, in scvi-hub's order."""
        tags = ["biology", "genomics", "single-cell", f"model_cls_name:{self.model_cls_name}"]
        tags += [f"{k}:{v}" for k, v in self.versions.items()]
        tags += [f"modality:{m}" for m in self.data_modalities]
        tags += [f"tissue:{t}" for t in self.tissues]
        if self.data_is_annotated is not None:
            tags.append(f"annotated:{self.data_is_annotated}")
        return tags


_PLAIN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:/+\-]*$")


def _yaml_scalar(value: str) -> str:
    s = str(value)
    if _PLAIN.match(s) and not s.endswith(":") and s.lower() not in ("true", "false", "null"):
        return s
    return json.dumps(s)  # a JSON string is a valid YAML scalar


def _flatten_params(params: dict) -> dict:
    # scvi-hub's rule: one level of nested dicts is lifted ({"non_kwargs": ..., "kwargs":
    # {"kwargs": {...}}} for scvi-tools' layout, dict-valued entries otherwise), unless that
    # would make two entries collide; then the parameters are shown as saved
    if "non_kwargs" in params:
        plain, nested = dict(params["non_kwargs"]), dict(params.get("kwargs") or {})
    else:
        plain = {k: v for k, v in params.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in params.items() if isinstance(v, dict)}
    lifted = {k: v for inner in nested.values() for k, v in (inner or {}).items()}
    if set(lifted) & set(plain):
        return dict(params)
    return {**plain, **lifted}


def _summary_markdown(stats: dict) -> str:
    rows = ["| Summary Stat Key          | Value |", "|--------------------------|-------|"]
    rows += [f"| {k:<25} | {v} |" for k, v in sorted(stats.items())]
    return "\n".join(rows)


def _registry_markdown(registry: dict) -> str:
    rows = [
        "| Registry Key             | scvi-tools Location                  |",
        "|--------------------------|--------------------------------------|",
    ]
    rows += [f"| {k:<25} | {_location(v):<36} |" for k, v in registry.items()]
    return "\n".join(rows)


def _location(value) -> str:
    """``"adata.obs['key']"`` for a location string or scvi-tools' ``{attr_name, attr_key}``."""
    if isinstance(value, str):
        return value
    where = "adata"
    if value.get("mod_key") is not None:
        where += f".mod['{value['mod_key']}']"
    if value.get("attr_key") is None:
        return f"{where}.{value['attr_name']}"
    return f"{where}.{value['attr_name']}['{value['attr_key']}']"


def model_card(info: ModelCardInfo) -> str:
    """The model card (``README.md`` text) in scvi-hub's format."""
    header = [
        f"library_name: {_yaml_scalar(info.library_name)}",
        f"license: {_yaml_scalar(info.license_info)}",
        "tags:",
    ] + [f"- {_yaml_scalar(t)}" for t in info.tags()]
    report = info.metrics_report or {}

    def metric(key):
        return report.get(key) or NA_FIELD

    return _TEMPLATE.format(
        header="\n".join(header),
        pretext=_PRETEXT,
        description=info.description,
        cell_wise_cv=metric("cell_wise_cv"),
        gene_wise_cv=metric("gene_wise_cv"),
        de_metrics=metric("diff_exp"),
        model_init_params=json.dumps(_flatten_params(info.model_init_params), indent=4),
        model_setup_anndata_args=json.dumps(info.model_setup_anndata_args, indent=4),
        model_data_registry=_registry_markdown(info.model_data_registry),
        data_is_minified=MISSING_FIELD if info.data_is_minified is None else info.data_is_minified,
        model_summary_stats=_summary_markdown(info.model_summary_stats),
        training_data_url=info.training_data_url or NA_FIELD,
        training_code_url=info.training_code_url or NA_FIELD,
        references=info.references,
    )


def data_registry(setup_args: dict) -> dict[str, str]:
    """``{registry key: location}`` for jaxvi's ``setup_anndata`` arguments.

    ``X``, ``batch``, ``labels`` and ``size_factor`` are where scvi-tools registers them as
    well; extra covariates are read from their obs columns.
    """
    layer = setup_args.get("layer")
    reg = {
        "X": "adata.X" if layer is None else f"adata.layers['{layer}']",
        "batch": "adata.obs['_scvi_batch']",
        "labels": "adata.obs['_scvi_labels']",
    }
    if setup_args.get("size_factor_key"):
        reg["size_factor"] = f"adata.obs['{setup_args['size_factor_key']}']"
    for key, name in (
        ("categorical_covariate_keys", "extra_categorical_covs"),
        ("continuous_covariate_keys", "extra_continuous_covs"),
    ):
        if setup_args.get(key):
            reg[name] = f"adata.obs[{list(setup_args[key])}]"
    return reg


def card_info_from_model(
    model,
    license_info: str = "cc-by-4.0",
    metrics_report: dict | None = None,
    library_name: str = "jaxvi",
    versions: dict | None = None,
    data_modalities=("rna",),
    **kwargs,
) -> ModelCardInfo:
    """:class:`ModelCardInfo` of a jaxvi ``SCVI``.

    ``versions`` defaults to ``{"jaxvi_version": ..., "anndata_version": ...}``;
    ``data_is_annotated`` defaults to whether a ``labels_key`` was registered and
    ``data_is_minified`` to the model's AnnData state (None without one). Further keyword
    arguments set the other :class:`ModelCardInfo` fields.
    """
    from importlib.metadata import version

    from jaxvi._version import __version__

    reg = model.registry_
    setup = dict(reg["setup_args"])
    if versions is None:
        versions = {"jaxvi_version": __version__, "anndata_version": version("anndata")}
    kwargs.setdefault("data_is_annotated", setup.get("labels_key") is not None)
    if "data_is_minified" not in kwargs and model.adata is not None:
        kwargs["data_is_minified"] = model.minified_data_type is not None
    return ModelCardInfo(
        license_info=license_info,
        model_cls_name=reg.get("model_name", "SCVI"),
        model_init_params=dict(model.init_params_),
        model_setup_anndata_args=setup,
        model_summary_stats=dict(reg["summary_stats"]),
        model_data_registry=data_registry(setup),
        library_name=library_name,
        versions=dict(versions),
        data_modalities=list(data_modalities),
        metrics_report=metrics_report,
        **kwargs,
    )


# ------------------------------------------------------ scvi.hub's card helper
_URL = re.compile(r"^(?:https?|ftps?)://[^\s/?#]+(?:[/?#]\S*)?$", re.IGNORECASE)


def validate_url_format(url: str) -> str:
    """``url`` if it looks like an http(s) or ftp(s) URL, else ``ValueError``.

    Only the form is checked: unlike scvi-tools, which also sends a GET request to the URL,
    nothing is fetched.
    """
    if not isinstance(url, str) or _URL.match(url) is None:
        raise ValueError(f"Invalid URL format: {url}")
    return url


_YAML_BLOCK = re.compile(r"^(\s*---[\r\n]+)([\S\s]*?)([\r\n]+---(\r\n|\n|$))")


class ModelCard(str):
    """A model card: its Markdown text, with the reading API of ``huggingface_hub.ModelCard``.

    The text itself is the value (so ``"x" in card`` and ``card.split(...)`` work as on the
    plain string jaxvi returned before); :attr:`content`, :attr:`text`, :attr:`data`,
    :meth:`save` and :meth:`push_to_hub` are what scvi-tools users call on the
    ``huggingface_hub.ModelCard`` that ``scvi.hub`` returns. :attr:`data` and
    :meth:`push_to_hub` need the ``hub`` extra (``huggingface_hub``); the rest needs nothing.
    """

    @property
    def content(self) -> str:
        """The whole card: YAML header and Markdown body."""
        return str(self)

    @property
    def text(self) -> str:
        """The Markdown body after the YAML header."""
        match = _YAML_BLOCK.search(self)
        return str(self) if match is None else str(self)[match.end() :]

    @property
    def data(self):
        """The YAML header as a ``huggingface_hub.ModelCardData``."""
        return self.to_huggingface().data

    def to_huggingface(self):
        """The card as a ``huggingface_hub.ModelCard``."""
        hf = _import_huggingface_hub()
        return hf.ModelCard(str(self))

    def save(self, filepath) -> None:
        """Write the card to ``filepath`` (parent folders are created)."""
        folder = os.path.dirname(os.fspath(filepath))
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(filepath, "w", encoding="utf-8", newline="") as f:
            f.write(str(self))

    @classmethod
    def load(cls, path) -> ModelCard:
        """The card in the local file ``path``."""
        with open(path, encoding="utf-8") as f:
            return cls(f.read())

    def push_to_hub(
        self,
        repo_id: str,
        token: str | None = None,
        repo_type: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        revision: str | None = None,
        create_pr: bool | None = None,
        parent_commit: str | None = None,
    ):
        """Upload the card as ``README.md`` of ``repo_id`` (``huggingface_hub.ModelCard``'s
        signature); returns the commit URL."""
        hf = _import_huggingface_hub()
        return hf.HfApi(token=token).upload_file(
            path_or_fileobj=str(self).encode("utf-8"),
            path_in_repo="README.md",
            repo_id=repo_id,
            repo_type=repo_type,
            commit_message=commit_message or "Upload model card",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            parent_commit=parent_commit,
        )


def _import_huggingface_hub():
    try:
        import huggingface_hub
    except ImportError as e:
        raise ImportError(
            "This needs huggingface_hub: `pip install 'jaxvi[hub]'` (or `pip install "
            "huggingface_hub`)."
        ) from e
    return huggingface_hub


@dataclasses.dataclass
class HubModelCardHelper:
    """The fields of a scvi-hub model card, and the card (``scvi.hub.HubModelCardHelper``).

    The fields and their order are scvi-tools 1.4.2's; ``library_name`` and ``jaxvi_version``
    are jaxvi's and come last. The card (:attr:`model_card`) has scvi-hub's header, sections
    and tables (see :func:`model_card`).

    Parameters
    ----------
    license_info
        License of the model, e.g. ``"cc-by-4.0"``.
    model_cls_name
        ``"SCVI"`` (the only class jaxvi implements; others raise ``ValueError``).
    model_init_params
        Constructor arguments: jaxvi's flat dict or scvi-tools' ``{"non_kwargs", "kwargs"}``.
    model_setup_anndata_args
        ``setup_anndata`` arguments.
    model_summary_stats
        ``{"n_cells": ..., "n_vars": ..., ...}``.
    model_data_registry
        ``{registry key: location}``: a location string (``"adata.X"``) or scvi-tools'
        ``{"attr_name": "obs", "attr_key": "_scvi_batch"}``.
    scvi_version
        scvi-tools version of the model files; None for jaxvi's own format.
    anndata_version
        anndata version used in training.
    data_modalities, tissues
        Tags ``modality:...`` and ``tissue:...``.
    data_is_annotated, data_is_minified
        Tag ``annotated:...``; the card's minified flag (None: "To be added...").
    training_data_url, training_code_url
        Links (checked for URL form only; nothing is fetched).
    model_parent_module
        Module of the model class (``"scvi.model"`` as in scvi-tools; ``"jaxvi"`` for jaxvi
        files). Not shown on the card, as in scvi-tools.
    description, references
        Free text.
    metrics_report
        ``{"cell_wise_cv", "gene_wise_cv", "diff_exp"}`` markdown tables (``metrics.json``).
    library_name
        The card's ``library_name``; default ``"scvi-tools"`` when ``scvi_version`` is set,
        else ``"jaxvi"``.
    jaxvi_version
        jaxvi version of the model files, shown as a ``jaxvi_version:...`` tag.
    """

    license_info: str
    model_cls_name: str
    model_init_params: dict
    model_setup_anndata_args: dict
    model_summary_stats: dict
    model_data_registry: dict
    scvi_version: str | None
    anndata_version: str
    data_modalities: list[str] = dataclasses.field(default_factory=list)
    tissues: list[str] = dataclasses.field(default_factory=list)
    data_is_annotated: bool | None = None
    data_is_minified: bool | None = None
    training_data_url: str | None = None
    training_code_url: str | None = None
    model_parent_module: str = "scvi.model"
    description: str = MISSING_FIELD
    references: str = MISSING_FIELD
    metrics_report: dict | None = None
    library_name: str | None = None
    jaxvi_version: str | None = None

    def __post_init__(self):
        if self.model_cls_name != "SCVI":
            raise ValueError(
                f"Model class name {self.model_cls_name} not recognized: jaxvi implements "
                "SCVI only, and its card describes SCVI."
            )
        for name in ("training_data_url", "training_code_url"):
            if getattr(self, name) is not None:
                validate_url_format(getattr(self, name))
        if self.metrics_report is not None and not isinstance(self.metrics_report, dict):
            raise TypeError(
                "metrics_report must be a dict of markdown tables (the content of "
                f"metrics.json), got {type(self.metrics_report).__name__}."
            )

    @property
    def versions(self) -> dict[str, str]:
        """``{tag name: version}`` in the card's tag order."""
        out = {}
        if self.scvi_version is not None:
            out["scvi_version"] = self.scvi_version
        if self.jaxvi_version is not None:
            out["jaxvi_version"] = self.jaxvi_version
        out["anndata_version"] = self.anndata_version
        return out

    def card_info(self) -> ModelCardInfo:
        """The :class:`ModelCardInfo` the card is rendered from."""
        library = self.library_name
        if library is None:
            library = "jaxvi" if self.scvi_version is None else "scvi-tools"
        return ModelCardInfo(
            license_info=self.license_info,
            model_cls_name=self.model_cls_name,
            model_init_params=dict(self.model_init_params),
            model_setup_anndata_args=dict(self.model_setup_anndata_args),
            model_summary_stats=dict(self.model_summary_stats),
            model_data_registry=dict(self.model_data_registry),
            library_name=library,
            versions=self.versions,
            data_modalities=list(self.data_modalities),
            tissues=list(self.tissues),
            data_is_annotated=self.data_is_annotated,
            data_is_minified=self.data_is_minified,
            training_data_url=self.training_data_url,
            training_code_url=self.training_code_url,
            description=self.description,
            references=self.references,
            metrics_report=self.metrics_report,
        )

    @property
    def model_card(self) -> ModelCard:
        """The card, rendered from the current field values."""
        return ModelCard(model_card(self.card_info()))

    @classmethod
    def from_dir(
        cls,
        local_dir: str,
        license_info: str,
        anndata_version: str,
        metrics_report=None,
        data_is_minified: bool | None = None,
        map_location="cpu",
        **kwargs,
    ) -> HubModelCardHelper:
        """The helper for the model saved in ``local_dir`` (jaxvi's or scvi-tools' files).

        Parameters
        ----------
        local_dir
            Directory with the model files (``model.json``/``model.npz`` or ``model.pt``).
        license_info, anndata_version
            As the fields.
        metrics_report
            A dict of tables, or the path of a ``metrics.json`` to read; None reads
            ``local_dir/metrics.json`` when there is one. (scvi-tools reads
            ``local_dir/metrics.json`` whatever path is given.)
        data_is_minified
            Default: whether ``local_dir/adata.h5ad`` is minified (None without one).
        map_location
            Accepted for scvi-tools' signature; nothing is placed on a device.
        kwargs
            Further fields (``data_modalities``, ``tissues``, ``description``, ...).

        Raises
        ------
        FileNotFoundError
            (also a ``ValueError``, as scvi-tools raises) when ``local_dir`` holds no model
            files.
        """
        from jaxvi import hub

        del map_location
        info = hub.read_model_info(local_dir)
        if metrics_report is None:
            path = os.path.join(local_dir, METRICS_FILE)
            metrics_report = _read_json(path) if os.path.isfile(path) else None
        elif isinstance(metrics_report, str | os.PathLike):
            metrics_report = _read_json(metrics_report)
        if data_is_minified is None:
            adata_path = os.path.join(local_dir, "adata.h5ad")
            if os.path.isfile(adata_path):
                data_is_minified = h5ad_is_minified(adata_path)
        kwargs.setdefault("library_name", info["library_name"])
        kwargs.setdefault("jaxvi_version", info["jaxvi_version"])
        if info["model_format"] == "jaxvi":
            kwargs.setdefault("model_parent_module", "jaxvi")
        # scvi-tools' registry views (attrdicts) list their keys sorted, and so do its cards
        return cls(
            license_info,
            info["model_cls_name"],
            info["init_params"],
            info["setup_args"],
            dict(sorted(info["summary_stats"].items())),
            dict(sorted(info["data_registry"].items())),
            info["scvi_version"],
            anndata_version,
            metrics_report=metrics_report,
            data_is_minified=data_is_minified,
            **kwargs,
        )


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def h5ad_is_minified(path: str) -> bool:
    """Whether the ``.h5ad`` file at ``path`` holds a minified AnnData (read from its ``uns``
    only)."""
    import h5py

    with h5py.File(path, "r") as f:
        return "uns" in f and "_scvi_adata_minify_type" in f["uns"]
