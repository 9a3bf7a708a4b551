"""scvi-hub model directories: model files, optional AnnData, metadata JSON, model card.

A hub directory holds what scvi-hub (Hugging Face) serves for a model::

    <model files>                   jaxvi: model.json + model.npz (pickle-free)
    adata.h5ad                      optional training data
    _scvi_required_metadata.json    HubMetadata: class, versions, format, data URL
    metrics.json                    optional criticism tables (jaxvi.criticism)
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
(``huggingface_hub``). Where jaxvi differs, and why, is listed in
``docs/user_guide/hub_compatibility.md``.

The package's modules, bottom up: ``_files`` (file names, downloads), ``_formats`` (the
format registry and what model files say), ``_huggingface`` (transfers), ``_card`` (the
card), ``_card_helper`` (``HubModelCardHelper``), ``_metadata`` (``HubMetadata``),
``_model`` (``HubModel``, ``save_hub_model``, ``load_hub_model``).
"""

from jaxvi.hub._card import NA_FIELD, ModelCard, ModelCardInfo, card_info_from_model, model_card
from jaxvi.hub._card_helper import HubModelCardHelper, h5ad_is_minified
from jaxvi.hub._files import CARD_FILE, METADATA_FILE, HubFileNotFoundError, validate_url_format
from jaxvi.hub._formats import (
    ModelFormat,
    get_model_format,
    read_model_info,
    register_model_format,
    registered_model_formats,
    unregister_model_format,
)
from jaxvi.hub._metadata import HubMetadata
from jaxvi.hub._model import HubModel, load_hub_model, save_hub_model

__all__ = [
    "CARD_FILE",
    "METADATA_FILE",
    "NA_FIELD",
    "HubFileNotFoundError",
    "HubMetadata",
    "HubModel",
    "HubModelCardHelper",
    "ModelCard",
    "ModelCardInfo",
    "ModelFormat",
    "card_info_from_model",
    "get_model_format",
    "h5ad_is_minified",
    "load_hub_model",
    "model_card",
    "read_model_info",
    "register_model_format",
    "registered_model_formats",
    "save_hub_model",
    "unregister_model_format",
    "validate_url_format",
]
