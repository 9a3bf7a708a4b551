"""scvi-hub model directories: model files, optional AnnData, metadata JSON, model card.

A hub directory holds what scvi-hub (Hugging Face) serves for a model::

    <model files>                   jaxvi: model.json + model.npz (pickle-free)
    adata.h5ad                      optional training data
    _scvi_required_metadata.json    HubMetadata: class, versions, format, data URL
    metrics.json                    optional criticism tables (jaxvi.hub.card)
    README.md                       the model card

The model files come from a :class:`ModelFormat`. jaxvi's own format is registered here;
another format plugs in with :func:`register_model_format` (scvi-tools' ``model.pt``,
through :mod:`jaxvi.io.scvi_tools`, is registered as ``"scvi-tools"``) and is
then written by ``save_hub_model(..., model_format=name)`` and recognised on load, from the
metadata's ``model_format`` or, for directories written by scvi-tools, from its files.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable

from jaxvi import io

__all__ = [
    "CARD_FILE",
    "METADATA_FILE",
    "HubMetadata",
    "HubModel",
    "ModelFormat",
    "get_model_format",
    "load_hub_model",
    "register_model_format",
    "save_hub_model",
]

METADATA_FILE = "_scvi_required_metadata.json"
CARD_FILE = "README.md"


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
        ``load(dir_path, adata)`` returns a jaxvi model; ``adata`` may be None.
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


def get_model_format(name: str) -> ModelFormat:
    """The registered format ``name``."""
    if name not in _FORMATS:
        raise ValueError(f"Unknown model format {name!r}; registered: {sorted(_FORMATS)}.")
    return _FORMATS[name]


def _detect_format(dir_path: str) -> ModelFormat:
    for fmt in _FORMATS.values():
        if all(os.path.exists(os.path.join(dir_path, f)) for f in fmt.files):
            return fmt
    raise FileNotFoundError(
        f"No model files in {dir_path}: expected one of "
        + "; ".join(f"{n}: {', '.join(f.files)}" for n, f in _FORMATS.items())
        + "."
    )


def _anndata_version() -> str:
    from importlib.metadata import version

    return version("anndata")


def _jaxvi_versions(model) -> dict:
    from jaxvi._version import __version__

    return {"jaxvi_version": __version__, "anndata_version": _anndata_version()}


def _jaxvi_save(model, dir_path: str, overwrite: bool) -> None:
    model.save(dir_path, overwrite=overwrite)


def _jaxvi_load(dir_path: str, adata):
    from jaxvi.model import SCVI

    return SCVI.load(dir_path, adata=adata)


def _scvi_tools_save(model, dir_path: str, overwrite: bool) -> None:
    model.save(dir_path, overwrite=overwrite, format="scvi-tools")


def _scvi_tools_load(dir_path: str, adata):
    from jaxvi.model import SCVI

    return SCVI.from_scvi_tools(dir_path, adata=adata)


def _scvi_tools_versions(model) -> dict:
    from jaxvi.io import scvi_tools as scvi_io

    return {"scvi_version": scvi_io.SCVI_TOOLS_VERSION, "anndata_version": _anndata_version()}


def _scvi_tools_version(model) -> str:
    from jaxvi.io import scvi_tools as scvi_io

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
        versions=_jaxvi_versions,
    )
)


# ------------------------------------------------------------------- metadata
@dataclasses.dataclass
class HubMetadata:
    """The hub's required metadata (``_scvi_required_metadata.json``).

    The first five fields are scvi-tools' ``HubMetadata``; ``model_format`` and
    ``jaxvi_version`` are jaxvi's. ``scvi_version`` is None for jaxvi-format files.
    """

    scvi_version: str | None
    anndata_version: str
    model_cls_name: str
    training_data_url: str | None = None
    model_parent_module: str = "jaxvi"
    model_format: str = "jaxvi"
    jaxvi_version: str | None = None

    def save(self, path: str, overwrite: bool = False) -> None:
        """Write the JSON file (refuses to replace one unless ``overwrite``)."""
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path} exists; pass `overwrite=True` to replace it.")
        content = dataclasses.asdict(self)
        if self.model_format == "scvi-tools":  # exactly scvi-tools' fields, so that it loads
            content = {k: content[k] for k in _SCVI_FIELDS}
            content["model_parent_module"] = "scvi.model"
        text = json.dumps(content, indent=4)
        io.atomic_write(path, lambda tmp: _write_text(tmp, text))

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
            known.setdefault("model_parent_module", "scvi.model")
        return cls(**known)


_SCVI_FIELDS = (
    "scvi_version",
    "anndata_version",
    "model_cls_name",
    "training_data_url",
    "model_parent_module",
)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------------- model
class HubModel:
    """A local hub directory: metadata, card, and the model loaded on first use.

    Parameters
    ----------
    local_dir
        The directory (written by :func:`save_hub_model`, or a scvi-hub download once a
        reader for its model format is registered).
    """

    def __init__(self, local_dir: str):
        if not os.path.isdir(local_dir):
            raise FileNotFoundError(f"{local_dir} is not a directory.")
        self.local_dir = local_dir
        meta_path = os.path.join(local_dir, METADATA_FILE)
        if not os.path.exists(meta_path):
            raise FileNotFoundError(f"No {METADATA_FILE} in {local_dir}: not a hub directory.")
        self.metadata = HubMetadata.load(meta_path)
        card_path = os.path.join(local_dir, CARD_FILE)
        if not os.path.exists(card_path):
            raise FileNotFoundError(f"No model card ({CARD_FILE}) in {local_dir}.")
        with open(card_path) as f:
            self.model_card = f.read()
        self._model = None
        self._adata = None

    @property
    def model_format(self) -> ModelFormat:
        """The format of the model files (from the metadata, else from the files)."""
        if self.metadata.model_format in _FORMATS:
            return _FORMATS[self.metadata.model_format]
        if self.metadata.model_format == "scvi-tools":
            raise ValueError(
                f"{self.local_dir} holds a scvi-tools model; no reader for 'scvi-tools' files "
                "is registered in this jaxvi."
            )
        return _detect_format(self.local_dir)

    @property
    def adata(self):
        """The saved AnnData (``adata.h5ad``), or None."""
        path = os.path.join(self.local_dir, io.ADATA_FILE)
        if self._adata is None and os.path.exists(path):
            import anndata

            self._adata = anndata.read_h5ad(path)
        return self._adata

    @property
    def metrics(self) -> dict | None:
        """The criticism tables of ``metrics.json``, or None."""
        from jaxvi.hub.card import METRICS_FILE

        path = os.path.join(self.local_dir, METRICS_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    @property
    def model(self):
        """The model, loaded with the saved AnnData on first access."""
        if self._model is None:
            self._model = self.load_model()
        return self._model

    def load_model(self, adata=None):
        """Load the model with ``adata`` (default: the saved AnnData, or none)."""
        fmt = self.model_format
        missing = [f for f in fmt.files if not os.path.exists(os.path.join(self.local_dir, f))]
        if missing:
            raise FileNotFoundError(f"{self.local_dir} lacks the model files {missing}.")
        model = fmt.load(self.local_dir, self.adata if adata is None else adata)
        name = type(model).__name__
        if name != self.metadata.model_cls_name:
            raise ValueError(
                f"The metadata names a {self.metadata.model_cls_name} model; the files hold "
                f"a {name}."
            )
        return model

    def __repr__(self) -> str:
        has_adata = os.path.exists(os.path.join(self.local_dir, io.ADATA_FILE))
        return (
            f"HubModel({self.local_dir!r}, {self.metadata.model_cls_name}, "
            f"format={self.metadata.model_format!r}, adata={'yes' if has_adata else 'no'})"
        )


def save_hub_model(
    model,
    dir_path: str,
    *,
    model_format: str = "jaxvi",
    save_anndata: bool = True,
    metrics: bool | dict | None = True,
    license_info: str = "cc-by-4.0",
    description: str | None = None,
    references: str | None = None,
    training_data_url: str | None = None,
    training_code_url: str | None = None,
    data_modalities=("rna",),
    tissues=(),
    n_samples: int = 5,
    label_key: str | None = None,
    overwrite: bool = False,
) -> HubModel:
    """Write ``model`` as a hub directory and return it as a :class:`HubModel`.

    Parameters
    ----------
    model
        A jaxvi ``SCVI``.
    dir_path
        Target directory (created).
    model_format
        A registered :class:`ModelFormat` name (``"jaxvi"``).
    save_anndata
        Also write the model's AnnData as ``adata.h5ad``.
    metrics
        True runs :func:`jaxvi.hub.card.create_criticism_report` (``n_samples``, ``label_key``)
        and writes ``metrics.json``; a dict of tables is written as given; None or False
        writes none (an existing ``metrics.json`` in the directory is still used).
    license_info, description, references, training_data_url, training_code_url
        Card fields (see :class:`jaxvi.hub.card.ModelCardInfo`).
    data_modalities, tissues
        Card fields (see :class:`jaxvi.hub.card.ModelCardInfo`).
    overwrite
        Replace an existing hub directory.
    """
    from jaxvi.hub.card import (
        METRICS_FILE,
        MISSING_FIELD,
        card_info_from_model,
        create_criticism_report,
        model_card,
    )

    fmt = get_model_format(model_format)
    meta_path = os.path.join(dir_path, METADATA_FILE)
    if os.path.exists(meta_path) and not overwrite:
        raise FileExistsError(
            f"{dir_path} already holds a hub model; pass `overwrite=True` to replace it."
        )
    if save_anndata and model.adata is None:
        raise ValueError("save_anndata=True but the model has no AnnData.")
    os.makedirs(dir_path, exist_ok=True)
    fmt.save(model, dir_path, overwrite)
    if save_anndata:
        adata = model.adata
        io.atomic_write(os.path.join(dir_path, io.ADATA_FILE), lambda tmp: adata.write_h5ad(tmp))
    metrics_path = os.path.join(dir_path, METRICS_FILE)
    if metrics is True:
        report = create_criticism_report(
            model, n_samples=n_samples, label_key=label_key, save_folder=dir_path
        )
    elif isinstance(metrics, dict):
        report = dict(metrics)
        text = json.dumps(report, indent=4)
        io.atomic_write(metrics_path, lambda tmp: _write_text(tmp, text))
    elif os.path.exists(metrics_path):
        with open(metrics_path) as f:
            report = json.load(f)
    else:
        report = None
    versions = fmt.versions(model)
    metadata = HubMetadata(
        scvi_version=fmt.scvi_version(model),
        anndata_version=_anndata_version(),
        model_cls_name=type(model).__name__,
        training_data_url=training_data_url,
        model_parent_module="jaxvi" if fmt.name == "jaxvi" else "scvi.model",
        model_format=fmt.name,
        jaxvi_version=_jaxvi_versions(model)["jaxvi_version"],
    )
    metadata.save(meta_path, overwrite=True)
    info = card_info_from_model(
        model,
        license_info=license_info,
        metrics_report=report,
        library_name=fmt.library_name,
        versions=versions,
        data_modalities=data_modalities,
        tissues=list(tissues),
        training_data_url=training_data_url,
        training_code_url=training_code_url,
        description=description or MISSING_FIELD,
        references=references or MISSING_FIELD,
    )
    text = model_card(info)
    io.atomic_write(os.path.join(dir_path, CARD_FILE), lambda tmp: _write_text(tmp, text))
    return HubModel(dir_path)


def load_hub_model(dir_path: str, adata=None):
    """Load the model of a hub directory (with ``adata``, or the saved AnnData)."""
    return HubModel(dir_path).load_model(adata)
