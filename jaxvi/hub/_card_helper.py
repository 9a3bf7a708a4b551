"""scvi-tools' ``scvi.hub.HubModelCardHelper``: the fields of a model card, filled from a
model directory (:meth:`HubModelCardHelper.from_dir`), and the card rendered from them."""

from __future__ import annotations

import dataclasses
import json
import os

from jaxvi import io
from jaxvi.criticism import METRICS_FILE
from jaxvi.hub._card import MISSING_FIELD, PRETEXTS, ModelCard, ModelCardInfo, model_card
from jaxvi.hub._files import validate_url_format
from jaxvi.hub._formats import read_model_info

__all__ = ["HubModelCardHelper", "h5ad_is_minified"]


@dataclasses.dataclass
class HubModelCardHelper:
    """The fields of a scvi-hub model card, and the card (``scvi.hub.HubModelCardHelper``).

    The fields and their order are scvi-tools 1.4.2's; ``library_name`` and ``jaxvi_version``
    are jaxvi's and come last. The card (:attr:`model_card`) has scvi-hub's header, sections
    and tables (see :func:`model_card`).

    Parameters
    ----------
    license_info
        License of the model, e.g. ``"cc-by-4.0"``.
    model_cls_name
        ``"SCVI"`` or ``"SCANVI"`` (the classes jaxvi implements; others raise
        ``ValueError``).
    model_init_params
        Constructor arguments: jaxvi's flat dict or scvi-tools' ``{"non_kwargs", "kwargs"}``.
    model_setup_anndata_args
        ``setup_anndata`` arguments.
    model_summary_stats
        ``{"n_cells": ..., "n_vars": ..., ...}``.
    model_data_registry
        ``{registry key: location}``: a location string (``"adata.X"``) or scvi-tools'
        ``{"attr_name": "obs", "attr_key": "_scvi_batch"}``.
    scvi_version
        scvi-tools version of the model files; None for jaxvi's own format.
    anndata_version
        anndata version used in training.
    data_modalities, tissues
        Tags ``modality:...`` and ``tissue:...``.
    data_is_annotated, data_is_minified
        Tag ``annotated:...``; the card's minified flag (None: "To be added...").
    training_data_url, training_code_url
        Links (checked for URL form only; nothing is fetched).
    model_parent_module
        Module of the model class (``"scvi.model"`` as in scvi-tools; ``"jaxvi"`` for jaxvi
        files). Not shown on the card, as in scvi-tools.
    description, references
        Free text.
    metrics_report
        ``{"cell_wise_cv", "gene_wise_cv", "diff_exp"}`` markdown tables (``metrics.json``).
    library_name
        The card's ``library_name``; default ``"scvi-tools"`` when ``scvi_version`` is set,
        else ``"jaxvi"``.
    jaxvi_version
        jaxvi version of the model files, shown as a ``jaxvi_version:...`` tag.
    """

    license_info: str
    model_cls_name: str
    model_init_params: dict
    model_setup_anndata_args: dict
    model_summary_stats: dict
    model_data_registry: dict
    scvi_version: str | None
    anndata_version: str
    data_modalities: list[str] = dataclasses.field(default_factory=list)
    tissues: list[str] = dataclasses.field(default_factory=list)
    data_is_annotated: bool | None = None
    data_is_minified: bool | None = None
    training_data_url: str | None = None
    training_code_url: str | None = None
    model_parent_module: str = "scvi.model"
    description: str = MISSING_FIELD
    references: str = MISSING_FIELD
    metrics_report: dict | None = None
    library_name: str | None = None
    jaxvi_version: str | None = None

    def __post_init__(self):
        if self.model_cls_name not in PRETEXTS:
            raise ValueError(
                f"Model class name {self.model_cls_name} not recognized: jaxvi implements "
                f"{' and '.join(PRETEXTS)}, and its cards describe those."
            )
        for name in ("training_data_url", "training_code_url"):
            if getattr(self, name) is not None:
                validate_url_format(getattr(self, name))
        if self.metrics_report is not None and not isinstance(self.metrics_report, dict):
            raise TypeError(
                "metrics_report must be a dict of markdown tables (the content of "
                f"metrics.json), got {type(self.metrics_report).__name__}."
            )

    @property
    def versions(self) -> dict[str, str]:
        """``{tag name: version}`` in the card's tag order."""
        out = {}
        if self.scvi_version is not None:
            out["scvi_version"] = self.scvi_version
        if self.jaxvi_version is not None:
            out["jaxvi_version"] = self.jaxvi_version
        out["anndata_version"] = self.anndata_version
        return out

    def card_info(self) -> ModelCardInfo:
        """The :class:`ModelCardInfo` the card is rendered from."""
        library = self.library_name
        if library is None:
            library = "jaxvi" if self.scvi_version is None else "scvi-tools"
        return ModelCardInfo(
            license_info=self.license_info,
            model_cls_name=self.model_cls_name,
            model_init_params=dict(self.model_init_params),
            model_setup_anndata_args=dict(self.model_setup_anndata_args),
            model_summary_stats=dict(self.model_summary_stats),
            model_data_registry=dict(self.model_data_registry),
            library_name=library,
            versions=self.versions,
            data_modalities=list(self.data_modalities),
            tissues=list(self.tissues),
            data_is_annotated=self.data_is_annotated,
            data_is_minified=self.data_is_minified,
            training_data_url=self.training_data_url,
            training_code_url=self.training_code_url,
            description=self.description,
            references=self.references,
            metrics_report=self.metrics_report,
        )

    @property
    def model_card(self) -> ModelCard:
        """The card, rendered from the current field values."""
        return ModelCard(model_card(self.card_info()))

    @classmethod
    def from_dir(
        cls,
        local_dir: str,
        license_info: str,
        anndata_version: str,
        metrics_report=None,
        data_is_minified: bool | None = None,
        map_location="cpu",
        **kwargs,
    ) -> HubModelCardHelper:
        """The helper for the model saved in ``local_dir`` (jaxvi's or scvi-tools' files).

        Parameters
        ----------
        local_dir
            Directory with the model files (``model.json``/``model.npz`` or ``model.pt``).
        license_info, anndata_version
            As the fields.
        metrics_report
            A dict of tables, or the path of a ``metrics.json`` to read; None reads
            ``local_dir/metrics.json`` when there is one. (scvi-tools reads
            ``local_dir/metrics.json`` whatever path is given.)
        data_is_minified
            Default: whether ``local_dir/adata.h5ad`` is minified (None without one).
        map_location
            Accepted for scvi-tools' signature; nothing is placed on a device.
        kwargs
            Further fields (``data_modalities``, ``tissues``, ``description``, ...).

        Raises
        ------
        FileNotFoundError
            (also a ``ValueError``, as scvi-tools raises) when ``local_dir`` holds no model
            files.
        """
        del map_location
        info = read_model_info(local_dir)
        if metrics_report is None:
            path = os.path.join(local_dir, METRICS_FILE)
            metrics_report = _read_json(path) if os.path.isfile(path) else None
        elif isinstance(metrics_report, str | os.PathLike):
            metrics_report = _read_json(metrics_report)
        if data_is_minified is None:
            adata_path = os.path.join(local_dir, io.ADATA_FILE)
            if os.path.isfile(adata_path):
                data_is_minified = h5ad_is_minified(adata_path)
        kwargs.setdefault("library_name", info["library_name"])
        kwargs.setdefault("jaxvi_version", info["jaxvi_version"])
        if info["model_format"] == "jaxvi":
            kwargs.setdefault("model_parent_module", "jaxvi")
        # scvi-tools' registry views (attrdicts) list their keys sorted, and so do its cards
        return cls(
            license_info,
            info["model_cls_name"],
            info["init_params"],
            info["setup_args"],
            dict(sorted(info["summary_stats"].items())),
            dict(sorted(info["data_registry"].items())),
            info["scvi_version"],
            anndata_version,
            metrics_report=metrics_report,
            data_is_minified=data_is_minified,
            **kwargs,
        )


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def h5ad_is_minified(path: str) -> bool:
    """Whether the ``.h5ad`` file at ``path`` holds a minified AnnData (read from its ``uns``
    only)."""
    import h5py

    with h5py.File(path, "r") as f:
        return "uns" in f and "_scvi_adata_minify_type" in f["uns"]
