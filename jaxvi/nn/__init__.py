"""Neural-network building blocks initialised like their PyTorch counterparts."""

from jaxvi.nn._activations import (
    get_var_activation,
    register_var_activation,
    var_activation_name,
)
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
    "get_var_activation",
    "one_hot_covariates",
    "register_var_activation",
    "var_activation_name",
]
