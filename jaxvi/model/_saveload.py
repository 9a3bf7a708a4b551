"""The bodies of ``save`` / ``load`` / ``from_scvi_tools``: plain parts in and out.

A jaxvi directory holds ``{prefix}model.json`` (settings, registry, history),
``{prefix}model.npz`` (the variables) and maybe ``{prefix}adata.h5ad``; ``prefix`` works as
in scvi-tools' ``save(dir, prefix=...)``, so several models can share a directory.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from jaxvi import io
from jaxvi._version import __version__
from jaxvi.io import scvi_tools
from jaxvi.model._parts import ModelParts, history_from_json, history_to_json

__all__ = ["jaxvi_parts", "save_model", "saved_registry", "scvi_tools_parts"]


def _names(prefix: str | None) -> dict[str, str]:
    p = prefix or ""
    return {
        "json_name": p + io.MODEL_JSON,
        "npz_name": p + io.MODEL_NPZ,
        "adata_name": p + io.ADATA_FILE,
    }


def save_model(model, dir_path, prefix, overwrite, save_anndata, format) -> None:
    """Write ``model`` to ``dir_path`` (see :meth:`jaxvi.model.BaseModel.save`)."""
    if format not in ("jaxvi", "scvi-tools"):
        raise ValueError(f"format must be 'jaxvi' or 'scvi-tools', got {format!r}.")
    if save_anndata and model.adata is None:
        raise ValueError("save_anndata=True but the model has no AnnData.")
    adata = model.adata if save_anndata else None
    indices = (model.train_indices_, model.validation_indices_, model.test_indices_)
    variables = jax.device_get(model.variables)
    if format == "scvi-tools":
        if model.minified_data_type is not None:
            raise ValueError(
                "A minified jaxvi model is not exported to scvi-tools (its registry would "
                "lack the minified fields); export the full model and minify it there."
            )
        init_params = dict(model.init_params_)
        if init_params.get("var_activation") not in (None, "exp"):
            raise ValueError(
                f"var_activation={init_params['var_activation']!r}: scvi-tools saves a torch "
                "function there, which jaxvi does not write; only the default exports."
            )
        if "var_activation" in init_params:  # scvi-tools' default is None (exp)
            init_params["var_activation"] = None
        return scvi_tools.write_scvi_tools(
            dir_path,
            state_dict=model._to_state_dict(variables),
            registry=model.registry_,
            history=model.history_,
            is_trained=model.is_trained_,
            indices=indices,
            adata=adata,
            prefix=prefix,
            overwrite=overwrite,
            **model._scvi_tools_export(init_params),
        )
    meta = {
        "model_name": model._model_name,
        "jaxvi_version": __version__,
        "init_params": model.init_params_,
        "config": dataclasses.asdict(model.config),
        "registry": model.registry_,
        "is_trained": model.is_trained_,
        "history": history_to_json(model.history_),
        "indices": {
            name: None if arr is None else [int(i) for i in arr]
            for name, arr in zip(("train", "validation", "test"), indices, strict=True)
        },
    }
    io.write_model_dir(
        dir_path,
        meta,
        io.flatten_tree(variables),
        overwrite=overwrite,
        adata=adata,
        **_names(prefix),
    )


def jaxvi_parts(cls, dir_path: str, adata, prefix: str | None):
    """``(ModelParts, saved AnnData path or None)`` of a jaxvi directory, or None when the
    directory holds a scvi-tools ``{prefix}model.pt`` instead."""
    names = _names(prefix)
    if not os.path.exists(os.path.join(dir_path, names["json_name"])) and (
        scvi_tools.is_scvi_tools_dir(dir_path, prefix)
    ):
        return None
    # model.json, model.npz and the AnnData from one version, schema-checked (jaxvi.schema)
    meta, arrays, saved_adata = io.read_saved_model(dir_path, read_adata=adata is None, **names)
    if meta.get("model_name") != cls._model_name:
        raise ValueError(
            f"{dir_path} holds a {meta.get('model_name')!r} model, not {cls._model_name}."
        )
    idx = meta["indices"]
    parts = ModelParts(
        registry=meta["registry"],
        init_params=meta["init_params"],
        variables=io.unflatten_tree(arrays),
        adata=saved_adata if adata is None else adata,
        history=history_from_json(meta["history"]),
        is_trained=bool(meta["is_trained"]),
        indices=tuple(
            None if idx[k] is None else np.asarray(idx[k]) for k in ("train", "validation", "test")
        ),
        config=cls._config_from_json(meta["config"]),
    )
    return parts, None


def scvi_tools_parts(cls, dir_path: str, adata, prefix: str | None, read: dict | None = None):
    """``(ModelParts, saved AnnData path or None)`` of a scvi-tools directory (no torch);
    ``read`` is the directory's :func:`~jaxvi.io.scvi_tools.read_scvi_tools` when already
    read.

    Raises
    ------
    ValueError
        If the directory holds another model class than ``cls`` (naming both), or uses
        constructor arguments the class does not support.
    """
    read = scvi_tools.read_scvi_tools(dir_path, prefix) if read is None else read
    saved_name = read["registry"]["model_name"]
    if saved_name != cls._model_name:
        raise ValueError(
            f"{dir_path} holds a scvi-tools {saved_name} model, not {cls._model_name}: load it "
            f"with jaxvi.{saved_name}.load."
        )
    init_params, config = cls._scvi_tools_config(read)
    unknown = sorted(set(init_params) - set(cls._non_kwargs) - cls._model_kwargs)
    if unknown:
        raise ValueError(
            f"The saved model uses {cls._model_name} arguments jaxvi does not support: {unknown}."
        )
    parts = ModelParts(
        registry=read["registry"],
        init_params=init_params,
        variables=cls._from_state_dict(read["state_dict"], config),
        adata=adata,
        history=read["history"],
        is_trained=read["is_trained"],
        indices=read["indices"],
        config=config,
    )
    return parts, read["adata_path"]


def saved_registry(dir_path: str, prefix: str | None = None) -> dict:
    """jaxvi's registry of a saved jaxvi or scvi-tools model (metadata only)."""
    names = _names(prefix)
    json_path = os.path.join(dir_path, names["json_name"])
    if os.path.exists(json_path):
        return io.read_model_dir(
            dir_path, json_name=names["json_name"], npz_name=names["npz_name"]
        )[0]["registry"]
    files = scvi_tools.read_scvi_tools_files(dir_path, prefix)
    return scvi_tools.registry_from_scvi(dict(files["attr_dict"]["registry_"]), files["var_names"])
