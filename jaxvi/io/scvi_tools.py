"""scvi-tools model directories in and out: ``model.pt`` (+ ``adata.h5ad``) ⇄ jaxvi ``SCVI``
and ``SCANVI``.

scvi-tools' ``SCVI.save`` (and ``SCANVI.save``, alike) writes ``{prefix}model.pt``, a
``torch.save`` file holding ``model_state_dict`` (the module's tensors plus an empty
``pyro_param_store``), ``var_names`` and ``attr_dict`` (registry, init parameters, history,
split indices, ...), and optionally ``{prefix}adata.h5ad``. :func:`read_scvi_tools` reads
such a directory into plain parts without torch and without running anything from the file
(:mod:`jaxvi.io.torchfile`); :func:`write_scvi_tools` writes one from plain parts that
``scvi.model.SCVI.load`` (``SCANVI.load``) reads, also without torch. Neither builds a model:
:class:`jaxvi.model.BaseModel` does.

The registries differ in shape, not content. scvi-tools keeps one entry per field
(``X``, ``batch``, ``labels``, ``size_factor``, ``extra_categorical_covs``,
``extra_continuous_covs``) with its state (category mappings, column names) and summary
statistics; jaxvi keeps the same setup arguments, genes, category lists and counts in one
flat JSON dict (:mod:`jaxvi.data.registry`). Categories are stored as strings in jaxvi and written
back as strings (a batch column of integers would be read back by scvi-tools as new
categories); the single default batch / label of an unkeyed setup is scvi-tools' ``[0]``.
A SCANVI registry adds the setup argument ``unlabeled_category`` (scvi-tools also keeps it
in the labels field's state, whose mapping has the unlabelled category last); its classes
are the mapping's categories but that one.
"""

from __future__ import annotations

import os
import uuid

import numpy as np
import pandas as pd

from jaxvi import schema
from jaxvi.io import _npz, torchfile

__all__ = [
    "MODEL_NAMES",
    "SCVI_TOOLS_VERSION",
    "UNLABELED_KEY",
    "init_params_from_scvi",
    "init_params_to_scvi",
    "is_scvi_tools_dir",
    "read_scvi_tools",
    "read_scvi_tools_files",
    "registry_from_scvi",
    "registry_to_scvi",
    "write_scvi_tools",
]

# The scvi-tools release whose format is written (and against which it is tested).
SCVI_TOOLS_VERSION = "1.4.2"
MODEL_PT = "model.pt"
ADATA_FILE = "adata.h5ad"
_PYRO_KEY = "pyro_param_store"
_SETUP_ARGS = (
    "layer",
    "batch_key",
    "labels_key",
    "size_factor_key",
    "categorical_covariate_keys",
    "continuous_covariate_keys",
)
_FIELDS = (
    "X",
    "batch",
    "labels",
    "size_factor",
    "extra_categorical_covs",
    "extra_continuous_covs",
)
# The model classes whose registries are translated; SCANVI's extra setup arguments.
MODEL_NAMES = ("SCVI", "SCANVI")
UNLABELED_KEY = "unlabeled_category"
_SCANVI_SETUP_ARGS = (UNLABELED_KEY, "use_minified")
# A minified model's extra fields: the AnnData itself (obsm / obs / uns) says it is minified.
_MINIFIED_FIELDS = ("latent_qzm", "latent_qzv", "observed_lib_size", "minify_type")


def is_scvi_tools_dir(dir_path: str, prefix: str | None = None) -> bool:
    """Whether ``dir_path`` holds a scvi-tools ``{prefix}model.pt``."""
    return os.path.isfile(os.path.join(dir_path, f"{prefix or ''}{MODEL_PT}"))


