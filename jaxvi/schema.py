"""What a saved model, checkpoint or weight set must look like before jaxvi uses it.

Every reader validates the whole of what it read before acting on any of it, so an edited or
corrupted file gets one ``ValueError`` naming the field (``config.n_hidden``,
``indices.train``, ``params/px_r``, ...) instead of a ``KeyError``, ``TypeError`` or a
failure deep inside JAX:

- :func:`check_model_meta`: ``model.json`` of :meth:`jaxvi.SCVI.save` (types, ranges, the
  registry's internal consistency, split indices within the registered cells, sizes bounded
  by the arrays the directory actually holds);
- :func:`check_checkpoint_meta`: ``checkpoint.json`` of :mod:`jaxvi.checkpoint`;
- :func:`check_weights`: weights are finite, batch-norm variances non-negative, and (given the
  architecture's dtypes) of exactly the expected dtype.

Nothing here reads files; :mod:`jaxvi.io` calls these after parsing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping

import numpy as np

__all__ = [
    "ALLOWED_ARRAY_DTYPES",
    "check_checkpoint_meta",
    "check_model_meta",
    "check_weights",
]

# Array dtypes a jaxvi npz may hold (``numpy.dtype.str``): plain little-endian numbers.
ALLOWED_ARRAY_DTYPES = frozenset(
    ["|b1", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8"]
)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Bounds beyond which a size is not a model but an attempt to exhaust memory or time.
_MAX_DIM = 1 << 31
_MAX_LAYERS = 1024


class _Fields:
    """Typed access to a JSON object with errors naming the dotted field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, field: str, problem: str):
        raise ValueError(f"{self.where}: field `{field}` {problem}.")

    def obj(self, value, field: str) -> dict:
        if not isinstance(value, dict):
            self.fail(field, f"must be an object, got {type(value).__name__}")
        return value

    def get(self, parent: dict, key: str, field: str):
        if key not in parent:
            self.fail(field, "is missing")
        return parent[key]

    def int_(self, value, field: str, lo: int = 0, hi: int = _MAX_DIM) -> int:
        if type(value) is not int:
            self.fail(field, f"must be an integer, got {value!r:.60}")
        if not lo <= value <= hi:
            self.fail(field, f"must be in [{lo}, {hi}], got {value}")
        return value

    def float_(self, value, field: str) -> float:
        if type(value) not in (int, float):
            self.fail(field, f"must be a number, got {value!r:.60}")
        return float(value)

    def bool_(self, value, field: str) -> bool:
        if type(value) is not bool:
            self.fail(field, f"must be true or false, got {value!r:.60}")
        return value

    def str_(self, value, field: str, none: bool = False) -> str | None:
        if value is None and none:
            return None
        if not isinstance(value, str):
            self.fail(field, f"must be a string, got {value!r:.60}")
        return value

    def strs(self, value, field: str, none: bool = False) -> list[str] | None:
        if value is None and none:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.fail(field, "must be a list of strings")
        return value

    def ints(self, value, field: str, lo: int, hi: int) -> list[int]:
        if not isinstance(value, list) or not all(type(v) is int for v in value):
            self.fail(field, "must be a list of integers")
        if value and not (lo <= min(value) and max(value) <= hi):
            bad = next(v for v in value if not lo <= v <= hi)
            self.fail(field, f"holds {bad}, outside [{lo}, {hi}]")
        return value


# --------------------------------------------------------------------------------- arrays
def check_manifest(where: str, declared) -> dict:
    """The ``arrays`` declaration: ``{name: {"shape": [int], "dtype": str, "sha256": hex}}``
    with dtypes from :data:`ALLOWED_ARRAY_DTYPES`. Returns it."""
    f = _Fields(where)
    f.obj(declared, "arrays")
    for name, entry in declared.items():
        field = f"arrays[{name!r}]"
        f.obj(entry, field)
        shape = f.get(entry, "shape", field + ".shape")
        if not isinstance(shape, list) or len(shape) > 32:
            f.fail(field + ".shape", "must be a list of at most 32 sizes")
        for n in shape:
            f.int_(n, field + ".shape", 0, _MAX_DIM)
        dtype = f.str_(f.get(entry, "dtype", field + ".dtype"), field + ".dtype")
        if dtype not in ALLOWED_ARRAY_DTYPES:
            f.fail(field + ".dtype", f"is {dtype!r}, not a plain little-endian numeric dtype")
        if "sha256" in entry and not (
            isinstance(entry["sha256"], str) and _SHA256.match(entry["sha256"])
        ):
            f.fail(field + ".sha256", "must be 64 lowercase hex digits")
    return declared


