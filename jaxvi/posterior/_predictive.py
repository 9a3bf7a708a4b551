"""Posterior quantities of a trained ``SCVI``: scvi-tools' ``RNASeqMixin`` / ``VAEMixin`` extras.

Every public function takes the model first and has the signature of the scvi-tools method of
the same name (minus ``dataloader``), so that ``SCVI`` can expose it as a thin method. The
work is done by jitted programs (one ``lax.scan`` over chunks of cell indices, as in
:mod:`jaxvi.posterior`), cached per model configuration, that run the module in evaluation
mode. Randomness comes from ``model._next_key()``, so results are reproducible per seed.

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

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxvi.data import CellData, gather
from jaxvi.likelihoods import PxParams, get_likelihood
from jaxvi.module import VAE, VAEConfig
from jaxvi.posterior._runner import run_chunked

__all__ = [
    "get_feature_correlation_matrix",
    "get_latent_library_size",
    "get_likelihood_parameters",
    "get_marginal_ll",
    "posterior_predictive_sample",
]

_LOG_2PI = math.log(2.0 * math.pi)
_NO_LIBRARY_POSTERIOR = (
    "The module for this model does not compute the posterior distribution for the library "
    "size. Set `give_mean` to False to use the observed library size instead."
)


# ----------------------------------------------------------------------------- programs
def _scan_chunks(body, idx):
    """``lax.scan`` of ``body(i, idx_i) -> out`` over the chunks of ``idx``; stacked outputs."""

    def step(_, xs):
        return None, body(*xs)

    _, out = jax.lax.scan(step, None, (jnp.arange(idx.shape[0]), idx))
    return out


@functools.lru_cache(maxsize=64)
def _likelihood_program(config: VAEConfig, n_samples: int):
    """``run(variables, data, idx, key) -> {name: (n_chunks, [S,] batch, genes)}``."""
    module = VAE(config)
    lik = get_likelihood(config.gene_likelihood)

    def run(variables, data: CellData, idx, key):
        def body(i, idx_i):
            batch = gather(data, idx_i)

            def fwd(m: VAE):
                inf = m.inference(batch, key=jax.random.fold_in(key, i), n_samples=n_samples)
                return m.generative(inf.z, inf.library, batch)

            p = module.apply(variables, method=fwd).px_params()
            out = {"mean": p.mu}
            if lik.uses_zi_logits:
                out["dropout"] = jnp.broadcast_to(jax.nn.sigmoid(p.zi_logits), p.mu.shape)
            if lik.uses_theta:
                out["dispersions"] = jnp.broadcast_to(p.theta, p.mu.shape)
            return out

        return _scan_chunks(body, idx)

    return jax.jit(run)


def _decode(m: VAE, batch, key, n_samples: int, code):
    """px of ``n_samples`` posterior draws, decoded in batch ``code`` (-1: the cell's own)."""
    inf = m.inference(batch, key=key, n_samples=n_samples)
    tb = jnp.where(code >= 0, code, batch.batch_index)
    return m.generative(inf.z, inf.library, batch._replace(batch_index=tb))


@functools.lru_cache(maxsize=64)
def _predictive_program(config: VAEConfig, n_samples: int):
    """``run(variables, data, idx, key, codes, gene_idx) -> (n_chunks, batch, genes[, S])``.

    Counts drawn from p(x | z, l) with z, l ~ q(. | x), averaged over the batch ``codes``.
    """
    module = VAE(config)
    lik = get_likelihood(config.gene_likelihood)

    def run(variables, data: CellData, idx, key, codes, gene_idx):
        def body(i, idx_i):
            batch = gather(data, idx_i)

            def draw(t_code):
                t, code = t_code
                k_inf, k_x = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, i), t))
                gen = module.apply(
                    variables, method=lambda m: _decode(m, batch, k_inf, n_samples, code)
                )
                p = PxParams(*(None if a is None else a[..., gene_idx] for a in gen.px_params()))
                return lik.sample(k_x, p)

            # One traced copy of the sampler whatever the number of batches averaged over.
            x = jnp.mean(jax.lax.map(draw, (jnp.arange(codes.shape[0]), codes)), axis=0)
            return x if n_samples == 1 else jnp.moveaxis(x, 0, -1)

        return _scan_chunks(body, idx)

    return jax.jit(run)


def normal_log_density(x, mean, var):
    return -0.5 * (jnp.square(x - mean) / var + jnp.log(var) + _LOG_2PI)


