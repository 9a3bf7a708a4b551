"""The training engine, for any :class:`~jaxvi.module.ModelDef`.

Layered from the inside out: the step (:func:`make_step`, ``step(key, state, batch, ...) ->
(state, info)``), the compiled epoch (:func:`make_train_epoch`, a ``lax.scan`` of the step over
the explicit minibatch grid of :func:`epoch_grid`), and the loop (:func:`fit`, one pass over
the blocks of a :class:`~jaxvi.data.DataSource` per epoch, with validation, LR plateau, early
stopping, the non-finite guard, signals and checkpoints, :mod:`jaxvi.train.checkpoint`). The
plan (:class:`PlanConfig`, the optimizer, the KL warm-up, the split, the step count) and the
state (:class:`TrainState`, :class:`EpochInfo`) are their own modules.
"""

from jaxvi.train import checkpoint
from jaxvi.train._epoch import epoch_grid, make_evaluate, make_step, make_train_epoch
from jaxvi.train._fit import evaluate, fit, history_metrics
from jaxvi.train._paired import PairedCells, paired_grid, paired_positions
from jaxvi.train._plan import (
    PlanConfig,
    Plateau,
    compute_kl_weight,
    get_max_epochs_heuristic,
    init_train_state,
    make_optimizer,
    split_indices,
    steps_per_epoch,
)
from jaxvi.train._state import (
    NON_FINITE_KINDS,
    EpochInfo,
    FitProgress,
    NonFiniteError,
    StepInfo,
    TrainingInterrupted,
    TrainState,
    variables_of,
)

__all__ = [
    "NON_FINITE_KINDS",
    "EpochInfo",
    "FitProgress",
    "NonFiniteError",
    "PairedCells",
    "PlanConfig",
    "Plateau",
    "StepInfo",
    "TrainState",
    "TrainingInterrupted",
    "checkpoint",
    "compute_kl_weight",
    "epoch_grid",
    "evaluate",
    "fit",
    "get_max_epochs_heuristic",
    "history_metrics",
    "init_train_state",
    "make_evaluate",
    "make_optimizer",
    "make_step",
    "make_train_epoch",
    "paired_grid",
    "paired_positions",
    "split_indices",
    "steps_per_epoch",
    "variables_of",
]
