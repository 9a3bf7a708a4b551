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

The names of ``scvi.hub`` work as there: :class:`HubMetadata` (``from_dir``),
:class:`HubModelCardHelper` (``from_dir``, ``model_card``), :class:`HubModel`
(``metadata=``, ``model_card=``, ``save``, ``model``, ``adata``, ``load_model``,
``read_adata``, ``large_training_adata``) and its Hugging Face transfers
``push_to_huggingface_hub`` / ``pull_from_huggingface_hub``, which need the ``hub`` extra
(``huggingface_hub``). Where jaxvi differs, and why, is listed in ``docs/hub.md``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable

from jaxvi import io
from jaxvi.hub.card import HubModelCardHelper, ModelCard, validate_url_format

__all__ = [
    "CARD_FILE",
    "METADATA_FILE",
    "HubFileNotFoundError",
    "HubMetadata",
    "HubModel",
    "HubModelCardHelper",
    "ModelCard",
    "ModelFormat",
    "get_model_format",
    "load_hub_model",
    "read_model_info",
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
class HubFileNotFoundError(FileNotFoundError, ValueError):
    """A hub file is missing. Also a ``ValueError``: scvi-tools raises ``ValueError`` where
    jaxvi raised ``FileNotFoundError``, and callers of either keep working."""


@dataclasses.dataclass
class HubMetadata:
    """The hub's required metadata (``_scvi_required_metadata.json``; ``scvi.hub.HubMetadata``).

    Parameters
    ----------
    scvi_version
        scvi-tools version of the model files; None for jaxvi's format.
    anndata_version
        anndata version used in training.
    model_cls_name
        ``"SCVI"``.
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

    The first five fields are scvi-tools', in its order and with its defaults. A file
    written for ``model_format="scvi-tools"`` holds exactly those five, so that scvi-tools
    reads it; a file without ``model_format`` was written by scvi-tools.
    """

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
            content = {k: content[k] for k in _SCVI_FIELDS}
        return content

    def save(self, save_path: str, overwrite: bool = False) -> None:
        """Write the JSON file (refuses to replace one unless ``overwrite``)."""
        if os.path.exists(save_path) and not overwrite:
            raise FileExistsError(
                f"File already exists at {save_path}. To overwrite, pass `overwrite=True`."
            )
        text = json.dumps(self.to_dict(), indent=4)
        io.atomic_write(save_path, lambda tmp: _write_text(tmp, text))

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


def read_model_info(local_dir: str) -> dict:
    """What the metadata and the card say about the model files in ``local_dir``.

    jaxvi's ``model.json`` and scvi-tools' ``model.pt`` are read as data (no weights are
    placed on a device, nothing is executed); another registered format is loaded.

    Returns
    -------
    ``{"model_format", "library_name", "model_cls_name", "scvi_version", "jaxvi_version",
    "init_params", "setup_args", "summary_stats", "data_registry"}``; for scvi-tools files
    the init parameters and data registry are in scvi-tools' layout, as scvi-tools' cards
    show them.

    Raises
    ------
    HubFileNotFoundError
        No model files (a ``FileNotFoundError`` and a ``ValueError``).
    """
    from jaxvi.hub.card import data_registry

    if not os.path.isdir(local_dir):
        raise HubFileNotFoundError(f"{local_dir} is not a directory.")
    try:
        fmt = _detect_format(local_dir)
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
        from jaxvi.io import scvi_tools as scvi_io

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
        "jaxvi_version": _jaxvi_versions(model)["jaxvi_version"],
        "init_params": dict(model.init_params_),
        "setup_args": dict(reg["setup_args"]),
        "summary_stats": dict(reg["summary_stats"]),
        "data_registry": data_registry(reg["setup_args"]),
    }


# ---------------------------------------------------------------------- model
MAX_HF_UPLOAD_SIZE = 5e9  # bytes of adata.h5ad that scvi-tools refuses to upload
LARGE_TRAINING_ADATA_FILE = "large_training_adata.h5ad"


