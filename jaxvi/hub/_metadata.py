"""The hub's required metadata, ``_scvi_required_metadata.json`` (``scvi.hub.HubMetadata``)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import ClassVar

from jaxvi.hub._files import validate_url_format, write_text
from jaxvi.hub._formats import read_model_info

__all__ = ["HubMetadata"]


@dataclasses.dataclass
class HubMetadata:
    """The hub's required metadata (``_scvi_required_metadata.json``; ``scvi.hub.HubMetadata``).

    The first five fields are scvi-tools', in its order and with its defaults
    (:attr:`SCVI_FIELDS`). A file written for ``model_format="scvi-tools"`` holds exactly
    those five, so that scvi-tools reads it; a file without ``model_format`` was written by
    scvi-tools.

    Attributes
    ----------
    scvi_version
        scvi-tools version of the model files; None for jaxvi's format.
    anndata_version
        anndata version used in training.
    model_cls_name
        ``"SCVI"`` or ``"SCANVI"``.
    training_data_url
        Where to download the training data when it is too large to upload (checked for URL
        form; nothing is fetched here).
    model_parent_module
        Module of the model class: ``"scvi.model"`` (scvi-tools' default) or ``"jaxvi"``.
    model_format
        jaxvi: the registered :class:`ModelFormat` of the model files; None: found from the
        files when the model is loaded.
    jaxvi_version
        jaxvi: the jaxvi version that wrote jaxvi-format files.
    """

    #: The fields of scvi-tools' metadata file, in its order.
    SCVI_FIELDS: ClassVar[tuple[str, ...]] = (
        "scvi_version",
        "anndata_version",
        "model_cls_name",
        "training_data_url",
        "model_parent_module",
    )

    scvi_version: str | None
    anndata_version: str
    model_cls_name: str
    training_data_url: str | None = None
    model_parent_module: str = "scvi.model"
    model_format: str | None = None
    jaxvi_version: str | None = None

    def __post_init__(self):
        if self.training_data_url is not None:
            validate_url_format(self.training_data_url)

    @classmethod
    def from_dir(
        cls, local_dir: str, anndata_version: str, map_location="cpu", **kwargs
    ) -> HubMetadata:
        """The metadata of the model saved in ``local_dir`` (jaxvi's or scvi-tools' files).

        Parameters
        ----------
        local_dir
            Directory with the model files.
        anndata_version
            anndata version used in training.
        map_location
            Accepted for scvi-tools' signature; nothing is placed on a device.
        kwargs
            Further fields (``training_data_url``, ``model_parent_module``, ...).

        Raises
        ------
        FileNotFoundError
            (also a ``ValueError``, as scvi-tools raises) when there are no model files.
        """
        del map_location
        info = read_model_info(local_dir)
        kwargs.setdefault("model_format", info["model_format"])
        kwargs.setdefault("jaxvi_version", info["jaxvi_version"])
        if info["model_format"] == "jaxvi":
            kwargs.setdefault("model_parent_module", "jaxvi")
        return cls(info["scvi_version"], anndata_version, info["model_cls_name"], **kwargs)

    def to_dict(self) -> dict:
        """The JSON content: scvi-tools' five fields only for ``model_format="scvi-tools"``."""
        content = dataclasses.asdict(self)
        if self.model_format == "scvi-tools":
            content = {k: content[k] for k in self.SCVI_FIELDS}
        return content

    def save(self, save_path: str, overwrite: bool = False) -> None:
        """Write the JSON file (refuses to replace one unless ``overwrite``)."""
        if os.path.exists(save_path) and not overwrite:
            raise FileExistsError(
                f"File already exists at {save_path}. To overwrite, pass `overwrite=True`."
            )
        write_text(save_path, json.dumps(self.to_dict(), indent=4))

    @classmethod
    def load(cls, path: str) -> HubMetadata:
        """Read the JSON file; scvi-tools' files (without jaxvi's fields) are accepted."""
        try:
            with open(path) as f:
                content = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(content, dict):
            raise ValueError(f"{path} must hold a JSON object.")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"anndata_version", "model_cls_name"} - set(content)
        if missing:
            raise ValueError(f"{path} lacks the fields {sorted(missing)}.")
        known = {k: v for k, v in content.items() if k in names}
        known.setdefault("scvi_version", None)
        if "model_format" not in content:  # written by scvi-tools
            known["model_format"] = "scvi-tools"
        return cls(**known)
