"""Training callbacks and loggers: ``model.train(callbacks=[...], logger=...)``.

jaxvi trains without Lightning, so Lightning callbacks cannot run; this is the small protocol
that covers what they are used for. A callback is any object with some of

``on_train_start(model)``
    Before the first epoch.
``on_epoch_end(model, epoch, metrics) -> bool | None``
    After every epoch: ``epoch`` (0-based, counting earlier ``train`` calls), ``metrics``
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
:class:`MLFlowLogger` ``mlflow``, :class:`WandbLogger` ``wandb`` (the ``jaxvi[loggers]``
extras), each imported when constructed.
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
                "(or jaxvi[loggers])."
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
    """Metrics and parameters to an MLflow run (needs ``mlflow``)."""

    def __init__(
        self,
        experiment_name: str = "jaxvi_logs",
        run_name: str | None = None,
        tracking_uri: str | None = None,
    ):
        try:
            import mlflow
        except ImportError as err:
            raise ImportError("MLFlowLogger needs mlflow: pip install mlflow.") from err
        self._mlflow = mlflow
        if tracking_uri is not None:
            mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment_name)
        self.run = mlflow.start_run(run_name=run_name)

    def log_hyperparams(self, params: dict) -> None:
        """``mlflow.log_params`` (values as strings)."""
        self._mlflow.log_params({k: str(v) for k, v in params.items()})

    def log_metrics(self, metrics: dict, step: int) -> None:
        """``mlflow.log_metrics`` at ``step``."""
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=int(step))

    def finalize(self, status: str) -> None:
        """End the run."""
        self._mlflow.end_run("FINISHED" if status == "success" else "FAILED")


class WandbLogger:
    """Metrics and configuration to a Weights & Biases run (needs ``wandb``); keyword
    arguments go to ``wandb.init``."""

    def __init__(self, **init_kwargs):
        try:
            import wandb
        except ImportError as err:
            raise ImportError("WandbLogger needs wandb: pip install wandb.") from err
        self.run = wandb.init(**init_kwargs)

    def log_hyperparams(self, params: dict) -> None:
        """Update the run's config."""
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics: dict, step: int) -> None:
        """``run.log`` at ``step``."""
        self.run.log(dict(metrics), step=int(step))

    def finalize(self, status: str) -> None:
        """Finish the run."""
        self.run.finish(exit_code=0 if status == "success" else 1)


def _as_list(value) -> list:
    if value is None or value is False or value is True:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def epoch_hooks(model, callbacks, logger, hparams: dict):
    """Check ``callbacks`` / ``logger`` and return ``(start, epoch_end, end)`` hooks, or
    ``(None, None, None)`` when there is nothing to call.

    ``epoch_end(state, epoch, step, metrics) -> bool`` sets ``model.variables`` from the
    engine's state when a callback will see the model, runs the callbacks and loggers, and
    says whether one asked to stop.

    Raises
    ------
    TypeError
        For a callback with none of the hooks (e.g. a Lightning callback), or a logger
        without ``log_metrics``.
    """
    cbs, loggers = _as_list(callbacks), _as_list(logger)
    hooks = ("on_train_start", "on_epoch_end", "on_train_end")
    for cb in cbs:
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
