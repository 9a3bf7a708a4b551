"""Queries of a trained model: compiled programs run over cells in bounded chunks.

Latent representation, normalised expression, likelihood parameters, posterior predictive
samples, marginal log-likelihood and importance weights.
"""

from jaxvi.posterior._importance import (
    anchors_per_group,
    get_importance_weights,
    importance_log_weights,
    normalize_log_weights,
)
from jaxvi.posterior._predictive import (
    get_feature_correlation_matrix,
    get_latent_library_size,
    get_likelihood_parameters,
    get_marginal_ll,
    normal_log_density,
    posterior_predictive_sample,
)
from jaxvi.posterior._runner import (
    MAX_CHUNKS_PER_CALL,
    bucket,
    chunks_per_call,
    expression_and_latent_program,
    last_run,
    latent_program,
    normalized_expression_program,
    run_chunked,
)

__all__ = [
    "MAX_CHUNKS_PER_CALL",
    "anchors_per_group",
    "bucket",
    "chunks_per_call",
    "expression_and_latent_program",
    "get_feature_correlation_matrix",
    "get_importance_weights",
    "get_latent_library_size",
    "get_likelihood_parameters",
    "get_marginal_ll",
    "importance_log_weights",
    "last_run",
    "latent_program",
    "normal_log_density",
    "normalize_log_weights",
    "normalized_expression_program",
    "posterior_predictive_sample",
    "run_chunked",
]