def _array_elements(manifest: dict) -> int:
    return sum(math.prod(e["shape"]) for e in manifest.values())


# --------------------------------------------------------------------------------- models
_SETUP_ARGS = (
    "layer",
    "batch_key",
    "labels_key",
    "size_factor_key",
    "categorical_covariate_keys",
    "continuous_covariate_keys",
)
_INT_CONFIG = ("n_input", "n_batch", "n_labels", "n_hidden", "n_latent", "n_layers")
_CHOICE_CONFIG = (
    "dispersion",
    "gene_likelihood",
    "latent_distribution",
    "batch_representation",
    "use_batch_norm",
    "use_layer_norm",
)
_BOOL_CONFIG = (
    "log_variational",
    "encode_covariates",
    "deeply_inject_covariates",
    "use_size_factor_key",
    "use_observed_lib_size",
)


def check_registry(f: _Fields, reg, model_name: str = "SCVI") -> int:
    """A registry of :func:`jaxvi.registry.setup_anndata` (``model_name`` ``"SCVI"``) or of
    ``SCANVI.setup_anndata`` (``"SCANVI"``: an ``unlabeled_category`` among the labels);
    returns its cell count."""
    f.obj(reg, "registry")
    if f.get(reg, "model_name", "registry.model_name") != model_name:
        f.fail("registry.model_name", f"must be {model_name!r}")
    args = f.obj(f.get(reg, "setup_args", "registry.setup_args"), "registry.setup_args")
    for key in _SETUP_ARGS:
        field = f"registry.setup_args.{key}"
        value = f.get(args, key, field)
        if key.endswith("_keys"):
            f.strs(value, field, none=True)
        else:
            f.str_(value, field, none=True)
    genes = f.strs(f.get(reg, "var_names", "registry.var_names"), "registry.var_names")
    batches = f.strs(
        f.get(reg, "batch_categories", "registry.batch_categories"), "registry.batch_categories"
    )
    labels = f.strs(
        f.get(reg, "labels_categories", "registry.labels_categories"), "registry.labels_categories"
    )
    cats = f.obj(
        f.get(
            reg, "categorical_covariate_categories", "registry.categorical_covariate_categories"
        ),
        "registry.categorical_covariate_categories",
    )
    cat_keys = args["categorical_covariate_keys"] or []
    if sorted(cats) != sorted(cat_keys):
        f.fail(
            "registry.categorical_covariate_categories",
            "must have one entry per categorical covariate key",
        )
    for k, v in cats.items():
        if not f.strs(v, f"registry.categorical_covariate_categories.{k}"):
            f.fail(f"registry.categorical_covariate_categories.{k}", "must not be empty")
    stats = f.obj(f.get(reg, "summary_stats", "registry.summary_stats"), "registry.summary_stats")
    n_cells = f.int_(
        f.get(stats, "n_cells", "registry.summary_stats.n_cells"), "registry.summary_stats.n_cells"
    )
    expected = {
        "n_vars": ("registry.var_names", len(genes)),
        "n_batch": ("registry.batch_categories", len(batches)),
        "n_labels": ("registry.labels_categories", len(labels)),
        "n_extra_categorical_covs": (
            "registry.setup_args.categorical_covariate_keys",
            len(cat_keys),
        ),
        "n_extra_continuous_covs": (
            "registry.setup_args.continuous_covariate_keys",
            len(args["continuous_covariate_keys"] or []),
        ),
    }
    for stat, (source, n) in expected.items():
        value = f.int_(
            f.get(stats, stat, f"registry.summary_stats.{stat}"), f"registry.summary_stats.{stat}"
        )
        if value != n:
            f.fail(source, f"has {n} entries but registry.summary_stats.{stat} is {value}")
    if not genes or not batches or not labels:
        f.fail(
            "registry.var_names" if not genes else "registry.batch_categories", "must not be empty"
        )
    if model_name == "SCANVI":
        field = "registry.setup_args.unlabeled_category"
        unlabeled = f.get(args, "unlabeled_category", field)
        if type(unlabeled) not in (str, int, float) or str(unlabeled) not in labels:
            f.fail(field, "must be a string or number among registry.labels_categories")
    return n_cells


