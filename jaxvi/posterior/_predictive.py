"""Posterior quantities of a trained scVI model: scvi-tools' ``RNASeqMixin`` / ``VAEMixin``
extras, as functions of a :class:`~jaxvi.posterior.Query`.

Each function takes the query (the module, variables, cells, key and chunk size) and the
options of the scvi-tools method of the same name; the model class resolves its own arguments
(``adata``, ``indices``, ``transform_batch``, ``gene_list``) into the query, batch codes and
gene indices (:func:`batch_codes`, :func:`gene_indices`). The work is done by the cached
programs of :mod:`jaxvi.posterior` run by :func:`~jaxvi.posterior.run_query`; randomness
comes from ``query.key``, so results are reproducible per seed.

Where scvi-tools 1.4.2 fails or is inexact, jaxvi chooses as follows (each function says so):

* likelihoods other than ``"zinb"``/``"nb"``: ``get_likelihood_parameters`` returns
  ``"dispersions"`` only for likelihoods that read ``theta`` (for ``"normal"`` it is the
  standard deviation; ``"poisson"`` has none), and ``get_feature_correlation_matrix`` uses the
  noiseless rate ``rna_size_factor * px_scale`` where there is no Gamma-Poisson dispersion;
* ``get_marginal_ll`` draws exactly ``n_mc_samples`` samples (scvi-tools draws
  ``ceil(n / per_pass) * per_pass`` but divides by ``n``) and, for ``"ln"``, evaluates
  ``p(z)`` and ``q(z | x)`` at the Gaussian draw rather than at its softmax.
"""

from __future__ import annotations

import numbers
import warnings

import jax
import numpy as np
import pandas as pd

from jaxvi.posterior._programs import (
    denoised_program,
    elbo_terms_program,
    library_program,
    likelihood_program,
    marginal_ll_program,
    predictive_program,
)
from jaxvi.posterior._runner import Query, run_query

__all__ = [
    "batch_codes",
    "gene_indices",
    "get_elbo_terms",
    "get_feature_correlation_matrix",
    "get_latent_library_size",
    "get_likelihood_parameters",
    "get_marginal_ll",
    "posterior_predictive_sample",
]

_NO_LIBRARY_POSTERIOR = (
    "The module for this model does not compute the posterior distribution for the library "
    "size. Set `give_mean` to False to use the observed library size instead."
)


def _check_positive(name: str, value) -> int:
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}.")
    return int(value)


def batch_codes(categories, transform_batch) -> np.ndarray:
    """Batch codes ``(T,)`` to decode with: ``[-1]`` (each cell's own batch) for None, else
    the codes of the category or list of categories ``transform_batch`` in ``categories``
    (None in a list: each cell's own batch).

    A value matches as scvi-tools matches it, equal to the category as the user wrote it in
    the batch column; the registry keeps categories as strings, so a number also matches a
    category that reads as the same number (``1`` and ``1.0`` match ``"1.0"``).

    Raises ``ValueError`` naming a value that is not a category.
    """
    if transform_batch is None:
        return np.array([-1])
    cats = [str(c) for c in categories]
    numeric: dict[float, int] = {}
    for i, c in enumerate(cats):
        try:
            numeric.setdefault(float(c), i)
        except ValueError:
            pass
    values = (
        list(transform_batch)
        if isinstance(transform_batch, list | tuple | np.ndarray)
        else [transform_batch]
    )
    codes = []
    for v in values:
        if v is None:
            codes.append(-1)
        elif str(v) in cats:
            codes.append(cats.index(str(v)))
        elif isinstance(v, numbers.Number) and not isinstance(v, bool) and float(v) in numeric:
            codes.append(numeric[float(v)])
        else:
            raise ValueError(f"transform_batch {v!r} is not a batch category ({cats[:10]}).")
    return np.asarray(codes)


def gene_indices(var_names, gene_list) -> np.ndarray:
    """Positions ``(G,)`` in ``var_names`` of the genes of ``gene_list`` (all for None), in
    the model's gene order; unknown names are ignored, and a list without any known gene
    raises ``ValueError`` (scvi-tools' ``posterior_predictive_sample``)."""
    names = np.asarray([str(v) for v in var_names])
    if gene_list is None:
        return np.arange(len(names))
    idx = np.flatnonzero(np.isin(names, [str(g) for g in gene_list]))
    if idx.size == 0:
        raise ValueError("None of the provided genes in ``gene_list`` were detected in the data.")
    return idx


