"""Saving and loading models: arrays in ``model.npz``, everything else in ``model.json``.

Nothing in a saved model executes code on load: arrays are read with
``numpy.load(allow_pickle=False)`` and the rest is JSON. Files are written to a temporary
name and renamed into place, so an interrupted save never leaves a half-written model.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

__all__ = ["FORMAT_VERSION", "flatten_tree", "read_model_dir", "unflatten_tree", "write_model_dir"]

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
MODEL_NPZ = "model.npz"
ADATA_FILE = "adata.h5ad"


def flatten_tree(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """Flatten a nested dict of arrays to ``{"a/b/c": ndarray}``."""
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(flatten_tree(dict(v), path + "/"))
        else:
            out[path] = np.asarray(v)
    return out


def unflatten_tree(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of :func:`flatten_tree`."""
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_model_dir(
    dir_path: str, meta: dict, arrays: dict[str, np.ndarray], *, overwrite: bool, adata=None
) -> None:
    """Write ``model.json`` (``meta`` plus format fields), ``model.npz`` and maybe the AnnData."""
    if os.path.exists(os.path.join(dir_path, MODEL_JSON)) and not overwrite:
        raise ValueError(
            f"{dir_path} already contains a saved model; pass `overwrite=True` to replace it."
        )
    os.makedirs(dir_path, exist_ok=True)
    meta = {"format": "jaxvi", "format_version": FORMAT_VERSION, **meta}

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)

    _atomic_write(os.path.join(dir_path, MODEL_NPZ), write_npz)
    if adata is not None:
        _atomic_write(os.path.join(dir_path, ADATA_FILE), lambda tmp: adata.write_h5ad(tmp))
    _atomic_write(os.path.join(dir_path, MODEL_JSON), write_json)


def read_model_dir(dir_path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """Read ``(meta, arrays)`` written by :func:`write_model_dir`, refusing anything else."""
    json_path = os.path.join(dir_path, MODEL_JSON)
    if not os.path.exists(json_path):
        raise FileNotFoundError(f"No saved jaxvi model in {dir_path} ({MODEL_JSON} missing).")
    try:
        with open(json_path) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_path} is corrupted or truncated: {e}") from e
    if meta.get("format") != "jaxvi":
        raise ValueError(f"{json_path} is not a jaxvi model file.")
    if int(meta.get("format_version", -1)) > FORMAT_VERSION:
        raise ValueError(
            f"{dir_path} was saved with format version {meta['format_version']}, newer than "
            f"this jaxvi reads ({FORMAT_VERSION}); upgrade jaxvi."
        )
    try:
        with np.load(os.path.join(dir_path, MODEL_NPZ), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as e:
        raise ValueError(f"{dir_path}/{MODEL_NPZ} holds objects that need pickle: refused.") from e
    except (OSError, EOFError, KeyError) as e:
        raise ValueError(f"{dir_path}/{MODEL_NPZ} is corrupted or truncated: {e}") from e
    return meta, arrays
