"""User-facing models with scvi-tools' API (``scvi.model``): the abstract
:class:`BaseModel` and the final model classes."""

from jaxvi.model import scarches
from jaxvi.model._base import BaseModel
from jaxvi.model._parts import ModelParts, QueryTraining, check_accelerator
from jaxvi.model._scanvi import SCANVI
from jaxvi.model._scvi import SCVI, config_from_registry, library_size_prior

__all__ = [
    "SCANVI",
    "SCVI",
    "BaseModel",
    "ModelParts",
    "QueryTraining",
    "check_accelerator",
    "config_from_registry",
    "library_size_prior",
    "scarches",
]
