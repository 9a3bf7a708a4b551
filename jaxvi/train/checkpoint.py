"""Training checkpoints: everything needed to continue a run exactly, without pickle.

A checkpoint is a directory ``epoch_<NNNNNN>`` holding ``checkpoint.json`` (the run's settings,
split, history, progress counters, run id and the layout of the optimizer state) and
``checkpoint.npz`` (parameters, batch-norm statistics, buffers, every optimizer-state leaf
and the global step). It is written like a saved model (:func:`jaxvi.io.write_model_dir`:
complete beside, then one atomic switch), so a crash mid-write never leaves a half checkpoint
that looks complete.

Each :class:`Checkpointer` (one ``train()`` call) is a run with its own id. It never
overwrites or deletes a checkpoint it did not write: when ``epoch_<N>`` already holds another
run's checkpoint (a run resumed from an older epoch into the same directory), it writes
``epoch_<N>-<run id>`` instead, and the keep-last-``keep`` policy deletes only its own older
checkpoints. "The newest checkpoint" of a directory is the one written last.

The PRNG position needs no storage: every epoch's key is ``fold_in(key(seed), epoch)``, so
the seed and the epoch number restore it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import uuid
import warnings

import jax
import numpy as np

from jaxvi import io
from jaxvi.train._state import FitProgress, TrainState

__all__ = [
    "CHECKPOINT_FORMAT_VERSION",
    "Checkpointer",
    "check_same_run",
    "find_checkpoint",
    "history_from_json",
    "history_to_json",
    "list_checkpoints",
    "plan_to_json",
    "read_checkpoint",
    "restore_state",
    "write_checkpoint",
]

CHECKPOINT_FORMAT_VERSION = 1
CKPT_JSON = "checkpoint.json"
CKPT_NPZ = "checkpoint.npz"
_NAME = re.compile(r"^epoch_(\d{6,})(-[0-9a-f]{8})?$")


def _opt_leaves(opt_state) -> tuple[list[str], list]:
    flat, _ = jax.tree_util.tree_flatten_with_path(opt_state)
    return [jax.tree_util.keystr(p) for p, _ in flat], [leaf for _, leaf in flat]


def write_checkpoint(
    directory: str, state: TrainState, meta: dict, name: str | None = None
) -> str:
    """Write ``state`` and ``meta`` (JSON-serialisable) as ``directory/<name>``, replacing a
    checkpoint of that name atomically.

    ``name`` defaults to ``epoch_<N>`` with ``N = meta["progress"]["epoch"]``. Returns the path.
    """
    os.makedirs(directory, exist_ok=True)
    host = jax.device_get(state)
    arrays = {}
    for group in ("params", "batch_stats", "buffers"):
        for k, v in io.flatten_tree(dict(getattr(host, group))).items():
            arrays[f"{group}/{k}"] = v
    paths, leaves = _opt_leaves(host.opt_state)
    for i, leaf in enumerate(leaves):
        arrays[f"opt/{i:05d}"] = np.asarray(leaf)
    arrays["step"] = np.asarray(host.step)
    meta = {
        **meta,
        "opt_layout": [
            {"path": p, "shape": list(np.shape(x)), "dtype": str(np.asarray(x).dtype)}
            for p, x in zip(paths, leaves, strict=True)
        ],
    }
    name = name or f"epoch_{int(meta['progress']['epoch']):06d}"
    final = os.path.join(directory, name)
    io.write_model_dir(
        final,
        meta,
        arrays,
        overwrite=True,
        json_name=CKPT_JSON,
        npz_name=CKPT_NPZ,
        kind="jaxvi-checkpoint",
        version=CHECKPOINT_FORMAT_VERSION,
    )
    return final


def list_checkpoints(directory: str) -> list[str]:
    """Complete checkpoint directories under ``directory``, oldest written first (ties, on
    file systems with coarse times, by epoch)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _NAME.match(name)
        if not m:
            continue
        try:
            written = os.stat(os.path.join(directory, name, CKPT_JSON)).st_mtime_ns
        except OSError:
            continue  # incomplete
        found.append((written, int(m.group(1)), name, os.path.join(directory, name)))
    return [p for *_, p in sorted(found)]