def _check_scanvi_config(f: _Fields, config: dict, n_categories: int, elements: int) -> None:
    """scANVI's config fields: the classifier options and the label prior."""
    n_labels = config["n_labels"]
    if n_labels not in (n_categories - 1, n_categories):
        f.fail("config.n_labels", f"is {n_labels} but the registry has {n_categories} labels")
    for key in ("linear_classifier", "classifier_logits"):
        f.bool_(f.get(config, key, f"config.{key}"), f"config.{key}")
    for key in ("classifier_n_hidden", "classifier_n_layers"):
        value = config.get(key)
        if value is not None:
            hi = _MAX_LAYERS if key.endswith("layers") else max(elements, 1)
            f.int_(value, f"config.{key}", 0, hi)
    rate = config.get("classifier_dropout_rate")
    if rate is not None and not 0.0 <= f.float_(rate, "config.classifier_dropout_rate") < 1.0:
        f.fail("config.classifier_dropout_rate", f"must be in [0, 1), got {rate}")
    prior = config.get("y_prior")
    if prior is not None:
        if not isinstance(prior, list) or len(prior) != n_labels:
            f.fail("config.y_prior", f"must be null or a list of {n_labels} numbers")
        if not all(type(p) in (int, float) and p >= 0 for p in prior):
            f.fail("config.y_prior", "must hold non-negative numbers")


