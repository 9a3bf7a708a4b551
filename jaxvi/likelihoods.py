"""Count likelihoods of the scVI decoder as pure, jit-able functions, and their registry.

Every likelihood uses scvi-tools' parameterisation: ``mu`` is the mean (``px_rate``),
``theta`` the inverse dispersion (``exp(px_r)``; the standard deviation for ``"normal"``) and
``zi_logits`` the logits of the zero-inflation gate (``px_dropout``). The formulas are
scvi-tools' ``log_nb_positive`` / ``log_zinb_positive`` (``eps = 1e-8`` inside the logs), so
that the same decoder outputs give the same reconstruction loss.

A new likelihood is one :class:`Likelihood` value handed to :func:`register_likelihood`; the
model then accepts its name as ``gene_likelihood`` without any other change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln, xlogy

__all__ = [
    "Likelihood",
    "PxParams",
    "available_likelihoods",
    "get_likelihood",
    "nb_log_prob",
    "normal_log_prob",
    "poisson_log_prob",
    "register_likelihood",
    "zinb_log_prob",
]

EPS = 1e-8
MAX_RATE = 1e8  # scvi-tools clamps Gamma draws / Poisson rates here when sampling


class PxParams(NamedTuple):
    """Parameters of p(x | z, l), each broadcastable to ``(..., cells, genes)``.

    Attributes
    ----------
    mu
        Mean of the counts (scVI ``px_rate``), positive.
    theta
        Inverse dispersion (``exp(px_r)``); the standard deviation for ``"normal"``.
    zi_logits
        Logits of the probability of an extra zero (scVI ``px_dropout``), or None.
    """

    mu: jax.Array
    theta: jax.Array | None = None
    zi_logits: jax.Array | None = None


def nb_log_prob(x: jax.Array, mu: jax.Array, theta: jax.Array, eps: float = EPS) -> jax.Array:
    """Elementwise log NB(x | mean ``mu``, inverse dispersion ``theta``).

    Parameters
    ----------
    x
        Counts, shape ``(..., genes)``.
    mu, theta
        Positive, broadcastable to ``x``.
    eps
        Added inside the logarithms, as scvi-tools' ``log_nb_positive``.

    Returns
    -------
    Array with the broadcast shape of the inputs.
    """
    log_theta_mu_eps = jnp.log(theta + mu + eps)
    return (
        theta * (jnp.log(theta + eps) - log_theta_mu_eps)
        + x * (jnp.log(mu + eps) - log_theta_mu_eps)
        + gammaln(x + theta)
        - gammaln(theta)
        - gammaln(x + 1.0)
    )


def zinb_log_prob(
    x: jax.Array, mu: jax.Array, theta: jax.Array, zi_logits: jax.Array, eps: float = EPS
) -> jax.Array:
    """Elementwise log ZINB: an extra zero with probability ``sigmoid(zi_logits)``.

    Parameters
    ----------
    x
        Counts, shape ``(..., genes)``.
    mu, theta, zi_logits
        Mean, inverse dispersion and gate logits, broadcastable to ``x``.

    Returns
    -------
    Array with the broadcast shape of the inputs; scvi-tools' ``log_zinb_positive``.
    """
    softplus_neg = jax.nn.softplus(-zi_logits)  # -log(1 - gate)
    log_theta_mu_eps = jnp.log(theta + mu + eps)
    pi_theta_log = -zi_logits + theta * (jnp.log(theta + eps) - log_theta_mu_eps)
    case_zero = jax.nn.softplus(pi_theta_log) - softplus_neg
    case_non_zero = (
        -softplus_neg
        + pi_theta_log
        + x * (jnp.log(mu + eps) - log_theta_mu_eps)
        + gammaln(x + theta)
        - gammaln(theta)
        - gammaln(x + 1.0)
    )
    is_zero = (x < eps).astype(case_zero.dtype)
    is_pos = (x > eps).astype(case_zero.dtype)
    return is_zero * case_zero + is_pos * case_non_zero


def poisson_log_prob(x: jax.Array, mu: jax.Array) -> jax.Array:
    """Elementwise log Poisson(x | rate ``mu``): ``x log mu - mu - log x!``."""
    # xlogy's derivative in y is x / y: 0/0 = NaN at x == 0, mu == 0 (a softmax that
    # underflows). Where x == 0 the term is 0 whatever mu is, so feed it a harmless 1 there;
    # values are unchanged.
    return xlogy(x, jnp.where(x == 0, 1.0, mu)) - mu - gammaln(x + 1.0)


def normal_log_prob(x: jax.Array, mu: jax.Array, scale: jax.Array) -> jax.Array:
    """Elementwise log N(x | ``mu``, ``scale``) (scVI's experimental ``"normal"``)."""
    return (
        -jnp.square(x - mu) / (2.0 * jnp.square(scale))
        - jnp.log(scale)
        - 0.5 * math.log(2.0 * math.pi)
    )


def _gamma_poisson(key, mu, theta):
    k_gamma, k_pois = jax.random.split(key)
    shape = jnp.broadcast_shapes(jnp.shape(mu), jnp.shape(theta))
    # Gamma(shape=theta, rate=theta/mu), i.e. mean mu.
    w = jax.random.gamma(k_gamma, jnp.broadcast_to(theta, shape)) * (mu / theta)
    return jax.random.poisson(k_pois, jnp.minimum(w, MAX_RATE), shape).astype(jnp.float32)


def _zinb_sample(key, p: PxParams):
    k_nb, k_zi = jax.random.split(key)
    counts = _gamma_poisson(k_nb, p.mu, p.theta)
    extra_zero = jax.random.uniform(k_zi, counts.shape) <= jax.nn.sigmoid(p.zi_logits)
    return jnp.where(extra_zero, 0.0, counts)


def _poisson_sample(key, p: PxParams):
    mu = jnp.minimum(p.mu, MAX_RATE)
    return jax.random.poisson(key, mu, jnp.shape(mu)).astype(jnp.float32)


def _normal_sample(key, p: PxParams):
    shape = jnp.broadcast_shapes(jnp.shape(p.mu), jnp.shape(p.theta))
    return p.mu + p.theta * jax.random.normal(key, shape)


@dataclasses.dataclass(frozen=True)
class Likelihood:
    """A count likelihood p(x | mu, theta, zi_logits), as the model uses it.

    Attributes
    ----------
    name
        The ``gene_likelihood`` string that selects it.
    log_prob
        ``log_prob(x, params) -> (..., genes)`` elementwise log-likelihood.
    sample
        ``sample(key, params) -> (..., genes)`` float32 draws.
    mean, variance
        ``f(params) -> (..., genes)``.
    uses_theta
        Whether ``params.theta`` is read (the model then builds the dispersion ``px_r``).
    uses_zi_logits
        Whether ``params.zi_logits`` is read (the model then computes ``px_dropout``).
    """

    name: str
    log_prob: Callable[[jax.Array, PxParams], jax.Array]
    sample: Callable[[jax.Array, PxParams], jax.Array]
    mean: Callable[[PxParams], jax.Array]
    variance: Callable[[PxParams], jax.Array]
    uses_theta: bool = True
    uses_zi_logits: bool = False


def _zinb_mean(p: PxParams):
    return (1.0 - jax.nn.sigmoid(p.zi_logits)) * p.mu


def _zinb_variance(p: PxParams):
    gate = jax.nn.sigmoid(p.zi_logits)
    return (1.0 - gate) * p.mu * (1.0 + p.mu * (gate + 1.0 / p.theta))


def _normal_variance(p: PxParams):
    # Broadcast: a per-gene scale must still give one variance per (cell, gene), like the others.
    shape = jnp.broadcast_shapes(jnp.shape(p.mu), jnp.shape(p.theta))
    return jnp.broadcast_to(jnp.square(p.theta), shape)


_REGISTRY: dict[str, Likelihood] = {}


def register_likelihood(likelihood: Likelihood, *, overwrite: bool = False) -> Likelihood:
    """Make ``likelihood`` available as ``gene_likelihood=likelihood.name``."""
    if likelihood.name in _REGISTRY and not overwrite:
        raise ValueError(
            f"A likelihood named {likelihood.name!r} is already registered; "
            "pass overwrite=True to replace it."
        )
    _REGISTRY[likelihood.name] = likelihood
    return likelihood


def get_likelihood(name: str) -> Likelihood:
    """The registered likelihood called ``name``, with a clear error listing the others."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"`gene_likelihood` must be one of {available_likelihoods()}, got {name!r}."
        ) from None


def available_likelihoods() -> list[str]:
    """Names of the registered likelihoods."""
    return list(_REGISTRY)


register_likelihood(
    Likelihood(
        "zinb",
        log_prob=lambda x, p: zinb_log_prob(x, p.mu, p.theta, p.zi_logits),
        sample=_zinb_sample,
        mean=_zinb_mean,
        variance=_zinb_variance,
        uses_zi_logits=True,
    )
)
register_likelihood(
    Likelihood(
        "nb",
        log_prob=lambda x, p: nb_log_prob(x, p.mu, p.theta),
        sample=lambda key, p: _gamma_poisson(key, p.mu, p.theta),
        mean=lambda p: p.mu,
        variance=lambda p: p.mu + jnp.square(p.mu) / p.theta,
    )
)
register_likelihood(
    Likelihood(
        "poisson",
        log_prob=lambda x, p: poisson_log_prob(x, p.mu),
        sample=_poisson_sample,
        mean=lambda p: p.mu,
        variance=lambda p: p.mu,
        uses_theta=False,
    )
)
register_likelihood(
    Likelihood(
        "normal",
        log_prob=lambda x, p: normal_log_prob(x, p.mu, p.theta),
        sample=_normal_sample,
        mean=lambda p: p.mu,
        variance=_normal_variance,
    )
)
