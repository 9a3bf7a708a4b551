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

import jax
import numpy as np
from scipy.special import logsumexp

from jaxvi._settings import settings
from jaxvi.data import DataSource, DeviceSource, covariate_data
from jaxvi.posterior._predictive import get_marginal_ll
from jaxvi.posterior._programs import latent_program, log_weight_program
from jaxvi.posterior._runner import Query, run_query

__all__ = [
    "anchors_per_group",
    "get_importance_weights",
    "importance_log_weights",
    "normalize_log_weights",
]


def _anchor_counts(source: DataSource, rows: np.ndarray) -> jax.Array:
    """Dense counts ``(len(rows), genes)`` of ``rows`` on the device: cells on the host or on
    disk read and move only these rows."""
    return source.minibatch(rows).x


def anchors_per_group(n_genes: int, n_anchors: int) -> int:
    """Anchors whose dense counts go to the device together: a power of two, at most
    ``settings.inference_bytes_per_call`` bytes of float32 counts (at least one anchor), and
    no more than ``n_anchors`` rounded up to a power of two."""
    cells = max(1, int(settings.inference_bytes_per_call) // max(4 * int(n_genes), 1))
    per = 1 << (cells.bit_length() - 1)
    return min(per, 1 << max(int(n_anchors) - 1, 0).bit_length())


def importance_log_weights(
    query: Query,
    rows: np.ndarray,
    u: np.ndarray,
    code: int,
    anchors: np.ndarray,
    anchor_log_px: np.ndarray,
) -> np.ndarray:
    """Unnormalised log weights ``(M,)`` of draws ``u`` ``(M, n_latent)`` of cells ``rows``.

    Parameters
    ----------
    query
        The VAE, its variables, the cells' source and the chunk size (its ``indices`` and
        ``key`` are not used): cells on the host or on disk have only the anchors' rows read
        (in groups of bounded size), and the draws' covariates.
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

    Returns
    -------
    float64 ``(M,)`` log weights (see the module docstring).
    """
    source = query.source
    rows = np.asarray(rows, np.int64)
    u = np.asarray(u, np.float32)
    anchors = np.asarray(anchors, np.int64)
    n_anchor = len(anchors)
    # q(z | x_a) of the anchors, their counts read in bounded pieces like any query
    qz_m, qz_v = run_query(
        latent_program(query.module, "dist"),
        query.replace(indices=anchors, key=jax.random.key(0)),
    )
    # Anchors are padded to a power of two so that groups of similar size share a program.
    a_pad = 1 << max(n_anchor - 1, 0).bit_length()
    per_group = anchors_per_group(source.n_genes, n_anchor)
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

    # The draws: only their cells' covariates, on the device (no counts read).
    draws = query.replace(
        source=DeviceSource(covariate_data(source.covariates(rows), source.n_genes)),
        indices=np.arange(len(rows)),
        key=None,
    )
    program = log_weight_program(query.module)
    fixed = jax.device_put((np.int32(code), qz_m_p, qz_v_p, real))
    prior = None
    groups = []
    for g in range(0, n_anchor, per_group):
        sl = slice(g, g + per_group)
        x_g = _anchor_counts(source, anchor_idx[sl])
        group_args = (x_g, *jax.device_put((log_px[sl], real[sl])))
        p, lse = run_query(program, draws, *fixed, *group_args, cell_args=(u,))
        del x_g
        if prior is None:
            prior = np.asarray(p, np.float64)
        groups.append(np.asarray(lse, np.float64))
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
    query: Query,
    zs,
    code: int = -1,
    max_cells: int = 1024,
    truncation: bool = False,
    n_mc_samples: int = 500,
    n_mc_samples_per_pass: int = 250,
    *,
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """Normalised importance weights of latent draws of the cells ``query.indices``.

    Parameters
    ----------
    query
        The VAE, its variables and the cells the draws were made for. ``query.key`` chooses
        the anchors (``fold_in(key, 0)``) and draws their ``log p(x)`` (``fold_in(key, 1)``).
    zs
        Latent draws before any ``"ln"`` softmax: ``(cells, n_latent)`` (one per cell) or
        ``(n_samples, cells, n_latent)``, aligned with ``query.indices``. scvi-tools also
        takes the posterior and likelihood distributions of the draws; jaxvi recomputes them
        from the model.
    code
        Batch code every draw is decoded with (-1: each cell's own batch).
    max_cells
        At most this many anchor cells, drawn without replacement from the cells.
    truncation
        Raise log weights below their log-mean to it (scvi-tools' rule).
    n_mc_samples, n_mc_samples_per_pass
        Importance samples for the anchors' ``log p(x)``
        (:func:`jaxvi.posterior.get_marginal_ll`).
    rows
        ``(M,)`` cells of each draw when ``zs`` is ``(M, n_latent)`` with repeats.

    Returns
    -------
    float64 ``(n_draws,)`` weights summing to one, in the order of ``zs`` flattened over its
    leading axes (sample-major for ``(n_samples, cells, n_latent)``).
    """
    indices = np.asarray(query.indices)
    if zs is None:
        raise ValueError("Pass the latent draws `zs`.")
    zs = np.asarray(zs, np.float32)
    n_latent = query.module.config.n_latent
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
    cells = np.unique(indices)
    if len(cells) > max_cells:
        seed = int(jax.random.randint(jax.random.fold_in(query.key, 0), (), 0, 2**31 - 1))
        anchors = np.random.default_rng(seed).choice(cells, size=int(max_cells), replace=False)
    else:
        anchors = cells
    log_px = get_marginal_ll(
        query.replace(indices=anchors, key=jax.random.fold_in(query.key, 1)),
        n_mc_samples=n_mc_samples,
        return_mean=False,
        n_mc_samples_per_pass=n_mc_samples_per_pass,
    )
    log_w = importance_log_weights(query, rows, u, int(code), anchors, log_px)
    return normalize_log_weights(log_w, truncation)