def find_checkpoint(path: str) -> str:
    """``path`` itself if it is a checkpoint, else the newest checkpoint inside it."""
    if os.path.exists(os.path.join(path, CKPT_JSON)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(f"No jaxvi checkpoint in {path!r}.")
    return found[-1]


def read_checkpoint(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(meta, arrays)`` of a checkpoint (see :func:`find_checkpoint`), verified like a
    saved model: no pickle, checksums and declared shapes checked, newer versions refused."""
    path = find_checkpoint(path)
    meta, arrays = io.read_model_dir(
        path,
        json_name=CKPT_JSON,
        npz_name=CKPT_NPZ,
        kind="jaxvi-checkpoint",
        max_version=CHECKPOINT_FORMAT_VERSION,
    )
    return meta, arrays


def restore_state(template: TrainState, meta: dict, arrays: dict[str, np.ndarray]) -> TrainState:
    """A :class:`TrainState` shaped like ``template`` holding the checkpoint's values.

    Raises ``ValueError`` naming the first mismatch when the parameter tree or the
    optimizer-state layout (leaf paths, shapes, dtypes) differs from ``template``'s, e.g. a
    checkpoint of another architecture or optimizer.
    """
    groups = {}
    for group in ("params", "batch_stats", "buffers"):
        expected = io.flatten_tree(dict(jax.device_get(getattr(template, group))))
        got = {k[len(group) + 1 :]: v for k, v in arrays.items() if k.startswith(group + "/")}
        _check_same(group, expected, got)
        groups[group] = jax.tree_util.tree_map(
            lambda a: jax.numpy.asarray(a), io.unflatten_tree(got) if got else {}
        )
    paths, leaves = _opt_leaves(template.opt_state)
    layout = meta.get("opt_layout", [])
    saved_paths = [e["path"] for e in layout]
    if saved_paths != paths:
        raise ValueError(
            "The checkpoint's optimizer state does not match this training plan (different "
            f"optimizer, clipping or frozen parameters): {len(saved_paths)} saved leaves vs "
            f"{len(paths)} expected; first saved {saved_paths[:2]}, expected {paths[:2]}."
        )
    new_leaves = []
    for i, (p, leaf, entry) in enumerate(zip(paths, leaves, layout, strict=True)):
        a = arrays.get(f"opt/{i:05d}")
        if a is None:
            raise ValueError(f"The checkpoint lacks optimizer leaf {p}.")
        ref = np.asarray(leaf)
        if a.shape != ref.shape or a.dtype != ref.dtype or list(a.shape) != entry["shape"]:
            raise ValueError(
                f"Optimizer leaf {p}: checkpoint has {a.dtype}{list(a.shape)}, expected "
                f"{ref.dtype}{list(ref.shape)}."
            )
        new_leaves.append(jax.numpy.asarray(a))
    treedef = jax.tree_util.tree_structure(template.opt_state)
    opt_state = jax.tree_util.tree_unflatten(treedef, new_leaves)
    if "step" not in arrays:
        raise ValueError("The checkpoint lacks the global step.")
    return TrainState(
        params=groups["params"],
        batch_stats=groups["batch_stats"],
        buffers=groups["buffers"],
        opt_state=opt_state,
        step=jax.numpy.asarray(arrays["step"], jax.numpy.int32),
    )


def _check_same(group: str, expected: dict, got: dict) -> None:
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(
            f"The checkpoint's {group} do not match this model: missing {missing[:5]}, "
            f"extra {extra[:5]}."
        )
    for k, ref in expected.items():
        if got[k].shape != np.shape(ref):
            raise ValueError(
                f"Checkpoint array {group}/{k} has shape {got[k].shape}, expected {np.shape(ref)}."
            )


@dataclasses.dataclass
class Checkpointer:
    """``on_epoch_end`` callback of :func:`jaxvi.train.fit` writing a checkpoint every
    ``every_n_epochs`` epochs and keeping the newest ``keep``.

    ``meta`` is the run description stored with each checkpoint (settings, split, earlier
    history); the progress is added per epoch.
    """

    directory: str
    every_n_epochs: int
    keep: int
    meta: dict
    last_path: str | None = None
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)
    written: list = dataclasses.field(default_factory=list)  # this run's, oldest first

    def __post_init__(self):
        if int(self.every_n_epochs) < 1:
            raise ValueError(f"checkpoint_every_n_epochs must be >= 1, got {self.every_n_epochs}.")
        if int(self.keep) < 1:
            raise ValueError(f"checkpoint_keep must be >= 1, got {self.keep}.")

    def __call__(self, state: TrainState, progress: FitProgress, force: bool = False) -> None:
        """Write a checkpoint after epoch ``progress.epoch`` if due (or ``force``)."""
        if not force and progress.epoch % int(self.every_n_epochs) != 0:
            return
        self.try_write(state, progress)

    def try_write(self, state: TrainState, progress: FitProgress) -> str | None:
        """:meth:`write`, but a failed write (disk full, permissions: any ``OSError``) is a
        warning, not an error: the training it would record is still in memory and is kept.
        Returns the checkpoint's path, or None when it could not be written."""
        try:
            return self.write(state, progress)
        except OSError as e:
            warnings.warn(
                f"The checkpoint after epoch {int(progress.epoch)} could not be written to "
                f"{self.directory} ({e}); training goes on and keeps its progress in memory, "
                "but this epoch cannot be resumed from disk.",
                UserWarning,
                stacklevel=2,
            )
            return None

    def write(self, state: TrainState, progress: FitProgress) -> str:
        """Write now, then delete this run's checkpoints beyond its newest ``keep`` (never
        another run's)."""
        meta = {**self.meta, "run_id": self.run_id, "progress": dataclasses.asdict(progress)}
        name = f"epoch_{int(progress.epoch):06d}"
        path = os.path.join(self.directory, name)
        if path not in self.written and os.path.lexists(path):
            name += f"-{self.run_id[:8]}"  # another run's: keep it
            path = os.path.join(self.directory, name)
        self.last_path = write_checkpoint(self.directory, state, meta, name)
        if self.last_path in self.written:
            self.written.remove(self.last_path)
        self.written.append(self.last_path)
        for old in self.written[: -int(self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
        del self.written[: -int(self.keep)]
        return self.last_path


def history_to_json(history: dict) -> dict:
    """``{metric: {"epoch": [...], "values": [...]}}`` of a history dict of DataFrames."""
    return {
        k: {"epoch": [int(i) for i in v.index], "values": [float(x) for x in v.iloc[:, 0]]}
        for k, v in (history or {}).items()
    }


def history_from_json(d: dict) -> dict:
    """Inverse of :func:`history_to_json`."""
    import pandas as pd

    return {
        k: pd.DataFrame({k: v["values"]}, index=pd.Index(v["epoch"], name="epoch"))
        for k, v in d.items()
    }


def plan_to_json(plan) -> dict:
    """A :class:`~jaxvi.train.PlanConfig` as JSON (a custom optimizer by its name only)."""
    out = dataclasses.asdict(plan)
    creator = out.pop("optimizer_creator")
    out["optimizer_creator"] = None if creator is None else getattr(creator, "__qualname__", "?")
    return out


def check_same_run(saved: dict, current: dict) -> None:
    """Refuse to resume when the settings that shape the run differ from the checkpoint's.

    ``current`` maps setting names (``batch_size``, ``plan``, ``config``, ...) to the values
    of this ``train()`` call; only ``max_epochs`` may change between the two.
    """
    diffs = []
    for key, value in current.items():
        old = saved.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            diffs += [
                f"{key}.{k}: {old.get(k)!r} -> {value.get(k)!r}"
                for k in sorted(set(value) | set(old))
                if _norm(old.get(k)) != _norm(value.get(k))
            ]
        elif _norm(old) != _norm(value):
            diffs.append(f"{key}: {old!r} -> {value!r}")
    if diffs:
        raise ValueError(
            "Cannot resume: this train() call differs from the checkpointed run in "
            + "; ".join(diffs[:8])
            + ". Pass the same settings (only max_epochs may change)."
        )


def _norm(v):
    return json.loads(json.dumps(v))
