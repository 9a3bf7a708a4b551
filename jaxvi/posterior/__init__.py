"""Queries of a trained model: compiled programs run over cells in bounded chunks.

A query is a value, :class:`Query` (the module or model definition, its variables, the cells'
:class:`~jaxvi.data.DataSource`, the cells, a key and the chunk size), and every program goes
through the one chunked runner, :func:`run_query`. Latent representation, normalised
expression, likelihood parameters, posterior predictive samples, marginal log-likelihood,
library size, denoised expression, importance weights, the ELBO terms, scANVI's class
probabilities, and the aggregated posterior of a set of cells.
"""

from jaxvi.posterior._aggregate import aggregated_log_prob, aggregated_posterior
from jaxvi.posterior._classify import classify_program, predict_probabilities
from jaxvi.posterior._importance import (
    anchors_per_group,
    get_importance_weights,
    importance_log_weights,
    normalize_log_weights,
)
from jaxvi.posterior._predictive import (
    batch_codes,
    gene_indices,
    get_elbo_terms,
    get_feature_correlation_matrix,
    get_latent_library_size,
    get_likelihood_parameters,
    get_marginal_ll,
    posterior_predictive_sample,
)
from jaxvi.posterior._programs import (
    denoised_program,
    elbo_terms_program,
    expression_and_latent_program,
    latent_program,
    library_program,
    likelihood_program,
    log_weight_program,
    marginal_ll_program,
    normal_log_density,
    normalized_expression_program,
    predictive_program,
)
from jaxvi.posterior._runner import (
    MAX_CHUNKS_PER_CALL,
    Query,
    bucket,
    chunks_per_call,
    last_run,
    run_query,
)

__all__ = [
    "MAX_CHUNKS_PER_CALL",
    "Query",
    "aggregated_log_prob",
    "aggregated_posterior",
    "anchors_per_group",
    "batch_codes",
    "bucket",
    "chunks_per_call",
    "classify_program",
    "denoised_program",
    "elbo_terms_program",
    "expression_and_latent_program",
    "gene_indices",
    "get_elbo_terms",
    "get_feature_correlation_matrix",
    "get_importance_weights",
    "get_latent_library_size",
    "get_likelihood_parameters",
    "get_marginal_ll",
    "importance_log_weights",
    "last_run",
    "latent_program",
    "library_program",
    "likelihood_program",
    "log_weight_program",
    "marginal_ll_program",
    "normal_log_density",
    "normalize_log_weights",
    "normalized_expression_program",
    "posterior_predictive_sample",
    "predict_probabilities",
    "predictive_program",
    "run_query",
]