def read_scvi_tools_files(dir_path: str, prefix: str | None = None) -> dict:
    """The three parts of a scvi-tools ``model.pt`` as plain data (no torch, no code run).

    Parameters
    ----------
    dir_path
        Directory written by scvi-tools' ``SCVI.save``.
    prefix
        File-name prefix passed to ``save``.

    Returns
    -------
    ``{"attr_dict": dict, "var_names": list[str], "state_dict": {key: np.ndarray}}``; the
    state dict without ``pyro_param_store``.

    Raises
    ------
    FileNotFoundError
        If there is no ``model.pt``.
    jaxvi.io.torchfile.UnsafePickleError
        If the file refers to anything but tensors, arrays, history tables and containers.
    ValueError
        If the file is not a scvi-tools model file.
    """
    path = os.path.join(dir_path, f"{prefix or ''}{MODEL_PT}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No scvi-tools model in {dir_path} ({MODEL_PT} missing).")
    saved = torchfile.load(path)
    if not isinstance(saved, dict) or not {"model_state_dict", "attr_dict", "var_names"} <= set(
        saved
    ):
        raise ValueError(
            f"{path} is not a scvi-tools model file (expected a dict with model_state_dict, "
            "var_names and attr_dict)."
        )
    state = dict(saved["model_state_dict"])
    pyro = state.pop(_PYRO_KEY, None)
    if isinstance(pyro, dict) and any(pyro.values()):
        raise ValueError(
            f"{path} carries a non-empty Pyro parameter store; not an SCVI or SCANVI model."
        )
    bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
    if bad:
        raise ValueError(f"{path}: state dict entries that are not tensors: {bad[:5]}.")
    for k, v in state.items():  # weights are floating; only batch-norm counters are integers
        kinds = "iu" if k.endswith("num_batches_tracked") else "f"
        if v.dtype.kind not in kinds:
            raise ValueError(
                f"{path}: weight {k} has dtype {v.dtype}, expected "
                f"{'an integer' if kinds == 'iu' else 'a floating'} dtype."
            )
    schema.check_weights(state, path)  # finite, batch-norm variances >= 0
    var_names = saved["var_names"]
    if isinstance(var_names, dict):
        raise ValueError(
            f"{path} holds a multi-modal (MuData) model; jaxvi reads AnnData models only."
        )
    return {
        "attr_dict": dict(saved["attr_dict"]),
        "var_names": [str(v) for v in np.asarray(var_names).tolist()],
        "state_dict": state,
    }


def _strs(values) -> list[str]:
    return [str(v) for v in np.asarray(values).tolist()]


