"""User-facing models with scvi-tools' API (``scvi.model``)."""

from jaxvi.model import scarches
from jaxvi.model._scvi import SCVI, config_from_registry, library_size_prior

__all__ = ["SCVI", "config_from_registry", "library_size_prior", "scarches"]
