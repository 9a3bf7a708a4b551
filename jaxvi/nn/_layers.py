"""Neural-network building blocks of scVI, written as Flax Linen modules.

The blocks reproduce scvi-tools' ``FCLayers``, ``Encoder`` and ``DecoderSCVI`` exactly:
PyTorch initialisation laws, batch norm with PyTorch's momentum convention and its unbiased
running variance, layer norm without affine parameters, and one-hot covariates concatenated
after the hidden input of every injected layer.

Modules carry no train/eval state: ``training`` is a call argument, dropout randomness comes
from the ``"dropout"`` RNG stream and batch-norm statistics live in the ``"batch_stats"``
collection. Every block accepts an optional ``mask`` of shape ``(cells,)`` so that a padded,
ragged minibatch gives exactly the batch statistics of its real cells.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvi.nn._activations import get_var_activation

__all__ = [
    "BatchNorm",
    "Dense",
    "DecoderSCVI",
    "Encoder",
    "FCLayers",
    "LayerNorm",
    "one_hot_covariates",
]


def _torch_uniform(fan_in: int):
    """PyTorch's ``nn.Linear`` law, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for weight and bias."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Dense(nn.Module):
    """Affine layer ``y = x @ kernel + bias`` initialised like ``torch.nn.Linear``.

    ``kernel`` has shape ``(n_in, n_out)`` (the transpose of PyTorch's weight).
    """

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        fan_in = x.shape[-1]
        kernel = self.param("kernel", _torch_uniform(fan_in), (fan_in, self.features))
        y = x @ kernel
        if self.use_bias:
            y = y + self.param("bias", _torch_uniform(fan_in), (self.features,))
        return y


class BatchNorm(nn.Module):
    """``torch.nn.BatchNorm1d`` over the last axis, with an optional cell mask.

    Training mode normalises with the (masked) biased batch variance and updates the running
    variance with the unbiased one, as PyTorch does; ``momentum`` is PyTorch's convention
    (weight of the new batch). Evaluation mode uses the running statistics.

    Parameters
    ----------
    momentum
        Weight of the current batch in the running averages (scVI: 0.01).
    epsilon
        Added to the variance (scVI: 1e-3).
    """

    momentum: float = 0.01
    epsilon: float = 1e-3

    @nn.compact
    def __call__(
        self, x: jax.Array, *, training: bool, mask: jax.Array | None = None
    ) -> jax.Array:
        """Normalise ``x`` of shape ``(..., cells, features)``; ``mask`` is ``(cells,)``."""
        n_feat = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (n_feat,))
        bias = self.param("bias", nn.initializers.zeros, (n_feat,))
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (n_feat,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (n_feat,), jnp.float32)
        if training:
            x2 = x.reshape(-1, n_feat)
            if mask is None:
                w = jnp.ones((x2.shape[0], 1), x.dtype)
            else:
                w = jnp.broadcast_to(mask, x.shape[:-1]).reshape(-1, 1).astype(x.dtype)
            n = jnp.maximum(jnp.sum(w), 1.0)
            mean = jnp.sum(w * x2, axis=0) / n
            var = jnp.sum(w * jnp.square(x2 - mean), axis=0) / n
            if not self.is_initializing():
                unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
                ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
                ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
        else:
            mean, var = ra_mean.value, ra_var.value
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias


