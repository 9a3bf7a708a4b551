"""``train()`` of every model: the arguments scvi-tools users pass, turned into one engine run.

:func:`run_training` checks the arguments, makes the split, places the data, restores a
checkpoint when resuming, and runs :func:`jaxvi.train.fit`; it returns plain values
(:class:`TrainOutcome`) and never touches a model object.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

from jaxvi._settings import settings
from jaxvi.data import make_source
from jaxvi.model._compat import external_split, log_flags
from jaxvi.model._parts import QueryTraining, out_of_memory_as
from jaxvi.parallel import resolve_devices, to_host
from jaxvi.train import (
    FitProgress,
    NonFiniteError,
    PlanConfig,
    TrainingInterrupted,
    fit,
    get_max_epochs_heuristic,
    init_train_state,
    split_indices,
)
from jaxvi.train import checkpoint as ckpt

__all__ = ["TRAINER_KWARGS", "TrainOutcome", "run_training"]

TRAINER_KWARGS = {
    "early_stopping_monitor",
    "early_stopping_patience",
    "early_stopping_min_delta",
    "early_stopping_mode",
    "early_stopping_warmup_epochs",
    "gradient_clip_val",
    "precision",
}
# Lightning's ``precision`` values -> JAX's default matmul precision for training.
_PRECISION = {
    "32": "float32",
    "32-true": "float32",
    "bf16": "BF16_BF16_F32",
    "bf16-mixed": "BF16_BF16_F32",
    "bf16-true": "BF16_BF16_F32",
    "tf32": "tensorfloat32",
}


class TrainOutcome(NamedTuple):
    """What a training run leaves: the final (or last good) state, the history, the split
    ``(train, validation, test)``, the mesh trained on (or None) and the compiled epoch
    (its ``_cache_size()`` counts compilations; None after an interruption)."""

    state: Any
    history: dict
    indices: tuple
    mesh: Any
    epoch_fn: Any


def run_training(
    engine_model,
    *,
    variables: dict,
    adata,
    registry: dict,
    config_json: dict,
    history: dict,
    query_training: QueryTraining,
    max_epochs: int | None = None,
    devices="auto",
    train_size: float | None = None,
    validation_size: float | None = None,
    shuffle_set_split: bool = True,
    load_sparse_tensor: bool | None = None,
    batch_size: int = 128,
    early_stopping: bool = False,
    datasplitter_kwargs: dict | None = None,
    plan_config: dict | None = None,
    plan_kwargs: dict | None = None,
    check_val_every_n_epoch: int | None = None,
    enable_progress_bar: bool = True,
    seed: int | None = None,
    streaming: bool | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every_n_epochs: int = 1,
    checkpoint_keep: int = 2,
    resume: str | None = None,
    epoch_callback=None,
    split_fn=None,
    paired_fn=None,
    **trainer_kwargs,
) -> TrainOutcome:
    """Train ``engine_model`` from ``variables`` on ``adata`` (arguments as
    :meth:`jaxvi.model.BaseModel.train`).

    ``epoch_callback(state, epoch, global_step, metrics) -> bool`` runs after every epoch
    (before the checkpoint); True stops training after that epoch.

    ``split_fn(n_obs, train_size, validation_size, batch_size, shuffle, seed, drop_last)
    -> (train, validation, test)`` replaces scVI's split (:func:`jaxvi.train.split_indices`;
    not with ``external_indexing``); ``paired_fn(train, validation)`` returns the
    :class:`jaxvi.train.PairedCells` of every step's second minibatch (or None), from the
    final split (a resumed run's included).

    Raises
    ------
    TrainingInterrupted, NonFiniteError
        As :func:`jaxvi.train.fit`; the error carries ``outcome``, a :class:`TrainOutcome` of
        the last completed epoch or the last finite step.
    """
    unknown = sorted(set(trainer_kwargs) - TRAINER_KWARGS)
    if unknown:
        raise TypeError(
            f"train() got unexpected keyword arguments {unknown}; "
            f"allowed: {sorted(TRAINER_KWARGS)}."
        )
    seed = settings.seed if seed is None else int(seed)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    plan_kw = {**(plan_config or {}), **(plan_kwargs or {})}
    rename = log_flags(plan_kw)
    if "gradient_clip_val" in trainer_kwargs:
        plan_kw["gradient_clip_val"] = trainer_kwargs.pop("gradient_clip_val")
    precision = trainer_kwargs.pop("precision", None)
    if precision is not None and str(precision) not in _PRECISION:
        raise ValueError(
            f"precision={precision!r} is not supported; use one of {sorted(_PRECISION)}."
        )
    plan = PlanConfig.from_kwargs(plan_kw)
    splitter = dict(datasplitter_kwargs or {})
    drop_last = bool(splitter.pop("drop_last", False))
    external = splitter.pop("external_indexing", None)
    if splitter:
        raise TypeError(f"Unsupported datasplitter_kwargs {sorted(splitter)}.")
    n_obs = adata.n_obs
    if max_epochs is None:
        max_epochs = get_max_epochs_heuristic(n_obs)
    if int(max_epochs) < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
    if external is not None:
        train_idx, val_idx, test_idx = external_split(external, n_obs, int(batch_size), drop_last)
    else:
        train_idx, val_idx, test_idx = (split_fn or split_indices)(
            n_obs,
            train_size,
            validation_size,
            batch_size=batch_size,
            shuffle=shuffle_set_split,
            seed=seed,
            drop_last=drop_last,
        )
    mesh = resolve_devices(devices)
    state, _ = init_train_state(engine_model, variables, plan, query_training.update_mask)
    run = {  # what must agree with a checkpoint for an exact continuation
        "n_cells": int(n_obs),
        "batch_size": int(batch_size),
        "drop_last": drop_last,
        "plan": ckpt.plan_to_json(plan),
        "config": config_json,
        "check_val_every_n_epoch": check_val_every_n_epoch,
        "early_stopping": bool(early_stopping),
        "trainer_kwargs": dict(trainer_kwargs),
    }
    history_before, progress = history, None
    if resume is not None:
        meta, arrays = ckpt.read_checkpoint(resume)
        ckpt.check_same_run(meta, run)
        seed = int(meta["seed"])
        split = meta["split"]
        train_idx, val_idx, test_idx = (
            np.asarray(split[k], np.int64) for k in ("train", "validation", "test")
        )
        history_before = ckpt.history_from_json(meta["history_before"])
        progress = FitProgress(**meta["progress"])
        state = ckpt.restore_state(state, meta, arrays)
    paired = None if paired_fn is None else paired_fn(train_idx, val_idx)
    if paired is not None:
        run["paired"] = paired.describe()
        if resume is not None:
            ckpt.check_same_run(meta, run)
    checkpointer = None
    if checkpoint_dir is not None:
        checkpointer = ckpt.Checkpointer(
            checkpoint_dir,
            checkpoint_every_n_epochs,
            checkpoint_keep,
            {
                **run,
                "seed": seed,
                "max_epochs": int(max_epochs),
                "split": {
                    "train": [int(i) for i in train_idx],
                    "validation": [int(i) for i in val_idx],
                    "test": [int(i) for i in test_idx],
                },
                "history_before": ckpt.history_to_json(history_before),
            },
        )
    splits = (train_idx, val_idx, test_idx)
    source = make_source(
        adata,
        registry,
        purpose="train",
        mesh=mesh,
        streaming=streaming,
        load_sparse_tensor=load_sparse_tensor,
    )
    matmul = _PRECISION[str(precision)] if precision is not None else None
    try:
        with jax.default_matmul_precision(matmul), out_of_memory_as("A training step"):
            state, history, epoch_fn = fit(
                engine_model,
                state,
                source,
                train_idx=train_idx,
                val_idx=val_idx,
                plan=plan,
                max_epochs=int(max_epochs),
                batch_size=int(batch_size),
                seed=seed,
                check_val_every_n_epoch=check_val_every_n_epoch,
                early_stopping=early_stopping,
                progress_bar=enable_progress_bar,
                history=history_before,
                drop_last=drop_last,
                progress=progress,
                on_epoch_end=_epoch_end(epoch_callback, checkpointer, rename),
                update_mask=query_training.update_mask,
                network_training=query_training.network_training,
                paired=paired,
                **trainer_kwargs,
            )
    except (TrainingInterrupted, NonFiniteError) as err:
        # Keep the last completed epoch (interruption) or the last finite step.
        history = {rename(k): v.rename(columns=rename) for k, v in err.history.items()}
        err.outcome = TrainOutcome(err.state, history, splits, mesh, None)
        if isinstance(err, TrainingInterrupted) and checkpointer is not None:
            checkpointer.try_write(err.state, err.progress)
        raise
    history = {rename(k): v.rename(columns=rename) for k, v in history.items()}
    return TrainOutcome(state, history, splits, mesh, epoch_fn)


def _epoch_end(epoch_callback, checkpointer, rename):
    """The engine's ``on_epoch_end(state, progress)``: the user's callbacks first (a stop
    they ask for is then part of the checkpoint), then the checkpoint."""
    if epoch_callback is None:
        return checkpointer

    def on_epoch_end(state, progress):
        last = {name: rows[-1] for name, rows in progress.rows.items() if rows}
        epoch = max(int(e) for e, _ in last.values())
        metrics = {rename(k): float(v) for k, (e, v) in last.items() if int(e) == epoch}
        if epoch_callback(state, epoch, int(to_host(state.step)), metrics):
            progress.stopped_early = True
        if checkpointer is not None:
            checkpointer(state, progress)

    return on_epoch_end
