"""Training engine: the reference recipe as one compiled program per epoch.

One epoch is a single ``jax.jit`` call: a ``lax.scan`` over minibatches of a fresh on-device
permutation of the training cells (the ragged last minibatch masked, never padded with
duplicated cells), each step an ELBO value-and-gradient and an optax update. The KL weight of
every step and the learning rate are arguments/optimizer state, so nothing recompiles between
epochs; metrics stay on the device and are read once per epoch.

The recipe is scvi-tools' ``TrainingPlan`` + ``Trainer`` defaults: Adam(lr 1e-3, eps 0.01)
with coupled weight decay 1e-6, KL warm-up over 400 epochs, optional reduce-LR-on-plateau,
gradient clipping and early stopping on ``elbo_validation``, a seeded 90/10 split.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import warnings
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd

from jaxvi.data import CellData, StreamingData, gather, pad_indices
from jaxvi.module import VAE, trainable_mask, vae_loss
from jaxvi.parallel import replicate, to_host

__all__ = [
    "EpochInfo",
    "FitProgress",
    "NonFiniteError",
    "PlanConfig",
    "TrainState",
    "compute_kl_weight",
    "evaluate",
    "fit",
    "get_max_epochs_heuristic",
    "init_train_state",
    "make_optimizer",
    "make_train_epoch",
    "split_indices",
    "TrainingInterrupted",
]


class TrainState(NamedTuple):
    """Everything carried from step to step (a pytree)."""

    params: dict
    batch_stats: dict
    buffers: dict
    opt_state: optax.OptState
    step: jax.Array  # () int32, the global step


class EpochInfo(NamedTuple):
    """Sums over the cells of the finite steps of one epoch (() float32 device scalars), and
    where the first non-finite step was."""

    n_obs: jax.Array
    loss_sum: jax.Array  # sum over minibatches of loss * minibatch size
    reconstruction_sum: jax.Array
    kl_local_sum: jax.Array
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
    """Where a :func:`fit` stands after its last completed epoch; JSON-friendly, so a
    checkpoint can restore it and continue exactly."""

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
    ``trainable``: a pytree of bools like the parameters (see
    :func:`jaxvi.module.trainable_mask`); other parameters are never updated, as PyTorch
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
    module: VAE, variables: dict, plan: PlanConfig, update_mask=None
) -> tuple[TrainState, optax.GradientTransformation]:
    """A fresh :class:`TrainState` (copied arrays, new optimizer state) and its optimizer."""
    params = jax.tree_util.tree_map(jnp.array, variables["params"])
    tx = make_optimizer(plan, trainable_mask(module.config, params), update_mask)
    state = TrainState(
        params=params,
        batch_stats=jax.tree_util.tree_map(jnp.array, variables.get("batch_stats", {})),
        buffers=dict(variables.get("buffers", {})),
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
    )
    return state, tx


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


def _variables(state: TrainState) -> dict:
    out = {"params": state.params, "batch_stats": state.batch_stats}
    if state.buffers:
        out["buffers"] = state.buffers
    return out


def _tree_sum(tree) -> jax.Array:
    leaves = [jnp.sum(x) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.sum(jnp.stack(leaves)) if leaves else jnp.float32(0.0)


def make_train_epoch(
    module: VAE,
    tx: optax.GradientTransformation,
    batch_size: int,
    guard: bool | str = "step",
    network_training: bool = True,
):
    """Compile-once epoch function.

    ``network_training=False`` computes the loss with the network in evaluation mode (no
    dropout, batch norm with its fixed running statistics), as scvi-tools 1.4.2 trains a
    scArches query model.

    ``guard`` chooses how non-finite values are caught:

    ``"step"`` (or True)
        Every step checks that its loss, gradients and optimizer update are finite (one sum
        per tree); from the first step that fails, parameter updates are zeroed and
        batch-norm statistics and the step counter kept, so the returned state holds the
        parameters of the last finite step (the optimizer moments are then not meaningful),
        and ``EpochInfo.bad_step`` / ``bad_kind`` say where and what failed (metrics cover
        the finite steps only). ``state`` is donated.
    ``"detect"``
        Nearly free: each step only tests its (scalar) loss, and the parameters are summed
        once at the end of the epoch. ``bad_step`` is the first step with a non-finite loss,
        or ``n_steps`` when only the parameters went non-finite; -1 if all is well. The
        state is *not* donated, so the caller can replay the epoch from it with ``"step"``
        to locate the failure and recover the last finite parameters (what :func:`fit`
        does).
    False
        No checks.

    Returns
    -------
    ``epoch(state, data, train_idx, key, kl_weights) -> (state, EpochInfo)`` where
    ``train_idx`` is ``(n_train,)`` int32 and ``kl_weights`` is ``(n_steps,)`` float32 with
    ``n_steps = ceil(n_train / batch_size)``.
    """
    if guard is True:
        guard = "step"
    if guard not in ("step", "detect", False):
        raise ValueError(f"guard must be 'step', 'detect' or False, got {guard!r}.")

    def step(state: TrainState, data: CellData, idx, mask, key, kl_weight, healthy):
        batch = gather(data, idx, mask)

        def loss_fn(params):
            variables = _variables(state._replace(params=params))
            out, new_stats = vae_loss(
                module, variables, batch, key=key, training=network_training, kl_weight=kl_weight
            )
            return out.loss, (out, new_stats)

        (loss, (out, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        n = jnp.sum(mask)
        sums = (
            n,
            loss * n,
            jnp.sum(out.reconstruction_loss * mask),
            jnp.sum((out.kl_z + out.kl_l) * mask),
        )
        if guard != "step":
            params = optax.apply_updates(state.params, updates)
            new = TrainState(params, new_stats, state.buffers, opt_state, state.step + 1)
            kind = jnp.where(jnp.isfinite(loss), 0, 1) if guard == "detect" else 0
            return new, sums, jnp.int32(kind)
        # One scalar per tree: a NaN or inf anywhere makes the sum non-finite.
        # Non-finite gradients give non-finite Adam updates, so the update sum covers both;
        # the gradient sum is only evaluated (lax.cond) to name the culprit.
        loss_ok = jnp.isfinite(loss)
        updates_ok = jnp.isfinite(_tree_sum(updates))
        grads_ok = jax.lax.cond(
            updates_ok, lambda: jnp.bool_(True), lambda: jnp.isfinite(_tree_sum(grads))
        )
        kind = jnp.where(~loss_ok, 1, jnp.where(~grads_ok, 2, jnp.where(~updates_ok, 3, 0)))
        ok = (kind == 0) & healthy
        # Zeroed updates fuse into the elementwise optimizer arithmetic: parameters stay at
        # the last finite step at no extra pass over memory. Small trees are selected.
        updates = jax.tree_util.tree_map(lambda u: jnp.where(ok, u, 0.0), updates)
        params = optax.apply_updates(state.params, updates)
        stats = jax.tree_util.tree_map(
            lambda a, b: jnp.where(ok, a, b), new_stats, state.batch_stats
        )
        new = TrainState(
            params, stats, state.buffers, opt_state, state.step + ok.astype(jnp.int32)
        )
        return new, sums, kind.astype(jnp.int32)

    def epoch(state: TrainState, data: CellData, train_idx, key, kl_weights):
        n_train = train_idx.shape[0]
        n_steps = kl_weights.shape[0]
        k_perm, k_steps = jax.random.split(key)
        perm = jax.random.permutation(k_perm, train_idx)
        n_used = min(n_train, n_steps * batch_size)  # fewer when the last batch is dropped
        pad = n_steps * batch_size - n_used
        idx = jnp.concatenate([perm[:n_used], jnp.zeros((pad,), perm.dtype)])
        idx = idx.reshape(n_steps, batch_size)
        mask = (jnp.arange(n_steps * batch_size) < n_used).astype(jnp.float32)
        mask = mask.reshape(n_steps, batch_size)

        def body(carry, xs):
            state, bad_step, bad_kind = carry
            i, idx_i, mask_i, kl_i = xs
            new, sums, kind = step(
                state, data, idx_i, mask_i, jax.random.fold_in(k_steps, i), kl_i, bad_step < 0
            )
            if guard != "step":
                first = (kind != 0) & (bad_step < 0)
                bad_step = jnp.where(first, i, bad_step)
                bad_kind = jnp.where(first, kind, bad_kind)
                return (new, bad_step, bad_kind), sums
            first = (kind != 0) & (bad_step < 0)
            ok = (kind == 0) & (bad_step < 0)
            bad_step = jnp.where(first, i, bad_step)
            bad_kind = jnp.where(first, kind, bad_kind)
            sums = tuple(jnp.where(ok, v, 0.0) for v in sums)
            return (new, bad_step, bad_kind), sums

        carry = (state, jnp.int32(-1), jnp.int32(0))
        xs = (jnp.arange(n_steps, dtype=jnp.int32), idx, mask, kl_weights.astype(jnp.float32))
        (state, bad_step, bad_kind), sums = jax.lax.scan(body, carry, xs)
        if guard == "detect":
            params_ok = jnp.isfinite(_tree_sum(state.params))
            bad_step = jnp.where((bad_step < 0) & ~params_ok, n_steps, bad_step)
        return state, EpochInfo(*(jnp.sum(v) for v in sums), bad_step, bad_kind)

    return jax.jit(epoch, donate_argnums=() if guard == "detect" else (0,))


def make_evaluate(module: VAE):
    """Jitted per-cell ELBO terms in evaluation mode (running BN statistics, no dropout).

    Returns ``evaluate(variables, data, idx, key) -> (rec, kl_z, kl_l)`` for ``idx`` of shape
    ``(n_chunks, batch)``, each output of that shape; one z sample per cell (as scvi-tools'
    ``get_elbo`` and validation), or the posterior mean when ``key`` is None.
    """

    def run(variables, data, idx, key):
        def body(_, xs):
            i, idx_i = xs
            batch = gather(data, idx_i)
            k = None if key is None else jax.random.fold_in(key, i)
            out, _ = vae_loss(module, variables, batch, key=k, training=False)
            return None, (out.reconstruction_loss, out.kl_z, out.kl_l)

        _, outs = jax.lax.scan(body, None, (jnp.arange(idx.shape[0]), idx))
        return outs

    return jax.jit(run)


def evaluate(evaluate_fn, variables, data: CellData, indices: np.ndarray, key, batch_size: int):
    """Per-cell ``(rec, kl_z, kl_l)`` as host float64 arrays of shape ``(len(indices),)``."""
    idx, mask = pad_indices(np.asarray(indices), batch_size)
    rec, kl_z, kl_l = evaluate_fn(variables, data, idx, key)
    keep = mask.reshape(-1) > 0
    return tuple(to_host(a).astype(np.float64).reshape(-1)[keep] for a in (rec, kl_z, kl_l))


@dataclasses.dataclass
class _Plateau:
    """``torch.optim.lr_scheduler.ReduceLROnPlateau`` (mode min, threshold_mode abs)."""

    factor: float
    patience: int
    threshold: float
    min_lr: float
    best: float = math.inf
    bad_epochs: int = 0

    def update(self, metric: float, lr: float) -> float:
        if metric < self.best - self.threshold:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.bad_epochs = 0
            return max(lr * self.factor, self.min_lr)
        return lr


class _SignalCatcher:
    """Turn the first SIGINT / SIGTERM into a flag checked between epochs (main thread only);
    a second one raises ``KeyboardInterrupt`` at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, write):
        self.signum = None
        self.write = write
        self.previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        self.write(
            f"Received {signal.Signals(signum).name}: stopping after the running epoch "
            "(send it again to stop at once, losing this epoch)."
        )

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False


