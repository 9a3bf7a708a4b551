"""scvi-tools model directories in and out: ``model.pt`` (+ ``adata.h5ad``) ⇄ jaxvi ``SCVI``.

scvi-tools' ``SCVI.save`` writes ``{prefix}model.pt``, a ``torch.save`` file holding
``model_state_dict`` (the VAE's tensors plus an empty ``pyro_param_store``), ``var_names`` and
``attr_dict`` (registry, init parameters, history, split indices, ...), and optionally
``{prefix}adata.h5ad``. :func:`read_scvi_tools` turns such a directory into a jaxvi model
without torch and without running anything from the file (:mod:`jaxvi.torchfile`);
:func:`write_scvi_tools` writes a directory that ``scvi.model.SCVI.load`` reads, also without
torch.

The registries differ in shape, not content. scvi-tools keeps one entry per field
(``X``, ``batch``, ``labels``, ``size_factor``, ``extra_categorical_covs``,
``extra_continuous_covs``) with its state (category mappings, column names) and summary
statistics; jaxvi keeps the same setup arguments, genes, category lists and counts in one
flat JSON dict (:mod:`jaxvi.registry`). Categories are stored as strings in jaxvi and written
back as strings (a batch column of integers would be read back by scvi-tools as new
categories); the single default batch / label of an unkeyed setup is scvi-tools' ``[0]``.
"""

from __future__ import annotations

import os
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxvi import schema, torchfile
from jaxvi.bridge import state_dict_to_variables, variables_to_state_dict

