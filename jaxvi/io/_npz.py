"""Saving and loading models: arrays in ``model.npz``, everything else in ``model.json``.

Nothing in a saved model executes code on load: arrays are read member by member with
``allow_pickle=False`` and the rest is JSON. A save writes the complete new directory beside
the old one and switches the two in one atomic rename (:func:`jaxvi.safefs.replace_directory`),
so a process killed at any moment, a full disk or a concurrent save leaves the directory
holding one complete version; a load opens all files from one version.

What a load checks, in order (each failure a ``ValueError`` naming the file and field):
regular files only (no FIFO or device), sizes bounded (``model.json`` at most
:data:`MAX_JSON_BYTES`; ``model.npz`` members stored uncompressed, each holding the bytes its
header declares), the format and version, the JSON checksum ``meta_sha256`` (detects
accidental corruption of the JSON; it is not a signature), the whole JSON against its schema
(:mod:`jaxvi.schema`), then each array's dtype (plain little-endian numbers), shape and
SHA-256 against the JSON's declaration.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib

import numpy as np

from jaxvi import safefs, schema
from jaxvi.module import SCANVAEConfig, VAEConfig

__all__ = [
    "FORMAT_VERSION",
    "PickleRefused",
    "array_manifest",
    "flatten_tree",
    "meta_digest",
    "read_model_dir",
    "read_saved_model",
    "unflatten_tree",
    "write_model_dir",
]

FORMAT_VERSION = 1
MODEL_JSON = "model.json"
MODEL_NPZ = "model.npz"
ADATA_FILE = "adata.h5ad"
MAX_JSON_BYTES = 1 << 30
MAX_NPZ_MEMBERS = 100_000
DIGEST_KEY = "meta_sha256"


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
    """Write one file atomically (temporary name, fsync, rename), with umask-respecting
    permissions (see :func:`jaxvi.safefs.write_file_atomically`)."""
    safefs.write_file_atomically(path, write)


def meta_digest(meta: dict) -> str:
    """SHA-256 of ``meta`` without its ``meta_sha256`` entry, as canonical JSON (sorted keys,
    no spaces): the checksum a saved JSON carries of itself."""
    body = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


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
    """Write ``json_name`` (``meta`` plus format fields, the array manifest and its own
    checksum), ``npz_name`` and maybe the AnnData as one atomic switch of ``dir_path``.

    Other files in ``dir_path`` are kept; an ``adata.h5ad`` of an earlier save is dropped
    when this one has none (it would not belong to the new model). Raises ``ValueError`` if
    a model is there and ``overwrite`` is False.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if v.dtype.hasobject:
            raise TypeError(f"Array {k!r} has dtype object; only plain numeric arrays are saved.")
    meta = {
        "format": kind,
        "format_version": version,
        **{
            k: v
            for k, v in meta.items()
            if k not in ("format", "format_version", "arrays", DIGEST_KEY)
        },
        "arrays": array_manifest(arrays),
    }
    meta[DIGEST_KEY] = meta_digest(meta)

    def refuse_existing(path):
        if os.path.exists(os.path.join(path, json_name)) and not overwrite:
            raise ValueError(
                f"{dir_path} already contains a saved model; pass `overwrite=True` to replace it."
            )

    def fill(stage):
        with open(os.path.join(stage, npz_name), "xb") as f:
            np.savez(f, **arrays)
        if adata is not None:
            adata.write_h5ad(os.path.join(stage, adata_name))
        with open(os.path.join(stage, json_name), "x") as f:
            json.dump(meta, f, indent=1)

    safefs.replace_directory(dir_path, fill, (json_name, npz_name, adata_name), refuse_existing)


