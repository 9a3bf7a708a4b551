"""jaxvi: scVI, the single-cell variational autoencoder of scvi-tools, and scANVI, in JAX/Flax."""

from jaxvi import data, likelihoods, memory
from jaxvi._settings import settings
from jaxvi._version import __version__
from jaxvi.likelihoods import Likelihood, register_likelihood
from jaxvi.model import SCANVI, SCVI

__all__ = [
    "__version__",
    "SCANVI",
    "SCVI",
    "Likelihood",
    "data",
    "likelihoods",
    "memory",
    "register_likelihood",
    "settings",
]