def get_elbo_terms(query: Query) -> dict[str, np.ndarray]:
    """The named terms of the model's loss per cell (KL weight 1, one draw per cell).

    ``query.module`` is a :class:`~jaxvi.module.ModelDef`.

    Returns
    -------
    ``{term: float64 (cells,)}``; for scVI ``"reconstruction_loss"`` and ``"kl_local"``,
    whose sum is the negative ELBO.
    """
    out = run_query(elbo_terms_program(query.module), query)
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def get_likelihood_parameters(
    query: Query, n_samples: int = 1, give_mean: bool = False
) -> dict[str, np.ndarray]:
    """Parameters of p(x | z, l) at posterior draws z, l ~ q(. | x).

    Parameters
    ----------
    query
        The VAE, its variables and the cells.
    n_samples
        Posterior draws per cell.
    give_mean
        With ``n_samples > 1``, average the parameters over the draws.

    Returns
    -------
    dict of float32 arrays, each ``(cells, genes)``, or ``(n_samples, cells, genes)`` when
    ``n_samples > 1`` and not ``give_mean``, in scvi-tools' key order:

    * ``"mean"``: ``px_rate``;
    * ``"dropout"``: the zero-inflation probability ``sigmoid(px_dropout)`` (likelihoods with
      a gate, i.e. ``"zinb"``);
    * ``"dispersions"``: ``theta = exp(px_r)`` broadcast to every cell, for likelihoods that
      use it (for ``"normal"`` the standard deviation; absent for ``"poisson"``, where
      scvi-tools 1.4.2 raises instead).
    """
    n_samples = _check_positive("n_samples", n_samples)
    program = likelihood_program(query.module, n_samples)
    out = run_query(program, query, cell_axis=1 if n_samples > 1 else 0)
    result = {}
    for name in ("mean", "dropout", "dispersions"):
        if name in out:
            value = np.asarray(out[name], np.float32)
            if give_mean and n_samples > 1:
                value = value.mean(axis=0)
            result[name] = value
    return result


def posterior_predictive_sample(query: Query, codes=(-1,), gene_idx=None, n_samples: int = 1):
    """Counts drawn from the posterior predictive p(x_hat | x).

    Each draw takes z, l ~ q(. | x) and then x_hat ~ p(x | z, l) (the likelihood's
    ``sample``, Poisson rates clamped at 1e8 as scvi-tools does).

    Parameters
    ----------
    query
        The VAE, its variables and the cells.
    codes
        ``(T,)`` batch codes to decode every cell in (:func:`batch_codes`; -1: its own); the
        draws are averaged over them (so no longer integer with several, as in scvi-tools).
    gene_idx
        ``(G,)`` genes to keep (:func:`gene_indices`; None: all).
    n_samples
        Draws per cell.

    Returns
    -------
    ``sparse.GCXS`` float32 of shape ``(cells, G)``, or ``(cells, G, n_samples)`` when
    ``n_samples > 1`` (pydata ``sparse``, as scvi-tools returns).
    """
    try:
        import sparse
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "posterior_predictive_sample returns a pydata `sparse` array; "
            "install it with `pip install sparse`."
        ) from err
    n_samples = _check_positive("n_samples", n_samples)
    if gene_idx is None:
        gene_idx = np.arange(query.module.config.n_input)
    program = predictive_program(query.module, n_samples)
    out = run_query(
        program,
        query,
        jax.device_put(np.asarray(codes, np.int32)),
        jax.device_put(np.asarray(gene_idx, np.int32)),
    )
    return sparse.GCXS.from_numpy(np.asarray(out, np.float32), compressed_axes=(0,))