def read_model_dir(
    dir_path: str,
    *,
    json_name: str = MODEL_JSON,
    npz_name: str = MODEL_NPZ,
    kind: str = "jaxvi",
    max_version: int = FORMAT_VERSION,
) -> tuple[dict, dict[str, np.ndarray]]:
    """Read ``(meta, arrays)`` written by :func:`write_model_dir`, refusing anything else.

    All files come from one version of the directory, even while another process saves to
    it.

    Raises
    ------
    FileNotFoundError
        ``json_name`` or ``npz_name`` is missing.
    ValueError
        Files that are not regular files or exceed the size bounds, truncated or corrupted
        files (invalid JSON, not a zip archive, CRC, JSON or array checksum mismatch,
        unreadable members), compressed members, another file kind, a format version newer
        than ``max_version``, a JSON that fails its schema (:mod:`jaxvi.schema`; the message
        names the field), arrays whose dtype is not plain little-endian numeric or whose
        shape or dtype differ from the declaration in the JSON, and any array that would need
        pickle (code execution) to load.
    """
    meta, arrays, _ = _read_snapshot(dir_path, json_name, npz_name, kind, max_version, None)
    return meta, arrays


def read_saved_model(
    dir_path: str,
    read_adata: bool = True,
    *,
    json_name: str = MODEL_JSON,
    npz_name: str = MODEL_NPZ,
    adata_name: str = ADATA_FILE,
):
    """``(meta, arrays, adata)`` of a directory written by :meth:`jaxvi.SCVI.save`, all from
    one version of it (``adata`` the saved ``adata_name`` read into memory, or None when
    there is none or ``read_adata`` is False). Checks as :func:`read_model_dir`."""
    return _read_snapshot(
        dir_path, json_name, npz_name, "jaxvi", FORMAT_VERSION, adata_name if read_adata else None
    )


def _check_model_meta(meta, where: str) -> None:
    # schema cannot import the architecture (jaxvi.module imports jaxvi.data, which imports
    # schema), so the config's field names come from here
    schema.check_model_meta(meta, where, configs=_CONFIGS)


_CONFIGS = {
    "SCVI": VAEConfig.__dataclass_fields__,
    "SCANVI": SCANVAEConfig.__dataclass_fields__,
}


_VALIDATORS = {"jaxvi": _check_model_meta, "jaxvi-checkpoint": schema.check_checkpoint_meta}


def _read_snapshot(dir_path, json_name, npz_name, kind, max_version, adata_name):
    """Open ``dir_path`` once and read its files relative to that handle; retried when a
    concurrent save switched the directory and deleted the old version mid-read."""
    for attempt in range(5):
        try:
            dir_fd = safefs.open_directory(dir_path)
        except (FileNotFoundError, NotADirectoryError):
            raise FileNotFoundError(
                f"No saved {kind} in {dir_path} (no such directory)."
            ) from None
        try:
            return _read_from(dir_fd, dir_path, json_name, npz_name, kind, max_version, adata_name)
        except FileNotFoundError:
            if attempt == 4 or not _switched(dir_path, dir_fd):
                raise
        finally:
            os.close(dir_fd)
    raise AssertionError("unreachable")


def _switched(dir_path: str, dir_fd: int) -> bool:
    try:
        return os.stat(dir_path).st_ino != os.fstat(dir_fd).st_ino
    except OSError:
        return True


