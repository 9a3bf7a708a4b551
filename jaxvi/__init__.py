"""jaxvi: scVI, the single-cell variational autoencoder of scvi-tools, in JAX/Flax."""

from jaxvi import datasets, likelihoods
from jaxvi._settings import settings

__all__ = ["datasets", "likelihoods", "settings", "__version__"]

__version__ = "0.1.0"
