"""What training carries and reports: the state, the per-epoch sums, where a fit stands, and
the two ways a fit ends early (a signal, a non-finite value)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import NamedTuple

import jax
import optax

__all__ = [
    "EpochInfo",
    "FitProgress",
    "NON_FINITE_KINDS",
    "NonFiniteError",
    "StepInfo",
    "TrainState",
    "TrainingInterrupted",
    "variables_of",
]


class TrainState(NamedTuple):
    """Everything carried from step to step (a pytree).

    Attributes
    ----------
    params
        Trained parameters (the ``"params"`` collection of the model's variables).
    batch_stats
        Batch-norm running statistics (``{}`` when the model has none).
    buffers
        Constants saved with the model but never trained (``{}`` when none).
    opt_state
        The optax state, with the learning rate as an injected hyperparameter.
    step
        ``()`` int32: the global step (finite steps taken).
    """

    params: dict
    batch_stats: dict
    buffers: dict
    opt_state: optax.OptState
    step: jax.Array


def variables_of(state: TrainState) -> dict:
    """The model's variables pytree (``{"params", "batch_stats"[, "buffers"]}``) of ``state``."""
    out = {"params": state.params, "batch_stats": state.batch_stats}
    if state.buffers:
        out["buffers"] = state.buffers
    return out


class StepInfo(NamedTuple):
    """What one training step reports (device scalars; summed over steps by the epoch).

    Attributes
    ----------
    n_obs
        ``()`` real cells of the minibatch.
    loss_sum
        ``()`` the loss times ``n_obs``.
    terms
        ``{name: ()}``: each named term of the loss (:class:`jaxvi.module.LossOutput`), a
        per-cell term summed over the real cells, a scalar term times ``n_obs``.
    kind
        ``()`` int32: 0 when all is finite, else 1 loss, 2 gradient, 3 optimizer update
        (see :data:`NON_FINITE_KINDS`).
    """

    n_obs: jax.Array
    loss_sum: jax.Array
    terms: Mapping[str, jax.Array]
    kind: jax.Array


class EpochInfo(NamedTuple):
    """Sums over the cells of the finite steps of one epoch (``()`` float32 device scalars),
    and where the first non-finite step was.

    ``terms`` holds the sum of each named term the model's loss reports (see
    :class:`StepInfo`), whatever the model; dividing by ``n_obs`` gives the epoch's means.
    """

    n_obs: jax.Array
    loss_sum: jax.Array
    terms: Mapping[str, jax.Array]
    bad_step: jax.Array | int = -1  # () int32: first step with a non-finite value, or -1
    bad_kind: jax.Array | int = 0  # () int32: 1 loss, 2 gradient, 3 optimizer update


NON_FINITE_KINDS = {
    1: (
        "loss",
        "the model diverged (learning rate too high for this data: lower plan_kwargs['lr'] or "
        "set gradient_clip_val), or a likelihood / covariate produced NaN for this minibatch",
    ),
    2: (
        "gradient",
        "exploding gradients: lower plan_kwargs['lr'] or set gradient_clip_val",
    ),
    3: (
        "optimizer update",
        "the optimizer produced a non-finite step from finite gradients (check a custom "
        "optimizer, eps or the learning rate)",
    ),
}


@dataclasses.dataclass
class FitProgress:
    """Where a :func:`~jaxvi.train.fit` stands after its last completed epoch; JSON-friendly,
    so a checkpoint can restore it and continue exactly."""

    epoch: int = 0  # epochs of this fit completed (the next local epoch to run)
    rows: dict = dataclasses.field(default_factory=dict)  # metric -> [[epoch, value], ...]
    plateau_best: float = math.inf
    plateau_bad_epochs: int = 0
    stop_best: float = math.inf
    stop_wait: int = 0
    stopped_early: bool = False


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM arrived during training; raised after the running epoch completed.

    ``state``, ``history`` and ``progress`` describe the last completed epoch;
    ``signum`` is the signal received.
    """

    def __init__(self, message, *, state, history, progress, signum):
        super().__init__(message)
        self.state, self.history, self.progress, self.signum = state, history, progress, signum


class NonFiniteError(FloatingPointError):
    """A non-finite loss, gradient or update; ``state`` holds the last finite parameters.

    Attributes: ``epoch``, ``step`` (within the epoch), ``global_step``, ``kind``
    (``"loss"``, ``"gradient"``, ``"optimizer update"``), ``state``, ``history``,
    ``progress`` (the epochs completed before).
    """

    def __init__(self, message, *, epoch, step, global_step, kind, state, history, progress):
        super().__init__(message)
        self.epoch, self.step, self.global_step, self.kind = epoch, step, global_step, kind
        self.state, self.history, self.progress = state, history, progress