def _read_from(dir_fd, dir_path, json_name, npz_name, kind, max_version, adata_name):
    json_path = os.path.join(dir_path, json_name)
    npz_path = os.path.join(dir_path, npz_name)
    try:
        json_file = safefs.open_regular(json_name, dir_fd, json_path)
    except FileNotFoundError:
        hint = ""
        if os.path.exists(os.path.join(dir_path, "model.pt")):
            hint = (
                " It holds a scvi-tools model.pt, a pickle that jaxvi does not execute; convert "
                "its weights with jaxvi.io.bridge."
            )
        raise FileNotFoundError(
            f"No saved {kind} in {dir_path} ({json_name} missing).{hint}"
        ) from None
    with json_file:
        text = safefs.read_bounded(json_file, MAX_JSON_BYTES, json_path)
    try:
        meta = json.loads(text.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{json_path} is corrupted or truncated (not valid JSON: {e}).") from e
    if not isinstance(meta, dict) or meta.get("format") != kind:
        raise ValueError(f"{json_path} is not a {kind} file.")
    version = meta.get("format_version", -1)
    if type(version) is not int:
        raise ValueError(f"{json_path} has an invalid format_version.")
    if version > max_version:
        raise ValueError(
            f"{dir_path} was saved with format version {version}, newer than this jaxvi reads "
            f"({max_version}); upgrade jaxvi."
        )
    if DIGEST_KEY in meta and meta[DIGEST_KEY] != meta_digest(meta):
        raise ValueError(
            f"{json_path} is corrupted: its contents do not match their checksum "
            f"({DIGEST_KEY}); it was changed after saving."
        )
    declared = meta.get("arrays")
    if declared is not None:
        schema.check_manifest(json_path, declared)
    validate = _VALIDATORS.get(kind)
    if validate is not None:
        validate(meta, json_path)
    try:
        npz_file = safefs.open_regular(npz_name, dir_fd, npz_path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{npz_path} is missing: the save is incomplete.") from None
    with npz_file:
        arrays = _read_npz(npz_file, npz_path)
    if declared is not None:
        _check_manifest(npz_path, declared, arrays)
    adata = None
    if adata_name is not None:
        adata = _read_adata(dir_fd, adata_name, os.path.join(dir_path, adata_name))
    return meta, arrays, adata


def _read_adata(dir_fd: int, name: str, path: str):
    """The saved AnnData of the snapshot, or None when the save has none."""
    import anndata

    try:
        f = safefs.open_regular(name, dir_fd, path)
    except FileNotFoundError:
        return None
    with f:
        proc = f"/proc/self/fd/{f.fileno()}"  # the same inode by path: HDF5's fast driver
        return anndata.read_h5ad(proc if os.path.exists(proc) else f)


def _read_npz(file, path: str) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` (an open regular file) read member by member, never unpickling,
    never inflating, and never allocating more than a member holds."""
    fmt = np.lib.format
    try:
        end = zipfile._EndRecData(file)  # the central directory's size, before parsing it
        if end is not None and end[zipfile._ECD_SIZE] > MAX_NPZ_MEMBERS * 512:
            raise ValueError(f"{path} has a zip directory of {end[zipfile._ECD_SIZE]} bytes.")
        with zipfile.ZipFile(file) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_NPZ_MEMBERS:
                raise ValueError(f"{path} holds more than {MAX_NPZ_MEMBERS} members.")
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise ValueError(
                        f"{path} holds a member {info.filename!r} that is not an array."
                    )
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(
                        f"{path}: member {info.filename!r} is compressed; jaxvi writes arrays "
                        "stored and does not inflate (a compressed member can be a zip bomb)."
                    )
            bad = zf.testzip()
            if bad is not None:
                raise ValueError(f"{path} is corrupted: CRC mismatch in member {bad!r}.")
            arrays = {}
            for info in infos:
                name = info.filename[:-4]
                with zf.open(info) as f:
                    version = fmt.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = fmt.read_array_header_1_0(f, max_header_size=10_000)
                    else:
                        shape, _, dtype = fmt.read_array_header_2_0(f, max_header_size=10_000)
                    if dtype.hasobject:
                        raise PickleRefused(
                            f"{path}: array {name!r} holds Python objects, which only "
                            "pickle (running code from the file) could load: refused."
                        )
                    if dtype.str not in schema.ALLOWED_ARRAY_DTYPES:
                        raise ValueError(
                            f"{path}: array {name!r} has dtype {dtype.str!r}; only plain "
                            "little-endian numeric arrays are read."
                        )
                    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if need > info.file_size - f.tell():
                        raise ValueError(
                            f"{path}: array {name!r} declares shape {shape} ({need} bytes) but "
                            f"its member holds {info.file_size - f.tell()} bytes."
                        )
                with zf.open(info) as f:
                    arrays[name] = fmt.read_array(f, allow_pickle=False)
            return arrays
    except PickleRefused:
        raise
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        ValueError,
        KeyError,
        RuntimeError,  # an "encrypted" member
        NotImplementedError,
    ) as e:
        if isinstance(e, ValueError) and str(e).startswith(path):
            raise
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