def get_marginal_ll(
    query: Query,
    n_mc_samples: int = 1000,
    return_mean: bool = True,
    n_mc_samples_per_pass: int = 1,
):
    """Importance-sampled estimate of the marginal log-likelihood log p(x) (higher is better).

    Per cell, with S = ``n_mc_samples`` draws (z_s, l_s) ~ q(z | x) q(l | x),
    ``logsumexp_s(log p(z_s) + log p(x | z_s, l_s) - log q(z_s | x)
    [+ log p(l_s) - log q(l_s | x)]) - log S``; the library terms enter only for a latent
    library (``use_observed_lib_size=False``), with the per-batch prior of the model. The draws
    are made ``n_mc_samples_per_pass`` at a time inside one compiled program.

    Parameters
    ----------
    query
        The VAE, its variables and the cells.
    n_mc_samples
        Importance samples per cell (exactly this many are used).
    return_mean
        Return scvi-tools' summary: the unweighted mean over chunks of ``query.batch_size``
        cells of each chunk's mean.
    n_mc_samples_per_pass
        Draws evaluated together (memory ``~ per_pass * batch_size * genes``); capped at
        ``n_mc_samples`` with a ``RuntimeWarning``.

    Returns
    -------
    float, or float64 ``(cells,)`` with ``return_mean=False``.

    Notes
    -----
    For ``latent_distribution="ln"``, p(z) and q(z | x) are the Gaussian densities of the draw
    before its softmax (the variables the estimate integrates over); scvi-tools 1.4.2 evaluates
    them at the softmax instead, which is not an estimate of log p(x).
    """
    n_mc = _check_positive("n_mc_samples", n_mc_samples)
    per_pass = _check_positive("n_mc_samples_per_pass", n_mc_samples_per_pass)
    if per_pass > n_mc:
        warnings.warn(
            "Number of chunks is larger than the total number of samples, setting it to the "
            "number of samples",
            RuntimeWarning,
            stacklevel=2,
        )
        per_pass = n_mc
    program = marginal_ll_program(query.module, per_pass)
    log_lkl = np.asarray(run_query(program, query, jax.device_put(np.int32(n_mc))), np.float64)
    if not return_mean:
        return log_lkl
    bs = int(query.batch_size)
    chunk_means = [log_lkl[i : i + bs].mean() for i in range(0, len(log_lkl), bs)]
    return float(np.mean(chunk_means))


def get_latent_library_size(query: Query, give_mean: bool = True) -> np.ndarray:
    """Library size of each cell (the scVI paper's l_n, on the count scale).

    Parameters
    ----------
    query
        The VAE, its variables and the cells.
    give_mean
        Return the posterior mean ``E[exp(l)] = exp(ql_m + ql_v / 2)`` (needs
        ``use_observed_lib_size=False``, else ``RuntimeError``); with False, ``exp(library)``:
        the observed total counts, or one draw from q(l | x) for a latent library.

    Returns
    -------
    float32 ``(cells, 1)``.
    """
    if give_mean and query.module.config.use_observed_lib_size:
        raise RuntimeError(_NO_LIBRARY_POSTERIOR)
    out = run_query(library_program(query.module, bool(give_mean)), query)
    return np.asarray(out, np.float32)


def get_feature_correlation_matrix(
    query: Query,
    var_names,
    codes=(-1,),
    n_samples: int = 10,
    rna_size_factor: int = 1000,
    correlation_type: str = "spearman",
) -> pd.DataFrame:
    """Gene-gene correlation of scVI's "denoised" expression.

    For every cell and each of ``n_samples`` draws z, l ~ q(. | x), draw
    ``w ~ Gamma(theta, rate = theta / (rna_size_factor * px_scale))`` (mean
    ``rna_size_factor * px_scale``; the noiseless ``rna_size_factor * px_scale`` for likelihoods
    without a Gamma-Poisson dispersion, where scvi-tools 1.4.2 fails); the correlation of the
    genes over all cells x draws is averaged over the batch ``codes``.

    Parameters
    ----------
    query
        The VAE, its variables and the cells (scvi-tools' default chunk: 64 cells). The
        batch code ``t`` draws from ``fold_in(query.key, t)``.
    var_names
        The genes' names, for the result's index and columns.
    codes
        ``(T,)`` batch codes (:func:`batch_codes`; -1: each cell's own).
    n_samples
        Posterior draws per cell.
    rna_size_factor
        Library size the frequencies ``px_scale`` are scaled to.
    correlation_type
        ``"spearman"`` (Pearson correlation of the per-gene ranks, ties averaged) or
        ``"pearson"``.

    Returns
    -------
    DataFrame ``(genes, genes)`` indexed by ``var_names`` on both axes.
    """
    from scipy.stats import rankdata

    if correlation_type not in ("spearman", "pearson"):
        raise ValueError("Unknown correlation type. Choose one of 'spearman', 'pearson'.")
    n_samples = _check_positive("n_samples", n_samples)
    program = denoised_program(query.module, n_samples)
    corr_mats = []
    for t, code in enumerate(codes):
        denoised = run_query(
            program,
            query.replace(key=jax.random.fold_in(query.key, t)),
            jax.device_put(np.int32(code)),
            jax.device_put(np.float32(rna_size_factor)),
            cell_axis=1,
        )
        flat = np.asarray(denoised, np.float64).reshape(-1, denoised.shape[-1])
        if correlation_type == "spearman":
            flat = rankdata(flat, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr_mats.append(np.atleast_2d(np.corrcoef(flat, rowvar=False)))
    corr = np.mean(np.stack(corr_mats), axis=0)
    var_names = pd.Index(var_names)
    return pd.DataFrame(corr, index=var_names, columns=var_names)
