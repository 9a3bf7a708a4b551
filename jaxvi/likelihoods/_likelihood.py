"""Likelihood implementations, the :class:`Likelihood` interface and the registry (public
face: :mod:`jaxvi.likelihoods`, whose docstring describes the interface)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxvi.likelihoods._log_prob import (
    EPS,
    FREE_GATE_SCALE,
    GATE_SHAPES,
    PxParams,
    _gamma_poisson,
    _nb_unnormalised,
    _normal_sample,
    _normal_variance,
    _poisson_no_factorial,
    _poisson_sample,
    _zinb_mean,
    _zinb_sample,
    _zinb_unnormalised,
    _zinb_variance,
    _zip_no_factorial,
    _zip_sample,
    _zip_variance,
    nb_log_prob,
    normal_log_prob,
    poisson_log_prob,
    zinb_log_prob,
    zip_log_prob,
)

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
