"""The two blocks scANVI adds to scVI's: a classifier on the latent space and a Gaussian decoder.

They reproduce scvi-tools' ``scvi.module.Classifier`` and ``scvi.nn.Decoder`` on top of
:class:`~jaxvi.nn.FCLayers` and :class:`~jaxvi.nn.Dense` (PyTorch initialisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvi.nn._layers import Dense, FCLayers

__all__ = ["Classifier", "Decoder"]


class Classifier(nn.Module):
    """scvi-tools' ``Classifier``: ``FCLayers`` (when ``n_hidden > 0`` and ``n_layers > 0``),
    then a linear layer to ``n_labels`` outputs, then a softmax unless ``logits``.

    Submodules are named ``hidden`` (the ``FCLayers``, absent for a linear classifier) and
    ``output`` (the last linear layer).
    """

    n_labels: int
    n_hidden: int = 128
    n_layers: int = 1
    dropout_rate: float = 0.1
    logits: bool = False
    use_batch_norm: bool = True
    use_layer_norm: bool = False

    @property
    def is_linear(self) -> bool:
        """Whether the classifier is a single linear layer."""
        return self.n_hidden <= 0 or self.n_layers <= 0

    @nn.compact
    def __call__(
        self, z: jax.Array, *, training: bool, mask: jax.Array | None = None
    ) -> jax.Array:
        """Map ``z`` ``(..., cells, n_in)`` to logits or probabilities ``(..., cells, n_labels)``.

        ``mask`` ``(cells,)`` excludes padding cells from the batch-norm statistics.
        """
        h = z
        if not self.is_linear:
            h = FCLayers(
                self.n_hidden,
                (),
                self.n_layers,
                self.n_hidden,
                self.dropout_rate,
                self.use_batch_norm,
                self.use_layer_norm,
                name="hidden",
            )(z, training=training, mask=mask)
        out = Dense(self.n_labels, name="output")(h)
        return out if self.logits else nn.softmax(out, axis=-1)


class Decoder(nn.Module):
    """scvi-tools' Gaussian ``Decoder``: ``FCLayers`` without dropout, then ``p_m = W_m h`` and
    ``p_v = exp(W_v h)`` (no variance floor, unlike :class:`~jaxvi.nn.Encoder`).

    Submodules are named ``decoder``, ``mean_decoder`` and ``var_decoder``.
    """

    n_output: int
    n_cat_list: tuple[int, ...] = ()
    n_layers: int = 1
    n_hidden: int = 128
    use_batch_norm: bool = True
    use_layer_norm: bool = False
    inject_covariates: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cats: Sequence[jax.Array] = (),
        *,
        training: bool,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Decode ``x`` ``(..., cells, n_in)`` into ``(p_m, p_v)``, each ``(..., cells, n_out)``.

        ``cats`` are integer codes broadcastable to ``x.shape[:-1]``.
        """
        h = FCLayers(
            self.n_hidden,
            self.n_cat_list,
            self.n_layers,
            self.n_hidden,
            0.0,
            self.use_batch_norm,
            self.use_layer_norm,
            self.inject_covariates,
            name="decoder",
        )(x, cats, training=training, mask=mask)
        p_m = Dense(self.n_output, name="mean_decoder")(h)
        p_v = jnp.exp(Dense(self.n_output, name="var_decoder")(h))
        return p_m, p_v
