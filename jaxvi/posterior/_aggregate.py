"""The aggregated posterior of a set of cells, and how probable each cell is under it
(scvi-tools' ``VAEMixin.get_aggregated_posterior`` and ``differential_abundance``).

The aggregated posterior of cells ``1..n`` is the equal-weight mixture of their latent
posteriors, each component a product over latent dimensions of Student-t (``dof``
degrees of freedom) or, with ``dof=None``, normal laws.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from jaxvi.data import pad_indices

__all__ = ["aggregated_posterior", "aggregated_log_prob"]


def aggregated_posterior(loc, scale, dof: float | None = 3.0) -> dist.MixtureSameFamily:
    """Equal-weight mixture of the cells' latent laws.

    Parameters
    ----------
    loc, scale
        ``(cells, n_latent)`` location and scale of each cell's component.
    dof
        Degrees of freedom of the Student-t components; ``None``: normal components.

    Returns
    -------
    A numpyro ``MixtureSameFamily`` with event shape ``(n_latent,)``: ``log_prob(u)`` takes
    ``(..., n_latent)`` points and returns ``(...)``.
    """
    loc, scale = jnp.asarray(loc), jnp.asarray(scale)
    if loc.ndim != 2 or loc.shape != scale.shape or loc.shape[0] == 0:
        raise ValueError(
            f"loc and scale must be (cells, n_latent) with at least one cell, got "
            f"{loc.shape} and {scale.shape}."
        )
    components = dist.Normal(loc, scale) if dof is None else dist.StudentT(dof, loc, scale)
    mixing = dist.Categorical(logits=jnp.ones(loc.shape[0], loc.dtype))
    return dist.MixtureSameFamily(mixing, components.to_event(1))


@functools.partial(jax.jit, static_argnames="dof")
def _log_prob(loc, scale, points, dof):
    return aggregated_posterior(loc, scale, dof).log_prob(points)


def aggregated_log_prob(
    loc, scale, points, dof: float | None = 3.0, batch_size: int = 128
) -> np.ndarray:
    """``log_prob`` of ``points`` under :func:`aggregated_posterior` ``(loc, scale, dof)``,
    ``batch_size`` points at a time (a chunk holds ``batch_size x cells x n_latent``
    component terms).

    Parameters
    ----------
    loc, scale
        ``(cells, n_latent)`` components.
    points
        ``(n_points, n_latent)``.

    Returns
    -------
    ``(n_points,)`` float32.
    """
    points = np.asarray(points, np.float32)
    n = len(points)
    if n == 0:
        return np.zeros(0, np.float32)
    loc, scale = jnp.asarray(loc, jnp.float32), jnp.asarray(scale, jnp.float32)
    dof = None if dof is None else float(dof)
    # every chunk the same shape (one compiled program); the padding repeats point 0
    rows, _ = pad_indices(np.arange(n), max(1, min(int(batch_size), n)))
    out = [np.asarray(_log_prob(loc, scale, jnp.asarray(points[r]), dof)) for r in rows]
    return np.concatenate(out)[:n]
