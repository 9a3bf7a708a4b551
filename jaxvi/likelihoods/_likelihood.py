"""Likelihood implementations, the :class:`Likelihood` interface and the registry (public
face: :mod:`jaxvi.likelihoods`, whose docstring describes the interface)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import gammaln, xlogy

from jaxvi.likelihoods._special import lgamma_digamma

__all__ = [
    "FREE_GATE_SCALE",
    "GATE_SHAPES",
    "Likelihood",
    "ParamSpec",
    "PxParams",
    "available_likelihoods",
    "from_numpyro",
    "get_likelihood",
    "likelihood_name",
    "nb_log_prob",
    "normal_log_prob",
    "poisson_log_prob",
    "register_likelihood",
    "unregister_likelihood",
    "zero_inflated",
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


class ParamSpec(NamedTuple):
    """One parameter a likelihood reads, as the decoder must produce it.

    Attributes
    ----------
    name
        The :class:`PxParams` field: ``"mu"``, ``"theta"`` or ``"zi_logits"``.
    shape
        ``"cell-gene"``, ``"gene"``, ``"gene-batch"``, ``"gene-label"``, or ``"dispersion"``
        (``theta`` follows the model's ``dispersion`` option).
    constraint
        ``"positive"`` or ``"real"``.
    link
        How the model produces it.
    """

    name: str
    shape: str
    constraint: str
    link: str


@dataclasses.dataclass(frozen=True)
class Likelihood:
    """A likelihood p(x | mu, theta, zi_logits) as the model uses it (see the module docstring).

    Attributes
    ----------
    name
        The ``gene_likelihood`` string that selects it.
    log_prob
        ``log_prob(x, params) -> (..., genes)`` elementwise log-likelihood; ``x`` are float
        counts ``(..., cells, genes)``. Must be differentiable in the parameters it reads.
    sample
        ``sample(key, params) -> (..., cells, genes)`` float32 draws.
    mean
        ``mean(params) -> (..., cells, genes)`` (broadcast to the shape of ``params.mu``).
    variance
        ``variance(params) -> (..., cells, genes)`` (broadcast likewise).
    uses_theta
        Whether ``params.theta`` is read (the model then builds the dispersion ``px_r``).
    uses_zi_logits
        Whether ``params.zi_logits`` is read.
    zi_logits_shape
        Where the gate logits come from: ``"cell-gene"`` (the decoder's ``px_dropout`` head, as
        scVI's ZINB), or one free logit per ``"gene"``, ``"gene-batch"`` or ``"gene-label"``.
    to_numpyro
        Optional ``to_numpyro(params) -> numpyro.distributions.Distribution``, the same
        distribution as a numpyro object (see :meth:`numpyro_distribution`).
    log_prob_no_factorial
        Optional ``f(x, params) -> (..., genes)`` equal to ``log_prob(x, params) +
        lgamma(x + 1)``: the log-density without its parameter-free ``-log x!`` term. When
        given, training adds that term per cell from a sum computed once per dataset
        (``Minibatch.log_x_factorial``) instead of evaluating ``lgamma`` at every step; the
        loss values are the same.
    """

    name: str
    log_prob: Callable[[jax.Array, PxParams], jax.Array]
    sample: Callable[[jax.Array, PxParams], jax.Array]
    mean: Callable[[PxParams], jax.Array]
    variance: Callable[[PxParams], jax.Array]
    uses_theta: bool = True
    uses_zi_logits: bool = False
    zi_logits_shape: str = "cell-gene"
    to_numpyro: Callable[[PxParams], object] | None = None
    log_prob_no_factorial: Callable[[jax.Array, PxParams], jax.Array] | None = None

    def __post_init__(self):
        """Check the declaration, so that a mistake fails here and not inside a traced model."""
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"A likelihood needs a non-empty string name, got {self.name!r}.")
        for field in ("log_prob", "sample", "mean", "variance"):
            if not callable(getattr(self, field)):
                raise TypeError(f"Likelihood {self.name!r}: `{field}` must be callable.")
        for field in ("to_numpyro", "log_prob_no_factorial"):
            if getattr(self, field) is not None and not callable(getattr(self, field)):
                raise TypeError(f"Likelihood {self.name!r}: `{field}` must be callable or None.")
        if self.zi_logits_shape not in GATE_SHAPES:
            raise ValueError(
                f"Likelihood {self.name!r}: `zi_logits_shape` must be one of "
                f"{list(GATE_SHAPES)}, got {self.zi_logits_shape!r}."
            )

    @property
    def param_specs(self) -> tuple[ParamSpec, ...]:
        """The parameters the decoder must produce for this likelihood."""
        specs = [ParamSpec("mu", "cell-gene", "positive", "exp(library) * softmax(decoder)")]
        if self.uses_theta:
            specs.append(ParamSpec("theta", "dispersion", "positive", "exp(px_r)"))
        if self.uses_zi_logits:
            link = (
                "decoder head px_dropout"
                if self.zi_logits_shape == "cell-gene"
                else f"{FREE_GATE_SCALE:g} * free parameter px_dropout, one per "
                f"{self.zi_logits_shape}"
            )
            specs.append(ParamSpec("zi_logits", self.zi_logits_shape, "real", link))
        return tuple(specs)

    @property
    def uses_gate_head(self) -> bool:
        """Whether the decoder's ``px_dropout`` head (cell-gene gate logits) is used."""
        return self.uses_zi_logits and self.zi_logits_shape == "cell-gene"

    def numpyro_distribution(self, params: PxParams):
        """The equivalent ``numpyro.distributions.Distribution`` at ``params``.

        Raises
        ------
        NotImplementedError
            When the likelihood was defined without ``to_numpyro``.
        """
        if self.to_numpyro is None:
            raise NotImplementedError(
                f"Likelihood {self.name!r} has no numpyro equivalent (no `to_numpyro`)."
            )
        return self.to_numpyro(params)


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


def zero_inflated(
    base: Likelihood, name: str, *, gate: str = "cell-gene", log_prob_zero=None
) -> Likelihood:
    """``base`` with an extra zero of probability ``sigmoid(zi_logits)``.

    ``log p(0) = logaddexp(log g, log(1 - g) + log p_base(0))`` and
    ``log p(x) = log(1 - g) + log p_base(x)`` for ``x > 0``.

    Parameters
    ----------
    base
        A count likelihood that does not read ``zi_logits`` itself.
    name
        Name of the new likelihood (not registered here).
    gate
        Shape of the gate logits: one of :data:`GATE_SHAPES`.
    log_prob_zero
        Optional ``f(params) -> log p_base(0)``; by default ``base.log_prob`` is evaluated at
        zero, which costs a second evaluation of ``base.log_prob``.

    Returns
    -------
    The new :class:`Likelihood`, with a numpyro equivalent when ``base`` has one.
    """
    if base.uses_zi_logits:
        raise ValueError(f"{base.name!r} already reads zi_logits; it cannot get a second gate.")

    def gated(base_log_prob):
        """The mixture over ``base_log_prob`` at x > 0; log p_base(0) has no log 0! term, so
        the zero case is the same whether ``base_log_prob`` includes -log x! or not."""

        def log_prob(x, p):
            lp0 = (
                base.log_prob(jnp.zeros_like(x), p) if log_prob_zero is None else log_prob_zero(p)
            )
            log_keep = -jax.nn.softplus(p.zi_logits)
            log_gate = -jax.nn.softplus(-p.zi_logits)
            return jnp.where(
                x < EPS, jnp.logaddexp(log_gate, log_keep + lp0), log_keep + base_log_prob(x, p)
            )

        return log_prob

    def sample(key, p):
        k_base, k_zi = jax.random.split(key)
        counts = base.sample(k_base, p)
        extra_zero = jax.random.uniform(k_zi, counts.shape) <= jax.nn.sigmoid(p.zi_logits)
        return jnp.where(extra_zero, 0.0, counts)

    def mean(p):
        return (1.0 - jax.nn.sigmoid(p.zi_logits)) * base.mean(p)

    def variance(p):
        g = jax.nn.sigmoid(p.zi_logits)
        m = base.mean(p)
        return (1.0 - g) * (base.variance(p) + g * jnp.square(m))

    to_numpyro = None
    if base.to_numpyro is not None:

        def to_numpyro(p):
            from numpyro.distributions import ZeroInflatedDistribution

            return ZeroInflatedDistribution(base.to_numpyro(p), gate_logits=p.zi_logits)

    no_factorial = base.log_prob_no_factorial
    return Likelihood(
        name,
        log_prob=gated(base.log_prob),
        sample=sample,
        mean=mean,
        variance=variance,
        uses_theta=base.uses_theta,
        uses_zi_logits=True,
        zi_logits_shape=gate,
        to_numpyro=to_numpyro,
        log_prob_no_factorial=None if no_factorial is None else gated(no_factorial),
    )


def from_numpyro(
    name: str,
    constructor: Callable[[PxParams], object],
    *,
    uses_theta: bool,
    uses_zi_logits: bool = False,
    zi_logits_shape: str = "cell-gene",
) -> Likelihood:
    """A likelihood from a numpyro distribution constructor.

    Parameters
    ----------
    name
        Name of the new likelihood (not registered here).
    constructor
        ``constructor(params: PxParams) -> numpyro.distributions.Distribution`` whose batch
        shape is that of ``params.mu``, e.g. ``lambda p: dist.GammaPoisson(p.theta, p.theta /
        p.mu)``. It is called inside jitted code, so it must be traceable.
    uses_theta, uses_zi_logits, zi_logits_shape
        Which decoder outputs it reads (see :class:`Likelihood`).

    Returns
    -------
    :class:`Likelihood` whose ``log_prob``, ``sample``, ``mean`` and ``variance`` are the
    distribution's. numpyro's own accuracy applies (its negative binomials go through
    ``betaln``: ~1e-6 relative in float32), and its samplers are used as they are.
    """

    def log_prob(x, p):
        return constructor(p).log_prob(x)

    def sample(key, p):
        return constructor(p).sample(key).astype(jnp.float32)

    def mean(p):
        return jnp.broadcast_to(constructor(p).mean, jnp.shape(p.mu))

    def variance(p):
        return jnp.broadcast_to(constructor(p).variance, jnp.shape(p.mu))

    return Likelihood(
        name,
        log_prob=log_prob,
        sample=sample,
        mean=mean,
        variance=variance,
        uses_theta=uses_theta,
        uses_zi_logits=uses_zi_logits,
        zi_logits_shape=zi_logits_shape,
        to_numpyro=constructor,
    )


_REGISTRY: dict[str, Likelihood] = {}


def register_likelihood(likelihood: Likelihood, *, overwrite: bool = False) -> Likelihood:
    """Make ``likelihood`` available as ``gene_likelihood=likelihood.name``.

    Models keep only the name (in memory and in saved files), so a saved model with a custom
    likelihood loads once the same likelihood is registered again. Compiled programs are cached
    per name: replacing a likelihood with ``overwrite=True`` is meant for a fresh session.
    """
    if not isinstance(likelihood, Likelihood):
        raise TypeError(f"register_likelihood expects a Likelihood, got {type(likelihood)}.")
    if likelihood.name in _REGISTRY and not overwrite:
        raise ValueError(
            f"A likelihood named {likelihood.name!r} is already registered; "
            "pass overwrite=True to replace it."
        )
    _REGISTRY[likelihood.name] = likelihood
    return likelihood


def unregister_likelihood(name: str) -> Likelihood:
    """Remove the likelihood called ``name`` from the registry and return it.

    Raises
    ------
    ValueError
        When no likelihood of that name is registered.
    """
    likelihood = get_likelihood(name)
    del _REGISTRY[name]
    return likelihood


def get_likelihood(name: str) -> Likelihood:
    """The registered likelihood called ``name``, with a clear error listing the others."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"`gene_likelihood` must be one of {available_likelihoods()}, got {name!r}. "
            "A custom likelihood must be registered (jaxvi.register_likelihood) before a "
            "model that uses it is created or loaded."
        ) from None


def likelihood_name(gene_likelihood: str | Likelihood) -> str:
    """The registered name for a ``gene_likelihood`` argument: a name or a :class:`Likelihood`.

    A :class:`Likelihood` object is registered under its name if that name is free; the same
    object may be passed again. A different likelihood under a taken name is an error.
    """
    if isinstance(gene_likelihood, Likelihood):
        known = _REGISTRY.get(gene_likelihood.name)
        if known is None:
            register_likelihood(gene_likelihood)
        elif known is not gene_likelihood and known != gene_likelihood:
            raise ValueError(
                f"A different likelihood is already registered as {gene_likelihood.name!r}; "
                "give yours another name (or register it with overwrite=True first)."
            )
        return gene_likelihood.name
    return get_likelihood(gene_likelihood).name


def available_likelihoods() -> list[str]:
    """Names of the registered likelihoods."""
    return list(_REGISTRY)


def _numpyro():
    import numpyro.distributions as dist

    return dist


register_likelihood(
    Likelihood(
        "zinb",
        log_prob=lambda x, p: zinb_log_prob(x, p.mu, p.theta, p.zi_logits),
        sample=_zinb_sample,
        mean=_zinb_mean,
        variance=_zinb_variance,
        uses_zi_logits=True,
        to_numpyro=lambda p: _numpyro().ZeroInflatedNegativeBinomial2(
            p.mu, p.theta, gate_logits=p.zi_logits
        ),
        log_prob_no_factorial=lambda x, p: _zinb_unnormalised(x, p.mu, p.theta, p.zi_logits, EPS),
    )
)
register_likelihood(
    Likelihood(
        "nb",
        log_prob=lambda x, p: nb_log_prob(x, p.mu, p.theta),
        sample=lambda key, p: _gamma_poisson(key, p.mu, p.theta),
        mean=lambda p: p.mu,
        variance=lambda p: p.mu + jnp.square(p.mu) / p.theta,
        to_numpyro=lambda p: _numpyro().NegativeBinomial2(p.mu, p.theta),
        log_prob_no_factorial=lambda x, p: _nb_unnormalised(x, p.mu, p.theta, EPS),
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
        to_numpyro=lambda p: _numpyro().Poisson(p.mu),
        log_prob_no_factorial=lambda x, p: _poisson_no_factorial(x, p.mu),
    )
)
register_likelihood(
    Likelihood(
        "normal",
        log_prob=lambda x, p: normal_log_prob(x, p.mu, p.theta),
        sample=_normal_sample,
        mean=lambda p: p.mu,
        variance=_normal_variance,
        to_numpyro=lambda p: _numpyro().Normal(p.mu, p.theta),
    )
)
# Not in scvi-tools.
register_likelihood(
    Likelihood(
        "zip",
        log_prob=lambda x, p: zip_log_prob(x, p.mu, p.zi_logits),
        sample=_zip_sample,
        mean=_zinb_mean,
        variance=_zip_variance,
        uses_theta=False,
        uses_zi_logits=True,
        to_numpyro=lambda p: _numpyro().ZeroInflatedDistribution(
            _numpyro().Poisson(p.mu), gate_logits=p.zi_logits
        ),
        log_prob_no_factorial=lambda x, p: _zip_no_factorial(x, p.mu, p.zi_logits),
    )
)
# zinb with one gate logit per gene: the same functions (zinb_log_prob broadcasts the (genes,)
# gate logits against (cells, genes)), another gate shape.
register_likelihood(
    dataclasses.replace(get_likelihood("zinb"), name="zinb-gene", zi_logits_shape="gene")
)
