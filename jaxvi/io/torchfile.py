"""Read and write PyTorch's ``torch.save`` zip files without torch and without running code.

A ``model.pt`` written by ``torch.save`` is a zip archive ``<name>/data.pkl`` (a pickle, protocol
2) plus one raw little-endian file ``<name>/data/<key>`` per tensor storage. Unpickling it with
:mod:`pickle` would import and call whatever the file names, so :func:`load` uses its own
unpickler that resolves only an allow-list of names and maps each to a jaxvi function that
builds plain data:

- tensors (``torch._utils._rebuild_tensor_v2`` over ``torch.<Type>Storage``) become NumPy
  arrays read from the storage files, with their offset, shape and strides bounds-checked;
- NumPy arrays, dtypes and scalars (``numpy._core.multiarray._reconstruct`` / ``scalar``,
  ``numpy.dtype``): the file never reaches NumPy's own reconstruction (no ``__setstate__`` on
  a dtype or an array, no ``ndarray(..., buffer=...)``). A dtype is looked up in a closed list
  of plain little-endian numeric dtypes (plus fixed-width strings, and ``object`` for arrays of
  plain Python values); an array is built by jaxvi as a fresh copy of exactly
  ``prod(shape) * itemsize`` bytes of the file, once, and an array the file never fills is
  refused. ``numpy.ndarray`` itself cannot be called;
- ``collections.OrderedDict``, ``collections.defaultdict`` (read as a dict), ``slice``,
  ``bytes`` (``_codecs.encode`` with ``latin1`` only);
- pandas DataFrames (scvi-tools' training history): the DataFrame, BlockManager, block and
  Index names are mapped to inert record objects; once the whole file is read, each recorded
  frame is rebuilt by jaxvi from its arrays with ``pandas.DataFrame(values, index, columns)``.
  Frames of any other layout (several blocks, object values, MultiIndex, ...) are refused.

Every other name (``os.system``, ``builtins.eval``, any class) raises
:class:`UnsafePickleError` naming it, before anything is called. ``BUILD`` is only applied to
jaxvi's own records, and ``NEWOBJ`` only to allowed classes, so a file cannot set attributes
on jaxvi's own functions either.

The work a file can cause is bounded: at most :data:`MAX_MEMBERS` zip members, none of them
compressed (``torch.save`` never compresses, so no member inflates beyond its size on disk),
a ``data.pkl`` of at most :data:`MAX_PICKLE_BYTES`, containers nested at most
:data:`MAX_DEPTH` deep and expanding (shared references counted each time they are reached)
to at most :data:`MAX_TREE_NODES` values, no tensor with more elements than its storage, and
arrays and tensors totalling at most the file's size plus :data:`OUTPUT_SLACK_BYTES`.

:func:`save` writes the same format (protocol 2 pickle, 64-byte-aligned storages, the records
``torch.save`` writes), again without torch: tensors are given as :class:`Tensor` wrappers of
NumPy arrays and are written as ``torch._utils._rebuild_tensor_v2`` references, which
``torch.load`` (as scvi-tools calls it) turns back into tensors.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import stat
import struct
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np

from jaxvi.io._torch_records import (  # noqa: F401  (documented limits)
    _INDEX,
    _NDARRAY,
    _PLAIN_VALUES,
    _RANGE_INDEX,
    MAX_DEPTH,
    MAX_MEMBERS,
    MAX_PICKLE_BYTES,
    MAX_TREE_NODES,
    OUTPUT_SLACK_BYTES,
    UnsafePickleError,
    _ArrayRecord,
    _bytes,
    _defaultdict,
    _DtypeRecord,
    _FrameRecord,
    _latin1_encode,
    _ManagerRecord,
    _materialise,
    _new_index,
    _np_dtype,
    _np_reconstruct,
    _np_scalar,
    _Record,
    _Storage,
    _tree_size,
    _unpickle_block,
)
from jaxvi.io._torch_writer import Tensor, save

__all__ = ["Tensor", "UnsafePickleError", "load", "save"]


# --------------------------------------------------------------------------- storages
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class _StorageType:
    """Stand-in for ``torch.<Type>Storage``: only its dtype is used."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", np.dtype(_STORAGE_DTYPES[name]))

    def __setattr__(self, *_):
        raise UnsafePickleError("model file tried to modify a storage type.")


