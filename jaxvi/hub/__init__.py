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

from jaxvi.hub import card
from jaxvi.hub._hub import (
    CARD_FILE,
    METADATA_FILE,
    HubFileNotFoundError,
    HubMetadata,
    HubModel,
    HubModelCardHelper,
    ModelCard,
    ModelFormat,
    get_model_format,
    load_hub_model,
    read_model_info,
    register_model_format,
    save_hub_model,
)

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
    "card",
]