def check_model_meta(
    meta, where: str = "model.json", configs: Mapping[str, Collection[str]] | None = None
) -> None:
    """Validate the whole of a ``model.json`` (after its arrays declaration was checked).

    ``configs`` maps each model name a file may hold to the names its ``config`` may hold
    (the fields of :class:`jaxvi.module.VAEConfig` for ``"SCVI"``, passed in by the reader
    because this module sits below the architecture); None accepts ``"SCVI"`` and skips the
    field check.

    Raises
    ------
    ValueError
        Naming the first field that is missing, of the wrong type, out of range or
        inconsistent with the registry or the arrays.
    """
    f = _Fields(where)
    f.obj(meta, "(top level)")
    known = ("SCVI",) if configs is None else tuple(configs)
    if f.get(meta, "model_name", "model_name") not in known:
        f.fail("model_name", f"must be one of {list(known)}, got {meta['model_name']!r:.60}")
    f.str_(meta.get("jaxvi_version", ""), "jaxvi_version")
    manifest = check_manifest(where, f.get(meta, "arrays", "arrays"))
    model_name = meta["model_name"]
    n_cells = check_registry(f, f.get(meta, "registry", "registry"), model_name)
    reg = meta["registry"]

    init = f.obj(f.get(meta, "init_params", "init_params"), "init_params")
    for key in ("n_hidden", "n_latent", "n_layers"):
        f.int_(f.get(init, key, f"init_params.{key}"), f"init_params.{key}", 1, _MAX_DIM)
    f.float_(f.get(init, "dropout_rate", "init_params.dropout_rate"), "init_params.dropout_rate")
    for key in ("dispersion", "gene_likelihood", "latent_distribution"):
        if key in init or model_name == "SCVI":  # scANVI's latent_distribution is a kwarg
            f.str_(f.get(init, key, f"init_params.{key}"), f"init_params.{key}")
    emb = init.get("batch_embedding_kwargs")
    if emb is not None:
        f.obj(emb, "init_params.batch_embedding_kwargs")

    config = f.obj(f.get(meta, "config", "config"), "config")
    fields = None if configs is None else configs[meta["model_name"]]
    unknown = [] if fields is None else sorted(set(config) - set(fields))
    if unknown:
        f.fail(f"config.{unknown[0]}", f"is not a {meta['model_name']} config field")
    elements = _array_elements(manifest)
    for key in _INT_CONFIG:
        # no size can exceed the number of values the directory holds: bounds the work
        # (tracing n_layers layers, allocating n_hidden-wide shapes) before the shape check
        value = f.int_(f.get(config, key, f"config.{key}"), f"config.{key}", 1, _MAX_DIM)
        if key != "n_labels" and value > max(elements, 1):
            f.fail(f"config.{key}", f"is {value}, more than the {elements} values saved")
    if config["n_layers"] > _MAX_LAYERS or config["n_layers"] > len(manifest):
        f.fail("config.n_layers", f"is {config['n_layers']}, more than the saved arrays allow")
    f.int_(f.get(config, "n_continuous_cov", "config.n_continuous_cov"), "config.n_continuous_cov")
    f.int_(config.get("batch_embedding_dim", 5), "config.batch_embedding_dim", 1, _MAX_DIM)
    f.ints(
        f.get(config, "n_cats_per_cov", "config.n_cats_per_cov"),
        "config.n_cats_per_cov",
        1,
        _MAX_DIM,
    )
    rate = f.float_(f.get(config, "dropout_rate", "config.dropout_rate"), "config.dropout_rate")
    if not 0.0 <= rate < 1.0:
        f.fail("config.dropout_rate", f"must be in [0, 1), got {rate}")
    for key in _CHOICE_CONFIG:
        f.str_(f.get(config, key, f"config.{key}"), f"config.{key}")
    for key in _BOOL_CONFIG:
        f.bool_(f.get(config, key, f"config.{key}"), f"config.{key}")
    stats = reg["summary_stats"]
    if model_name == "SCANVI":  # its classes: the label categories but the unlabelled one
        _check_scanvi_config(f, config, stats["n_labels"], elements)
    for key, stat in (
        ("n_input", "n_vars"),
        ("n_batch", "n_batch"),
        ("n_labels", "n_labels"),
        ("n_continuous_cov", "n_extra_continuous_covs"),
    ):
        if key == "n_labels" and model_name == "SCANVI":
            continue
        if config[key] != stats[stat]:
            f.fail(f"config.{key}", f"is {config[key]} but the registry has {stats[stat]}")
    cat_keys = reg["setup_args"]["categorical_covariate_keys"] or []
    per_cov = [len(reg["categorical_covariate_categories"][k]) for k in cat_keys]
    if config["n_cats_per_cov"] != per_cov:
        f.fail("config.n_cats_per_cov", f"is {config['n_cats_per_cov']}, the registry {per_cov}")

    f.bool_(f.get(meta, "is_trained", "is_trained"), "is_trained")
    history = f.obj(f.get(meta, "history", "history"), "history")
    for name, entry in history.items():
        field = f"history.{name}"
        f.obj(entry, field)
        epochs = f.ints(f.get(entry, "epoch", field + ".epoch"), field + ".epoch", 0, _MAX_DIM)
        values = f.get(entry, "values", field + ".values")
        if not isinstance(values, list) or not all(
            v is None or type(v) in (int, float) for v in values
        ):
            f.fail(field + ".values", "must be a list of numbers")
        if len(values) != len(epochs):
            f.fail(field, "has different numbers of epochs and values")
    indices = f.obj(f.get(meta, "indices", "indices"), "indices")
    for name in ("train", "validation", "test"):
        value = f.get(indices, name, f"indices.{name}")
        if value is not None:
            f.ints(value, f"indices.{name}", 0, n_cells - 1)