@functools.lru_cache(maxsize=64)
def _marginal_ll_program(config: VAEConfig, per_pass: int):
    """``run(variables, data, idx, key, n_mc) -> (n_chunks, batch)`` importance-sampled
    ``log p(x)``: a running logsumexp over ``ceil(n_mc / per_pass)`` passes of ``per_pass``
    draws, of which the first ``n_mc`` count (``n_mc`` is traced: one compilation serves
    every sample count)."""
    module = VAE(config)
    lik = get_likelihood(config.gene_likelihood)
    ln = config.latent_distribution == "ln"
    latent_library = not config.use_observed_lib_size

    def run(variables, data: CellData, idx, key, n_mc):
        def body(i, idx_i):
            batch = gather(data, idx_i)
            inf = module.apply(variables, batch, key=None, method=VAE.inference)
            qz_m, qz_v = inf.qz_m, inf.qz_v
            n_cells = qz_m.shape[0]
            if latent_library:
                pl_m, pl_v = module.apply(variables, batch.batch_index, method=VAE.library_prior)
            k_chunk = jax.random.fold_in(key, i)

            def one_pass(j, lse):
                k_z, k_l = jax.random.split(jax.random.fold_in(k_chunk, j))
                eps = jax.random.normal(k_z, (per_pass, *qz_m.shape))
                u = qz_m + jnp.sqrt(qz_v) * eps
                # log p(z) - log q(z | x), both at the Gaussian draw u.
                log_w = jnp.sum(
                    normal_log_density(u, 0.0, 1.0) - normal_log_density(u, qz_m, qz_v), -1
                )
                if latent_library:
                    library = inf.ql_m + jnp.sqrt(inf.ql_v) * jax.random.normal(
                        k_l, (per_pass, *inf.ql_m.shape)
                    )
                    log_w += jnp.sum(
                        normal_log_density(library, pl_m, pl_v)
                        - normal_log_density(library, inf.ql_m, inf.ql_v),
                        -1,
                    )
                else:
                    library = jnp.broadcast_to(inf.library, (per_pass, n_cells, 1))
                z = jax.nn.softmax(u, axis=-1) if ln else u
                gen = module.apply(variables, z, library, batch, method=VAE.generative)
                log_w += jnp.sum(lik.log_prob(batch.x, gen.px_params()), -1)
                used = (j * per_pass + jnp.arange(per_pass)) < n_mc
                log_w = jnp.where(used[:, None], log_w, -jnp.inf)
                return jnp.logaddexp(lse, jax.nn.logsumexp(log_w, axis=0))

            n_passes = (n_mc + per_pass - 1) // per_pass
            lse0 = jnp.full((n_cells,), -jnp.inf, qz_m.dtype)
            lse = jax.lax.fori_loop(0, n_passes, one_pass, lse0)
            return lse - jnp.log(n_mc.astype(lse.dtype))

        return _scan_chunks(body, idx)

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def _library_program(config: VAEConfig, give_mean: bool):
    """``run(variables, data, idx, key) -> (n_chunks, batch, 1)`` library sizes (counts)."""
    module = VAE(config)

    def run(variables, data: CellData, idx, key):
        def body(i, idx_i):
            batch = gather(data, idx_i)
            k = None if give_mean else jax.random.fold_in(key, i)
            inf = module.apply(variables, batch, key=k, method=VAE.inference)
            if give_mean:  # mean of LogNormal(ql_m, sqrt(ql_v))
                return jnp.exp(inf.ql_m + 0.5 * inf.ql_v)
            return jnp.exp(inf.library)

        return _scan_chunks(body, idx)

    return jax.jit(run)


@functools.lru_cache(maxsize=64)
def _denoised_program(config: VAEConfig, n_samples: int):
    """``run(variables, data, idx, key, code, size_factor) -> (n_chunks, S, batch, genes)``.

    Gamma(theta, rate theta / (size_factor * px_scale)) draws, one per z draw (scVI's
    "denoised" expression); ``size_factor * px_scale`` for likelihoods without a Gamma-Poisson
    dispersion.
    """
    module = VAE(config)
    gamma = config.gene_likelihood in ("nb", "zinb", "zinb-gene")

    def run(variables, data: CellData, idx, key, code, size_factor):
        def body(i, idx_i):
            batch = gather(data, idx_i)
            k_inf, k_g = jax.random.split(jax.random.fold_in(key, i))
            gen = module.apply(
                variables, method=lambda m: _decode(m, batch, k_inf, n_samples, code)
            )
            rate = size_factor * gen.px_scale
            if n_samples == 1:
                rate = rate[None]
            if not gamma:
                return rate
            theta = jnp.broadcast_to(jnp.exp(gen.px_r), rate.shape)
            return jax.random.gamma(k_g, theta) * (rate / theta)

        return _scan_chunks(body, idx)

    return jax.jit(run)


