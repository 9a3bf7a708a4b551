"""scANVI's data rules, as plain functions: the labels registry with an unlabelled category,
the number of classes, the semi-supervised split and the labelled groups of a training run.

Each follows scvi-tools 1.4.2 (``LabelsWithUnlabeledObsField``, ``SCANVI.__init__``,
``SemiSupervisedDataSplitter``, ``SemiSupervisedDataLoader``); :class:`jaxvi.SCANVI` and its
``train`` call them.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

from jaxvi.data import registry as reglib
from jaxvi.model._scvi import config_from_registry
from jaxvi.module import SCANVAEConfig
from jaxvi.train import PairedCells

__all__ = [
    "UNLABELED_KEY",
    "label_values",
    "labelled_groups",
    "model_n_labels",
    "scanvi_config",
    "scanvi_params_from_scvi_tools",
    "scanvi_registry",
    "semi_supervised_split",
]

# Where the registry keeps the unlabelled category (scvi-tools: a setup argument).
UNLABELED_KEY = "unlabeled_category"
# ``classifier_parameters`` keys -> SCANVAEConfig fields.
_CLASSIFIER_FIELDS = {
    "n_hidden": "classifier_n_hidden",
    "n_layers": "classifier_n_layers",
    "dropout_rate": "classifier_dropout_rate",
    "logits": "classifier_logits",
}


def label_values(adata, registry: dict) -> np.ndarray:
    """The registered labels column of ``adata`` as strings ``(cells,)`` (how the registry
    stores categories)."""
    key = registry["setup_args"]["labels_key"]
    if key not in adata.obs:
        raise reglib.MissingColumnError(f"Column '{key}' not found in adata.obs.")
    return adata.obs[key].astype(str).to_numpy()


def scanvi_registry(
    adata,
    labels_key: str,
    unlabeled_category,
    layer: str | None = None,
    batch_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
) -> dict:
    """Register ``adata`` for scANVI and return the registry (also in ``adata.uns``).

    As scVI's :func:`jaxvi.data.registry.setup_anndata`, then scvi-tools'
    ``LabelsWithUnlabeledObsField``: when ``unlabeled_category`` occurs in the labels
    column, its category *swaps* places with the last one (categories ``Unknown, a, b, c``
    give codes ``c=0, a=1, b=2, Unknown=3``); when it is no category at all it is appended
    last; a category that exists but labels no cell stays where it is. The label codes in
    ``adata.obs["_scvi_labels"]`` follow that order. When no cell carries the unlabelled
    category (every cell is then labelled) a ``UserWarning`` says so.

    Raises
    ------
    ValueError
        ``labels_key`` None, or a labels column with missing values (as scVI's setup for
        any registered column).
    KeyError
        A ``labels_key`` that is not an ``adata.obs`` column.
    """
    if labels_key is None:
        raise ValueError("SCANVI.setup_anndata needs `labels_key`, the column with the labels.")
    if unlabeled_category is None:
        raise ValueError("SCANVI.setup_anndata needs `unlabeled_category`.")
    registry = reglib.setup_anndata(
        adata,
        layer=layer,
        batch_key=batch_key,
        labels_key=labels_key,
        size_factor_key=size_factor_key,
        categorical_covariate_keys=categorical_covariate_keys,
        continuous_covariate_keys=continuous_covariate_keys,
    )
    mapping = list(registry["labels_categories"])
    unlabeled = str(unlabeled_category)
    if unlabeled in set(label_values(adata, registry)):
        i = mapping.index(unlabeled)
        mapping[i], mapping[-1] = mapping[-1], mapping[i]
    else:
        # Kept, not refused: a fully labelled reference set up with a placeholder category
        # (scvi-tools' from_scvi_model(..., "Unknown") workflow) is common and valid; a
        # misspelt category silently labelling every cell is not, hence the warning.
        warnings.warn(
            f"unlabeled_category {unlabeled!r} labels no cell of adata.obs[{labels_key!r}]: "
            "every cell is treated as labelled. If some cells have no label, give them this "
            "category.",
            UserWarning,
            stacklevel=3,
        )
        if unlabeled not in mapping:
            mapping.append(unlabeled)
    registry["model_name"] = "SCANVI"
    registry["setup_args"][UNLABELED_KEY] = unlabeled_category
    registry["labels_categories"] = mapping
    registry["summary_stats"]["n_labels"] = len(mapping)
    adata.uns[reglib.UNS_KEY] = registry
    adata.obs["_scvi_labels"] = reglib.registry_arrays(adata, registry, counts=False)["labels"]
    return registry


def model_n_labels(registry: dict, labels: np.ndarray | None) -> int:
    """The classifier's number of classes (scvi-tools' ``SCANVI.__init__``).

    ``len(categories) - 1`` when the unlabelled category labels some cell, or when the
    column's distinct values are one fewer than the categories; else ``len(categories)``
    (a quirk kept from the reference: a categorical column with an unused category and no
    unlabelled cell counts the unlabelled category as a class). ``labels`` (strings) None,
    a model without data, follows the first rule's count.
    """
    n = len(registry["labels_categories"])
    if labels is None:
        return n - 1
    unlabeled = str(registry["setup_args"][UNLABELED_KEY])
    values = set(labels.tolist())
    if unlabeled in values or len(values) == n - 1:
        return n - 1
    return n


def scanvi_config(registry: dict, init_params: dict, n_labels: int | None = None) -> SCANVAEConfig:
    """The :class:`~jaxvi.module.SCANVAEConfig` of a registry and ``SCANVI`` arguments:
    scVI's VAE part (:func:`jaxvi.model.config_from_registry`), then the classifier options
    (``linear_classifier``, ``classifier_parameters``, ``y_prior``) and ``n_labels``
    (default: the categories but one).

    Raises
    ------
    ValueError
        ``classifier_parameters`` keys other than ``n_hidden``, ``n_layers``,
        ``dropout_rate``, ``logits``, or an invalid option (:class:`SCANVAEConfig`).
    """
    p = dict(init_params)
    p.setdefault("latent_distribution", "normal")
    classifier = dict(p.pop("classifier_parameters", None) or {})
    unknown = sorted(set(classifier) - set(_CLASSIFIER_FIELDS))
    if unknown:
        raise ValueError(
            f"Unsupported classifier_parameters {unknown}; jaxvi supports "
            f"{sorted(_CLASSIFIER_FIELDS)}."
        )
    y_prior = p.pop("y_prior", None)
    linear = bool(p.pop("linear_classifier", False))
    vae = config_from_registry(registry, p)
    if n_labels is None:
        n_labels = len(registry["labels_categories"]) - 1
    fields = {f.name: getattr(vae, f.name) for f in dataclasses.fields(vae)}
    fields["n_labels"] = int(n_labels)
    options = {_CLASSIFIER_FIELDS[k]: v for k, v in classifier.items()}
    if "classifier_logits" in options:
        options["classifier_logits"] = bool(options["classifier_logits"])
    prior = None if y_prior is None else tuple(float(v) for v in y_prior)
    return SCANVAEConfig(**fields, linear_classifier=linear, y_prior=prior, **options)


def scanvi_params_from_scvi_tools(read: dict) -> tuple[dict, int]:
    """``(init_params, n_labels)`` of a scvi-tools SCANVI directory read by
    :func:`jaxvi.io.scvi_tools.read_scvi_tools`.

    scvi-tools saves ``datamodule`` (None) among the arguments and ``y_prior`` as a
    ``(1, n_labels)`` tensor (here a list of floats). The class count is the saved weights'
    ``y_prior``'s: scvi-tools recomputes it from the data at load by
    :func:`model_n_labels`' rule, which may count the unlabelled category as a class.

    Raises
    ------
    ValueError
        A datamodule setup, weights without a ``(1, n)`` ``y_prior``, or a class count that
        is neither the labels registry's categories nor one fewer.
    """
    init_params = dict(read["init_params"])
    if init_params.pop("datamodule", None) is not None:
        raise ValueError("SCANVI models set up with a custom datamodule are not supported.")
    if init_params.get("y_prior") is not None:
        prior = np.asarray(init_params["y_prior"], dtype=np.float64).ravel()
        init_params["y_prior"] = [float(p) for p in prior]
    prior = read["state_dict"].get("y_prior")
    if prior is None or prior.ndim != 2 or prior.shape[0] != 1:
        raise ValueError(
            "The saved SCANVI weights lack `y_prior` of shape (1, n_labels) (got "
            f"{None if prior is None else prior.shape}); not a scvi-tools SCANVI module."
        )
    n_labels, n_cats = int(prior.shape[1]), len(read["registry"]["labels_categories"])
    if n_labels < 1 or n_labels not in (n_cats - 1, n_cats):
        raise ValueError(
            f"The saved SCANVI classifies {n_labels} classes (its y_prior), but its labels "
            f"registry has {n_cats} categories, the unlabelled one included."
        )
    return init_params, n_labels


def _split_counts(n, train_size, validation_size, batch_size, drop_last, train_size_is_none):
    """scvi-tools' ``validate_data_split``: ``(n_train, n_val)`` (no error when the moved
    cells leave an empty training part)."""
    if not 0.0 < train_size <= 1.0:
        raise ValueError("Invalid train_size. Must be: 0 < train_size <= 1")
    n_train = math.ceil(train_size * n)
    if validation_size is None:
        n_val = n - n_train
    elif not 0.0 <= validation_size < 1.0:
        raise ValueError("Invalid validation_size. Must be 0 <= validation_size < 1")
    elif train_size + validation_size > 1:
        raise ValueError("train_size + validation_size must be between 0 and 1")
    else:
        n_val = math.floor(n * validation_size)
    if n_train == 0:
        raise ValueError(
            f"With n_samples={n}, train_size={train_size} and validation_size="
            f"{validation_size}, the resulting train set will be empty."
        )
    left = n_train % batch_size
    if 0 < left < 3 and not drop_last:
        if not train_size_is_none:
            warnings.warn(
                f"Last batch will have a small size of {left} samples. Consider changing "
                f"batch_size from {batch_size} to avoid errors during model training.",
                UserWarning,
                stacklevel=5,
            )
        else:
            n_train -= left
            if n_val > 0:
                n_val += left
                warnings.warn(
                    f"{left} cells moved from training set to validation set. If you want to "
                    "avoid it please use train_size parameter during train.",
                    UserWarning,
                    stacklevel=5,
                )
    return n_train, n_val


def semi_supervised_split(
    labelled: np.ndarray,
    train_size: float | None,
    validation_size: float | None,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scvi-tools' ``SemiSupervisedDataSplitter``: ``(train, validation, test)`` int64 rows.

    Labelled and unlabelled cells (``labelled`` ``(cells,)`` bool) are split separately,
    each by scVI's rule on its own count and with its own permutation
    ``RandomState(seed).permutation`` (scvi-tools' ``choice`` without replacement); each
    set is the labelled part followed by the unlabelled part. ``train_size`` None means
    0.9 with the cells of a 1-2 cell last minibatch moved to validation.
    """
    labelled = np.asarray(labelled, bool)
    train_size_is_none = not train_size
    size = 0.9 if train_size_is_none else float(train_size)
    _split_counts(len(labelled), size, validation_size, batch_size, drop_last, train_size_is_none)
    parts = []
    for rows in (np.flatnonzero(labelled), np.flatnonzero(~labelled)):
        if len(rows) == 0:
            parts.append((rows, rows, rows))
            continue
        n_train, n_val = _split_counts(
            len(rows), size, validation_size, batch_size, drop_last, train_size_is_none
        )
        perm = np.random.RandomState(seed=seed).permutation(len(rows)) if shuffle else None
        ordered = rows if perm is None else rows[perm]
        parts.append(
            (
                ordered[n_val : n_val + n_train],
                ordered[:n_val],
                ordered[n_val + n_train :],
            )
        )
    lab, unl = parts
    return tuple(np.concatenate([lab[k], unl[k]]).astype(np.int64) for k in range(3))


def labelled_groups(
    labels: np.ndarray, unlabeled_category, train_idx, val_idx, n_samples_per_label
) -> PairedCells | None:
    """The labelled cells of a split as :class:`jaxvi.train.PairedCells`, one group per
    class in sorted order of the label values (``np.unique``), each in split order, as
    scvi-tools' ``SemiSupervisedDataLoader`` builds them; None without labelled cells.

    Raises
    ------
    ValueError
        If some cells are labelled but none is in the training set.
    """
    labels = np.asarray(labels)
    unlabeled = str(unlabeled_category)
    classes = [c for c in np.unique(labels) if c != unlabeled]
    if not classes:
        return None

    def groups(cells):
        cells = np.asarray(cells, np.int64)
        values = labels[cells]
        return tuple(cells[values == c] for c in classes)

    paired = PairedCells(groups(train_idx), groups(val_idx), n_samples_per_label)
    if paired.n_cells("train") == 0:
        raise ValueError(
            "No labelled cell is in the training set (all of them went to validation or "
            "test); pass a larger train_size."
        )
    return paired