# ---------------------------------------------------------------------------- checkpoints
def check_checkpoint_meta(meta, where: str = "checkpoint.json") -> None:
    """Validate a ``checkpoint.json`` of :mod:`jaxvi.checkpoint` before resuming from it
    (split indices within ``n_cells``, progress counters, history, optimizer layout)."""
    f = _Fields(where)
    f.obj(meta, "(top level)")
    check_manifest(where, f.get(meta, "arrays", "arrays"))
    n_cells = f.int_(f.get(meta, "n_cells", "n_cells"), "n_cells", 1)
    f.int_(f.get(meta, "seed", "seed"), "seed", -(1 << 63), (1 << 64) - 1)
    f.int_(f.get(meta, "max_epochs", "max_epochs"), "max_epochs", 1)
    split = f.obj(f.get(meta, "split", "split"), "split")
    for name in ("train", "validation", "test"):
        f.ints(f.get(split, name, f"split.{name}"), f"split.{name}", 0, n_cells - 1)
    progress = f.obj(f.get(meta, "progress", "progress"), "progress")
    known = (
        "epoch",
        "rows",
        "plateau_best",
        "plateau_bad_epochs",
        "stop_best",
        "stop_wait",
        "stopped_early",
    )
    unknown = sorted(set(progress) - set(known))
    if unknown:
        f.fail(f"progress.{unknown[0]}", "is not a training-progress field")
    f.int_(f.get(progress, "epoch", "progress.epoch"), "progress.epoch", 0)
    for key in ("plateau_bad_epochs", "stop_wait"):
        if key in progress:
            f.int_(progress[key], f"progress.{key}", 0)
    for key in ("plateau_best", "stop_best"):
        if key in progress:
            f.float_(progress[key], f"progress.{key}")
    if "stopped_early" in progress:
        f.bool_(progress["stopped_early"], "progress.stopped_early")
    rows = f.obj(progress.get("rows", {}), "progress.rows")
    for name, entries in rows.items():
        if not isinstance(entries, list) or not all(
            isinstance(e, list)
            and len(e) == 2
            and type(e[0]) is int
            and (e[1] is None or type(e[1]) in (int, float))
            for e in entries
        ):
            f.fail(f"progress.rows.{name}", "must be a list of [epoch, value] pairs")
    history = f.obj(f.get(meta, "history_before", "history_before"), "history_before")
    for name, entry in history.items():
        field = f"history_before.{name}"
        f.obj(entry, field)
        f.ints(f.get(entry, "epoch", field + ".epoch"), field + ".epoch", 0, _MAX_DIM)
        values = f.get(entry, "values", field + ".values")
        if not isinstance(values, list) or len(values) != len(entry["epoch"]):
            f.fail(field + ".values", "must be a list with one number per epoch")
    layout = f.get(meta, "opt_layout", "opt_layout")
    if not isinstance(layout, list):
        f.fail("opt_layout", "must be a list")
    for k, entry in enumerate(layout):
        field = f"opt_layout[{k}]"
        f.obj(entry, field)
        f.str_(f.get(entry, "path", field + ".path"), field + ".path")
        f.ints(f.get(entry, "shape", field + ".shape"), field + ".shape", 0, _MAX_DIM)


# -------------------------------------------------------------------------------- weights
def check_weights(
    weights: Mapping[str, np.ndarray], where: str, dtypes: Mapping[str, np.dtype] | None = None
) -> None:
    """Refuse non-finite weights, negative batch-norm variances and unexpected dtypes.

    Parameters
    ----------
    weights
        ``{name: array}``, flat (``params/decoder/...`` or scvi-tools' dotted names).
        Batch-norm variances are the names ending in ``/var`` or ``.running_var``.
    where
        The file, for the message.
    dtypes
        The dtype each name must have (the architecture's); None skips that check.

    Raises
    ------
    ValueError
        Naming the array and the problem.
    """
    for name, value in weights.items():
        a = np.asarray(value)
        if dtypes is not None and name in dtypes and a.dtype != np.dtype(dtypes[name]):
            raise ValueError(
                f"{where}: weight {name} has dtype {a.dtype}, expected {np.dtype(dtypes[name])}."
            )
        if a.dtype.kind not in "fiub":
            raise ValueError(f"{where}: weight {name} has non-numeric dtype {a.dtype}.")
        if a.dtype.kind == "f" and not np.all(np.isfinite(a)):
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
            raise ValueError(
                f"{where}: weight {name} holds {bad} non-finite value(s) (NaN or infinite); "
                "a model with such weights gives NaN outputs. Refused."
            )
        if (name.endswith("/var") or name.endswith(".running_var")) and np.any(a < 0):
            raise ValueError(
                f"{where}: batch-norm variance {name} holds negative values; refused."
            )
