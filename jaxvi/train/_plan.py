"""The training plan: scvi-tools' ``TrainingPlan`` options, the optimizer, the KL warm-up, the
data split, the default epoch count and the one rule for the number of steps per epoch."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxvi.module import ModelDef
from jaxvi.train._state import TrainState

__all__ = [
    "PlanConfig",
    "Plateau",
    "compute_kl_weight",
    "get_max_epochs_heuristic",
    "init_train_state",
    "make_optimizer",
    "split_indices",
    "steps_per_epoch",
]


@dataclasses.dataclass
class PlanConfig:
    """Training-plan options with scvi-tools' ``TrainingPlan`` names and defaults."""

    optimizer: str = "Adam"
    lr: float = 1e-3
    weight_decay: float = 1e-6
    eps: float = 0.01
    n_steps_kl_warmup: int | None = None
    n_epochs_kl_warmup: int | None = 400
    reduce_lr_on_plateau: bool = False
    lr_factor: float = 0.6
    lr_patience: int = 30
    lr_threshold: float = 0.0
    lr_scheduler_metric: str = "elbo_validation"
    lr_min: float = 0.0
    max_kl_weight: float = 1.0
    min_kl_weight: float = 0.0
    gradient_clip_val: float | None = None
    optimizer_creator: Callable[[float], optax.GradientTransformation] | None = None

    @classmethod
    def from_kwargs(cls, plan_kwargs: dict | None) -> PlanConfig:
        """Build from a ``plan_kwargs`` dict, naming unknown keys in the error."""
        plan_kwargs = dict(plan_kwargs or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(plan_kwargs) - names)
        if unknown:
            raise ValueError(f"Unknown plan_kwargs {unknown}; allowed: {sorted(names)}.")
        plan = cls(**plan_kwargs)
        if plan.optimizer not in ("Adam", "AdamW", "Custom"):
            raise ValueError(
                f"optimizer must be 'Adam', 'AdamW' or 'Custom', got {plan.optimizer!r}."
            )
        if plan.optimizer == "Custom" and plan.optimizer_creator is None:
            raise ValueError("optimizer='Custom' needs `optimizer_creator(lr)` in plan_kwargs.")
        return plan


def get_max_epochs_heuristic(
    n_obs: int, epochs_cap: int = 400, decay_at_n_obs: int = 20_000
) -> int:
    """scvi-tools' default epoch count ``min(round(20000 / n_obs * 400), 400)``, at least 1."""
    max_epochs = max(min(round((decay_at_n_obs / n_obs) * epochs_cap), epochs_cap), 1)
    if max_epochs == 1:
        warnings.warn(
            "The default number of maximum epochs has been set to 1 due to the large number "
            "of observations. Pass in `max_epochs` to the `train` function to control the "
            "number of epochs.",
            UserWarning,
            stacklevel=3,
        )
    return max_epochs


def compute_kl_weight(plan: PlanConfig, epoch: int, step: int | np.ndarray):
    """KL warm-up weight (``epoch`` 0-based); epoch mode takes precedence over step mode."""
    lo, hi = plan.min_kl_weight, plan.max_kl_weight
    if plan.n_epochs_kl_warmup:
        if epoch < plan.n_epochs_kl_warmup:
            return np.full(np.shape(step), lo + (hi - lo) * epoch / plan.n_epochs_kl_warmup)
        return np.full(np.shape(step), hi)
    if plan.n_steps_kl_warmup:
        step = np.asarray(step, np.float64)
        w = lo + (hi - lo) * step / plan.n_steps_kl_warmup
        return np.where(step < plan.n_steps_kl_warmup, w, hi)
    return np.full(np.shape(step), hi)


def make_optimizer(
    plan: PlanConfig, trainable=None, update_mask=None
) -> optax.GradientTransformation:
    """The reference optimizer, with the learning rate injected as a hyperparameter.

    ``Adam``: L2 weight decay added to the gradient, then Adam (``torch.optim.Adam``).
    ``AdamW``: decoupled decay. Clipping by global norm first when ``gradient_clip_val``.
    ``trainable``: a pytree of bools like the parameters (a model's
    :attr:`jaxvi.module.ModelDef.trainable`); other parameters are never updated, as PyTorch
    skips parameters without a gradient (no weight decay, no optimizer state).
    ``update_mask``: a pytree of bool arrays shaped like the parameters (scArches query
    models); entries where it is False get a zero gradient and a zero update, so neither the
    gradient nor weight decay ever moves them.
    """

    def build(learning_rate):
        if plan.optimizer == "Custom":
            core = plan.optimizer_creator(learning_rate)
        elif plan.optimizer == "AdamW":
            core = optax.adamw(learning_rate, eps=plan.eps, weight_decay=plan.weight_decay)
        else:
            core = optax.chain(
                optax.add_decayed_weights(plan.weight_decay),
                optax.adam(learning_rate, eps=plan.eps),
            )
        if plan.gradient_clip_val:
            core = optax.chain(optax.clip_by_global_norm(plan.gradient_clip_val), core)
        if trainable is not None:
            core = optax.masked(core, trainable)
        if update_mask is not None:
            core = optax.chain(_zero_frozen(update_mask), core, _zero_frozen(update_mask))
        return core

    return optax.inject_hyperparams(build)(learning_rate=plan.lr)


