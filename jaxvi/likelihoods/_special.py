"""``lgamma`` and ``digamma`` of positive arguments in one pass, for the count likelihoods.

XLA's ``lgamma`` / ``digamma`` handle every real argument (a reflection branch with ``sin`` /
``tan`` for negative ones, evaluated everywhere under a select), and reverse-mode autodiff of a
negative binomial evaluates the Lanczos series twice (once for ``lgamma`` in the forward pass,
once for ``digamma`` in the backward pass) with its eight terms kept as separate arrays. The
arguments of the negative binomial (``x + theta`` and ``theta``) are positive, so here both
functions come from one Lanczos series (g = 7, nine coefficients, the same as XLA's) evaluated
at ``z + 1`` and shifted down with ``lgamma(z) = lgamma(z + 1) - log z``; the eight reciprocals
are formed two at a time from one division.

Accuracy (float32, against scipy in float64, ``z`` from 1e-4 to 1e7): about 2.5e-6 of
``max(1, |lgamma|)`` and 7e-7 of ``max(1, |digamma|)``, as XLA's own functions (2.0e-6 and
9.7e-7); in float64 about 1e-14.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

__all__ = ["lgamma_digamma"]

_LANCZOS_G = 7.0
_LANCZOS = (
    0.99999999999980993,
    676.5203681218851,
    -1259.1392167224028,
    771.32342877765313,
    -176.61502916214059,
    12.507343278686905,
    -0.13857109526572012,
    9.9843695780195716e-6,
    1.5056327351493116e-7,
)
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def lgamma_digamma(z):
    """``(lgamma(z), digamma(z))`` for ``z > 0``, elementwise.

    Parameters
    ----------
    z
        Positive array of any shape (float32 or float64). ``z <= 0`` gives inf or NaN.

    Returns
    -------
    Two arrays of the shape and dtype of ``z``.
    """
    a = jnp.full_like(z, _LANCZOS[0])  # A(z) = c0 + sum_k c_k / (z + k)
    da = jnp.zeros_like(z)  # A'(z)
    for k in (1, 3, 5, 7):
        u, v = z + k, z + (k + 1)
        inv_uv = 1.0 / (u * v)  # 1/u = v/(uv), 1/v = u/(uv); uv = inf gives 0, the limit
        ru, rv = v * inv_uv, u * inv_uv
        a = a + _LANCZOS[k] * ru + _LANCZOS[k + 1] * rv
        da = da - _LANCZOS[k] * ru * ru - _LANCZOS[k + 1] * rv * rv
    t = z + (_LANCZOS_G + 0.5)
    log_t = jnp.log(t)
    # lgamma(z + 1) = log sqrt(2 pi) + (z + 1/2) log t - t + log A(z); then subtract log z.
    lgamma = _HALF_LOG_2PI + (z + 0.5) * log_t - t + jnp.log(a / z)
    # d/dz: log t + (z + 1/2)/t - 1 + A'/A = log t - g/t + A'/A; then subtract 1/z.
    digamma = log_t - _LANCZOS_G / t + da / a - 1.0 / z
    return lgamma, digamma
