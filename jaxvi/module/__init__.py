"""Model definitions: the engine's contract (:class:`ModelDef`, :class:`LossOutput`) and the
pure Flax modules with their losses (scVI's :class:`VAE`)."""

from jaxvi.module._base import KL_GLOBAL, KL_LOCAL, RECONSTRUCTION, LossOutput, ModelDef
from jaxvi.module._vae import (
    VAE,
    ELBOTerms,
    GenerativeOutputs,
    InferenceOutputs,
    VAEConfig,
    init_variables,
    normal_kl,
    trainable_mask,
    vae_loss,
    vae_model_def,
)

__all__ = [
    "KL_GLOBAL",
    "KL_LOCAL",
    "RECONSTRUCTION",
    "VAE",
    "ELBOTerms",
    "GenerativeOutputs",
    "InferenceOutputs",
    "LossOutput",
    "ModelDef",
    "VAEConfig",
    "init_variables",
    "normal_kl",
    "trainable_mask",
    "vae_loss",
    "vae_model_def",
]