class _Budget:
    """Bytes of arrays and tensors a file may still make the reader build."""

    __slots__ = ("left",)

    def __init__(self, nbytes: int):
        self.left = int(nbytes)

    def charge(self, nbytes: int, what: str) -> None:
        self.left -= int(nbytes)
        if self.left < 0:
            raise UnsafePickleError(
                f"{what} would take the arrays built from this file past its own size plus "
                f"{OUTPUT_SLACK_BYTES >> 20} MiB: refused (a memory amplification)."
            )


def _ints(values, what: str) -> tuple[int, ...]:
    """A tuple of at most 32 plain ints (a shape, stride)."""
    if not isinstance(values, tuple | list) or len(values) > 32:
        raise UnsafePickleError(f"{what} is not a tuple of at most 32 integers.")
    if not all(type(v) is int for v in values):
        raise UnsafePickleError(f"{what} holds something other than integers.")
    return tuple(values)


def _rebuild_tensor(
    budget: _Budget, storage, offset, size, stride, requires_grad=False, hooks=None, *rest
):
    """``torch._utils._rebuild_tensor_v2`` as a bounds-checked NumPy view, copied."""
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("tensor rebuilt from something that is not a storage.")
    if hooks:
        raise UnsafePickleError("tensor with backward hooks refused.")
    size = _ints(size, "tensor size")
    stride = _ints(stride, "tensor stride")
    if type(offset) is not int:
        raise UnsafePickleError("tensor offset is not an integer.")
    flat = storage.array
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise UnsafePickleError(f"tensor with invalid layout (size {size}, stride {stride}).")
    numel = math.prod(size)
    if numel > flat.size:
        raise UnsafePickleError(
            f"tensor of size {size} has more elements than its storage ({flat.size}): refused "
            "(torch.save never writes one; it would amplify the file in memory)."
        )
    budget.charge(numel * flat.dtype.itemsize, f"tensor of size {size}")
    if numel == 0:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
    if last >= flat.size:
        raise UnsafePickleError(
            f"tensor (size {size}, stride {stride}, offset {offset}) reads past its storage "
            f"of {flat.size} elements."
        )
    item = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    return np.array(view)


# --------------------------------------------------------------------------- unpickler
_NP_CORE = ("numpy._core.multiarray", "numpy.core.multiarray")
_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): _defaultdict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "slice"): slice,
    ("builtins", "bytes"): _bytes,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): _np_dtype,
    ("numpy", "ndarray"): _NDARRAY,
    _REBUILD_TENSOR: _rebuild_tensor,  # bound to the file's budget in find_class
    ("pandas.core.frame", "DataFrame"): _FrameRecord,
    ("pandas.core.internals.managers", "BlockManager"): _ManagerRecord,
    ("pandas._libs.internals", "_unpickle_block"): _unpickle_block,
    ("pandas.core.internals.blocks", "_unpickle_block"): _unpickle_block,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
    ("pandas.core.indexes.base", "Index"): _INDEX,
    ("pandas.core.indexes.range", "RangeIndex"): _RANGE_INDEX,
}
for _name in ("dict", "list", "slice", "bytes"):  # protocol 2 writes builtins as __builtin__
    _ALLOWED[("__builtin__", _name)] = _ALLOWED[("builtins", _name)]
for _mod in _NP_CORE:
    _ALLOWED[(_mod, "_reconstruct")] = _np_reconstruct
    _ALLOWED[(_mod, "scalar")] = _np_scalar
for _name in _STORAGE_DTYPES:
    _ALLOWED[("torch", _name)] = _StorageType(_name)

# Classes NEWOBJ may instantiate.
_NEWABLE = (OrderedDict, dict, _FrameRecord, _ManagerRecord)


