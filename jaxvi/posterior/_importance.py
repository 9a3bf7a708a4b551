"""Importance weights of posterior draws (scvi-tools' ``RNASeqMixin.get_importance_weights``).

Draws ``z_m`` (m = 1..M) are made from the posteriors q(z | x) of a set of cells. A subset of
those cells (at most ``max_cells``, chosen at random) serves as anchors a = 1..A. The weight of
draw ``m`` favours latent codes under which many anchors are likely::

    log w_m = logsumexp_a [ log p(z_m) + log p(x_a | z_m, l_a) - log p(x_a)
                            - logsumexp_a' log q(z_m | x_a') ]

where ``p(x_a | z_m, l_a)`` is the likelihood decoded from ``z_m`` (with the batch and
covariates of the cell ``z_m`` was drawn for, or the transform batch) with its mean rescaled to
the anchor's observed total count ``l_a``, and ``log p(x_a)`` the importance-sampled marginal
log-likelihood (:func:`jaxvi.posterior.get_marginal_ll`). Weights are normalised to sum to
one. With ``truncation``, log weights below their log-mean are raised to it (scvi-tools 1.4.2
applies this floor, although the truncated importance sampling it cites caps weights instead).

The decoded parameters are recomputed from ``z_m`` inside a compiled program rather than
stored, and the ``M x A x genes`` likelihood terms are never held at once: a ``lax.scan`` over
chunks of draws maps over the anchors. Only the cells needed are read and moved to the device,
in bounded pieces, as for any query (:func:`jaxvi.posterior.run_chunked`): q(z | x_a) of the
anchors is computed first, then the anchors' counts go to the device in groups of at most
``settings.inference_bytes_per_call`` bytes (the sum over anchors is accumulated group by
group), and the draws need only their cells' covariates. A backed AnnData therefore has only
its anchor rows read from disk.

Where jaxvi differs from scvi-tools 1.4.2: for ``latent_distribution="ln"`` the densities p(z)
and q(z | x) are evaluated at the Gaussian draw before its softmax (scvi-tools evaluates them
at the softmax); and the mean is rescaled to the anchor's library for every likelihood
(scvi-tools rescales it only for ``"zinb"`` and ``"nb"``; for ``"poisson"`` and ``"normal"`` it
keeps each draw's own library).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from jaxvi._settings import settings
from jaxvi.data import CellData, Minibatch, gather, is_host, take_rows
from jaxvi.likelihoods import get_likelihood
from jaxvi.module import VAE, VAEConfig
from jaxvi.parallel import to_host
from jaxvi.posterior import _predictive as posterior
from jaxvi.posterior._predictive import normal_log_density
from jaxvi.posterior._runner import MAX_CHUNKS_PER_CALL, bucket, latent_program, run_chunked

__all__ = [
    "anchors_per_group",
    "get_importance_weights",
    "importance_log_weights",
    "normalize_log_weights",
]


COVARIATES = ("batch_index", "labels", "cat_covs", "cont_covs", "size_factor")


@functools.lru_cache(maxsize=32)
def _log_weight_program(config: VAEConfig):
    """``run(variables, covs, u, code, qz_m, qz_v, qz_real, x_g, log_px_g, real_g)``.

    ``covs`` holds the covariates (:data:`COVARIATES`) of the cells the draws belong to and
    ``u`` ``(n_chunks, batch, n_latent)`` the draws (pre-softmax), each ``(n_chunks, batch,
    ...)``; ``qz_m``, ``qz_v`` ``(A, n_latent)`` are q(z | x_a) of all anchors with
    ``qz_real`` ``(A,)`` (1 for real anchors); ``x_g`` ``(A_g, genes)`` are the counts of
    one group of anchors with ``log_px_g`` ``(A_g,)`` and ``real_g`` ``(A_g,)``. Returns
    ``(log p(z) - logsumexp_a log q(z | x_a), logsumexp_{a in group} [log p(x_a | z, l_a)
    - log p(x_a)])``, each ``(n_chunks, batch)``.
    """
    module = VAE(config)
    lik = get_likelihood(config.gene_likelihood)
    ln = config.latent_distribution == "ln"

    def run(variables, covs, u, code, qz_m, qz_v, qz_real, x_g, log_px_g, real_g):
        lib_g = jnp.sum(x_g, axis=-1)  # (A_g,)

        def body(_, xs):
            cov_i, u_i = xs
            batch = Minibatch(x=None, **cov_i)
            tb = jnp.where(code >= 0, code, batch.batch_index)
            z = jax.nn.softmax(u_i, axis=-1) if ln else u_i
            library = jnp.zeros((z.shape[0], 1), z.dtype)
            gen = module.apply(
                variables, z, library, batch._replace(batch_index=tb), method=VAE.generative
            )
            params = gen.px_params()
            log_pz = jnp.sum(normal_log_density(u_i, 0.0, 1.0), -1)  # (B,)
            log_qz = jnp.sum(normal_log_density(u_i[:, None, :], qz_m, qz_v), -1)  # (B, A)
            log_qz = jnp.where(qz_real > 0, log_qz, -jnp.inf)

            def per_anchor(xl):
                x, lib = xl
                p = params._replace(mu=gen.px_scale * lib)
                return jnp.sum(lik.log_prob(x[None, :], p), -1)  # (B,)

            log_px_z = jax.lax.map(per_anchor, (x_g, lib_g), batch_size=8).T  # (B, A_g)
            terms = jnp.where(real_g > 0, log_px_z - log_px_g[None, :], -jnp.inf)
            prior = log_pz - jax.nn.logsumexp(log_qz, axis=1)
            return None, (prior, jax.nn.logsumexp(terms, axis=1))

        _, out = jax.lax.scan(body, None, (covs, u))
        return out

    return jax.jit(run)


@jax.jit
def _gather_counts(data: CellData, idx: jax.Array) -> jax.Array:
    return gather(data, idx).x


def _anchor_counts(data: CellData, rows: np.ndarray) -> jax.Array:
    """Dense counts ``(len(rows), genes)`` of ``rows`` on the device: host data (a backed
    AnnData included) reads and moves only these rows."""
    if is_host(data):
        return jnp.asarray(take_rows(data, rows).x)
    return _gather_counts(data, jnp.asarray(rows, jnp.int32))


def anchors_per_group(n_genes: int, n_anchors: int) -> int:
    """Anchors whose dense counts go to the device together: a power of two, at most
    ``settings.inference_bytes_per_call`` bytes of float32 counts (at least one anchor), and
    no more than ``n_anchors`` rounded up to a power of two."""
    cells = max(1, int(settings.inference_bytes_per_call) // max(4 * int(n_genes), 1))
    per = 1 << (cells.bit_length() - 1)
    return min(per, 1 << max(int(n_anchors) - 1, 0).bit_length())


def importance_log_weights(
    model,
    data: CellData,
    rows: np.ndarray,
    u: np.ndarray,
    code: int,
    anchors: np.ndarray,
    anchor_log_px: np.ndarray,
    batch_size: int,
) -> np.ndarray:
    """Unnormalised log weights ``(M,)`` of draws ``u`` ``(M, n_latent)`` of cells ``rows``.

    Parameters
    ----------
    model
        A jaxvi ``SCVI`` (its config and variables are used).
    data
        The cells (from ``model._query_inputs``): host data, whose counts may stay on disk
        (only the anchors' rows are read, in groups of bounded size), or device data.
    rows
        ``(M,)`` int: the cell each draw was made for (only its covariates are used).
    u
        ``(M, n_latent)`` float: latent draws before any ``"ln"`` softmax.
    code
        Batch code to decode with, or -1 for each cell's own batch.
    anchors
        ``(A,)`` int anchor cells.
    anchor_log_px
        ``(A,)`` float ``log p(x_a)`` of the anchors.
    batch_size
        Draws per chunk.

    Returns
    -------
    float64 ``(M,)`` log weights (see the module docstring).
    """
    rows = np.asarray(rows, np.int64)
    u = np.asarray(u, np.float32)
    anchors = np.asarray(anchors, np.int64)
    m = len(rows)
    n_anchor = len(anchors)
    # q(z | x_a) of the anchors, their counts read in bounded pieces like any query
    qz_m, qz_v = run_chunked(
        latent_program(model.config, "dist"),
        model.variables,
        data,
        anchors,
        batch_size,
        jax.random.key(0),
    )
    # Anchors are padded to a power of two so that groups of similar size share a program.
    a_pad = 1 << max(n_anchor - 1, 0).bit_length()
    per_group = anchors_per_group(data.n_genes, n_anchor)
    a_pad = max(a_pad, per_group)
    anchor_idx = np.full(a_pad, anchors[0], np.int64)
    anchor_idx[:n_anchor] = anchors
    real = np.zeros(a_pad, np.float32)
    real[:n_anchor] = 1.0
    log_px = np.zeros(a_pad, np.float32)
    log_px[:n_anchor] = anchor_log_px
    qz_m_p = np.zeros((a_pad, qz_m.shape[-1]), np.float32)
    qz_v_p = np.ones((a_pad, qz_v.shape[-1]), np.float32)
    qz_m_p[:n_anchor] = qz_m
    qz_v_p[:n_anchor] = qz_v

    # the draws: covariates of their cells (no counts), in chunks of batch_size
    n_chunks = max(1, -(-m // batch_size))
    take = np.zeros(n_chunks * batch_size, np.int64)
    take[:m] = rows

    def chunked(a):
        return a.reshape(n_chunks, batch_size, *a.shape[1:])

    covs = {
        k: None if getattr(data, k) is None else chunked(to_host(getattr(data, k))[take])
        for k in COVARIATES
    }
    u_p = np.zeros((n_chunks * batch_size, u.shape[-1]), np.float32)
    u_p[:m] = u
    u_p = chunked(u_p)

    program = _log_weight_program(model.config)
    fixed = (jnp.int32(code), jnp.asarray(qz_m_p), jnp.asarray(qz_v_p), jnp.asarray(real))
    prior = None
    groups = []
    for g in range(0, n_anchor, per_group):
        sl = slice(g, g + per_group)
        x_g = _anchor_counts(data, anchor_idx[sl])
        group_args = (x_g, jnp.asarray(log_px[sl]), jnp.asarray(real[sl]))
        priors, sums = [], []
        for start in range(0, n_chunks, MAX_CHUNKS_PER_CALL):
            stop = min(n_chunks, start + MAX_CHUNKS_PER_CALL)
            n = stop - start
            size = bucket(n)

            def piece(a, start=start, stop=stop, n=n, size=size):
                pad = np.zeros((size - n, *a.shape[1:]), a.dtype)
                return jnp.asarray(np.concatenate([a[start:stop], pad]))

            cov_call = {k: None if v is None else piece(v) for k, v in covs.items()}
            p, lse = program(model.variables, cov_call, piece(u_p), *fixed, *group_args)
            priors.append(np.asarray(p, np.float64)[:n].reshape(-1))
            sums.append(np.asarray(lse, np.float64)[:n].reshape(-1))
        del x_g
        if prior is None:
            prior = np.concatenate(priors)[:m]
        groups.append(np.concatenate(sums)[:m])
    return prior + np.logaddexp.reduce(np.stack(groups), axis=0)


def normalize_log_weights(log_w: np.ndarray, truncation: bool = False) -> np.ndarray:
    """Probabilities ``(M,)`` (float64, summing to 1) from log weights ``(M,)``.

    With ``truncation``, log weights below ``log(mean(w))`` are first raised to it.
    """
    log_w = np.asarray(log_w, np.float64)
    if not np.all(np.isfinite(log_w)):
        raise FloatingPointError(
            "Importance weights are not finite; the anchors' marginal log-likelihoods or the "
            "decoded likelihood overflowed."
        )
    if truncation:
        tau = logsumexp(log_w) - np.log(len(log_w))
        log_w = np.maximum(log_w, tau)
    p = np.exp(log_w - logsumexp(log_w))
    return p / p.sum()


def get_importance_weights(
    model,
    adata=None,
    indices=None,
    zs=None,
    transform_batch=None,
    max_cells: int = 1024,
    truncation: bool = False,
    n_mc_samples: int = 500,
    n_mc_samples_per_pass: int = 250,
    batch_size: int | None = None,
    *,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Normalised importance weights of latent draws of the cells ``indices``.

    Parameters
    ----------
    model
        A trained jaxvi ``SCVI``.
    adata, indices
        The cells the draws were made for (default: all cells of the model's AnnData).
    zs
        Latent draws before any ``"ln"`` softmax: ``(cells, n_latent)`` (one per cell) or
        ``(n_samples, cells, n_latent)``, aligned with ``indices``. scvi-tools also takes the
        posterior and likelihood distributions of the draws; jaxvi recomputes them from the
        model.
    transform_batch
        Batch category every draw is decoded with (default: each cell's own batch).
    max_cells
        At most this many anchor cells, drawn without replacement from ``indices``.
    truncation
        Raise log weights below their log-mean to it (scvi-tools' rule).
    n_mc_samples, n_mc_samples_per_pass
        Importance samples for the anchors' ``log p(x)``
        (:func:`jaxvi.posterior.get_marginal_ll`).
    batch_size
        Draws per chunk (``settings.batch_size`` by default).
    rows
        Internal: ``(M,)`` cells of each draw when ``zs`` is ``(M, n_latent)`` with repeats.

    Returns
    -------
    float64 ``(n_draws,)`` weights summing to one, in the order of ``zs`` flattened over its
    leading axes (sample-major for ``(n_samples, cells, n_latent)``).
    """
    if getattr(model, "minified_data_type", None) is not None:
        raise ValueError(
            "Importance weights need the counts of the anchor cells; this model's AnnData is "
            "minified."
        )
    adata, indices, data, bs = model._query_inputs(adata, indices, batch_size)
    if zs is None:
        raise ValueError("Pass the latent draws `zs`.")
    zs = np.asarray(zs, np.float32)
    n_latent = model.config.n_latent
    if zs.ndim not in (2, 3) or zs.shape[-1] != n_latent:
        raise ValueError(
            f"zs must be (cells, {n_latent}) or (n_samples, cells, {n_latent}); got {zs.shape}."
        )
    if rows is None:
        if zs.shape[-2] != len(indices):
            raise ValueError(f"zs has {zs.shape[-2]} cells but indices select {len(indices)}.")
        rows = np.tile(indices, zs.shape[0] if zs.ndim == 3 else 1)
    u = zs.reshape(-1, n_latent)
    if len(rows) != len(u):
        raise ValueError(f"rows has {len(rows)} entries for {len(u)} draws.")
    if int(max_cells) < 1:
        raise ValueError(f"max_cells must be >= 1, got {max_cells}.")
    codes = model._batch_codes(transform_batch)
    if len(codes) > 1:
        raise NotImplementedError(
            "Importance weights cannot be computed when expression levels are averaged across "
            "batches."
        )
    cells = np.unique(indices)
    if len(cells) > max_cells:
        rng = np.random.default_rng(model._next_key_int())
        anchors = rng.choice(cells, size=int(max_cells), replace=False)
    else:
        anchors = cells
    log_px = posterior.get_marginal_ll(
        model,
        adata,
        anchors,
        n_mc_samples=n_mc_samples,
        batch_size=bs,
        return_mean=False,
        n_mc_samples_per_pass=n_mc_samples_per_pass,
    )
    log_w = importance_log_weights(model, data, rows, u, int(codes[0]), anchors, log_px, bs)
    return normalize_log_weights(log_w, truncation)
