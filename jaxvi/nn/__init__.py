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
from jaxvi.nn._scanvi import Classifier, Decoder

__all__ = [
    "BatchNorm",
    "Classifier",
    "Decoder",
    "DecoderSCVI",
    "Dense",
    "Encoder",
    "FCLayers",
    "LayerNorm",
    "one_hot_covariates",
]
