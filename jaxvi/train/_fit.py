"""The training loop: scvi-tools' ``Trainer`` around the compiled epoch, for any model.

:func:`fit` runs epochs of :func:`jaxvi.train.make_train_epoch` over the blocks of a
:class:`~jaxvi.data.DataSource` (cells in device memory are one block; a streamed AnnData is
several, read one after the other), and around them what scvi-tools' ``TrainingPlan`` and
Lightning's ``Trainer`` do between epochs: the KL warm-up, validation, reduce-LR-on-plateau,
early stopping, history, checkpoints (``on_epoch_end``), SIGINT/SIGTERM, and the non-finite
guard's replay. It knows the model only through its :class:`~jaxvi.module.ModelDef`: the
history reports whatever named terms the model's loss returns.

The recipe is scvi-tools' defaults: Adam(lr 1e-3, eps 0.01) with coupled weight decay 1e-6,
KL warm-up over 400 epochs, optional reduce-LR-on-plateau, gradient clipping and early
stopping on ``elbo_validation``, a seeded 90/10 split.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxvi.data import DataSource, as_source, pad_indices
from jaxvi.module import KL_GLOBAL, KL_LOCAL, RECONSTRUCTION, ModelDef
from jaxvi.parallel import to_host
from jaxvi.train._announced import _Announced, _fold
from jaxvi.train._epoch import epoch_grid, make_evaluate, make_train_epoch
from jaxvi.train._paired import PairedCells, paired_grid, paired_positions
from jaxvi.train._plan import (
    PlanConfig,
    Plateau,
    compute_kl_weight,
    make_optimizer,
    steps_per_epoch,
)
from jaxvi.train._state import (
    NON_FINITE_KINDS,
    EpochInfo,
    FitProgress,
    NonFiniteError,
    TrainingInterrupted,
    TrainState,
    variables_of,
)

__all__ = ["evaluate", "fit", "history_metrics"]

ELBO_TERMS = (RECONSTRUCTION, KL_LOCAL, KL_GLOBAL)


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


def history_metrics(means: dict, suffix: str, prefixed=frozenset()) -> dict:
    """History names of the mean terms ``{name: float}`` of an epoch (``suffix`` is
    ``"train"`` or ``"validation"``): scvi-tools' ELBO metrics (``elbo_<suffix>``, the sum of
    ``reconstruction_loss``, ``kl_local`` and ``kl_global``, each reported, a missing KL as
    0) when the loss reports ``reconstruction_loss``, then every other term as
    ``<name>_<suffix>``, or ``<suffix>_<name>`` for the names in ``prefixed``
    (:attr:`jaxvi.module.ModelDef.prefixed_terms`). ``means["elbo"]``, if given, is used as
    the ELBO."""
    out = {}
    if RECONSTRUCTION in means:
        parts = [means.get(name, 0.0) for name in ELBO_TERMS]
        out[f"elbo_{suffix}"] = means.get("elbo", parts[0] + parts[1] + parts[2])
        for name, value in zip(ELBO_TERMS, parts, strict=True):
            out[f"{name}_{suffix}"] = value
    for name, value in means.items():
        if name not in ELBO_TERMS and name != "elbo":
            out[f"{suffix}_{name}" if name in prefixed else f"{name}_{suffix}"] = value
    return out


def _train_metrics(info: EpochInfo, kl_weight: float, prefixed=frozenset()) -> dict:
    n = float(info.n_obs)
    means = {name: float(v) / n for name, v in info.terms.items()}
    if RECONSTRUCTION in means:
        means["elbo"] = means[RECONSTRUCTION] + means.get(KL_LOCAL, 0.0)
        if KL_GLOBAL in means:
            means["elbo"] += means[KL_GLOBAL]
    metrics = {"train_loss": float(info.loss_sum) / n, **history_metrics(means, "train", prefixed)}
    metrics["kl_weight"] = kl_weight
    return metrics


def evaluate(
    evaluate_fn,
    variables,
    source: DataSource,
    cells,
    key,
    batch_size,
    kl_weight=1.0,
    pair_rows=None,
):
    """The loss and the named terms of ``cells`` in evaluation mode, block by block.

    Parameters
    ----------
    evaluate_fn
        From :func:`jaxvi.train.make_evaluate`.
    variables
        The model's variables.
    source
        Where the cells live (:class:`jaxvi.data.DataSource`).
    cells
        ``(n,)`` int cells to evaluate.
    key
        One draw per cell from it (None: the posterior mean).
    batch_size
        Cells per chunk.
    kl_weight
        The KL weight of the loss.
    pair_rows
        ``(m,)`` dataset rows among ``cells``: each chunk is paired with a minibatch of them
        (:func:`jaxvi.train.paired_grid`, in this order, cycled), or None. Needs one block.

    Returns
    -------
    ``(loss, terms)``: ``loss`` the mean over cells of the per-chunk losses (weighted by their
    cells, as Lightning aggregates a logged value), ``terms`` ``{name: (n,) float64}`` per
    cell (in block order: the order of ``cells`` for one block, sorted for a streamed
    source), or the float mean of a scalar term.
    """
    loss_sum, n_total = 0.0, 0
    per_cell: dict = {}
    scalars: dict = {}
    w = source.replicate(np.float32(kl_weight))
    cells = np.asarray(cells)
    if pair_rows is not None and len(source.block_sizes(cells)) > 1:
        raise ValueError(_ONE_BLOCK)
    for block in source.blocks(cells, key, shuffle=False):
        idx, mask = pad_indices(block.cells, batch_size)
        pair = ()
        if pair_rows is not None:
            p_idx, p_mask = paired_grid(pair_rows, idx.shape[0], batch_size)
            p_idx = paired_positions(p_idx, p_mask, block.rows, block.cells)
            pair = (source.replicate(p_idx), source.replicate(p_mask))
        loss, terms = evaluate_fn(
            block.key,
            variables,
            block.data,
            source.replicate(idx),
            source.replicate(mask),
            w,
            *pair,
        )
        counts = mask.sum(axis=1).astype(np.float64)
        keep = mask.reshape(-1) > 0
        loss_sum += float(np.sum(to_host(loss).astype(np.float64) * counts))
        n_total += int(counts.sum())
        for name, value in terms.items():
            value = to_host(value).astype(np.float64)
            if value.ndim == 1:  # a scalar per chunk
                scalars[name] = scalars.get(name, 0.0) + float(np.sum(value * counts))
            else:
                per_cell.setdefault(name, []).append(value.reshape(-1)[keep])
    out = {name: np.concatenate(parts) for name, parts in per_cell.items()}
    out.update({name: total / n_total for name, total in scalars.items()})
    return loss_sum / n_total, out


_ONE_BLOCK = (
    "Paired (labelled) minibatches need every cell of a pass in one block; a streamed AnnData "
    "is read in several. Train with streaming=False (the cells in memory)."
)


def _validation_metrics(loss: float, terms: dict, prefixed=frozenset()) -> dict:
    means = {name: float(np.mean(v)) for name, v in terms.items()}
    if RECONSTRUCTION in terms:
        per_cell = [terms[n] for n in ELBO_TERMS if n in terms and np.ndim(terms[n])]
        scalar = sum(float(terms[n]) for n in ELBO_TERMS if n in terms and not np.ndim(terms[n]))
        means["elbo"] = float(np.mean(sum(per_cell[1:], per_cell[0]))) + scalar
    return {"validation_loss": loss, **history_metrics(means, "validation", prefixed)}


def _check_blocks(sizes, batch_size, drop_last, state, stream):
    """Refuse a pass with no step, or whose ragged last minibatch holds one cell in a model
    with batch norm (batch statistics of one value per channel)."""
    steps = [steps_per_epoch(s, batch_size, drop_last) for s in sizes]
    if sum(steps) == 0:
        raise ValueError("drop_last=True with fewer training cells than batch_size.")
    if drop_last or not jax.tree_util.tree_leaves(state.batch_stats):
        return steps
    for size, n in zip(sizes, steps, strict=True):
        if size - (n - 1) * batch_size == 1:
            where = f"a streamed block of {size} cells" if stream else f"{size} training cells"
            raise ValueError(
                f"The last training minibatch would hold a single cell ({where}, "
                f"batch_size={batch_size}), and batch norm needs more than one value per "
                "channel in training. Change batch_size or train_size, or pass "
                "datasplitter_kwargs={'drop_last': True}."
            )
    return steps


def _check_paired(n_cells, batch_size, drop_last, state):
    """Refuse paired minibatches that would be empty, or whose ragged last one holds one
    cell in a model with batch norm (as :func:`_check_blocks`)."""
    n_rows = steps_per_epoch(n_cells, batch_size, drop_last)
    if n_rows == 0:
        raise ValueError(
            f"The paired (labelled) training minibatches would be empty: {n_cells} cells with "
            f"batch_size={batch_size}" + (" and drop_last=True." if drop_last else ".")
        )
    if not drop_last and jax.tree_util.tree_leaves(state.batch_stats):
        if n_cells - (n_rows - 1) * batch_size == 1:
            raise ValueError(
                f"The last paired (labelled) minibatch would hold a single cell ({n_cells} "
                f"labelled training cells, batch_size={batch_size}), and batch norm needs more "
                "than one value per channel in training. Change batch_size, train_size or "
                "n_samples_per_label, or pass datasplitter_kwargs={'drop_last': True}."
            )


def fit(
    model_def: ModelDef,
    state: TrainState,
    source,
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
    paired: PairedCells | None = None,
):
    """Train ``model_def`` for up to ``max_epochs`` epochs; return ``(state, history,
    epoch_fn)``.

    Parameters
    ----------
    model_def
        The model (:class:`jaxvi.module.ModelDef`).
    state
        The starting :class:`TrainState` (:func:`jaxvi.train.init_train_state`).
    source
        Where the cells live: a :class:`jaxvi.data.DataSource` (:func:`jaxvi.data.make_source`)
        or a :class:`jaxvi.data.CellData`. Each epoch is one loop over its blocks. On a
        mesh training is data-parallel: ``state`` is replicated over the mesh here and comes
        back replicated.
    train_idx, val_idx
        ``(n,)`` int training and validation cells.
    plan
        The training plan (:class:`jaxvi.train.PlanConfig`).
    max_epochs, batch_size, seed
        Epochs in total (with ``progress``), minibatch size, seed of the minibatches and
        of the model's draws.
    check_val_every_n_epoch, early_stopping, early_stopping_monitor, early_stopping_patience,
    early_stopping_min_delta, early_stopping_mode
        Validation and early stopping, with Lightning's names and defaults.
    early_stopping_warmup_epochs
        The first this many checks of the monitored metric count neither as improvements
        nor against the patience (scvi-tools' ``LoudEarlyStopping``).
    progress_bar
        Show a tqdm bar.
    history
        Metrics of earlier ``train()`` calls, appended to (scvi-tools' quirk: only keys
        already there grow).
    epoch_offset
        The epoch number of this fit's first epoch (the KL warm-up and the keys use it).
    drop_last
        Drop the ragged last minibatch of each pass (of each block when streamed) instead
        of masking it.
    progress
        From a checkpoint: continue a fit where it stood (the next epoch, the metrics so far,
        the LR-plateau and early-stopping counters); with the matching ``state`` the result
        is bit-identical to an uninterrupted fit.
    on_epoch_end
        ``on_epoch_end(state, progress)`` after every completed epoch (checkpointing).
    catch_signals
        Turn SIGINT / SIGTERM into :class:`TrainingInterrupted` after the running epoch.
    guard
        Catch non-finite values: each epoch runs the cheap ``"detect"`` program, and an
        epoch that failed is replayed with per-step checks (``"step"``) from its start to
        find the step and keep the last finite parameters.
    update_mask, network_training
        Freeze parameter entries (:func:`jaxvi.train.make_optimizer`); train with the
        network in evaluation mode (:func:`jaxvi.train.make_step`).
    paired
        A second minibatch for every step (:class:`jaxvi.train.PairedCells`, scANVI's
        labelled cells), as scvi-tools' ``ConcatDataLoader``: each epoch the training groups
        are subsampled and shuffled (from ``seed`` and the epoch), cut into minibatches of
        ``batch_size`` (``drop_last`` as the main ones) and cycled over the epoch's steps;
        validation chunks are paired with the validation groups, in order, drawn once. The
        minibatch carries them as ``Minibatch.labelled``. Needs the cells in one block (not
        streamed).

    Returns
    -------
    ``(state, history, epoch_fn)``: ``history`` maps scvi-tools' metric names
    (``train_loss``, ``elbo_train``, ``reconstruction_loss_train``, ``kl_local_train``,
    ``kl_global_train``, ``kl_weight``, the ``_validation`` ones, and ``<term>_train`` for
    other terms of the loss) to one-column DataFrames indexed by epoch; ``epoch_fn`` is the
    compiled epoch (its ``_cache_size()`` counts compilations).

    Raises
    ------
    TrainingInterrupted
        After the running epoch, when SIGINT or SIGTERM arrived (``catch_signals``).
    NonFiniteError
        When a step's loss, gradient or update is not finite (``guard``); it holds the
        state of the last finite step.
    """
    from tqdm.auto import tqdm

    source = as_source(source)
    train_idx = np.asarray(train_idx)
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
    tx = make_optimizer(plan, model_def.trainable(state.params), update_mask)
    detect = "detect" if guard else False
    epoch_fn = make_train_epoch(model_def, tx, guard=detect, network_training=network_training)
    replay_fn = None  # the per-step guarded epoch, compiled only if an epoch fails
    eval_fn = make_evaluate(model_def)
    sizes = source.block_sizes(train_idx)
    n_steps = sum(_check_blocks(sizes, batch_size, drop_last, state, len(sizes) > 1))
    pair_val = None
    if paired is not None:
        if len(sizes) > 1:
            raise ValueError(_ONE_BLOCK)
        _check_paired(paired.n_cells("train"), batch_size, drop_last, state)
        if paired.n_cells("validation") > 0:
            pair_val = paired.rows("validation", np.random.default_rng([seed, 1, 0]))
    mesh = source.mesh
    with jax.transfer_guard("allow"):  # the seed: the only value of the loop set by host code
        k_train, k_val = jax.random.split(jax.random.key(seed))
    if mesh is not None:
        state = source.replicate(state)
        if batch_size % mesh.size:
            warnings.warn(
                f"batch_size {batch_size} is not a multiple of the {mesh.size} devices; "
                "minibatches are computed replicated (no speed-up).",
                UserWarning,
                stacklevel=3,
            )

    def run_epoch(fn, state, key, kl_w, pair_rows):
        """One pass over the training blocks: ``(state, EpochInfo summed over blocks)``."""
        total, start = None, 0
        for block in source.blocks(train_idx, key, shuffle=True):
            steps = steps_per_epoch(len(block.cells), batch_size, drop_last)
            if steps == 0:
                continue
            kl = source.replicate(np.asarray(kl_w[start : start + steps], np.float32))
            start += steps
            pair = ()
            if pair_rows is not None:  # one block holding every training cell
                p_idx, p_mask = paired_grid(pair_rows, steps, batch_size, drop_last=drop_last)
                p_idx = paired_positions(p_idx, p_mask, block.rows, block.cells)
                pair = (source.replicate(p_idx), source.replicate(p_mask))
            cells = source.replicate(block.cells)
            k_steps, idx, mask = epoch_grid(block.key, cells, n_steps=steps, batch_size=batch_size)
            state, info = fn(k_steps, state, block.data, idx, mask, kl, *pair)
            if start > steps:  # a later block: its steps counted in epoch numbering
                offset = source.replicate(np.int32(start - steps))
                info = info._replace(bad_step=_shift_bad_step(info.bad_step, offset))
            total = info if total is None else _add(total, info)
            # A streamed epoch stops at its first non-finite block (a host read per block).
            if start < n_steps and int(to_host(info.bad_step)) >= 0:
                return state, total
        return state, total

    progress = FitProgress() if progress is None else dataclasses.replace(progress)
    progress.rows = {k: [list(r) for r in v] for k, v in progress.rows.items()}
    plateau = Plateau(
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
    # Each program is compiled before its first call, announced, and outside the bar's clock.
    train_epoch = _Announced(epoch_fn, "the training epoch", bar)
    validate_fn = _Announced(eval_fn, "the validation program", bar)
    try:
        if catcher is not None:
            catcher.__enter__()
        for local_epoch in bar:
            epoch = epoch_offset + local_epoch
            global_step = int(to_host(state.step))
            kl_w = compute_kl_weight(plan, epoch, np.arange(global_step, global_step + n_steps))
            key = source.replicate(_fold(k_train, epoch))
            pair_rows = None
            if paired is not None:  # this epoch's draw and order, the same in a replay
                rng = np.random.default_rng([seed, 0, epoch])
                pair_rows = paired.rows("train", rng)
                pair_rows = pair_rows[rng.permutation(len(pair_rows))]
            start_state = state
            state, info = run_epoch(train_epoch, state, key, kl_w, pair_rows)
            info = jax.tree_util.tree_map(to_host, info)
            if guard and int(info.bad_step) >= 0:
                # Replay the epoch with per-step checks: same keys, same minibatches.
                if replay_fn is None:
                    replay_fn = _Announced(
                        make_train_epoch(
                            model_def, tx, guard="step", network_training=network_training
                        ),
                        "the per-step guarded epoch",
                        bar,
                    )
                state, info = run_epoch(replay_fn, start_state, key, kl_w, pair_rows)
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
            metrics = _train_metrics(info, float(kl_w[-1]), model_def.prefixed_terms)
            if validate and (local_epoch + 1) % check_val_every_n_epoch == 0:
                k_epoch = source.replicate(_fold(k_val, epoch))
                variables = variables_of(state)
                loss, terms = evaluate(
                    validate_fn,
                    variables,
                    source,
                    val_idx,
                    k_epoch,
                    batch_size,
                    kl_w[-1],
                    pair_val,
                )
                metrics.update(_validation_metrics(loss, terms, model_def.prefixed_terms))
            for name, value in metrics.items():
                progress.rows.setdefault(name, []).append([epoch, value])
            bar.set_postfix(train_loss=f"{metrics['train_loss']:.4g}", refresh=False)
            if plan.reduce_lr_on_plateau and plan.lr_scheduler_metric in metrics:
                lr = float(to_host(state.opt_state.hyperparams["learning_rate"]))
                new_lr = plateau.update(metrics[plan.lr_scheduler_metric], lr)
                if new_lr != lr:
                    hp = dict(state.opt_state.hyperparams)
                    hp["learning_rate"] = source.replicate(np.asarray(new_lr, np.float32))
                    state = state._replace(opt_state=state.opt_state._replace(hyperparams=hp))
            # scvi-tools' warm-up: the first N checks of the monitor are ignored entirely
            if (
                early_stopping
                and early_stopping_monitor in metrics
                and (len(progress.rows[early_stopping_monitor]) > early_stopping_warmup_epochs)
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


@jax.jit
def _shift_bad_step(bad, offset):
    return jnp.where(bad >= 0, bad + offset, bad)


def _add(total: EpochInfo, info: EpochInfo) -> EpochInfo:
    """``info`` of a later block added to the sums of the blocks before it."""
    sums = jax.tree_util.tree_map(jnp.add, total[:3], info[:3])
    return info._replace(n_obs=sums[0], loss_sum=sums[1], terms=sums[2])


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