__all__ = [
    "SCVI_TOOLS_VERSION",
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
_NON_KWARGS = (
    "n_hidden",
    "n_latent",
    "n_layers",
    "dropout_rate",
    "dispersion",
    "gene_likelihood",
    "use_observed_lib_size",
    "latent_distribution",
)


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
    jaxvi.torchfile.UnsafePickleError
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
        raise ValueError(f"{path} carries a non-empty Pyro parameter store; not an SCVI model.")
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
        raise ValueError(f"{path} holds a multi-modal (MuData) model; jaxvi reads SCVI only.")
    return {
        "attr_dict": dict(saved["attr_dict"]),
        "var_names": [str(v) for v in np.asarray(var_names).tolist()],
        "state_dict": state,
    }


def _strs(values) -> list[str]:
    return [str(v) for v in np.asarray(values).tolist()]


def registry_from_scvi(registry: dict, var_names: list[str]) -> dict:
    """jaxvi's registry (see :mod:`jaxvi.registry`) from scvi-tools' ``registry_``.

    Raises
    ------
    ValueError
        For another model class or setup method, unknown setup arguments or fields (e.g. a
        minified model's), naming them.
    """
    name = registry.get("model_name")
    if name != "SCVI":
        raise ValueError(f"The saved model is a {name!r}; jaxvi converts scvi-tools SCVI only.")
    method = registry.get("setup_method_name", "setup_anndata")
    if method != "setup_anndata":
        raise ValueError(f"Models set up with {method!r} are not supported (only setup_anndata).")
    args = dict(registry.get("setup_args", {}))
    unknown = sorted(set(args) - set(_SETUP_ARGS))
    if unknown:
        raise ValueError(f"Unsupported scvi-tools setup arguments: {unknown}.")
    fields = dict(registry.get("field_registries", {}))
    extra = sorted(set(fields) - set(_FIELDS))
    if extra:
        raise ValueError(
            f"The saved registry has fields jaxvi does not read: {extra} (a minified or "
            "non-SCVI setup); load it in scvi-tools and save an unminified SCVI."
        )
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
    batch, labels = mapping("batch"), mapping("labels")
    return {
        "model_name": "SCVI",
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


def _mapping_array(categories: list[str], keyed: bool) -> np.ndarray:
    if not keyed:
        return np.array([0])
    return np.array(list(categories), dtype=object)


def registry_to_scvi(registry: dict) -> dict:
    """scvi-tools' ``registry_`` (as ``SCVI.save`` writes it) from jaxvi's registry."""
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
    return {
        "scvi_version": SCVI_TOOLS_VERSION,
        "model_name": "SCVI",
        "setup_args": {k: args[k] for k in _SETUP_ARGS},
        "field_registries": fields,
        "setup_method_name": "setup_anndata",
        "_scvi_uuid": str(uuid.uuid4()),
    }


def init_params_from_scvi(init_params: dict) -> dict:
    """jaxvi's ``init_params_`` from scvi-tools' ``{"non_kwargs": ..., "kwargs": {"kwargs"}}``."""
    from jaxvi.model import _VAE_KWARGS

    if "non_kwargs" not in init_params:
        raise ValueError("The saved init_params_ lack 'non_kwargs' (scvi-tools < 0.8?).")
    params = dict(init_params["non_kwargs"])
    kwargs = dict(init_params.get("kwargs", {}).get("kwargs", {}) or {})
    unknown = sorted(set(params) - set(_NON_KWARGS)) + sorted(set(kwargs) - _VAE_KWARGS)
    if unknown:
        raise ValueError(f"The saved model uses SCVI arguments jaxvi does not support: {unknown}.")
    return {**params, **kwargs}


def init_params_to_scvi(init_params: dict) -> dict:
    """scvi-tools' ``init_params_`` layout (as its model cards show it) from jaxvi's."""
    non = {k: init_params[k] for k in _NON_KWARGS}
    kwargs = {k: v for k, v in init_params.items() if k not in _NON_KWARGS}
    return {"kwargs": {"kwargs": kwargs}, "non_kwargs": non}


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


def read_scvi_tools(cls, dir_path: str, adata=None, prefix: str | None = None):
    """A jaxvi model from a scvi-tools ``SCVI`` directory.

    Parameters
    ----------
    cls
        The model class (:class:`jaxvi.SCVI`).
    dir_path
        Directory written by ``scvi.model.SCVI.save`` (``model.pt``, maybe ``adata.h5ad``).
    adata
        AnnData with the model's genes (in order) and known categories; default the saved
        ``adata.h5ad`` if present, else the model loads without data.
    prefix
        File-name prefix used at save time.

    Returns
    -------
    A ``cls`` instance with the saved registry, init parameters, history, split indices and
    weights; its outputs equal scvi-tools' for the same data.
    """
    from jaxvi import registry as reglib
    from jaxvi.model import _check_variables, config_from_registry
    from jaxvi.module import VAE

    parts = read_scvi_tools_files(dir_path, prefix)
    attrs = parts["attr_dict"]
    reg = registry_from_scvi(dict(attrs["registry_"]), parts["var_names"])
    init_params = init_params_from_scvi(dict(attrs["init_params_"]))
    config = config_from_registry(reg, init_params)
    variables = state_dict_to_variables(parts["state_dict"], config)
    _check_variables(variables, config)
    if adata is None:
        path = os.path.join(dir_path, f"{prefix or ''}{ADATA_FILE}")
        if os.path.exists(path):
            import anndata

            adata = anndata.read_h5ad(path)
    if adata is not None:
        reglib.check_counts_structure(adata, reg["setup_args"]["layer"])
        reglib.registry_arrays(adata, reg)  # same genes, known categories
        adata.uns[reglib.UNS_KEY] = reg
    model = cls.__new__(cls)
    model.registry_ = reg
    model.adata = adata
    model.init_params_ = init_params
    model.config = config
    model.module = VAE(config)
    model.variables = jax.tree_util.tree_map(jnp.asarray, variables)
    model.history_ = _history_from_scvi(attrs.get("history_"))
    model.is_trained_ = bool(attrs.get("is_trained_", False))
    model.train_indices_ = _indices(attrs.get("train_indices_"))
    model.validation_indices_ = _indices(attrs.get("validation_indices_"))
    model.test_indices_ = _indices(attrs.get("test_indices_"))
    model._n_calls = 0
    model._mesh = None  # as SCVI.load: JAX's default device until to_device()
    return model


def write_scvi_tools(
    model,
    dir_path: str,
    prefix: str | None = None,
    overwrite: bool = False,
    save_anndata: bool = False,
) -> None:
    """Write ``model`` as a scvi-tools 1.4.2 ``SCVI`` directory (no torch needed).

    Parameters
    ----------
    model
        A jaxvi ``SCVI``.
    dir_path
        Output directory; ``scvi.model.SCVI.load(dir_path, adata)`` reads it.
    prefix
        File-name prefix, as scvi-tools' ``save``.
    overwrite
        Replace an existing ``model.pt``.
    save_anndata
        Also write the model's AnnData as ``adata.h5ad``.

    Raises
    ------
    ValueError
        If the file exists and ``overwrite`` is False, if ``save_anndata`` is asked of a model
        without data, or for a model whose config scvi-tools cannot express (a likelihood
        registered only in jaxvi).
    """
    from jaxvi import io

    if model.config.gene_likelihood not in ("zinb", "nb", "poisson", "normal"):
        raise ValueError(
            f"gene_likelihood={model.config.gene_likelihood!r} exists only in jaxvi; "
            "scvi-tools cannot load it."
        )
    pt_path = os.path.join(dir_path, f"{prefix or ''}{MODEL_PT}")
    if os.path.exists(pt_path) and not overwrite:
        raise ValueError(f"{pt_path} already exists; pass `overwrite=True` to replace it.")
    if save_anndata and model.adata is None:
        raise ValueError("save_anndata=True but the model has no AnnData.")
    os.makedirs(dir_path, exist_ok=True)
    variables = jax.device_get(model.variables)
    state = variables_to_state_dict(variables, model.config)
    state_dict = {k: torchfile.Tensor(v) for k, v in state.items()}
    state_dict[_PYRO_KEY] = {"params": {}, "constraints": {}}
    history = {k: v.copy() for k, v in model.history_.items()} or None
    attr_dict = {
        "get_normalized_function_name_": "get_normalized_expression",
        "history_": history,
        "init_params_": init_params_to_scvi(model.init_params_),
        "is_trained_": bool(model.is_trained_),
        "registry_": registry_to_scvi(model.registry_),
        "run_id_": "",
        "run_name_": "jaxvi",
        "test_indices_": _indices(model.test_indices_),
        "train_indices_": _indices(model.train_indices_),
        "validation_indices_": _indices(model.validation_indices_),
    }
    obj = {
        "model_state_dict": state_dict,
        "var_names": np.array(model.registry_["var_names"], dtype=object),
        "attr_dict": attr_dict,
    }
    if save_anndata:
        adata = model.adata.copy()
        adata.uns.pop("_jaxvi", None)  # scvi-tools re-registers from the model's registry
        io._atomic_write(os.path.join(dir_path, f"{prefix or ''}{ADATA_FILE}"), adata.write_h5ad)
    io._atomic_write(pt_path, lambda tmp: torchfile.save(obj, tmp, archive_name="model"))
