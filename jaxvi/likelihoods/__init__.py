"""Likelihoods p(x | z, l) of the scVI decoder: pure, jit-able functions, an interface, a registry.

The interface
-------------
A likelihood is one :class:`Likelihood` value: a name, ``log_prob``, ``sample``, ``mean`` and
``variance``, and a declaration of which decoder outputs it reads. The model hands it a
:class:`PxParams` with up to three fields, made as follows (``Likelihood.param_specs`` lists
them for a given likelihood):

=============  =================================  ==========  =====================================
field          shape                              constraint  how the model makes it
=============  =================================  ==========  =====================================
``mu``         cell-gene                          positive    ``exp(library) * softmax(decoder)``
                                                              (scVI ``px_rate``); always present
``theta``      the model's ``dispersion`` option  positive    ``exp(px_r)``; ``px_r`` is a free
               (gene, gene-batch, gene-label) or              parameter, or a decoder head for
               cell-gene (``"gene-cell"``)                    ``"gene-cell"``; if ``uses_theta``
``zi_logits``  ``zi_logits_shape``: cell-gene     real        logits of an extra-zero gate
               (a decoder head, scVI                          (``gate = sigmoid(zi_logits)``), if
               ``px_dropout``), gene, gene-batch              ``uses_zi_logits``; free per-gene
               or gene-label (free parameters)                parameters start at 0 and are
                                                              stored divided by
                                                              ``FREE_GATE_SCALE``
=============  =================================  ==========  =====================================

Per-gene parameters arrive as ``(genes,)`` (``"gene"``) or already looked up per cell,
``(cells, genes)`` (``"gene-batch"``, ``"gene-label"``), so every function must broadcast.
``theta`` is whatever positive quantity the likelihood wants (inverse dispersion for the
negative binomials, the standard deviation for ``"normal"``).

Built-in likelihoods use scvi-tools' parameterisation and formulas (``log_nb_positive`` /
``log_zinb_positive``, ``eps = 1e-8`` inside the logs) so that the same decoder outputs give
the same reconstruction loss: ``"zinb"``, ``"nb"``, ``"poisson"``, ``"normal"``. Two more are
not in scvi-tools: ``"zip"`` (zero-inflated Poisson, a gate per cell and gene) and
``"zinb-gene"`` (negative binomial with one zero-inflation gate per gene, the same for every
cell). :func:`zero_inflated` adds a gate of any shape to any count likelihood.

Every built-in gives the equivalent numpyro distribution (``lik.numpyro_distribution(params)``),
and :func:`from_numpyro` makes a likelihood from a numpyro distribution constructor. Note on
accuracy: numpyro's negative binomial log-probability goes through ``betaln`` and is only about
1e-6 accurate in float32 (worse for large ``theta``), so jaxvi's own formulas are the ones the
model trains with.
"""

from jaxvi.likelihoods._likelihood import (
    Likelihood,
    ParamSpec,
    available_likelihoods,
    from_numpyro,
    get_likelihood,
    likelihood_name,
    register_likelihood,
    unregister_likelihood,
    zero_inflated,
)
from jaxvi.likelihoods._log_prob import (
    EPS,
    FREE_GATE_SCALE,
    GATE_SHAPES,
    MAX_RATE,
    PxParams,
    nb_log_prob,
    normal_log_prob,
    poisson_log_prob,
    zinb_log_prob,
    zip_log_prob,
)
from jaxvi.likelihoods._special import lgamma_digamma

__all__ = [
    "EPS",
    "MAX_RATE",
    "FREE_GATE_SCALE",
    "GATE_SHAPES",
    "Likelihood",
    "ParamSpec",
    "PxParams",
    "available_likelihoods",
    "from_numpyro",
    "get_likelihood",
    "lgamma_digamma",
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
