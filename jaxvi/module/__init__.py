"""Model definitions: the engine's contract (:class:`ModelDef`, :class:`LossOutput`) and the
pure Flax modules with their losses (scVI's :class:`VAE`, scANVI's :class:`SCANVAE`)."""

from jaxvi.module._base import KL_GLOBAL, KL_LOCAL, RECONSTRUCTION, LossOutput, ModelDef
from jaxvi.module._scanvae import (
    SCANVAE,
    HierarchyOutputs,
    SCANVAEConfig,
    SCANVAETerms,
    classification_metrics,
    init_scanvae_variables,
    scanvae_elbo,
    scanvae_loss,
    scanvae_model_def,
)
from jaxvi.module._vae import (
    VAE,
    ELBOTerms,
    GenerativeOutputs,
    InferenceOutputs,
    VAEConfig,
    init_variables,
    masked_mean,
    negative_log_likelihood,
    normal_kl,
    trainable_mask,
    vae_loss,
    vae_model_def,
)

__all__ = [
    "KL_GLOBAL",
    "KL_LOCAL",
    "RECONSTRUCTION",
    "SCANVAE",
    "VAE",
    "ELBOTerms",
    "GenerativeOutputs",
    "HierarchyOutputs",
    "InferenceOutputs",
    "LossOutput",
    "ModelDef",
    "SCANVAEConfig",
    "SCANVAETerms",
    "VAEConfig",
    "classification_metrics",
    "init_scanvae_variables",
    "init_variables",
    "masked_mean",
    "negative_log_likelihood",
    "normal_kl",
    "scanvae_elbo",
    "scanvae_loss",
    "scanvae_model_def",
    "trainable_mask",
    "vae_loss",
    "vae_model_def",
]
