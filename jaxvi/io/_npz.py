"""Saving and loading models: arrays in ``model.npz``, everything else in ``model.json``.

Nothing in a saved model executes code on load: arrays are read with
``numpy.load(allow_pickle=False)`` and the rest is JSON. Files are written to a temporary
name and renamed into place, so an interrupted save never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
import zlib

import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "PickleRefused",
    "array_manifest",
    "flatten_tree",
    "read_model_dir",
    "unflatten_tree",
    "write_model_dir",
]

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


def atomic_write(path: str, write) -> None:
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


def array_manifest(arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    """``{name: {"shape", "dtype", "sha256"}}`` of each array (the declaration checked on load)."""
    out = {}
    for k, v in arrays.items():
        v = np.asarray(v)
        out[k] = {
            "shape": list(v.shape),
            "dtype": v.dtype.str,
            "sha256": hashlib.sha256(v.tobytes()).hexdigest(),
        }
    return out


def write_model_dir(
    dir_path: str,
    meta: dict,
    arrays: dict[str, np.ndarray],
    *,
    overwrite: bool,
    adata=None,
    json_name: str = MODEL_JSON,
    npz_name: str = MODEL_NPZ,
    kind: str = "jaxvi",
    version: int = FORMAT_VERSION,
    adata_name: str = ADATA_FILE,
) -> None:
    """Write ``json_name`` (``meta`` plus format fields and the array manifest), ``npz_name``
    and maybe the AnnData; each file atomically (temporary name, then rename)."""
    if os.path.exists(os.path.join(dir_path, json_name)) and not overwrite:
        raise ValueError(
            f"{dir_path} already contains a saved model; pass `overwrite=True` to replace it."
        )
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype.hasobject:
            raise TypeError(f"Array {k!r} has dtype object; only plain numeric arrays are saved.")
    os.makedirs(dir_path, exist_ok=True)
    meta = {
        "format": kind,
        "format_version": version,
        **{k: v for k, v in meta.items() if k not in ("format", "format_version")},
        "arrays": array_manifest(arrays),
    }

    def write_npz(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def write_json(tmp):
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)

    atomic_write(os.path.join(dir_path, npz_name), write_npz)
    if adata is not None:
        atomic_write(os.path.join(dir_path, adata_name), lambda tmp: adata.write_h5ad(tmp))
    atomic_write(os.path.join(dir_path, json_name), write_json)


def read_model_dir(
    dir_path: str,
    *,
    json_name: str = MODEL_JSON,
    npz_name: str = MODEL_NPZ,
    kind: str = "jaxvi",
    max_version: int = FORMAT_VERSION,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Read ``(meta, arrays)`` written by :func:`write_model_dir`, refusing anything else.

    Raises
    ------
    FileNotFoundError
        ``json_name`` or ``npz_name`` is missing.
    ValueError
        Truncated or corrupted files (invalid JSON, not a zip archive, CRC or checksum
        mismatch, unreadable members), another file kind, a format version newer than
        ``max_version``, arrays whose shape or dtype differ from the declaration in the
        JSON, and any array that would need pickle (code execution) to load.
    """
    json_path = os.path.join(dir_path, json_name)
    npz_path = os.path.join(dir_path, npz_name)
    if not os.path.exists(json_path):
        hint = ""
        if os.path.exists(os.path.join(dir_path, "model.pt")):
            hint = (
                " It holds a scvi-tools model.pt, a pickle that jaxvi does not execute; convert "
                "its weights with jaxvi.io.bridge."
            )
        raise FileNotFoundError(f"No saved {kind} in {dir_path} ({json_name} missing).{hint}")
    try:
        with open(json_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_path} is corrupted or truncated (not valid JSON: {e}).") from e
    if not isinstance(meta, dict) or meta.get("format") != kind:
        raise ValueError(f"{json_path} is not a {kind} file.")
    try:
        version = int(meta.get("format_version", -1))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{json_path} has an invalid format_version.") from e
    if version > max_version:
        raise ValueError(
            f"{dir_path} was saved with format version {version}, newer than this jaxvi reads "
            f"({max_version}); upgrade jaxvi."
        )
    if not os.path.exists(npz_path):
        raise FileNotFoundError(f"{npz_path} is missing: the save is incomplete.")
    arrays = _read_npz(npz_path)
    declared = meta.get("arrays")
    if declared is not None:
        _check_manifest(npz_path, declared, arrays)
    return meta, arrays


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` read member by member, never unpickling."""
    fmt = np.lib.format
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"{path} is corrupted: CRC mismatch in member {bad!r}.")
            arrays = {}
            for name in zf.namelist():
                if not name.endswith(".npy"):
                    raise ValueError(f"{path} holds a member {name!r} that is not an array.")
                with zf.open(name) as f:
                    version = fmt.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = fmt.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = fmt.read_array_header_2_0(f)
                    if dtype.hasobject:
                        raise PickleRefused(
                            f"{path}: array {name[:-4]!r} holds Python objects, which only "
                            "pickle (running code from the file) could load: refused."
                        )
                with zf.open(name) as f:
                    arrays[name[:-4]] = fmt.read_array(f, allow_pickle=False)
            return arrays
    except PickleRefused:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{path} is corrupted or truncated: {e}") from e


class PickleRefused(ValueError):
    """A saved file would need pickle (arbitrary code execution) to load."""


def _check_manifest(path: str, declared: dict, arrays: dict[str, np.ndarray]) -> None:
    if not isinstance(declared, dict):
        raise ValueError(f"{path}: the array declaration in the JSON is malformed.")
    missing = sorted(set(declared) - set(arrays))
    extra = sorted(set(arrays) - set(declared))
    if missing or extra:
        raise ValueError(
            f"{path} does not hold the declared arrays: missing {missing[:5]}, "
            f"undeclared {extra[:5]}."
        )
    for k, d in declared.items():
        a = arrays[k]
        if list(a.shape) != list(d.get("shape", [])) or a.dtype.str != d.get("dtype"):
            raise ValueError(
                f"{path}: array {k!r} is {a.dtype.str}{list(a.shape)} but the JSON declares "
                f"{d.get('dtype')}{d.get('shape')}."
            )
        digest = hashlib.sha256(a.tobytes()).hexdigest()
        if "sha256" in d and digest != d["sha256"]:
            raise ValueError(f"{path}: array {k!r} is corrupted (checksum mismatch).")