class HubModel:
    """A hub directory: metadata, card, and the model loaded on first use
    (``scvi.hub.HubModel``).

    Parameters
    ----------
    local_dir
        The directory with the model files (written by :func:`save_hub_model`, by
        ``model.save``, by scvi-tools, or downloaded with :meth:`pull_from_huggingface_hub`).
    repo_name
        The Hugging Face repository it comes from or goes to.
    metadata
        A :class:`HubMetadata` (or scvi-tools' ``scvi.hub.HubMetadata``), or the path of a
        metadata JSON file; default the directory's ``_scvi_required_metadata.json``.
    model_card
        A :class:`~jaxvi.hub.card.HubModelCardHelper`, a :class:`~jaxvi.hub.card.ModelCard`, a
        ``huggingface_hub.ModelCard`` (or scvi-tools' ``scvi.hub.HubModelCardHelper``), or
        the path of a Markdown file; default the directory's ``README.md``.

    Raises
    ------
    HubFileNotFoundError
        (a ``FileNotFoundError`` and a ``ValueError``, which scvi-tools raises) when there is
        no metadata or no card.
    """

    def __init__(
        self,
        local_dir: str,
        repo_name: str | None = None,
        metadata: HubMetadata | str | None = None,
        model_card=None,
    ):
        local_dir = os.fspath(local_dir)
        if not os.path.isdir(local_dir):
            raise FileNotFoundError(f"{local_dir} is not a directory.")
        self._local_dir = local_dir
        self._repo_name = repo_name
        meta_path = os.path.join(local_dir, METADATA_FILE)
        if isinstance(metadata, HubMetadata):
            self._metadata = metadata
        elif isinstance(metadata, str | os.PathLike) or (
            metadata is None and os.path.isfile(meta_path)
        ):
            self._metadata = HubMetadata.load(meta_path if metadata is None else metadata)
        elif metadata is None:
            raise HubFileNotFoundError(
                f"No metadata found: no {METADATA_FILE} in {local_dir} and no `metadata=`."
            )
        elif all(hasattr(metadata, k) for k in _SCVI_FIELDS):  # scvi.hub.HubMetadata
            self._metadata = HubMetadata(**{k: getattr(metadata, k) for k in _SCVI_FIELDS})
        else:
            raise TypeError(
                f"metadata must be a HubMetadata or a path, got {type(metadata).__name__}."
            )
        card_path = os.path.join(local_dir, CARD_FILE)
        if isinstance(model_card, HubModelCardHelper):
            self._model_card = model_card.model_card
        elif isinstance(model_card, ModelCard):
            self._model_card = model_card
        elif isinstance(model_card, str | os.PathLike) or (
            model_card is None and os.path.isfile(card_path)
        ):
            self._model_card = ModelCard.load(card_path if model_card is None else model_card)
        elif model_card is None:
            raise HubFileNotFoundError(
                f"No model card found: no {CARD_FILE} in {local_dir} and no `model_card=`."
            )
        elif hasattr(model_card, "content") and hasattr(model_card, "data"):
            self._model_card = ModelCard(str(model_card))  # a huggingface_hub.ModelCard
        elif hasattr(getattr(model_card, "model_card", None), "content"):
            self._model_card = ModelCard(str(model_card.model_card))  # scvi.hub's helper
        else:
            raise TypeError(
                "model_card must be a HubModelCardHelper, a ModelCard or a path, got "
                f"{type(model_card).__name__}."
            )
        self._model = None
        self._adata = None
        self._large_training_adata = None

    # ---------------------------------------------------------------- views
    @property
    def local_dir(self) -> str:
        """The directory with the model files."""
        return self._local_dir

    @property
    def repo_name(self) -> str | None:
        """The Hugging Face repository (set by pull and push)."""
        return self._repo_name

    @property
    def metadata(self) -> HubMetadata:
        """The metadata."""
        return self._metadata

    @property
    def model_card(self):
        """The card, a :class:`~jaxvi.hub.card.ModelCard` (its text, with
        ``huggingface_hub.ModelCard``'s ``content``, ``text``, ``data``, ``save``)."""
        return self._model_card

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
        if self.metadata.model_format is not None:
            raise ValueError(
                f"The metadata names the model format {self.metadata.model_format!r}, which "
                f"is not registered (registered: {sorted(_FORMATS)})."
            )
        return _detect_format(self.local_dir)

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
    def adata(self):
        """The saved AnnData (``adata.h5ad``, read on first access), or None."""
        if self._adata is None:
            self.read_adata()
        return self._adata

    @property
    def large_training_adata(self):
        """The training data too large to upload (read or downloaded on first access; see
        :meth:`read_large_training_adata`), or None."""
        if self._large_training_adata is None:
            self.read_large_training_adata()
        return self._large_training_adata

    @property
    def model(self):
        """The model, loaded on first access (see :meth:`load_model`)."""
        if self._model is None:
            self.load_model()
        return self._model

    # ---------------------------------------------------------------- reads
    def read_adata(self) -> None:
        """Read ``adata.h5ad`` when the directory has one (else nothing)."""
        path = os.path.join(self.local_dir, io.ADATA_FILE)
        if os.path.isfile(path):
            import anndata

            self._adata = anndata.read_h5ad(path)

    def read_large_training_adata(self) -> None:
        """Read ``large_training_adata.h5ad``, downloading it first from the metadata's
        ``training_data_url`` when the directory lacks it; without either, nothing.

        The URL must serve the ``.h5ad`` file itself (http, https or ftp). cellxgene
        explorer sessions (``.cxg``) are not read; scvi-tools' fallback to the scvi-hub-models
        DVC store when there is no URL does not apply to jaxvi.
        """
        path = os.path.join(self.local_dir, LARGE_TRAINING_ADATA_FILE)
        url = self.metadata.training_data_url
        if not os.path.isfile(path) and url is not None:
            if url.rstrip("/").endswith(".cxg"):
                raise NotImplementedError(
                    f"{url} is a cellxgene explorer session, which jaxvi does not read; "
                    "download the dataset as .h5ad and pass it as `load_model(adata=...)`."
                )
            _download(url, path)
        if os.path.isfile(path):
            import anndata

            self._large_training_adata = anndata.read_h5ad(path)

    def load_model(self, adata=None, accelerator: str = "auto", device="auto"):
        """Load the model (and keep it as :attr:`model`); returns it.

        Parameters
        ----------
        adata
            Data to load the model with. Default: the directory's ``adata.h5ad``, else the
            large training data (:attr:`large_training_adata`) when the directory has it or
            the metadata gives its URL, else none: the model loads without data (scvi-tools
            raises ``ValueError`` there) and its queries take ``adata=``.
        accelerator
            ``"auto"`` or the backend JAX must be running on (``"cpu"``, ``"gpu"``,
            ``"tpu"``); anything else raises ``ValueError``.
        device
            Accepted for scvi-tools' signature; JAX's default device is used.
        """
        from jaxvi.model._parts import check_accelerator

        del device
        check_accelerator(accelerator)
        fmt = self.model_format
        missing = [f for f in fmt.files if not os.path.exists(os.path.join(self.local_dir, f))]
        if missing:
            raise HubFileNotFoundError(f"{self.local_dir} lacks the model files {missing}.")
        if adata is None:
            adata = self.adata
        if adata is None and (
            os.path.isfile(os.path.join(self.local_dir, LARGE_TRAINING_ADATA_FILE))
            or self.metadata.training_data_url is not None
        ):
            adata = self.large_training_adata
        model = fmt.load(self.local_dir, adata)
        name = type(model).__name__
        if name != self.metadata.model_cls_name:
            raise ValueError(
                f"The metadata names a {self.metadata.model_cls_name} model; the files hold "
                f"a {name}."
            )
        self._model = model
        return model

    # ---------------------------------------------------------------- writes
    def _resolved_metadata(self) -> HubMetadata:
        if self.metadata.model_format is not None:
            return self.metadata
        return dataclasses.replace(self.metadata, model_format=self.model_format.name)

    def save(self, overwrite: bool = False) -> None:
        """Write the card (``README.md``) and the metadata into the directory.

        A metadata without ``model_format`` is written with the format of the files found.
        Refuses to replace either file unless ``overwrite``.
        """
        card_path = os.path.join(self.local_dir, CARD_FILE)
        meta_path = os.path.join(self.local_dir, METADATA_FILE)
        for path in (card_path, meta_path):
            if os.path.isfile(path) and not overwrite:
                raise FileExistsError(
                    f"{path} already exists. To overwrite, pass `overwrite=True`."
                )
        metadata = self._resolved_metadata()
        text = str(self.model_card)
        io.atomic_write(card_path, lambda tmp: _write_text(tmp, text))
        metadata.save(meta_path, overwrite=True)

    def push_to_huggingface_hub(
        self,
        repo_name: str,
        repo_token: str | None = None,
        repo_create: bool = False,
        repo_create_kwargs: dict | None = None,
        collection_name: str | None = None,
        push_anndata: bool = True,
        **kwargs,
    ):
        """Upload the card, the metadata and the directory's files to a Hugging Face repo.

        Everything goes in one commit: ``README.md`` and the metadata from memory (as
        scvi-tools does), and every file of :attr:`local_dir` but hidden ones and
        ``large_training_adata.h5ad`` (the model files, ``metrics.json``, and ``adata.h5ad``
        unless ``push_anndata=False``). Needs the ``hub`` extra (``huggingface_hub``).

        Parameters
        ----------
        repo_name
            ``"owner/name"`` of the model repository.
        repo_token
            A token with write access, or the path of a file holding one; None uses
            huggingface_hub's (``HF_TOKEN``, or the saved login).
        repo_create
            Create the repository first (``huggingface_hub.HfApi.create_repo``).
        repo_create_kwargs
            Keyword arguments of ``create_repo`` (``private``, ``exist_ok``, ...).
        collection_name
            Slug of a Hub collection (``"owner/title-0123abcd"``) to add the model to; None
            adds it to none. (scvi-tools adds its models to the scvi-tools team's collections
            by model class; jaxvi does not.)
        push_anndata
            Also upload ``adata.h5ad``.
        kwargs
            Passed to ``huggingface_hub.HfApi.create_commit`` (``commit_message``,
            ``revision``, ``create_pr``, ...).

        Returns
        -------
        The ``huggingface_hub.CommitInfo`` of the upload.

        Raises
        ------
        ValueError
            ``adata.h5ad`` is 5 GB or more (the Hub's upload limit; scvi-tools' check): give
            its URL as the metadata's ``training_data_url`` and push with
            ``push_anndata=False``.
        """
        from jaxvi.hub.card import _import_huggingface_hub

        hf = _import_huggingface_hub()
        adata_path = os.path.join(self.local_dir, io.ADATA_FILE)
        if (
            push_anndata
            and os.path.isfile(adata_path)
            and os.path.getsize(adata_path) >= MAX_HF_UPLOAD_SIZE
        ):
            raise ValueError(
                f"{adata_path} is too large to upload to the Hub (5 GB or more): host it "
                "elsewhere, set the metadata's training_data_url, and push with "
                "`push_anndata=False`."
            )
        if repo_token is not None and os.path.isfile(repo_token):
            with open(repo_token) as f:
                repo_token = f.read().strip()
        api = hf.HfApi(token=repo_token)
        if repo_create:
            api.create_repo(repo_name, **(repo_create_kwargs or {}))
        metadata = self._resolved_metadata()
        ops = [
            hf.CommitOperationAdd(CARD_FILE, str(self.model_card).encode("utf-8")),
            hf.CommitOperationAdd(
                METADATA_FILE, json.dumps(metadata.to_dict(), indent=4).encode("utf-8")
            ),
        ]
        skip = {CARD_FILE, METADATA_FILE, LARGE_TRAINING_ADATA_FILE}
        for rel in _files_under(self.local_dir):
            if rel in skip or (not push_anndata and rel.endswith((".h5ad", ".h5mu"))):
                continue
            ops.append(hf.CommitOperationAdd(rel, os.path.join(self.local_dir, rel)))
        kwargs.setdefault("commit_message", f"Upload {metadata.model_cls_name} model")
        info = api.create_commit(repo_id=repo_name, operations=ops, **kwargs)
        if collection_name is not None:
            api.add_collection_item(
                collection_slug=collection_name,
                item_id=repo_name,
                item_type="model",
                exists_ok=True,
            )
        self._repo_name = repo_name
        return info

    @classmethod
    def pull_from_huggingface_hub(
        cls,
        repo_name: str,
        cache_dir: str | None = None,
        revision: str | None = None,
        pull_anndata: bool = True,
        **kwargs,
    ) -> HubModel:
        """Download a model repository from the Hugging Face Hub as a :class:`HubModel`.

        The files go to huggingface_hub's cache (``cache_dir``, default its own) through
        ``huggingface_hub.snapshot_download``; with ``HF_HUB_OFFLINE=1`` a repository already
        in the cache is opened without a request. The card is the ``README.md`` of the same
        revision (scvi-tools fetches the latest card separately).

        Parameters
        ----------
        repo_name
            ``"owner/name"`` of the model repository.
        cache_dir
            Download cache.
        revision
            Branch, tag or commit; None takes the latest (with a ``UserWarning``, as
            scvi-tools).
        pull_anndata
            Also download ``adata.h5ad``.
        kwargs
            Passed to ``snapshot_download`` (``token``, ``endpoint``, ``local_files_only``,
            ...).

        Notes
        -----
        Downloaded: the metadata, the card, ``metrics.json``, the model files of every
        registered format (jaxvi's ``model.json``/``model.npz``, scvi-tools' ``model.pt``)
        and ``adata.h5ad``. MuData files (``mdata.h5mu``) are not: jaxvi's SCVI reads AnnData.
        """
        from jaxvi.hub.card import METRICS_FILE, _import_huggingface_hub

        hf = _import_huggingface_hub()
        if revision is None:
            warnings.warn(
                "No revision was passed, so the default (latest) revision will be used.",
                UserWarning,
                stacklevel=2,
            )
        patterns = [METADATA_FILE, CARD_FILE, METRICS_FILE]
        for fmt in _FORMATS.values():
            patterns += [f for f in fmt.files if f not in patterns]
        if pull_anndata:
            patterns.append(io.ADATA_FILE)
        folder = hf.snapshot_download(
            repo_id=repo_name,
            allow_patterns=patterns,
            cache_dir=cache_dir,
            revision=revision,
            **kwargs,
        )
        return cls(folder, repo_name=repo_name)

    def __repr__(self) -> str:
        has_adata = os.path.exists(os.path.join(self.local_dir, io.ADATA_FILE))
        return (
            f"HubModel({self.local_dir!r}, {self.metadata.model_cls_name}, "
            f"format={self.metadata.model_format!r}, adata={'yes' if has_adata else 'no'}, "
            f"model loaded={'yes' if self._model is not None else 'no'})"
        )


def _files_under(folder: str) -> list[str]:
    """Paths (with ``/``) of the files under ``folder``, hidden files and folders left out."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                rel = os.path.relpath(os.path.join(root, name), folder)
                out.append(rel.replace(os.sep, "/"))
    return out


def _download(url: str, path: str, timeout: float = 60.0) -> None:
    """Fetch ``url`` into ``path`` (through a temporary file, so a failed download leaves
    nothing behind)."""
    import shutil
    import urllib.request

    validate_url_format(url)  # http(s) or ftp(s) only: urlopen would also open file: URLs
    with urllib.request.urlopen(url, timeout=timeout) as response:
        io.atomic_write(path, lambda tmp: _copy_to(response, tmp, shutil))


def _copy_to(response, tmp: str, shutil) -> None:
    with open(tmp, "wb") as f:
        shutil.copyfileobj(response, f)


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
