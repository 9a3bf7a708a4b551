"""A model jaxvi has never seen, defined outside the package in a few lines: a Gaussian
autoencoder on log counts with an extra per-cell penalty and a scalar term. The engine trains
it through the :class:`~jaxvi.module.ModelDef` contract alone (tests/train/test_engine.py,
tests/parallel/test_sharding.py)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvi.module import LossOutput, ModelDef


class _AE(nn.Module):
    n_genes: int

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(8)(jnp.log1p(x)))
        return nn.Dense(self.n_genes)(h)


def gaussian_ae(n_genes: int) -> ModelDef:
    """A model the engine has never seen: no VAE, no batch norm, its own loss terms."""
    module = _AE(n_genes)

    def init(key):
        return {"params": module.init(key, jnp.ones((2, n_genes)))["params"], "batch_stats": {}}

    def loss(key, variables, batch, *, training, kl_weight=1.0):
        pred = module.apply({"params": variables["params"]}, batch.x)
        rec = 0.5 * jnp.sum(jnp.square(jnp.log1p(batch.x) - pred), axis=-1)
        penalty = 1e-2 * jnp.sum(jnp.square(pred), axis=-1)
        mask = jnp.ones_like(rec) if batch.mask is None else batch.mask
        per_cell = rec + kl_weight * penalty
        value = jnp.sum(per_cell * mask) / jnp.maximum(jnp.sum(mask), 1.0)
        terms = {"reconstruction_loss": rec, "penalty": penalty, "scale": jnp.float32(2.0)}
        return LossOutput(value, terms), variables["batch_stats"]

    return ModelDef("gaussian-ae", init, loss, lambda p: jax.tree_util.tree_map(lambda _: True, p))
