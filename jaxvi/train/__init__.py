"""The training engine: scvi-tools' recipe as one compiled program per epoch, with
checkpoints (:mod:`jaxvi.train.checkpoint`)."""

from jaxvi.train import checkpoint  # noqa: E402  (needs _fit first)
from jaxvi.train._fit import (
    EpochInfo,
    FitProgress,
    NonFiniteError,
    PlanConfig,
    TrainingInterrupted,
    TrainState,
    compute_kl_weight,
    evaluate,
    fit,
    get_max_epochs_heuristic,
    init_train_state,
    make_evaluate,
    make_optimizer,
    make_train_epoch,
    split_indices,
)

__all__ = [
    "EpochInfo",
    "FitProgress",
    "NonFiniteError",
    "PlanConfig",
    "TrainState",
    "TrainingInterrupted",
    "checkpoint",
    "compute_kl_weight",
    "evaluate",
    "fit",
    "get_max_epochs_heuristic",
    "init_train_state",
    "make_evaluate",
    "make_optimizer",
    "make_train_epoch",
    "split_indices",
]