# ---------------------------------------------------------------------------- functions
def _check_positive(name: str, value) -> int:
    if int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}.")
    return int(value)


def get_likelihood_parameters(
    model,
    adata=None,
    indices=None,
    n_samples: int = 1,
    give_mean: bool = False,
    batch_size: int | None = None,
) -> dict[str, np.ndarray]:
    """Parameters of p(x | z, l) at posterior draws z, l ~ q(. | x).

    Parameters
    ----------
    model
        A jaxvi ``SCVI``.
    adata, indices
        Cells to use (default: all cells of the model's AnnData).
    n_samples
        Posterior draws per cell.
    give_mean
        With ``n_samples > 1``, average the parameters over the draws.
    batch_size
        Cells per chunk (``settings.batch_size`` by default).

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
    adata, indices, data, bs = model._query_inputs(adata, indices, batch_size)
    n_samples = _check_positive("n_samples", n_samples)
    program = _likelihood_program(model.config, n_samples)
    out = run_chunked(
        program,
        model.variables,
        data,
        indices,
        bs,
        model._next_key(),
        cell_axis=1 if n_samples > 1 else 0,
    )
    result = {}
    for name in ("mean", "dropout", "dispersions"):
        if name in out:
            value = np.asarray(out[name], np.float32)
            if give_mean and n_samples > 1:
                value = value.mean(axis=0)
            result[name] = value
    return result


def posterior_predictive_sample(
    model,
    adata=None,
    indices=None,
    transform_batch=None,
    n_samples: int = 1,
    gene_list=None,
    batch_size: int | None = None,
):
    """Counts drawn from the posterior predictive p(x_hat | x).

    Each draw takes z, l ~ q(. | x) and then x_hat ~ p(x | z, l) (the likelihood's
    ``sample``, Poisson rates clamped at 1e8 as scvi-tools does).

    Parameters
    ----------
    model
        A jaxvi ``SCVI``.
    adata, indices
        Cells to use (default: all cells of the model's AnnData).
    transform_batch
        Batch category to decode every cell in; a list averages the draws over the listed
        batches (so the result is no longer integer, as in scvi-tools).
    n_samples
        Draws per cell.
    gene_list
        Genes to keep; they come back in the model's gene order, unknown names are ignored
        and a list without any known gene raises ``ValueError`` (scvi-tools' behaviour).
    batch_size
        Cells per chunk (``settings.batch_size`` by default).

    Returns
    -------
    ``sparse.GCXS`` float32 of shape ``(cells, genes)``, or ``(cells, genes, n_samples)`` when
    ``n_samples > 1`` (pydata ``sparse``, as scvi-tools returns).
    """
    try:
        import sparse
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "posterior_predictive_sample returns a pydata `sparse` array; "
            "install it with `pip install sparse`."
        ) from err
    adata, indices, data, bs = model._query_inputs(adata, indices, batch_size)
    n_samples = _check_positive("n_samples", n_samples)
    var_names = np.asarray([str(v) for v in model.registry_["var_names"]])
    if gene_list is None:
        gene_idx = np.arange(len(var_names))
    else:
        gene_idx = np.flatnonzero(np.isin(var_names, [str(g) for g in gene_list]))
        if gene_idx.size == 0:
            raise ValueError(
                "None of the provided genes in ``gene_list`` were detected in the data."
            )
    codes = model._batch_codes(transform_batch)
    program = _predictive_program(model.config, n_samples)
    out = run_chunked(
        program,
        model.variables,
        data,
        indices,
        bs,
        model._next_key(),
        jnp.asarray(codes, jnp.int32),
        jnp.asarray(gene_idx, jnp.int32),
    )
    return sparse.GCXS.from_numpy(np.asarray(out, np.float32), compressed_axes=(0,))


def get_marginal_ll(
    model,
    adata=None,
    indices=None,
    n_mc_samples: int = 1000,
    batch_size: int | None = None,
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
    model
        A jaxvi ``SCVI``.
    adata, indices
        Cells to use (default: all cells of the model's AnnData).
    n_mc_samples
        Importance samples per cell (exactly this many are used).
    batch_size
        Cells per chunk (``settings.batch_size`` by default).
    return_mean
        Return scvi-tools' summary: the unweighted mean over chunks of ``batch_size`` cells of
        each chunk's mean.
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
    adata, indices, data, bs = model._query_inputs(adata, indices, batch_size)
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
    program = _marginal_ll_program(model.config, per_pass)
    log_lkl = run_chunked(
        program, model.variables, data, indices, bs, model._next_key(), jnp.int32(n_mc)
    )
    log_lkl = np.asarray(log_lkl, np.float64)
    if not return_mean:
        return log_lkl
    chunk_means = [log_lkl[i : i + bs].mean() for i in range(0, len(log_lkl), bs)]
    return float(np.mean(chunk_means))


def get_latent_library_size(
    model,
    adata=None,
    indices=None,
    give_mean: bool = True,
    batch_size: int | None = None,
) -> np.ndarray:
    """Library size of each cell (the scVI paper's l_n, on the count scale).

    Parameters
    ----------
    model
        A jaxvi ``SCVI``.
    adata, indices
        Cells to use (default: all cells of the model's AnnData).
    give_mean
        Return the posterior mean ``E[exp(l)] = exp(ql_m + ql_v / 2)`` (needs
        ``use_observed_lib_size=False``, else ``RuntimeError``); with False, ``exp(library)``:
        the observed total counts, or one draw from q(l | x) for a latent library.
    batch_size
        Cells per chunk (``settings.batch_size`` by default).

    Returns
    -------
    float32 ``(cells, 1)``.
    """
    if give_mean and model.config.use_observed_lib_size:
        raise RuntimeError(_NO_LIBRARY_POSTERIOR)
    adata, indices, data, bs = model._query_inputs(adata, indices, batch_size)
    program = _library_program(model.config, bool(give_mean))
    out = run_chunked(program, model.variables, data, indices, bs, model._next_key())
    return np.asarray(out, np.float32)


def get_feature_correlation_matrix(
    model,
    adata=None,
    indices=None,
    n_samples: int = 10,
    batch_size: int = 64,
    rna_size_factor: int = 1000,
    transform_batch=None,
    correlation_type: str = "spearman",
) -> pd.DataFrame:
    """Gene-gene correlation of scVI's "denoised" expression.

    For every cell and each of ``n_samples`` draws z, l ~ q(. | x), draw
    ``w ~ Gamma(theta, rate = theta / (rna_size_factor * px_scale))`` (mean
    ``rna_size_factor * px_scale``; the noiseless ``rna_size_factor * px_scale`` for likelihoods
    without a Gamma-Poisson dispersion, where scvi-tools 1.4.2 fails); the correlation of the
    genes over all cells x draws is averaged over the ``transform_batch`` batches.

    Parameters
    ----------
    model
        A jaxvi ``SCVI``.
    adata, indices
        Cells to use (default: all cells of the model's AnnData).
    n_samples
        Posterior draws per cell.
    batch_size
        Cells per chunk (64, as scvi-tools).
    rna_size_factor
        Library size the frequencies ``px_scale`` are scaled to.
    transform_batch
        None (each cell's own batch), a batch category, or a list of them (averaged).
    correlation_type
        ``"spearman"`` (Pearson correlation of the per-gene ranks, ties averaged) or
        ``"pearson"``.

    Returns
    -------
    DataFrame ``(genes, genes)`` indexed by the var names on both axes.
    """
    from scipy.stats import rankdata

    if correlation_type not in ("spearman", "pearson"):
        raise ValueError("Unknown correlation type. Choose one of 'spearman', 'pearson'.")
    adata, indices, data, bs = model._query_inputs(adata, indices, batch_size)
    n_samples = _check_positive("n_samples", n_samples)
    program = _denoised_program(model.config, n_samples)
    corr_mats = []
    for code in model._batch_codes(transform_batch):
        denoised = run_chunked(
            program,
            model.variables,
            data,
            indices,
            bs,
            model._next_key(),
            jnp.int32(code),
            jnp.float32(rna_size_factor),
            cell_axis=1,
        )
        flat = np.asarray(denoised, np.float64).reshape(-1, denoised.shape[-1])
        if correlation_type == "spearman":
            flat = rankdata(flat, axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr_mats.append(np.atleast_2d(np.corrcoef(flat, rowvar=False)))
    corr = np.mean(np.stack(corr_mats), axis=0)
    var_names = pd.Index(adata.var_names)
    return pd.DataFrame(corr, index=var_names, columns=var_names)
