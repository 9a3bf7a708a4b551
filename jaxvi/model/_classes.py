"""The model classes by name, and loading a saved model whose class the files name.

A saved directory says which class it holds: jaxvi's ``model.json`` in ``model_name``,
scvi-tools' ``model.pt`` in its registry's ``model_name``. :func:`load_model` reads it and
loads the directory with that class (a scvi-tools file is read once), so a caller that does
not know the class (:mod:`jaxvi.hub`) needs no list of its own.
"""

from __future__ import annotations

import json
import os

from jaxvi import io
from jaxvi.io import scvi_tools
from jaxvi.model._base import BaseModel
from jaxvi.model._saveload import scvi_tools_parts
from jaxvi.model._scanvi import SCANVI
from jaxvi.model._scvi import SCVI

__all__ = ["MODEL_CLASSES", "load_model", "model_class", "saved_model_name"]

MODEL_CLASSES: dict[str, type[BaseModel]] = {"SCVI": SCVI, "SCANVI": SCANVI}
_FORMATS = ("jaxvi", "scvi-tools")


def model_class(name: str) -> type[BaseModel]:
    """The jaxvi model class called ``name`` (``"SCVI"``, ``"SCANVI"``).

    Raises
    ------
    ValueError
        For a name jaxvi has no class for, listing the ones it has.
    """
    if name not in MODEL_CLASSES:
        raise ValueError(
            f"jaxvi has no model class {name!r}; it implements {sorted(MODEL_CLASSES)}."
        )
    return MODEL_CLASSES[name]


def _format_of(dir_path: str, prefix: str | None, format: str | None) -> str:
    if format is not None:
        if format not in _FORMATS:
            raise ValueError(f"format must be one of {_FORMATS} or None, got {format!r}.")
        return format
    if os.path.exists(os.path.join(dir_path, f"{prefix or ''}{io.MODEL_JSON}")):
        return "jaxvi"
    if scvi_tools.is_scvi_tools_dir(dir_path, prefix):
        return "scvi-tools"
    raise FileNotFoundError(
        f"No saved model in {dir_path}: neither {prefix or ''}{io.MODEL_JSON} nor "
        f"{prefix or ''}{scvi_tools.MODEL_PT}."
    )


def _json_model_name(path: str) -> str:
    if os.path.getsize(path) > io.MAX_JSON_BYTES:
        raise ValueError(f"{path} is larger than {io.MAX_JSON_BYTES} bytes.")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_name"), str):
        raise ValueError(f"{path} does not name its model class (model_name).")
    return meta["model_name"]


def saved_model_name(dir_path: str, prefix: str | None = None, format: str | None = None) -> str:
    """The model class name a saved directory holds (metadata only for jaxvi's files).

    Parameters
    ----------
    dir_path, prefix
        As for ``load``.
    format
        ``"jaxvi"``, ``"scvi-tools"`` or None (jaxvi's ``model.json`` if present, else
        scvi-tools' ``model.pt``).
    """
    fmt = _format_of(dir_path, prefix, format)
    if fmt == "jaxvi":
        return _json_model_name(os.path.join(dir_path, f"{prefix or ''}{io.MODEL_JSON}"))
    registry = scvi_tools.read_scvi_tools_files(dir_path, prefix)["attr_dict"].get("registry_")
    name = registry.get("model_name") if isinstance(registry, dict) else None
    if not isinstance(name, str):
        raise ValueError(f"The scvi-tools model in {dir_path} does not name its model class.")
    return name


def load_model(
    dir_path: str, adata=None, prefix: str | None = None, format: str | None = None
) -> BaseModel:
    """Load a saved model with the class its files name (``SCVI`` or ``SCANVI``).

    Parameters
    ----------
    dir_path, adata, prefix
        As for :meth:`jaxvi.SCVI.load`.
    format
        ``"jaxvi"``, ``"scvi-tools"`` or None (detected as by ``load``).

    Returns
    -------
    A :class:`jaxvi.SCVI` or :class:`jaxvi.SCANVI`.

    Raises
    ------
    ValueError
        When the files name a class jaxvi does not implement.
    FileNotFoundError
        When there are no model files.
    """
    fmt = _format_of(dir_path, prefix, format)
    if fmt == "jaxvi":
        cls = model_class(saved_model_name(dir_path, prefix, fmt))
        return cls.load(dir_path, adata=adata, prefix=prefix)
    read = scvi_tools.read_scvi_tools(dir_path, prefix)  # read once: it names the class
    cls = model_class(read["registry"]["model_name"])
    return cls._from_parts(*scvi_tools_parts(cls, dir_path, adata, prefix, read))