def _zero_frozen(update_mask) -> optax.GradientTransformation:
    """Set the entries where ``update_mask`` is False to exactly zero."""

    def update(updates, state, params=None):
        del params
        out = jax.tree_util.tree_map(lambda u, m: jnp.where(m, u, 0.0), updates, update_mask)
        return out, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def init_train_state(
    model_def: ModelDef, variables: dict, plan: PlanConfig, update_mask=None
) -> tuple[TrainState, optax.GradientTransformation]:
    """A fresh :class:`TrainState` (copied arrays, new optimizer state) and its optimizer.

    Parameters
    ----------
    model_def
        The model (:class:`jaxvi.module.ModelDef`); its ``trainable`` says which parameters
        the optimizer may update.
    variables
        ``{"params", "batch_stats"[, "buffers"]}`` to start from.
    plan
        The training plan (optimizer, learning rate, ...).
    update_mask
        Optional pytree of bool arrays shaped like the parameters (see :func:`make_optimizer`).
    """
    params = jax.tree_util.tree_map(jnp.array, variables["params"])
    tx = make_optimizer(plan, model_def.trainable(params), update_mask)
    state = TrainState(
        params=params,
        batch_stats=jax.tree_util.tree_map(jnp.array, variables.get("batch_stats", {})),
        buffers=dict(variables.get("buffers", {})),
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
    )
    return state, tx


def steps_per_epoch(n_cells: int, batch_size: int, drop_last: bool) -> int:
    """Minibatches in one pass over ``n_cells`` cells: the ONE rule for the step count.

    ``ceil(n_cells / batch_size)`` (the ragged last minibatch masked), or
    ``floor(n_cells / batch_size)`` with ``drop_last`` (the ragged last minibatch dropped).
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    if drop_last:
        return int(n_cells) // int(batch_size)
    return -(-int(n_cells) // int(batch_size))


def split_indices(
    n_obs: int,
    train_size: float | None = None,
    validation_size: float | None = None,
    batch_size: int = 128,
    shuffle: bool = True,
    seed: int | None = 0,
    drop_last: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scvi-tools' ``DataSplitter``: ``(train, validation, test)`` cell indices.

    ``n_train = ceil(train_size * n)`` (0.9 by default), validation the rest or
    ``floor(validation_size * n)``. When ``train_size`` was not given and the last training
    minibatch would hold 1 or 2 cells, those move to validation. The permutation is
    ``np.random.RandomState(seed).permutation(n)``: validation first, then train, then test.
    """
    train_size_is_none = train_size is None
    train_size = 0.9 if train_size is None else float(train_size)
    if not 0.0 < train_size <= 1.0:
        raise ValueError("Invalid train_size. Must be: 0 < train_size <= 1")
    n_train = math.ceil(train_size * n_obs)
    if validation_size is None:
        n_val = n_obs - n_train
    elif not 0.0 <= validation_size < 1.0:
        raise ValueError("Invalid validation_size. Must be 0 <= validation_size < 1")
    elif train_size + validation_size > 1:
        raise ValueError("train_size + validation_size must be between 0 and 1")
    else:
        n_val = math.floor(n_obs * validation_size)
    if n_train == 0:
        raise ValueError(f"With n_obs={n_obs} and train_size={train_size} the train set is empty.")
    leftover = n_train % batch_size
    if 0 < leftover < 3 and not drop_last:
        if not train_size_is_none:
            warnings.warn(
                f"Last batch will have a small size of {leftover} samples. Consider changing "
                f"batch_size from {batch_size} to avoid noisy batch-norm statistics.",
                UserWarning,
                stacklevel=3,
            )
        else:
            n_train -= leftover
            if n_val > 0:
                n_val += leftover
                warnings.warn(
                    f"{leftover} cells moved from training set to validation set. If you want "
                    "to avoid it please use train_size parameter during train.",
                    UserWarning,
                    stacklevel=3,
                )
    if n_train == 0:
        raise ValueError(
            f"No cells left to train on: {n_obs} cell(s) with train_size={train_size} and "
            f"batch_size={batch_size} (a last minibatch of 1-2 cells moves to validation). "
            "scVI needs more cells; or pass train_size explicitly."
        )
    perm = np.random.RandomState(seed=seed).permutation(n_obs) if shuffle else np.arange(n_obs)
    return perm[n_val : n_val + n_train], perm[:n_val], perm[n_val + n_train :]


@dataclasses.dataclass
class Plateau:
    """The learning-rate schedule of ``reduce_lr_on_plateau``:
    ``torch.optim.lr_scheduler.ReduceLROnPlateau`` (mode min, threshold_mode abs). As torch,
    a reduction by no more than ``eps`` (1e-8) is not applied."""

    factor: float
    patience: int
    threshold: float
    min_lr: float
    best: float = math.inf
    bad_epochs: int = 0
    eps: float = 1e-8

    def update(self, metric: float, lr: float) -> float:
        """The learning rate after an epoch whose monitored ``metric`` is given."""
        if metric < self.best - self.threshold:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.bad_epochs = 0
            new_lr = max(lr * self.factor, self.min_lr)
            return new_lr if lr - new_lr > self.eps else lr
        return lr
