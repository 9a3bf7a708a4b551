"""Neural-network building blocks initialised like their PyTorch counterparts."""

from jaxvi.nn._layers import (
    BatchNorm,
    DecoderSCVI,
    Dense,
    Encoder,
    FCLayers,
    LayerNorm,
    one_hot_covariates,
)

__all__ = [
    "BatchNorm",
    "DecoderSCVI",
    "Dense",
    "Encoder",
    "FCLayers",
    "LayerNorm",
    "one_hot_covariates",
]