def fit(
    module: VAE,
    state: TrainState,
    data: CellData,
    *,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    plan: PlanConfig,
    max_epochs: int,
    batch_size: int = 128,
    seed: int = 0,
    check_val_every_n_epoch: int | None = None,
    early_stopping: bool = False,
    early_stopping_monitor: str = "elbo_validation",
    early_stopping_patience: int = 45,
    early_stopping_min_delta: float = 0.0,
    early_stopping_mode: str = "min",
    early_stopping_warmup_epochs: int = 0,
    progress_bar: bool = True,
    history: dict[str, pd.DataFrame] | None = None,
    epoch_offset: int = 0,
    drop_last: bool = False,
    progress: FitProgress | None = None,
    on_epoch_end: Callable[[TrainState, FitProgress], None] | None = None,
    catch_signals: bool = True,
    guard: bool = True,
    update_mask=None,
    network_training: bool = True,
):
    """Train for up to ``max_epochs`` epochs and return ``(state, history, epoch_fn)``.

    ``history`` maps scvi-tools' metric names to one-column DataFrames indexed by epoch.
    ``epoch_fn`` is the compiled epoch (its ``_cache_size()`` counts compilations).
    ``drop_last`` drops the ragged last minibatch of each epoch instead of masking it.
    ``data`` may also be a :class:`jaxvi.data.StreamingData` (cells read from disk in
    blocks). With ``data`` sharded over a mesh (:func:`jaxvi.parallel.sharded_cell_data`)
    training is data-parallel: ``state`` is replicated over the mesh here and comes back
    replicated.

    ``progress`` (from a checkpoint) continues a fit where it stood: the next epoch, the
    metrics so far, the LR-plateau and early-stopping counters; with the matching ``state``
    the result is bit-identical to an uninterrupted fit. ``on_epoch_end(state, progress)``
    runs after every completed epoch (checkpointing).

    Raises
    ------
    TrainingInterrupted
        After the running epoch, when SIGINT or SIGTERM arrived (``catch_signals``).
    NonFiniteError
        When a step's loss, gradient or update is not finite (``guard``); it holds the
        state of the last finite step.

    ``early_stopping_warmup_epochs``: the first this many checks of the monitored metric
    neither count as improvements nor as patience (scvi-tools' ``LoudEarlyStopping``).
    ``update_mask`` freezes parameter entries (:func:`make_optimizer`);
    ``network_training=False`` trains in evaluation mode (:func:`make_train_epoch`).
    """
    from tqdm.auto import tqdm

    if len(train_idx) == 0:
        raise ValueError("The training set is empty.")
    if early_stopping and check_val_every_n_epoch is None:
        check_val_every_n_epoch = 1
    if plan.reduce_lr_on_plateau:
        check_val_every_n_epoch = 1
    validate = check_val_every_n_epoch is not None
    if (validate or early_stopping) and len(val_idx) == 0:
        if early_stopping or plan.reduce_lr_on_plateau:
            raise ValueError(
                "Early stopping / reduce_lr_on_plateau need a validation set; use train_size < 1."
            )
        validate = False
    tx = make_optimizer(plan, trainable_mask(module.config, state.params), update_mask)
    detect = "detect" if guard else False
    epoch_fn = make_train_epoch(
        module, tx, batch_size, guard=detect, network_training=network_training
    )
    replay_fn = None  # the per-step guarded epoch, compiled only if an epoch fails
    eval_fn = make_evaluate(module)
    stream = data if isinstance(data, StreamingData) else None
    if stream is not None:
        n_steps = stream.n_steps(batch_size, drop_last)
        if n_steps == 0:
            raise ValueError("drop_last=True with fewer training cells than batch_size.")
    elif drop_last:
        n_steps = len(train_idx) // batch_size
        if n_steps == 0:
            raise ValueError("drop_last=True with fewer training cells than batch_size.")
    else:
        n_steps = -(-len(train_idx) // batch_size)
        last = len(train_idx) - (n_steps - 1) * batch_size
        if last == 1 and module.config.use_batch_norm != "none":
            raise ValueError(
                f"The last training minibatch would hold a single cell ({len(train_idx)} "
                f"training cells, batch_size={batch_size}), and batch norm needs more than "
                "one value per channel in training. Change batch_size or train_size, or pass "
                "datasplitter_kwargs={'drop_last': True}."
            )
    mesh = data.mesh
    k_train, k_val = jax.random.split(jax.random.key(seed))

    def placed(tree):  # replicated over the mesh, or left to JAX's default device
        return tree if mesh is None else replicate(tree, mesh)

    if mesh is not None:
        state = placed(state)
        if batch_size % mesh.size:
            warnings.warn(
                f"batch_size {batch_size} is not a multiple of the {mesh.size} devices; "
                "minibatches are computed replicated (no speed-up).",
                UserWarning,
                stacklevel=3,
            )
    train_idx_dev = placed(np.asarray(train_idx, np.int32))
    if mesh is None:
        train_idx_dev = jnp.asarray(train_idx_dev)

    def run_epoch(fn, state, key, kl_w):
        if stream is not None:
            return stream.run_epoch(fn, state, key, kl_w, batch_size, drop_last)
        return fn(state, data, train_idx_dev, key, placed(np.asarray(kl_w, np.float32)))

    progress = FitProgress() if progress is None else dataclasses.replace(progress)
    progress.rows = {k: [list(r) for r in v] for k, v in progress.rows.items()}
    plateau = _Plateau(
        plan.lr_factor,
        plan.lr_patience,
        plan.lr_threshold,
        plan.lr_min,
        progress.plateau_best,
        progress.plateau_bad_epochs,
    )
    sign = 1.0 if early_stopping_mode == "min" else -1.0
    start = progress.epoch
    stop = start if progress.stopped_early else max(start, max_epochs)
    bar = tqdm(
        range(start, stop),
        disable=not progress_bar,
        desc="Training",
        unit="epoch",
        initial=start,
        total=stop,
    )
    catcher = _SignalCatcher(lambda m: bar.write(m, file=sys.stderr)) if catch_signals else None
    try:
        if catcher is not None:
            catcher.__enter__()
        for local_epoch in bar:
            epoch = epoch_offset + local_epoch
            global_step = int(to_host(state.step))
            kl_w = compute_kl_weight(plan, epoch, np.arange(global_step, global_step + n_steps))
            key = placed(jax.random.fold_in(k_train, epoch))
            start_state = state
            state, info = run_epoch(epoch_fn, state, key, kl_w)
            info = jax.tree_util.tree_map(to_host, info)
            if guard and int(info.bad_step) >= 0:
                # Replay the epoch with per-step checks: same keys, same minibatches.
                if replay_fn is None:
                    replay_fn = make_train_epoch(
                        module, tx, batch_size, guard="step", network_training=network_training
                    )
                state, info = run_epoch(replay_fn, start_state, key, kl_w)
                info = jax.tree_util.tree_map(to_host, info)
            del start_state
            if int(info.bad_step) >= 0:
                what, hint = NON_FINITE_KINDS[int(info.bad_kind)]
                step = int(info.bad_step)
                raise NonFiniteError(
                    f"Training stopped: the {what} became non-finite (NaN or inf) at epoch "
                    f"{epoch}, step {step} of {n_steps} (global step {global_step + step}). "
                    f"The model keeps the parameters of the last finite step. Likely cause: "
                    f"{hint}.",
                    epoch=epoch,
                    step=step,
                    global_step=global_step + step,
                    kind=what,
                    state=state,
                    history=_append_history(history, progress.rows),
                    progress=progress,
                )
            n = float(info.n_obs)
            rec, kl_local = float(info.reconstruction_sum) / n, float(info.kl_local_sum) / n
            metrics = {
                "train_loss": float(info.loss_sum) / n,
                "elbo_train": rec + kl_local,
                "reconstruction_loss_train": rec,
                "kl_local_train": kl_local,
                "kl_global_train": 0.0,
                "kl_weight": float(kl_w[-1]),
            }
            if validate and (local_epoch + 1) % check_val_every_n_epoch == 0:
                variables = _variables(state)
                k_epoch = placed(jax.random.fold_in(k_val, epoch))
                if stream is None:
                    r, kz, kl = evaluate(eval_fn, variables, data, val_idx, k_epoch, batch_size)
                else:
                    r, kz, kl = stream.evaluate(evaluate, eval_fn, variables, k_epoch, batch_size)
                w = float(kl_w[-1])
                metrics.update(
                    {
                        "validation_loss": float(np.mean(r + w * kz + kl)),
                        "elbo_validation": float(np.mean(r + kz + kl)),
                        "reconstruction_loss_validation": float(np.mean(r)),
                        "kl_local_validation": float(np.mean(kz + kl)),
                        "kl_global_validation": 0.0,
                    }
                )
            for name, value in metrics.items():
                progress.rows.setdefault(name, []).append([epoch, value])
            bar.set_postfix(train_loss=f"{metrics['train_loss']:.4g}", refresh=False)
            if plan.reduce_lr_on_plateau and plan.lr_scheduler_metric in metrics:
                lr = float(to_host(state.opt_state.hyperparams["learning_rate"]))
                new_lr = plateau.update(metrics[plan.lr_scheduler_metric], lr)
                if new_lr != lr:
                    hp = dict(state.opt_state.hyperparams)
                    hp["learning_rate"] = placed(np.asarray(new_lr, np.float32))
                    state = state._replace(opt_state=state.opt_state._replace(hyperparams=hp))
            # scvi-tools' warm-up: the first N checks of the monitor are ignored entirely
            if early_stopping and early_stopping_monitor in metrics and (
                len(progress.rows[early_stopping_monitor]) > early_stopping_warmup_epochs
            ):
                current = sign * metrics[early_stopping_monitor]
                if current < progress.stop_best - early_stopping_min_delta:
                    progress.stop_best, progress.stop_wait = current, 0
                else:
                    progress.stop_wait += 1
                    if progress.stop_wait >= early_stopping_patience:
                        bar.write(
                            f"Monitored metric {early_stopping_monitor} did not improve in the "
                            f"last {early_stopping_patience} records. Best score: "
                            f"{sign * progress.stop_best:.3f}. Signaling Trainer to stop."
                        )
                        progress.stopped_early = True
            progress.epoch = local_epoch + 1
            progress.plateau_best, progress.plateau_bad_epochs = plateau.best, plateau.bad_epochs
            if on_epoch_end is not None:
                on_epoch_end(state, progress)
            if catcher is not None and catcher.signum is not None:
                name = signal.Signals(catcher.signum).name
                raise TrainingInterrupted(
                    f"Training interrupted by {name} after epoch {epoch}; the model keeps the "
                    "parameters and history of that epoch.",
                    state=state,
                    history=_append_history(history, progress.rows),
                    progress=progress,
                    signum=catcher.signum,
                )
            if progress.stopped_early:
                break
    finally:
        bar.close()
        if catcher is not None:
            catcher.__exit__(*sys.exc_info())
    history = _append_history(history, progress.rows)
    return state, history, epoch_fn


def _append_history(history, rows):
    if not rows:
        return dict(history or {})
    new = {
        name: pd.DataFrame(
            {name: [v for _, v in vals]}, index=pd.Index([e for e, _ in vals], name="epoch")
        )
        for name, vals in rows.items()
    }
    if not history:
        return new
    # scvi-tools' quirk: a second train() appends to existing keys only.
    return {
        name: pd.concat([frame, new[name]]) if name in new else frame
        for name, frame in history.items()
    }
