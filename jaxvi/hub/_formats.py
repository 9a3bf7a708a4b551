"""Model-file formats of a hub directory: the registry, jaxvi's and scvi-tools' formats, and
what a directory's model files say about the model (:func:`read_model_info`)."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from importlib.metadata import version

from jaxvi import io
from jaxvi._version import __version__
from jaxvi.hub._files import HubFileNotFoundError
from jaxvi.io import scvi_tools as scvi_io
from jaxvi.model import load_model

__all__ = [
    "ModelFormat",
    "anndata_version",
    "data_registry",
    "detect_model_format",
    "get_model_format",
    "jaxvi_versions",
    "read_model_info",
    "register_model_format",
    "registered_model_formats",
    "unregister_model_format",
]


@dataclasses.dataclass(frozen=True)
class ModelFormat:
    """How model files are written to and read from a hub directory.

    Attributes
    ----------
    name
        Format name, stored as the metadata's ``model_format``.
    files
        File names that a directory in this format holds (used to recognise it).
    save
        ``save(model, dir_path, overwrite)`` writes the model files (not the AnnData).
    load
        ``load(dir_path, adata)`` returns a jaxvi model (of the class the files name: jaxvi's
        and scvi-tools' formats load ``SCVI`` and ``SCANVI``); ``adata`` may be None.
    library_name
        The card's ``library_name``.
    versions
        ``versions(model) -> {tag name: version}`` for the card's tags.
    scvi_version
        ``scvi_version(model) -> str | None`` for the metadata (scvi-tools files need it).
    """

    name: str
    files: tuple[str, ...]
    save: Callable
    load: Callable
    library_name: str
    versions: Callable
    scvi_version: Callable = lambda model: None


_FORMATS: dict[str, ModelFormat] = {}


def register_model_format(fmt: ModelFormat, overwrite: bool = False) -> None:
    """Make ``fmt`` available to :func:`save_hub_model` and :class:`HubModel`."""
    if fmt.name in _FORMATS and not overwrite:
        raise ValueError(f"Model format {fmt.name!r} is already registered.")
    if not fmt.files:
        raise ValueError("A model format must name at least one file.")
    _FORMATS[fmt.name] = fmt


def unregister_model_format(name: str) -> ModelFormat:
    """Remove the registered format ``name`` and return it."""
    get_model_format(name)
    return _FORMATS.pop(name)


def get_model_format(name: str) -> ModelFormat:
    """The registered format ``name``."""
    if name not in _FORMATS:
        raise ValueError(f"Unknown model format {name!r}; registered: {sorted(_FORMATS)}.")
    return _FORMATS[name]


def registered_model_formats() -> dict[str, ModelFormat]:
    """``{name: format}`` of the registered formats, in registration order (a copy)."""
    return dict(_FORMATS)


def detect_model_format(dir_path: str) -> ModelFormat:
    """The first registered format whose files are all in ``dir_path``.

    Raises
    ------
    FileNotFoundError
        No registered format's files are there.
    """
    for fmt in _FORMATS.values():
        if all(os.path.exists(os.path.join(dir_path, f)) for f in fmt.files):
            return fmt
    raise FileNotFoundError(
        f"No model files in {dir_path}: expected one of "
        + "; ".join(f"{n}: {', '.join(f.files)}" for n, f in _FORMATS.items())
        + "."
    )


def anndata_version() -> str:
    """The installed anndata's version."""
    return version("anndata")


def jaxvi_versions(model) -> dict:
    """``{"jaxvi_version", "anndata_version"}``: the versions tagged on a jaxvi-format card."""
    return {"jaxvi_version": __version__, "anndata_version": anndata_version()}


def _jaxvi_save(model, dir_path: str, overwrite: bool) -> None:
    model.save(dir_path, overwrite=overwrite)


def _jaxvi_load(dir_path: str, adata):
    return load_model(dir_path, adata=adata, format="jaxvi")  # the class model.json names


def _scvi_tools_save(model, dir_path: str, overwrite: bool) -> None:
    model.save(dir_path, overwrite=overwrite, format="scvi-tools")


def _scvi_tools_load(dir_path: str, adata):
    return load_model(dir_path, adata=adata, format="scvi-tools")  # the registry's class


def _scvi_tools_versions(model) -> dict:
    return {"scvi_version": scvi_io.SCVI_TOOLS_VERSION, "anndata_version": anndata_version()}


def _scvi_tools_version(model) -> str:
    return scvi_io.SCVI_TOOLS_VERSION


register_model_format(
    ModelFormat(
        name="scvi-tools",
        files=("model.pt",),
        save=_scvi_tools_save,
        load=_scvi_tools_load,
        library_name="scvi-tools",
        versions=_scvi_tools_versions,
        scvi_version=_scvi_tools_version,
    )
)

register_model_format(
    ModelFormat(
        name="jaxvi",
        files=(io.MODEL_JSON, io.MODEL_NPZ),
        save=_jaxvi_save,
        load=_jaxvi_load,
        library_name="jaxvi",
        versions=jaxvi_versions,
    )
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


def read_model_info(local_dir: str) -> dict:
    """What the metadata and the card say about the model files in ``local_dir``.

    jaxvi's ``model.json`` and scvi-tools' ``model.pt`` are read as data (no weights are
    placed on a device, nothing is executed); another registered format is loaded.

    Returns
    -------
    dict
        With the keys ``model_format``, ``library_name``, ``model_cls_name``,
        ``scvi_version``, ``jaxvi_version``, ``init_params``, ``setup_args``,
        ``summary_stats`` and ``data_registry``; for scvi-tools files the init parameters
        and data registry are in scvi-tools' layout, as scvi-tools' cards show them.

    Raises
    ------
    HubFileNotFoundError
        No model files (a ``FileNotFoundError`` and a ``ValueError``).
    """
    if not os.path.isdir(local_dir):
        raise HubFileNotFoundError(f"{local_dir} is not a directory.")
    try:
        fmt = detect_model_format(local_dir)
    except FileNotFoundError as e:
        raise HubFileNotFoundError(str(e)) from None
    if fmt.name == "jaxvi":
        path = os.path.join(local_dir, io.MODEL_JSON)
        try:
            with open(path, encoding="utf-8") as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(meta, dict) or meta.get("format") != "jaxvi":
            raise ValueError(f"{path} is not a jaxvi model file.")
        reg = meta["registry"]
        return {
            "model_format": fmt.name,
            "library_name": fmt.library_name,
            "model_cls_name": meta.get("model_name", reg.get("model_name")),
            "scvi_version": None,
            "jaxvi_version": meta.get("jaxvi_version"),
            "init_params": dict(meta["init_params"]),
            "setup_args": dict(reg["setup_args"]),
            "summary_stats": dict(reg["summary_stats"]),
            "data_registry": data_registry(reg["setup_args"]),
        }
    if fmt.name == "scvi-tools":
        attrs = scvi_io.read_scvi_tools_files(local_dir)["attr_dict"]
        reg = attrs["registry_"]
        fields = reg.get("field_registries", {})
        stats = {}
        for field in fields.values():
            stats.update(field.get("summary_stats", {}))
        return {
            "model_format": fmt.name,
            "library_name": fmt.library_name,
            "model_cls_name": reg["model_name"],
            "scvi_version": reg["scvi_version"],
            "jaxvi_version": None,
            "init_params": attrs["init_params_"],
            "setup_args": dict(reg["setup_args"]),
            "summary_stats": stats,
            "data_registry": {
                k: dict(f["data_registry"]) for k, f in fields.items() if f.get("data_registry")
            },
        }
    model = fmt.load(local_dir, None)
    reg = model.registry_
    return {
        "model_format": fmt.name,
        "library_name": fmt.library_name,
        "model_cls_name": type(model).__name__,
        "scvi_version": fmt.scvi_version(model),
        "jaxvi_version": jaxvi_versions(model)["jaxvi_version"],
        "init_params": dict(model.init_params_),
        "setup_args": dict(reg["setup_args"]),
        "summary_stats": dict(reg["summary_stats"]),
        "data_registry": data_registry(reg["setup_args"]),
    }