class LayerNorm(nn.Module):
    """``torch.nn.LayerNorm(elementwise_affine=False)`` over the last axis (eps 1e-5)."""

    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise ``x`` of shape ``(..., features)``."""
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.epsilon)


def one_hot_covariates(
    cats: Sequence[jax.Array], n_cat_list: Sequence[int], lead_shape: tuple[int, ...]
) -> list[jax.Array]:
    """One-hot encode categorical covariates, skipping those with a single category.

    Parameters
    ----------
    cats
        Integer codes, each of shape ``(cells,)``. Extra entries beyond ``n_cat_list`` are
        ignored, as in scvi-tools.
    n_cat_list
        Number of categories of each covariate; entries <= 1 add no columns.
    lead_shape
        Leading shape ``(..., cells)`` to broadcast the one-hots to.

    Returns
    -------
    List of float32 arrays of shape ``(*lead_shape, n_cat)``.
    """
    out = []
    for codes, n_cat in zip(cats, n_cat_list, strict=False):
        if n_cat > 1:
            oh = jax.nn.one_hot(codes, n_cat, dtype=jnp.float32)
            out.append(jnp.broadcast_to(oh, (*lead_shape, n_cat)))
    return out


class FCLayers(nn.Module):
    """scVI's stack of ``Dense -> BatchNorm -> LayerNorm -> ReLU -> Dropout`` blocks.

    Layer widths are ``[n_in] + (n_layers - 1) * [n_hidden] + [n_out]``. One-hot covariates
    are concatenated after the input of layer 0, and of every later layer when
    ``inject_covariates``. Submodules are named ``layer{i}_dense`` and ``layer{i}_bn``.
    """

    n_out: int
    n_cat_list: tuple[int, ...] = ()
    n_layers: int = 1
    n_hidden: int = 128
    dropout_rate: float = 0.1
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
    ) -> jax.Array:
        """Map ``x`` of shape ``(..., cells, n_in)`` to ``(..., cells, n_out)``."""
        widths = [self.n_hidden] * (self.n_layers - 1) + [self.n_out]
        onehots = one_hot_covariates(cats, self.n_cat_list, x.shape[:-1])
        for i, width in enumerate(widths):
            if onehots and (i == 0 or self.inject_covariates):
                x = jnp.concatenate([x, *onehots], axis=-1)
            x = Dense(width, name=f"layer{i}_dense")(x)
            if self.use_batch_norm:
                x = BatchNorm(name=f"layer{i}_bn")(x, training=training, mask=mask)
            if self.use_layer_norm:
                x = LayerNorm()(x)
            x = nn.relu(x)
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not training)(x)
        return x


class Encoder(nn.Module):
    """scVI's Gaussian encoder: ``q_m = W_m h``, ``q_v = act(W_v h) + var_eps``.

    ``var_activation`` names ``act`` (:mod:`jaxvi.nn._activations`; ``"exp"`` as scvi-tools).

    Returns the mean and variance, each of shape ``(..., cells, n_output)``; sampling and the
    ``"ln"`` softmax transform are done by the caller with an explicit key.
    """

    n_output: int
    n_cat_list: tuple[int, ...] = ()
    n_layers: int = 1
    n_hidden: int = 128
    dropout_rate: float = 0.1
    use_batch_norm: bool = True
    use_layer_norm: bool = False
    inject_covariates: bool = True
    var_eps: float = 1e-4
    var_activation: str = "exp"

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cats: Sequence[jax.Array] = (),
        *,
        training: bool,
        mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Encode ``x`` of shape ``(..., cells, n_in)`` into ``(q_m, q_v)``."""
        h = FCLayers(
            self.n_hidden,
            self.n_cat_list,
            self.n_layers,
            self.n_hidden,
            self.dropout_rate,
            self.use_batch_norm,
            self.use_layer_norm,
            self.inject_covariates,
            name="encoder",
        )(x, cats, training=training, mask=mask)
        q_m = Dense(self.n_output, name="mean_encoder")(h)
        act = get_var_activation(self.var_activation)
        q_v = act(Dense(self.n_output, name="var_encoder")(h)) + self.var_eps
        return q_m, q_v


class DecoderSCVI(nn.Module):
    """scVI's decoder: hidden layers, then the scale, dispersion and dropout heads.

    ``px_scale`` is a softmax over genes (softplus when size factors are given),
    ``px_rate = exp(library) * px_scale``, ``px_dropout`` are zero-inflation logits and
    ``px_r`` is the per-cell dispersion head (used by ``dispersion="gene-cell"``). Heads whose
    output is not needed are skipped at apply time but always created at initialisation, so
    the parameter tree matches scvi-tools' state dict.
    """

    n_output: int
    n_cat_list: tuple[int, ...] = ()
    n_layers: int = 1
    n_hidden: int = 128
    use_batch_norm: bool = True
    use_layer_norm: bool = False
    inject_covariates: bool = True
    scale_activation: str = "softmax"

    @nn.compact
    def __call__(
        self,
        z: jax.Array,
        library: jax.Array,
        cats: Sequence[jax.Array] = (),
        *,
        training: bool,
        mask: jax.Array | None = None,
        need_px_r: bool = True,
        need_px_dropout: bool = True,
    ) -> tuple[jax.Array, jax.Array | None, jax.Array, jax.Array | None]:
        """Decode.

        Parameters
        ----------
        z
            Decoder input, shape ``(..., cells, n_in)``.
        library
            Log library size, shape ``(..., cells, 1)``.

        Returns
        -------
        ``(px_scale, px_r, px_rate, px_dropout)``, each ``(..., cells, n_output)``;
        ``px_r`` / ``px_dropout`` are None when not requested.
        """
        px_h = FCLayers(
            self.n_hidden,
            self.n_cat_list,
            self.n_layers,
            self.n_hidden,
            0.0,
            self.use_batch_norm,
            self.use_layer_norm,
            self.inject_covariates,
            name="px_decoder",
        )(z, cats, training=training, mask=mask)
        unnorm = Dense(self.n_output, name="px_scale_decoder")(px_h)
        if self.scale_activation == "softplus":
            px_scale = nn.softplus(unnorm)
        else:
            px_scale = nn.softmax(unnorm, axis=-1)
        init = self.is_initializing()
        px_r = Dense(self.n_output, name="px_r_decoder")(px_h) if (need_px_r or init) else None
        px_dropout = (
            Dense(self.n_output, name="px_dropout_decoder")(px_h)
            if (need_px_dropout or init)
            else None
        )
        px_rate = jnp.exp(library) * px_scale
        return px_scale, px_r, px_rate, px_dropout