def registry_from_scvi(registry: dict, var_names: list[str]) -> dict:
    """jaxvi's registry (see :mod:`jaxvi.data.registry`) from scvi-tools' ``registry_``.

    An ``SCVI`` or ``SCANVI`` registry; a ``SCANVI`` one also gives the setup argument
    ``unlabeled_category`` and its labels field must be consistent (see
    :func:`_scanvi_labels`).

    Raises
    ------
    ValueError
        For another model class or setup method, unknown setup arguments or fields, naming
        them (a minified SCVI model's fields are accepted), or a malformed SCANVI labels
        field.
    """
    if not isinstance(registry, dict):
        raise ValueError(f"The saved registry_ is a {type(registry).__name__}, not a dict.")
    name = registry.get("model_name")
    if name not in MODEL_NAMES:
        raise ValueError(
            f"The saved model is a {name!r}; jaxvi converts scvi-tools "
            f"{' and '.join(MODEL_NAMES)} models only."
        )
    method = registry.get("setup_method_name", "setup_anndata")
    if method != "setup_anndata":
        raise ValueError(f"Models set up with {method!r} are not supported (only setup_anndata).")
    args = dict(registry.get("setup_args", {}))
    known = _SETUP_ARGS + (_SCANVI_SETUP_ARGS if name == "SCANVI" else ())
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(f"Unsupported scvi-tools {name} setup arguments: {unknown}.")
    fields = dict(registry.get("field_registries", {}))
    extra = sorted(set(fields) - set(_FIELDS) - set(_MINIFIED_FIELDS))
    if extra:
        raise ValueError(
            f"The saved registry has fields jaxvi does not read: {extra} (a non-{name} setup)."
        )
    if name == "SCANVI" and set(fields) & set(_MINIFIED_FIELDS):
        # scvi-tools keeps a minified scANVI's posterior under obsm["scanvi_latent_qzm"],
        # not where jaxvi's minified models look for it
        raise ValueError("Minified scvi-tools SCANVI models are not read by jaxvi.")
    setup_args = {k: args.get(k) for k in _SETUP_ARGS}
    for k in ("categorical_covariate_keys", "continuous_covariate_keys"):
        setup_args[k] = list(setup_args[k]) if setup_args[k] else None

    def mapping(field):
        state = fields.get(field, {}).get("state_registry", {})
        return _strs(state["categorical_mapping"]) if "categorical_mapping" in state else ["0"]

    cat_keys = setup_args["categorical_covariate_keys"] or []
    cat_state = fields.get("extra_categorical_covs", {}).get("state_registry", {})
    cov_cats = {k: _strs(cat_state["mappings"][k]) for k in cat_keys}
    x_state = fields.get("X", {}).get("state_registry", {})
    x_stats = fields.get("X", {}).get("summary_stats", {})
    n_vars = int(x_stats.get("n_vars", len(var_names)))
    if n_vars != len(var_names):
        raise ValueError(f"The registry counts {n_vars} genes but var_names has {len(var_names)}.")
    if "column_names" in x_state and _strs(x_state["column_names"]) != list(var_names):
        raise ValueError("The registry's gene names differ from the saved var_names.")
    if name == "SCANVI":  # before the labels mapping is read: it must be well formed
        setup_args[UNLABELED_KEY] = _scanvi_labels(args, fields.get("labels"))
    batch, labels = mapping("batch"), mapping("labels")
    return {
        "model_name": name,
        "setup_args": setup_args,
        "var_names": list(var_names),
        "batch_categories": batch,
        "labels_categories": labels,
        "categorical_covariate_categories": cov_cats,
        "summary_stats": {
            "n_cells": int(x_stats.get("n_cells", x_state.get("n_obs", 0))),
            "n_vars": n_vars,
            "n_batch": len(batch),
            "n_labels": len(labels),
            "n_extra_categorical_covs": len(cat_keys),
            "n_extra_continuous_covs": len(setup_args["continuous_covariate_keys"] or []),
        },
    }


def _scanvi_labels(args: dict, field) -> object:
    """The unlabelled category of a scvi-tools SCANVI registry, after checking its labels
    field as ``LabelsWithUnlabeledObsField`` writes it: a labels column, a 1-D mapping of
    distinct plain values holding the unlabelled category, the same unlabelled category in
    the field's state as in the setup arguments.

    Raises
    ------
    ValueError
        Naming what is malformed.
    """
    where = "The saved SCANVI registry's labels field"
    labels_key = args.get("labels_key")
    if not isinstance(labels_key, str):
        raise ValueError(f"The saved SCANVI registry has no labels_key (got {labels_key!r}).")
    if UNLABELED_KEY not in args:
        raise ValueError("The saved SCANVI registry lacks the setup argument unlabeled_category.")
    unlabeled = args[UNLABELED_KEY]
    if not isinstance(unlabeled, str | int | float | np.generic) or isinstance(unlabeled, bool):
        raise ValueError(f"unlabeled_category {unlabeled!r} is not a plain value.")
    state = field.get("state_registry") if isinstance(field, dict) else None
    if not isinstance(state, dict) or "categorical_mapping" not in state:
        raise ValueError(f"{where} has no categorical_mapping.")
    raw = state["categorical_mapping"]
    values = np.asarray(raw, dtype=object) if isinstance(raw, list | tuple | np.ndarray) else None
    if values is None or values.ndim != 1 or len(values) < 2:
        raise ValueError(
            f"{where}: categorical_mapping must be a 1-D array of at least two categories "
            f"(the classes and the unlabelled one), got {type(raw).__name__} "
            f"{getattr(values, 'shape', '')}."
        )
    if not all(isinstance(v, str | int | float | np.generic) for v in values.tolist()):
        raise ValueError(f"{where}: categorical_mapping holds values that are not plain.")
    mapping = _strs(values)
    if len(set(mapping)) != len(mapping):
        raise ValueError(f"{where}: categorical_mapping has repeated categories {mapping}.")
    if state.get("unlabeled_category", unlabeled) != unlabeled:
        raise ValueError(
            f"{where} names the unlabelled category {state['unlabeled_category']!r}, the setup "
            f"arguments {unlabeled!r}."
        )
    if str(unlabeled) not in mapping:
        raise ValueError(
            f"{where}: the unlabelled category {unlabeled!r} is not among its categories "
            f"{mapping}."
        )
    if state.get("original_key", labels_key) != labels_key:
        raise ValueError(
            f"{where} reads column {state['original_key']!r}, the setup arguments {labels_key!r}."
        )
    return unlabeled.item() if isinstance(unlabeled, np.generic) else unlabeled


