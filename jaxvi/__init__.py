"""jaxvi: scVI, the single-cell variational autoencoder of scvi-tools, in JAX/Flax."""

from jaxvi import data, likelihoods, memory
from jaxvi._settings import settings
from jaxvi._version import __version__
from jaxvi.likelihoods import Likelihood, register_likelihood
from jaxvi.model import SCVI

__all__ = [
    "__version__",
    "SCVI",
    "Likelihood",
    "data",
    "likelihoods",
    "memory",
    "register_likelihood",
    "settings",
]
