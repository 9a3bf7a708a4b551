"""Count log-probabilities, samplers and moments of the built-in likelihoods: pure, jit-able
functions of the decoder's parameters (:class:`PxParams`)."""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln, xlogy

from jaxvi.likelihoods._special import lgamma_digamma

__all__ = [
    "EPS",
    "FREE_GATE_SCALE",
    "GATE_SHAPES",
    "MAX_RATE",
    "PxParams",
    "nb_log_prob",
    "normal_log_prob",
    "poisson_log_prob",
    "zinb_log_prob",
    "zip_log_prob",
]

EPS = 1e-8
GATE_SHAPES = ("cell-gene", "gene", "gene-batch", "gene-label")
# Free (per-gene / batch / label) gate logits are stored divided by this factor: with Adam at
# lr 1e-3 a free logit moves at most ~1e-3 per step, too slow to leave its start within a
# normal training run; the factor is a 10x learning-rate multiplier for these parameters.
FREE_GATE_SCALE = 10.0
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


def _softplus_sigmoid(u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(softplus(u), sigmoid(u))`` from one exponential."""
    e = jnp.exp(-jnp.abs(u))
    inv = 1.0 / (1.0 + e)
    return jnp.maximum(u, 0.0) + jnp.log1p(e), jnp.where(u >= 0, inv, e * inv)


def _nb_value_grads(x, mu, theta, eps):
    """log NB(x) + lgamma(x + 1) and its partial derivatives in (x, mu, theta)."""
    tme = theta + mu + eps
    l_tme = jnp.log(tme)
    l_theta = jnp.log(theta + eps)
    l_mu = jnp.log(mu + eps)
    lg_xt, dg_xt = lgamma_digamma(x + theta)
    lg_t, dg_t = lgamma_digamma(theta)  # on theta's own shape, e.g. (genes,)
    value = theta * (l_theta - l_tme) + x * (l_mu - l_tme) + lg_xt - lg_t
    d_theta = l_theta - l_tme + theta / (theta + eps) - (theta + x) / tme + dg_xt - dg_t
    d_mu = x / (mu + eps) - (theta + x) / tme
    d_x = l_mu - l_tme + dg_xt
    return value, (d_x, d_mu, d_theta)


def _zinb_value_grads(x, mu, theta, zi_logits, eps):
    """log ZINB(x) + lgamma(x + 1) and its partial derivatives in (x, mu, theta, zi_logits)."""
    sp_neg, sig_neg = _softplus_sigmoid(-zi_logits)  # -log(1 - gate), 1 - gate
    tme = theta + mu + eps
    l_tme = jnp.log(tme)
    l_theta = jnp.log(theta + eps)
    l_mu = jnp.log(mu + eps)
    pi_theta_log = -zi_logits + theta * (l_theta - l_tme)
    sp_pt, sig_pt = _softplus_sigmoid(pi_theta_log)
    lg_xt, dg_xt = lgamma_digamma(x + theta)
    lg_t, dg_t = lgamma_digamma(theta)  # on theta's own shape, e.g. (genes,)
    zero = x < eps
    case_zero = sp_pt - sp_neg
    case_non_zero = -sp_neg + pi_theta_log + x * (l_mu - l_tme) + lg_xt - lg_t
    value = jnp.where(zero, case_zero, case_non_zero)
    dpt_dtheta = l_theta - l_tme + theta / (theta + eps) - theta / tme
    dpt_dmu = -theta / tme
    d_pi = jnp.where(zero, sig_neg - sig_pt, sig_neg - 1.0)
    d_theta = jnp.where(zero, sig_pt * dpt_dtheta, dpt_dtheta - x / tme + dg_xt - dg_t)
    d_mu = jnp.where(zero, sig_pt * dpt_dmu, dpt_dmu + x / (mu + eps) - x / tme)
    d_x = jnp.where(zero, 0.0, l_mu - l_tme + dg_xt)
    return value, (d_x, d_mu, d_theta, d_pi)


# The negative binomials with their derivatives written out: one fused elementwise pass gives
# the value and every partial derivative (autodiff would evaluate lgamma's series in the
# forward pass, digamma's in the backward pass, and keep a dozen intermediate arrays). Higher
# derivatives come from autodiff of the written-out first derivatives.
@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _nb_unnormalised(x, mu, theta, eps):
    return _nb_value_grads(x, mu, theta, eps)[0]


@_nb_unnormalised.defjvp
def _nb_unnormalised_jvp(eps, primals, tangents):
    value, grads = _nb_value_grads(*primals, eps)
    return value, sum(g * t for g, t in zip(grads, tangents, strict=True))


@functools.partial(jax.custom_jvp, nondiff_argnums=(4,))
def _zinb_unnormalised(x, mu, theta, zi_logits, eps):
    return _zinb_value_grads(x, mu, theta, zi_logits, eps)[0]


@_zinb_unnormalised.defjvp
def _zinb_unnormalised_jvp(eps, primals, tangents):
    value, grads = _zinb_value_grads(*primals, eps)
    return value, sum(g * t for g, t in zip(grads, tangents, strict=True))


def nb_log_prob(x: jax.Array, mu: jax.Array, theta: jax.Array, eps: float = EPS) -> jax.Array:
    """Elementwise log NB(x | mean ``mu``, inverse dispersion ``theta``).

    scvi-tools' ``log_nb_positive``: ``theta (log(theta + eps) - log(theta + mu + eps))
    + x (log(mu + eps) - log(theta + mu + eps)) + lgamma(x + theta) - lgamma(theta)
    - lgamma(x + 1)``, computed in one pass with its derivatives (:mod:`jaxvi.likelihoods`).

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
    x, mu, theta = (jnp.asarray(a) for a in (x, mu, theta))
    return _nb_unnormalised(x, mu, theta, eps) - gammaln(x + 1.0)


def zinb_log_prob(
    x: jax.Array, mu: jax.Array, theta: jax.Array, zi_logits: jax.Array, eps: float = EPS
) -> jax.Array:
    """Elementwise log ZINB: an extra zero with probability ``sigmoid(zi_logits)``.

    scvi-tools' ``log_zinb_positive``: at ``x < eps``, ``softplus(-zi_logits + theta
    (log(theta + eps) - log(theta + mu + eps))) - softplus(-zi_logits)``; elsewhere
    ``-softplus(-zi_logits) - zi_logits`` plus the negative binomial's log-density. Computed
    in one pass with its derivatives (:mod:`jaxvi.likelihoods`).

    Parameters
    ----------
    x
        Counts, shape ``(..., genes)``.
    mu, theta, zi_logits
        Mean, inverse dispersion and gate logits, broadcastable to ``x``.

    Returns
    -------
    Array with the broadcast shape of the inputs.
    """
    x, mu, theta, zi_logits = (jnp.asarray(a) for a in (x, mu, theta, zi_logits))
    return _zinb_unnormalised(x, mu, theta, zi_logits, eps) - gammaln(x + 1.0)


def poisson_log_prob(x: jax.Array, mu: jax.Array) -> jax.Array:
    """Elementwise log Poisson(x | rate ``mu``): ``x log mu - mu - log x!``."""
    return _poisson_no_factorial(x, mu) - gammaln(x + 1.0)


def normal_log_prob(x: jax.Array, mu: jax.Array, scale: jax.Array) -> jax.Array:
    """Elementwise log N(x | ``mu``, ``scale``) (scVI's experimental ``"normal"``)."""
    return (
        -jnp.square(x - mu) / (2.0 * jnp.square(scale))
        - jnp.log(scale)
        - 0.5 * math.log(2.0 * math.pi)
    )


def zip_log_prob(x: jax.Array, mu: jax.Array, zi_logits: jax.Array) -> jax.Array:
    """Elementwise log zero-inflated Poisson (extra zero with probability ``sigmoid(zi_logits)``).

    Parameters
    ----------
    x
        Counts, shape ``(..., genes)``.
    mu, zi_logits
        Poisson rate and gate logits, broadcastable to ``x``.

    Returns
    -------
    Array with the broadcast shape of the inputs:
    ``log(g + (1 - g) e^-mu) = logaddexp(zi_logits, -mu) - softplus(zi_logits)`` at zero and
    ``log(1 - g) + log Poisson(x | mu)`` elsewhere.
    """
    return _zip_no_factorial(x, mu, zi_logits) - gammaln(x + 1.0)


def _poisson_no_factorial(x, mu):
    # xlogy's derivative in y is x / y: 0/0 = NaN at x == 0, mu == 0 (a softmax that
    # underflows). Where x == 0 the term is 0 whatever mu is, so feed it a harmless 1 there;
    # values are unchanged.
    return xlogy(x, jnp.where(x == 0, 1.0, mu)) - mu


def _zip_no_factorial(x, mu, zi_logits):
    log_keep = -jax.nn.softplus(zi_logits)  # log(1 - gate)
    case_zero = jnp.logaddexp(zi_logits, -mu) + log_keep
    return jnp.where(x < EPS, case_zero, log_keep + _poisson_no_factorial(x, mu))


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


def _zinb_mean(p: PxParams):
    return (1.0 - jax.nn.sigmoid(p.zi_logits)) * p.mu


def _zinb_variance(p: PxParams):
    gate = jax.nn.sigmoid(p.zi_logits)
    return (1.0 - gate) * p.mu * (1.0 + p.mu * (gate + 1.0 / p.theta))


def _zip_variance(p: PxParams):
    gate = jax.nn.sigmoid(p.zi_logits)
    return (1.0 - gate) * p.mu * (1.0 + gate * p.mu)


def _zip_sample(key, p: PxParams):
    k_pois, k_zi = jax.random.split(key)
    counts = _poisson_sample(k_pois, p)
    extra_zero = jax.random.uniform(k_zi, counts.shape) <= jax.nn.sigmoid(p.zi_logits)
    return jnp.where(extra_zero, 0.0, counts)


def _normal_variance(p: PxParams):
    # Broadcast: a per-gene scale must still give one variance per (cell, gene), like the others.
    shape = jnp.broadcast_shapes(jnp.shape(p.mu), jnp.shape(p.theta))
    return jnp.broadcast_to(jnp.square(p.theta), shape)