def _mapping_array(categories: list[str], keyed: bool) -> np.ndarray:
    if not keyed:
        return np.array([0])
    return np.array(list(categories), dtype=object)


def registry_to_scvi(registry: dict) -> dict:
    """scvi-tools' ``registry_`` (as ``SCVI.save`` / ``SCANVI.save`` write it) from jaxvi's
    registry (an SCVI or SCANVI one)."""
    name = registry.get("model_name", "SCVI")
    if name not in MODEL_NAMES:
        raise ValueError(f"A {name!r} registry has no scvi-tools form in jaxvi.")
    args = registry["setup_args"]
    stats = registry["summary_stats"]
    layer = args["layer"]

    def field(data=None, state=None, summary=None):
        return {
            "data_registry": data or {},
            "state_registry": state or {},
            "summary_stats": summary or {},
        }

    def categorical(key, default_col, cats, stat):
        return field(
            {"attr_name": "obs", "attr_key": default_col},
            {
                "categorical_mapping": _mapping_array(cats, key is not None),
                "original_key": key if key is not None else default_col,
            },
            {stat: len(cats)},
        )

    fields = {
        "X": field(
            {"attr_name": "layers" if layer else "X", "attr_key": layer},
            {
                "n_obs": int(stats["n_cells"]),
                "n_vars": int(stats["n_vars"]),
                "column_names": np.array(registry["var_names"], dtype=object),
            },
            {"n_cells": int(stats["n_cells"]), "n_vars": int(stats["n_vars"])},
        ),
        "batch": categorical(
            args["batch_key"], "_scvi_batch", registry["batch_categories"], "n_batch"
        ),
        "labels": categorical(
            args["labels_key"], "_scvi_labels", registry["labels_categories"], "n_labels"
        ),
        "size_factor": field(
            {"attr_name": "obs", "attr_key": args["size_factor_key"]}
            if args["size_factor_key"]
            else None
        ),
    }
    cat_keys = list(args["categorical_covariate_keys"] or [])
    cats = registry["categorical_covariate_categories"]
    fields["extra_categorical_covs"] = field(
        {"attr_name": "obsm", "attr_key": "_scvi_extra_categorical_covs"} if cat_keys else None,
        {
            "mappings": {k: np.array(cats[k], dtype=object) for k in cat_keys},
            "field_keys": cat_keys,
            "n_cats_per_key": [len(cats[k]) for k in cat_keys],
        }
        if cat_keys
        else None,
        {"n_extra_categorical_covs": len(cat_keys)},
    )
    cont_keys = list(args["continuous_covariate_keys"] or [])
    fields["extra_continuous_covs"] = field(
        {"attr_name": "obsm", "attr_key": "_scvi_extra_continuous_covs"} if cont_keys else None,
        {"columns": np.array(cont_keys, dtype=object)} if cont_keys else None,
        {"n_extra_continuous_covs": len(cont_keys)},
    )
    setup_args = {k: args[k] for k in _SETUP_ARGS}
    if name == "SCANVI":  # LabelsWithUnlabeledObsField's state; SCANVI.setup_anndata's order
        unlabeled = args[UNLABELED_KEY]
        fields["labels"]["state_registry"][UNLABELED_KEY] = unlabeled
        setup_args = {
            "labels_key": args["labels_key"],
            UNLABELED_KEY: unlabeled,
            **{k: args[k] for k in _SETUP_ARGS if k != "labels_key"},
            "use_minified": True,
        }
    return {
        "scvi_version": SCVI_TOOLS_VERSION,
        "model_name": name,
        "setup_args": setup_args,
        "field_registries": fields,
        "setup_method_name": "setup_anndata",
        "_scvi_uuid": str(uuid.uuid4()),
    }