class _Unpickler(pickle._Unpickler):  # the pure-Python one: its opcodes can be restricted
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, read_storage, budget: _Budget):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage
        self._storages: dict[str, _Storage] = {}
        self._budget = budget

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"the model file refers to {module}.{name}, which jaxvi does not load "
                "(only tensors, NumPy arrays, pandas history tables and plain containers); "
                "refused without running it."
            )
        if (module, name) == _REBUILD_TENSOR:
            budget = self._budget

            def rebuild(*args):
                return _rebuild_tensor(budget, *args)

            return rebuild
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise UnsafePickleError(f"unknown persistent id {pid!r} refused.")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError("persistent storage of an unknown type refused.")
        if not isinstance(key, str | bytes) or type(numel) is not int:
            raise UnsafePickleError("persistent storage with a malformed key or size refused.")
        key = key.decode() if isinstance(key, bytes) else key
        if key not in self._storages:
            raw = self._read_storage(key)
            dtype = storage_type.dtype
            if len(raw) % dtype.itemsize:
                raise UnsafePickleError(f"storage {key} has a truncated last element.")
            arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
            if dtype == np.bool_:  # any non-zero byte is True, as torch reads it
                arr = np.frombuffer(raw, np.uint8) != 0
            if storage_type.name != "UntypedStorage" and arr.size < numel:
                raise UnsafePickleError(f"storage {key} holds fewer elements than declared.")
            self._storages[key] = _Storage(arr, storage_type.name)
        storage = self._storages[key]
        if storage.kind != storage_type.name:
            raise UnsafePickleError(f"storage {key} is referred to with two different types.")
        return storage

    def _build_array(self, record: _ArrayRecord, state) -> None:
        """Fill ``record`` from NumPy's pickled array state ``([1,] shape, dtype, fortran,
        data)``: a fresh array built by jaxvi from exactly the bytes (or plain values) it
        needs; never ``ndarray.__setstate__``."""
        if record.array is not None:
            raise UnsafePickleError(
                "the state of a NumPy array set twice refused (it would free memory that "
                "other arrays still point to)."
            )
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("a NumPy array state of an unknown layout refused.")
        if len(state) == 5:
            if state[0] != 1 or type(state[0]) is not int:
                raise UnsafePickleError("a NumPy array state of an unknown version refused.")
            state = state[1:]
        shape, dtype, fortran, data = state
        shape = _ints(shape, "NumPy array shape")
        if any(n < 0 for n in shape):
            raise UnsafePickleError(f"NumPy array of negative shape {shape} refused.")
        if not isinstance(dtype, _DtypeRecord) or type(fortran) is not bool:
            raise UnsafePickleError("a NumPy array state without a readable dtype refused.")
        dt = dtype.dtype
        n = math.prod(shape)
        order = "F" if fortran else "C"
        if dt.hasobject:
            if not isinstance(data, list) or len(data) != n:
                raise UnsafePickleError(f"object array of shape {shape} without its values.")
            bad = next((v for v in data if not isinstance(v, _PLAIN_VALUES)), None)
            if bad is not None:
                raise UnsafePickleError(f"an object array holding a {type(bad).__name__} refused.")
            self._budget.charge(8 * n, f"object array of shape {shape}")
            arr = np.empty(n, dtype=object)
            arr[:] = data
        else:
            if not isinstance(data, bytes) or len(data) != n * dt.itemsize:
                raise UnsafePickleError(
                    f"NumPy array of shape {shape} and dtype {dt} whose data is not exactly "
                    f"{n * dt.itemsize} bytes refused."
                )
            self._budget.charge(len(data), f"NumPy array of shape {shape}")
            arr = np.frombuffer(data, dtype=dt, count=n).copy()
            if dt == np.bool_:
                arr = arr.view(np.uint8) != 0
        record.array = arr.reshape(shape, order=order)

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is OrderedDict and isinstance(state, dict):
            return  # a state dict's ``_metadata`` (module versions): not needed, dropped
        if isinstance(inst, _ArrayRecord):
            self._build_array(inst, state)
        elif isinstance(inst, _DtypeRecord):
            inst.setstate(state)
        elif isinstance(inst, _Record):
            inst.__setstate__(state)
        else:
            raise UnsafePickleError(f"setting the state of a {type(inst).__name__} refused.")

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if not any(cls is c for c in _NEWABLE):
            raise UnsafePickleError(f"creating a {cls!r} refused.")
        if not isinstance(args, tuple):
            raise UnsafePickleError("NEWOBJ without an argument tuple refused.")
        self.append(cls.__new__(cls, *args) if cls in (OrderedDict, dict) else cls(*args))

    def _refuse(self):
        raise UnsafePickleError("pickle opcode not allowed in a model file.")

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _refuse
    dispatch[pickle.INST[0]] = _refuse
    dispatch[pickle.OBJ[0]] = _refuse


