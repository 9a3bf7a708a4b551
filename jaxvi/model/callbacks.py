"""Training callbacks and loggers: ``model.train(callbacks=[...], logger=...)``.

jaxvi trains without Lightning, so Lightning callbacks cannot run (:func:`epoch_hooks` refuses
them); this is the small protocol that covers what they are used for. A callback is any object
with some of

``on_train_start(model)``
    Before the first epoch.
``on_epoch_end(model, epoch, metrics) -> bool | None``
    After every epoch: ``epoch`` (0-based in each ``train`` call, as the history's index;
    a run resumed from a checkpoint goes on from the checkpoint's epoch), ``metrics``
    the epoch's row of the history (``{"train_loss": ..., "elbo_train": ..., ...}``, the
    validation entries on validation epochs). ``model.variables`` then holds the parameters
    after that epoch, so the model's queries can be called. Return True to stop training
    after this epoch (Lightning's ``trainer.should_stop = True``).
``on_train_end(model)``
    After the last epoch (also after an early stop).

A logger is any object with ``log_metrics(metrics, step)`` (and optionally
``log_hyperparams(params)``, ``finalize(status)``, ``save()``): the loggers here, or a
Lightning logger, which has the same methods. Each epoch it receives the history row plus
``"epoch"``, at the global step.

:class:`CSVLogger` needs nothing; :class:`TensorBoardLogger` needs ``tensorboard``,
:class:`MLFlowLogger` ``mlflow``, :class:`WandbLogger` ``wandb``, each imported when
constructed: the extras ``jaxvi[tensorboard]``, ``jaxvi[mlflow]``, ``jaxvi[wandb]``, or
``jaxvi[loggers]`` for all three.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable

import jax

__all__ = [
    "CSVLogger",
    "Callback",
    "LambdaCallback",
    "MLFlowLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "epoch_hooks",
]


class Callback:
    """Base class of training callbacks: override the hooks you need (all do nothing)."""

    def on_train_start(self, model) -> None:
        """Before the first epoch."""

    def on_epoch_end(self, model, epoch: int, metrics: dict[str, float]) -> bool | None:
        """After each epoch; return True to stop training."""
        return None

    def on_train_end(self, model) -> None:
        """After the last epoch."""


class LambdaCallback(Callback):
    """A callback from a function ``fn(model, epoch, metrics) -> bool | None`` run at each
    epoch end."""

    def __init__(self, on_epoch_end: Callable):
        self._fn = on_epoch_end

    def on_epoch_end(self, model, epoch, metrics):
        """Call the function."""
        return self._fn(model, epoch, metrics)


def _version_dir(save_dir: str, name: str, version) -> str:
    root = os.path.join(save_dir, name)
    if version is None:
        taken = [
            int(d.split("_", 1)[1])
            for d in (os.listdir(root) if os.path.isdir(root) else [])
            if d.startswith("version_") and d.split("_", 1)[1].isdigit()
        ]
        version = max(taken, default=-1) + 1
    path = os.path.join(root, version if isinstance(version, str) else f"version_{version}")
    os.makedirs(path, exist_ok=True)
    return path


class CSVLogger:
    """Write the metrics to ``save_dir/name/version_N/metrics.csv`` (Lightning's layout:
    one row per epoch, columns ``epoch``, ``step`` and the metric names) and the
    hyperparameters to ``hparams.yaml``.

    Parameters
    ----------
    save_dir
        Root directory.
    name
        Experiment folder under ``save_dir``.
    version
        ``version_<int>`` folder, or a folder name; None: the next free number.
    """

    def __init__(self, save_dir: str, name: str = "jaxvi_logs", version: int | str | None = None):
        self.log_dir = _version_dir(save_dir, name, version)
        self.metrics_file_path = os.path.join(self.log_dir, "metrics.csv")
        self.rows: list[dict] = []

    def log_hyperparams(self, params: dict) -> None:
        """Write ``hparams.yaml`` (JSON values, which YAML reads)."""
        with open(os.path.join(self.log_dir, "hparams.yaml"), "w") as f:
            for k, v in params.items():
                f.write(f"{k}: {json.dumps(v, default=str)}\n")

    def log_metrics(self, metrics: dict, step: int) -> None:
        """Add a row and rewrite the file (the columns may grow on validation epochs)."""
        self.rows.append({**metrics, "step": int(step)})
        self.save()

    def save(self) -> None:
        """Write ``metrics.csv``."""
        keys = ["epoch", "step"]
        for row in self.rows:
            keys += [k for k in row if k not in keys]
        with open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(self.rows)

    def finalize(self, status: str) -> None:
        """Write the file a last time."""
        self.save()


class TensorBoardLogger:
    """Scalars to TensorBoard event files in ``save_dir/name/version_N`` (needs the
    ``tensorboard`` package, not TensorFlow or torch)."""

    def __init__(self, save_dir: str, name: str = "jaxvi_logs", version: int | str | None = None):
        try:
            from tensorboard.compat.proto.event_pb2 import Event
            from tensorboard.compat.proto.summary_pb2 import Summary
            from tensorboard.summary.writer.event_file_writer import EventFileWriter
        except ImportError as err:
            raise ImportError(
                "TensorBoardLogger needs the tensorboard package: pip install tensorboard "
                "(or the jaxvi[tensorboard] extra)."
            ) from err
        self._event, self._summary = Event, Summary
        self.log_dir = _version_dir(save_dir, name, version)
        self._writer = EventFileWriter(self.log_dir)

    def log_hyperparams(self, params: dict) -> None:
        """Hyperparameters as one text summary."""
        text = json.dumps(params, default=str, indent=1)
        value = self._summary.Value(tag="hparams", metadata=None)
        value.tensor.dtype = 7  # DT_STRING
        value.tensor.string_val.append(text.encode())
        value.metadata.plugin_data.plugin_name = "text"
        self._writer.add_event(
            self._event(wall_time=time.time(), summary=self._summary(value=[value]))
        )

    def log_metrics(self, metrics: dict, step: int) -> None:
        """One scalar per metric at ``step``."""
        values = [
            self._summary.Value(tag=k, simple_value=float(v))
            for k, v in metrics.items()
            if k != "epoch"
        ]
        event = self._event(
            wall_time=time.time(), step=int(step), summary=self._summary(value=values)
        )
        self._writer.add_event(event)
        self._writer.flush()

    def finalize(self, status: str) -> None:
        """Flush and close the event file."""
        self._writer.close()


class MLFlowLogger:
    """Metrics and parameters to an MLflow run (needs ``mlflow``), through MLflow's fluent
    API: the run is started here and made the active run (``self.run``).

    ``finalize`` ends the run (``FINISHED``, or ``FAILED`` when training stopped on an error or
    an interruption). A later ``train`` with the same logger logs to a new run of the same
    experiment and name: its epochs and steps start again at 0, and its parameters may differ,
    which MLflow refuses within one run.

    Parameters
    ----------
    experiment_name
        ``mlflow.set_experiment`` (created when missing).
    run_name
        ``mlflow.start_run(run_name=...)``; None: MLflow's generated name.
    tracking_uri
        ``mlflow.set_tracking_uri``; None: MLflow's default (``MLFLOW_TRACKING_URI`` or
        ``./mlruns``).
    """

    def __init__(
        self,
        experiment_name: str = "jaxvi_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
    ):
        try:
            import mlflow
        except ImportError as err:
            raise ImportError(
                "MLFlowLogger needs mlflow: pip install mlflow (or the jaxvi[mlflow] extra)."
            ) from err
        self._mlflow = mlflow
        if tracking_uri is not None:
            mlflow.set_tracking_uri(tracking_uri)
        self.experiment_id = mlflow.set_experiment(experiment_name=experiment_name).experiment_id
        self._run_name = run_name
        self.run = mlflow.start_run(experiment_id=self.experiment_id, run_name=run_name)
        self._ended = False

    def _active_run(self) -> None:
        # after end_run the fluent API would start an unnamed run on its own; start ours
        if self._ended:
            self.run = self._mlflow.start_run(
                experiment_id=self.experiment_id, run_name=self._run_name
            )
            self._ended = False

    def log_hyperparams(self, params: dict) -> None:
        """``mlflow.log_params`` (values as strings)."""
        self._active_run()
        self._mlflow.log_params({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: int) -> None:
        """``mlflow.log_metrics`` at ``step``."""
        self._active_run()
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=int(step))

    def finalize(self, status: str) -> None:
        """``mlflow.end_run``: ``FINISHED`` after a successful training, else ``FAILED``."""
        if not self._ended:
            self._mlflow.end_run(status="FINISHED" if status == "success" else "FAILED")
            self._ended = True


class WandbLogger:
    """Metrics and configuration to a Weights & Biases run (needs ``wandb``), started here
    (``self.run``).

    ``finalize`` finishes the run (exit code 1 when training stopped on an error or an
    interruption). A later ``train`` with the same logger logs to a new run, made with the same
    arguments: its steps start again at 0, which W&B ignores within one run (steps must
    increase).

    Parameters
    ----------
    **init_kwargs
        Passed to ``wandb.init`` (``project``, ``name``, ``config``, ``mode``, ...).
    """

    def __init__(self, **init_kwargs):
        try:
            import wandb
        except ImportError as err:
            raise ImportError(
                "WandbLogger needs wandb: pip install wandb (or the jaxvi[wandb] extra)."
            ) from err
        self._wandb = wandb
        self._init_kwargs = init_kwargs
        self.run = wandb.init(**init_kwargs)
        self._finished = False

    def _active_run(self) -> None:
        # a finished run refuses run.log
        if self._finished:
            self.run = self._wandb.init(**self._init_kwargs)
            self._finished = False

    def log_hyperparams(self, params: dict) -> None:
        """``run.config.update``."""
        self._active_run()
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """``run.log`` at ``step``."""
        self._active_run()
        self.run.log(dict(metrics), step=int(step))

    def finalize(self, status: str) -> None:
        """``run.finish``: exit code 0 after a successful training, else 1."""
        if not self._finished:
            self.run.finish(exit_code=0 if status == "success" else 1)
            self._finished = True


def _as_list(value) -> list:
    if value is None or value is False or value is True:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


_LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning")


def _lightning_base(cb) -> type | None:
    """The most basic class of ``cb``'s method resolution order defined in Lightning (its
    ``Callback`` for a callback), or None.

    Found by module name, so Lightning is not imported (and need not be installed).
    """
    found = [
        cls
        for cls in type(cb).__mro__
        if str(cls.__module__).split(".", 1)[0] in _LIGHTNING_PACKAGES
    ]
    return found[-1] if found else None


def epoch_hooks(model, callbacks, logger, hparams: dict):
    """Check ``callbacks`` / ``logger`` and return ``(start, epoch_end, end)`` hooks, or
    ``(None, None, None)`` when there is nothing to call.

    ``epoch_end(state, epoch, step, metrics) -> bool`` sets ``model.variables`` from the
    engine's state when a callback will see the model, runs the callbacks and loggers, and
    says whether one asked to stop.

    Raises
    ------
    TypeError
        For a Lightning callback (a subclass of ``lightning.pytorch.Callback`` or
        ``pytorch_lightning.Callback``, built-ins such as ``EarlyStopping`` included), a
        callback with none of the hooks, or a logger without ``log_metrics``; raised before
        any logger or callback is called.
    """
    cbs, loggers = _as_list(callbacks), _as_list(logger)
    hooks = ("on_train_start", "on_epoch_end", "on_train_end")
    for cb in cbs:
        # Lightning's hooks have the jaxvi names but take (trainer, pl_module): they would
        # pass the check below and fail at the first call, after the loggers started
        base = _lightning_base(cb)
        if base is not None:
            cls = type(cb)
            raise TypeError(
                f"{cls.__module__}.{cls.__qualname__} is a Lightning callback (a subclass of "
                f"{base.__module__}.{base.__qualname__}); Lightning callbacks cannot run in "
                "jaxvi, which trains without Lightning. See 'Callbacks and loggers' on the "
                "compatibility page of the user guide (docs/user_guide/compatibility.md) for "
                "the jaxvi form of its hooks, EarlyStopping and ModelCheckpoint."
            )
        if not any(callable(getattr(cb, h, None)) for h in hooks):
            raise TypeError(
                f"{type(cb).__name__} is not a jaxvi callback (it has none of {list(hooks)}); "
                "Lightning callbacks cannot run in jaxvi: see the compatibility page of the "
                "user guide for their jaxvi form."
            )
    for lg in loggers:
        if not callable(getattr(lg, "log_metrics", None)):
            raise TypeError(f"logger {type(lg).__name__} has no log_metrics(metrics, step).")
    if not cbs and not loggers:
        return None, None, None

    def call(name, *args):
        return [getattr(cb, name)(model, *args) for cb in cbs if callable(getattr(cb, name, None))]

    def start():
        for lg in loggers:
            if callable(getattr(lg, "log_hyperparams", None)):
                lg.log_hyperparams(hparams)
        call("on_train_start")

    def epoch_end(state, epoch: int, step: int, metrics: dict) -> bool:
        for lg in loggers:
            lg.log_metrics({"epoch": epoch, **metrics}, step)
        if not cbs:
            return False
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if state.buffers:
            variables["buffers"] = state.buffers
        model.variables = jax.tree_util.tree_map(lambda a: a, variables)
        return any(bool(r) for r in call("on_epoch_end", epoch, dict(metrics)))

    def end(status: str):
        if status == "success":
            call("on_train_end")
        for lg in loggers:
            for name, args in (("finalize", (status,)), ("save", ())):
                if callable(getattr(lg, name, None)):
                    getattr(lg, name)(*args)

    return start, epoch_end, end