def init_params_from_scvi(init_params: dict) -> dict:
    """jaxvi's flat ``init_params_`` from scvi-tools' ``{"non_kwargs": ..., "kwargs":
    {<name of the ** argument>: ...}}`` (``kwargs`` for SCVI, ``model_kwargs`` for SCANVI;
    every one is lifted, as scvi-tools' ``load`` does). Which names a model accepts is the
    model class's business."""
    if "non_kwargs" not in init_params:
        raise ValueError("The saved init_params_ lack 'non_kwargs' (scvi-tools < 0.8?).")
    params = dict(init_params["non_kwargs"])
    nested = init_params.get("kwargs") or {}
    if not isinstance(nested, dict) or not all(
        isinstance(v, dict) or v is None for v in nested.values()
    ):
        raise ValueError("The saved init_params_['kwargs'] is not a dict of dicts.")
    kwargs = {k: v for inner in nested.values() for k, v in (inner or {}).items()}
    return {**params, **kwargs}


def init_params_to_scvi(
    init_params: dict, non_kwargs: tuple[str, ...], kwargs_name: str = "kwargs"
) -> dict:
    """scvi-tools' ``init_params_`` layout (as its model cards show it) from jaxvi's flat one;
    ``non_kwargs`` are the model's named constructor arguments, ``kwargs_name`` the name of
    its ``**`` argument (``"model_kwargs"`` for SCANVI)."""
    non = {k: init_params[k] for k in non_kwargs}
    kwargs = {k: v for k, v in init_params.items() if k not in non_kwargs}
    return {"kwargs": {kwargs_name: kwargs}, "non_kwargs": non}


def _indices(value) -> np.ndarray | None:
    return None if value is None else np.asarray(value, dtype=np.int64)


def _history_from_scvi(history) -> dict[str, pd.DataFrame]:
    if not history:
        return {}
    out = {}
    for name, frame in dict(history).items():
        if not isinstance(frame, pd.DataFrame) or frame.shape[1] != 1:
            raise ValueError(f"history entry {name!r} is not a one-column table.")
        index = pd.Index(np.asarray(frame.index), name="epoch")
        out[str(name)] = pd.DataFrame({str(name): frame.iloc[:, 0].to_numpy(float)}, index=index)
    return out


def read_scvi_tools(dir_path: str, prefix: str | None = None) -> dict:
    """The plain parts of a scvi-tools model directory (no torch, no code run).

    Parameters
    ----------
    dir_path
        Directory written by ``scvi.model.SCVI.save`` (``model.pt``, maybe ``adata.h5ad``).
    prefix
        File-name prefix used at save time.

    Returns
    -------
    dict with ``registry`` (jaxvi's layout), ``init_params`` (flat), ``state_dict``
    (name -> ndarray, scvi-tools' names), ``history``, ``is_trained``, ``indices``
    (train, validation, test; arrays or None) and ``adata_path`` (the saved AnnData's path,
    or None).
    """
    parts = read_scvi_tools_files(dir_path, prefix)
    attrs = parts["attr_dict"]
    adata_path = os.path.join(dir_path, f"{prefix or ''}{ADATA_FILE}")
    return {
        "registry": registry_from_scvi(dict(attrs["registry_"]), parts["var_names"]),
        "init_params": init_params_from_scvi(dict(attrs["init_params_"])),
        "state_dict": parts["state_dict"],
        "history": _history_from_scvi(attrs.get("history_")),
        "is_trained": bool(attrs.get("is_trained_", False)),
        "indices": tuple(
            _indices(attrs.get(f"{k}_indices_")) for k in ("train", "validation", "test")
        ),
        "adata_path": adata_path if os.path.exists(adata_path) else None,
    }