# Errors a malformed pickle or archive raises inside the reader (never from running code).
_MALFORMED = (
    pickle.UnpicklingError,
    EOFError,
    TypeError,
    AttributeError,
    IndexError,
    KeyError,
    ValueError,
    LookupError,
    struct.error,
    OverflowError,
    RecursionError,
    MemoryError,
    UnicodeDecodeError,
    zipfile.BadZipFile,
    NotImplementedError,
)


def _open_regular(path: str):
    """``path`` opened for reading if it is a regular file; never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file (a device, FIFO or directory).")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: str) -> bytes:
    """A member's bytes: stored (never inflated) and at most ``limit`` bytes."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise UnsafePickleError(
            f"{path}: member {info.filename!r} is compressed; torch.save writes every member "
            "stored, and jaxvi does not inflate (a compressed member can be a zip bomb)."
        )
    if info.file_size > limit:
        raise UnsafePickleError(
            f"{path}: member {info.filename!r} declares {info.file_size} bytes, more than "
            f"{limit} allowed."
        )
    try:
        return zf.read(info)
    except (OSError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:
        raise UnsafePickleError(
            f"{path}: member {info.filename!r} is corrupted or unreadable ({e})."
        ) from e


def load(path: str) -> Any:
    """Read a ``torch.save`` file into NumPy arrays and plain containers, running no code.

    Parameters
    ----------
    path
        A zip-format ``.pt`` file (PyTorch >= 1.6).

    Returns
    -------
    The saved object with every tensor as a NumPy array of its dtype and shape, and every
    pandas DataFrame rebuilt from its numeric arrays.

    Raises
    ------
    UnsafePickleError
        If the file refers to any name outside the allow-list (the message names it), its
        tensors, arrays or frames are malformed, or it exceeds the bounds on the reader's work
        (see the module docstring). Nothing the file names is ever called.
    ValueError
        If the file is not a regular file or not a zip-format torch file.
    """
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        try:
            end = zipfile._EndRecData(f)  # the central directory's size, before parsing it
        except (OSError, *_MALFORMED):
            end = None  # ZipFile below says what is wrong
        if end is not None and end[zipfile._ECD_SIZE] > MAX_MEMBERS * 512:
            raise UnsafePickleError(
                f"{path}: a zip directory of {end[zipfile._ECD_SIZE]} bytes refused (more than "
                f"{MAX_MEMBERS} members)."
            )
        try:
            zf = zipfile.ZipFile(f)
        except (OSError, *_MALFORMED) as e:  # OSError: a seek the broken directory asks for
            raise ValueError(
                f"{path} is not a zip-format torch file (legacy torch.save files are not read)."
            ) from e
        with zf:
            infos = {i.filename: i for i in zf.infolist()}
            if len(zf.infolist()) > MAX_MEMBERS:
                raise UnsafePickleError(f"{path}: more than {MAX_MEMBERS} zip members refused.")
            pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(pkl) != 1:
                raise ValueError(f"{path} is not a torch.save archive (no <name>/data.pkl).")
            prefix = pkl[0][: -len("data.pkl")]
            order = infos.get(prefix + "byteorder")
            if order is not None and _read_member(zf, order, 16, path).strip() not in (
                b"little",
                b"",
            ):
                raise ValueError(f"{path} was written big-endian; not supported.")
            try:

                def read_storage(key: str) -> bytes:
                    info = infos.get(f"{prefix}data/{key}")
                    if info is None:
                        raise UnsafePickleError(f"storage {key!r} is missing from {path}.")
                    return _read_member(zf, info, size, path)

                data = _read_member(zf, infos[pkl[0]], MAX_PICKLE_BYTES, path)
                budget = _Budget(size + OUTPUT_SLACK_BYTES)
                obj = _Unpickler(data, read_storage, budget).load()
                _tree_size(obj, {})
                return _materialise(obj, {})
            except UnsafePickleError:
                raise
            except _MALFORMED as e:
                raise UnsafePickleError(f"{path}: malformed or disallowed pickle ({e}).") from e
