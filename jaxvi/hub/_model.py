"""Hub directories as models: :class:`HubModel` (``scvi.hub.HubModel``), and
:func:`save_hub_model` / :func:`load_hub_model`, which write and read them."""

from __future__ import annotations

import dataclasses
import json
import os

from jaxvi import io
from jaxvi.criticism import METRICS_FILE, create_criticism_report
from jaxvi.hub._card import MISSING_FIELD, ModelCard, card_info_from_model, model_card
from jaxvi.hub._card_helper import HubModelCardHelper
from jaxvi.hub._files import (
    CARD_FILE,
    LARGE_TRAINING_ADATA_FILE,
    METADATA_FILE,
    HubFileNotFoundError,
    download,
    write_text,
)
from jaxvi.hub._formats import (
    ModelFormat,
    anndata_version,
    detect_model_format,
    get_model_format,
    jaxvi_versions,
    registered_model_formats,
)
from jaxvi.hub._huggingface import pull_hub_directory, push_hub_directory
from jaxvi.hub._metadata import HubMetadata
from jaxvi.model import check_accelerator

__all__ = ["HubModel", "load_hub_model", "save_hub_model"]


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
        A :class:`HubModelCardHelper`, a :class:`ModelCard`, a
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
        elif all(hasattr(metadata, k) for k in HubMetadata.SCVI_FIELDS):  # scvi.hub's
            fields = HubMetadata.SCVI_FIELDS
            self._metadata = HubMetadata(**{k: getattr(metadata, k) for k in fields})
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
        """The card, a :class:`ModelCard` (its text, with
        ``huggingface_hub.ModelCard``'s ``content``, ``text``, ``data``, ``save``)."""
        return self._model_card

    @property
    def model_format(self) -> ModelFormat:
        """The format of the model files (from the metadata, else from the files)."""
        formats = registered_model_formats()
        if self.metadata.model_format in formats:
            return formats[self.metadata.model_format]
        if self.metadata.model_format == "scvi-tools":
            raise ValueError(
                f"{self.local_dir} holds a scvi-tools model; no reader for 'scvi-tools' files "
                "is registered in this jaxvi."
            )
        if self.metadata.model_format is not None:
            raise ValueError(
                f"The metadata names the model format {self.metadata.model_format!r}, which "
                f"is not registered (registered: {sorted(formats)})."
            )
        return detect_model_format(self.local_dir)

    @property
    def metrics(self) -> dict | None:
        """The criticism tables of ``metrics.json``, or None."""
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
            download(url, path)
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
        write_text(card_path, text)
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
        info = push_hub_directory(
            self.local_dir,
            str(self.model_card),
            self._resolved_metadata(),
            repo_name,
            repo_token=repo_token,
            repo_create=repo_create,
            repo_create_kwargs=repo_create_kwargs,
            collection_name=collection_name,
            push_anndata=push_anndata,
            **kwargs,
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
        folder = pull_hub_directory(
            repo_name, cache_dir=cache_dir, revision=revision, pull_anndata=pull_anndata, **kwargs
        )
        return cls(folder, repo_name=repo_name)

    def __repr__(self) -> str:
        has_adata = os.path.exists(os.path.join(self.local_dir, io.ADATA_FILE))
        return (
            f"HubModel({self.local_dir!r}, {self.metadata.model_cls_name}, "
            f"format={self.metadata.model_format!r}, adata={'yes' if has_adata else 'no'}, "
            f"model loaded={'yes' if self._model is not None else 'no'})"
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
        A jaxvi ``SCVI`` or ``SCANVI``.
    dir_path
        Target directory (created).
    model_format
        A registered :class:`ModelFormat` name (``"jaxvi"``).
    save_anndata
        Also write the model's AnnData as ``adata.h5ad``.
    metrics
        True runs :func:`jaxvi.criticism.create_criticism_report` (``n_samples``, ``label_key``)
        and writes ``metrics.json``; a dict of tables is written as given; None or False
        writes none (an existing ``metrics.json`` in the directory is still used).
    license_info, description, references, training_data_url, training_code_url
        Card fields (see :class:`ModelCardInfo`).
    data_modalities, tissues
        Card fields (see :class:`ModelCardInfo`).
    overwrite
        Replace an existing hub directory.
    """
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
        write_text(metrics_path, text)
    elif os.path.exists(metrics_path):
        with open(metrics_path) as f:
            report = json.load(f)
    else:
        report = None
    versions = fmt.versions(model)
    metadata = HubMetadata(
        scvi_version=fmt.scvi_version(model),
        anndata_version=anndata_version(),
        model_cls_name=type(model).__name__,
        training_data_url=training_data_url,
        model_parent_module="jaxvi" if fmt.name == "jaxvi" else "scvi.model",
        model_format=fmt.name,
        jaxvi_version=jaxvi_versions(model)["jaxvi_version"],
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
    write_text(os.path.join(dir_path, CARD_FILE), text)
    return HubModel(dir_path)


def load_hub_model(dir_path: str, adata=None):
    """Load the model of a hub directory (with ``adata``, or the saved AnnData)."""
    return HubModel(dir_path).load_model(adata)
