"""User-facing models with scvi-tools' API (``scvi.model``): the abstract
:class:`BaseModel`, the final model classes, and :func:`load_model`, which loads a saved
model with the class its files name."""

from jaxvi.model import scarches
from jaxvi.model._base import BaseModel
from jaxvi.model._classes import MODEL_CLASSES, load_model, model_class, saved_model_name
from jaxvi.model._parts import ModelParts, QueryTraining, check_accelerator
from jaxvi.model._scanvi import SCANVI
from jaxvi.model._scvi import SCVI, config_from_registry, library_size_prior

__all__ = [
    "MODEL_CLASSES",
    "SCANVI",
    "SCVI",
    "BaseModel",
    "ModelParts",
    "QueryTraining",
    "check_accelerator",
    "config_from_registry",
    "library_size_prior",
    "load_model",
    "model_class",
    "saved_model_name",
    "scarches",
]
