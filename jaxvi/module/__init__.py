"""Model definitions: pure Flax modules and their losses (the scVI ``VAE``)."""

from jaxvi.module._vae import (
    VAE,
    GenerativeOutputs,
    InferenceOutputs,
    LossOutput,
    VAEConfig,
    init_variables,
    normal_kl,
    trainable_mask,
    vae_loss,
)

__all__ = [
    "VAE",
    "GenerativeOutputs",
    "InferenceOutputs",
    "LossOutput",
    "VAEConfig",
    "init_variables",
    "normal_kl",
    "trainable_mask",
    "vae_loss",
]