def write_scvi_tools(
    dir_path: str,
    *,
    state_dict: dict,
    registry: dict,
    init_params: dict,
    non_kwargs: tuple[str, ...],
    history: dict,
    is_trained: bool,
    indices: tuple,
    adata=None,
    prefix: str | None = None,
    overwrite: bool = False,
    extra_attrs: dict | None = None,
    kwargs_name: str = "kwargs",
) -> None:
    """Write a scvi-tools 1.4.2 model directory from plain parts (no torch needed).

    Parameters
    ----------
    dir_path
        Output directory; ``scvi.model.SCVI.load(dir_path, adata)`` (``SCANVI.load`` for a
        SCANVI registry) reads it.
    state_dict
        name -> ndarray with scvi-tools' names (:func:`jaxvi.io.bridge.variables_to_state_dict`).
    registry, init_params, history, is_trained, indices
        The model's registry, flat constructor arguments, history, trained flag and split.
    non_kwargs
        The model's named constructor arguments (the rest of ``init_params`` are kwargs).
    adata
        Also write this AnnData as ``adata.h5ad`` (None: no AnnData file).
    prefix
        File-name prefix, as scvi-tools' ``save``.
    overwrite
        Replace an existing ``model.pt``.
    extra_attrs
        Further model attributes scvi-tools saves for the class (SCANVI's
        ``unlabeled_category_``, ...); scvi-tools' ``load`` sets them on the model.
    kwargs_name
        The name of the model's ``**`` argument in its saved ``init_params_``.

    Raises
    ------
    ValueError
        If the file exists and ``overwrite`` is False.
    """
    pt_path = os.path.join(dir_path, f"{prefix or ''}{MODEL_PT}")
    if os.path.exists(pt_path) and not overwrite:
        raise ValueError(f"{pt_path} already exists; pass `overwrite=True` to replace it.")
    os.makedirs(dir_path, exist_ok=True)
    tensors = {k: torchfile.Tensor(np.asarray(v)) for k, v in state_dict.items()}
    tensors[_PYRO_KEY] = {"params": {}, "constraints": {}}
    history = {k: v.copy() for k, v in history.items()} or None
    train, validation, test = indices
    attr_dict = {
        "get_normalized_function_name_": "get_normalized_expression",
        "history_": history,
        "init_params_": init_params_to_scvi(init_params, non_kwargs, kwargs_name),
        "is_trained_": bool(is_trained),
        "registry_": registry_to_scvi(registry),
        "run_id_": "",
        "run_name_": "jaxvi",
        "test_indices_": _indices(test),
        "train_indices_": _indices(train),
        "validation_indices_": _indices(validation),
        **(extra_attrs or {}),
    }
    obj = {
        "model_state_dict": tensors,
        "var_names": np.array(registry["var_names"], dtype=object),
        "attr_dict": attr_dict,
    }
    if adata is not None:
        adata = adata.copy()
        adata.uns.pop("_jaxvi", None)  # scvi-tools re-registers from the model's registry
        _npz.atomic_write(os.path.join(dir_path, f"{prefix or ''}{ADATA_FILE}"), adata.write_h5ad)
    _npz.atomic_write(pt_path, lambda tmp: torchfile.save(obj, tmp, archive_name="model"))
