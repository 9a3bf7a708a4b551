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
import sys
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["Tensor", "UnsafePickleError", "load", "save"]


class UnsafePickleError(ValueError):
    """A ``torch.save`` file refers to something jaxvi refuses to load."""


# --------------------------------------------------------------------------- limits
MAX_MEMBERS = 10_000  # zip members (a scvi-tools SCVI has ~40 storages)
MAX_PICKLE_BYTES = 1 << 30  # data.pkl
MAX_DEPTH = 100  # nesting of containers
MAX_TREE_NODES = 10_000_000  # values after expanding shared references
OUTPUT_SLACK_BYTES = 64 << 20  # arrays built beyond the file's own size

# The dtypes an array or scalar may have, by the spec NumPy pickles (``numpy.dtype(spec)``);
# each maps to a little-endian dtype jaxvi builds itself.
_PLAIN_DTYPES = {
    "b1": "|b1",
    "i1": "|i1",
    "u1": "|u1",
    "i2": "<i2",
    "u2": "<u2",
    "i4": "<i4",
    "u4": "<u4",
    "i8": "<i8",
    "u8": "<u8",
    "f2": "<f2",
    "f4": "<f4",
    "f8": "<f8",
}
_OBJECT_SPECS = ("O8", "O4")
_MAX_STRING_CHARS = 1 << 20
_PLAIN_VALUES = (str, bytes, int, float, bool, np.number, np.bool_, type(None))


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
_DTYPE_STORAGE = {
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.int16): "ShortStorage",
    np.dtype(np.int8): "CharStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


class _StorageType:
    """Stand-in for ``torch.<Type>Storage``: only its dtype is used."""

    __slots__ = ("dtype", "name")

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", np.dtype(_STORAGE_DTYPES[name]))

    def __setattr__(self, *_):
        raise UnsafePickleError("model file tried to modify a storage type.")


class _Storage:
    """A storage read from ``data/<key>``: a flat NumPy array."""

    __slots__ = ("array", "kind")

    def __init__(self, array: np.ndarray, kind: str):
        self.array, self.kind = array, kind


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


# --------------------------------------------------------------------------- numpy
class _ClassRef:
    """A class the file may name but never call (``numpy.ndarray`` as ``_reconstruct``'s
    first argument)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        object.__setattr__(self, "name", name)

    def __setattr__(self, *_):
        raise UnsafePickleError(f"model file tried to modify {self.name}.")

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError(
            f"calling {self.name} from a model file refused (it would make an array from "
            "uninitialised memory or a view of another array's buffer)."
        )


_NDARRAY = _ClassRef("numpy.ndarray")


class _DtypeRecord:
    """``numpy.dtype(spec)`` as a file asks for it: jaxvi's own dtype for ``spec`` (closed
    list, little-endian), whose pickled state (BUILD) may only confirm that layout."""

    __slots__ = ("dtype", "built")

    def __init__(self, dtype: np.dtype):
        self.dtype, self.built = dtype, False

    def setstate(self, state) -> None:
        if self.built:
            raise UnsafePickleError("the state of a dtype set twice: refused.")
        self.built = True
        if not isinstance(state, tuple) or len(state) not in (8, 9):
            raise UnsafePickleError("a dtype state of an unknown layout refused.")
        version, order, subarray, names, fields, elsize, alignment = state[:7]
        if version not in (3, 4) or (len(state) == 9 and state[8] is not None):
            raise UnsafePickleError("a dtype state of an unknown version or with metadata.")
        if subarray is not None or names is not None or fields is not None:
            raise UnsafePickleError(
                "a dtype with sub-arrays or fields refused: only plain numeric dtypes are read."
            )
        if order not in ("<", "|", "=") or (order == "=" and sys.byteorder != "little"):
            raise UnsafePickleError(
                f"a big-endian dtype ({order!r}) refused: only little-endian dtypes are read."
            )
        if type(elsize) is not int or elsize not in (-1, self.dtype.itemsize):
            raise UnsafePickleError(f"a dtype state declaring {elsize} bytes per item refused.")
        if type(alignment) is not int:
            raise UnsafePickleError("a dtype state with a non-integer alignment refused.")


def _np_dtype(spec, align=False, copy=False):
    """``numpy.dtype(spec, align, copy)``: a :class:`_DtypeRecord` of the closed list."""
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy dtype from {type(spec).__name__} refused.")
    if spec in _PLAIN_DTYPES:
        return _DtypeRecord(np.dtype(_PLAIN_DTYPES[spec]))
    if spec in _OBJECT_SPECS:
        return _DtypeRecord(np.dtype(object))
    if spec[:1] in ("U", "S") and spec[1:].isdigit() and 0 < int(spec[1:]) <= _MAX_STRING_CHARS:
        return _DtypeRecord(np.dtype(("<" if spec[0] == "U" else "|") + spec))
    raise UnsafePickleError(
        f"numpy dtype {spec!r} refused: only bool, (u)int8-64, float16/32/64, fixed-width "
        "strings and object arrays of plain values are read."
    )


class _ArrayRecord:
    """``numpy._core.multiarray._reconstruct(ndarray, ...)``: an array the file must fill
    exactly once with BUILD; jaxvi then builds it (:meth:`_Unpickler._build_array`)."""

    __slots__ = ("array",)

    def __init__(self):
        self.array = None


def _np_reconstruct(cls, shape, dtype_code):
    if cls is not _NDARRAY:
        raise UnsafePickleError(f"numpy array subclass {cls!r} refused.")
    return _ArrayRecord()


def _array_of(value, what: str) -> np.ndarray:
    """The NumPy array a record stands for (refusing one the file never filled)."""
    if isinstance(value, _ArrayRecord):
        if value.array is None:
            raise UnsafePickleError(
                f"{what}: a NumPy array the file never filled with data refused (it would be "
                "uninitialised memory)."
            )
        return value.array
    if isinstance(value, np.ndarray):
        return value
    raise UnsafePickleError(f"{what} is not an array.")


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, _DtypeRecord) or dtype.dtype.hasobject:
        raise UnsafePickleError("numpy scalar of an object or unknown dtype refused.")
    if not isinstance(data, bytes) or len(data) != dtype.dtype.itemsize:
        raise UnsafePickleError("numpy scalar whose bytes do not match its dtype refused.")
    value = np.frombuffer(data, dtype=dtype.dtype, count=1).copy()
    if dtype.dtype == np.bool_:
        value = value.view(np.uint8) != 0
    return value[0]


# --------------------------------------------------------------------------- builtins
def _defaultdict(factory=None, *_):
    return {}


def _latin1_encode(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is only allowed for latin1 text.")
    return text.encode("latin1")


def _bytes(*args):
    if args == ():
        return b""
    if len(args) == 1 and isinstance(args[0], bytes):
        return args[0]
    raise UnsafePickleError("bytes(...) with these arguments refused.")


# --------------------------------------------------------------------------- pandas
class _Record:
    """Inert record of a pandas object: constructor arguments and pickled state."""

    kind = "record"

    def __init__(self, *args, **kwargs):
        self.args = args
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _FrameRecord(_Record):
    kind = "DataFrame"


class _ManagerRecord(_Record):
    kind = "BlockManager"


class _IndexClass:
    """Stand-in for ``pandas.Index`` / ``RangeIndex`` as passed to ``_new_Index``."""

    __slots__ = ("name",)

    def __init__(self, name):
        object.__setattr__(self, "name", name)

    def __setattr__(self, *_):
        raise UnsafePickleError("model file tried to modify an index class.")


_INDEX = _IndexClass("Index")
_RANGE_INDEX = _IndexClass("RangeIndex")


class _IndexRecord:
    __slots__ = ("cls", "data")

    def __init__(self, cls, data):
        if not isinstance(cls, _IndexClass) or not isinstance(data, dict):
            raise UnsafePickleError("pandas index of an unsupported kind refused.")
        self.cls, self.data = cls, data


class _BlockRecord:
    __slots__ = ("values", "placement", "ndim")

    def __init__(self, values, placement, ndim=2, *_):
        self.values, self.placement, self.ndim = values, placement, ndim


def _unpickle_block(values, placement, ndim=2, *_):
    return _BlockRecord(values, placement, ndim)


def _new_index(cls, data):
    return _IndexRecord(cls, data)


def _index_from_record(rec) -> Any:
    import pandas as pd

    if isinstance(rec, _IndexRecord):
        d = rec.data
        if not isinstance(d.get("name"), str | int | type(None)):
            raise UnsafePickleError("pandas index with a non-plain name refused.")
        if rec.cls is _RANGE_INDEX:
            return pd.RangeIndex(
                int(d.get("start", 0)), int(d["stop"]), int(d.get("step", 1)), name=d.get("name")
            )
        values = _array_of(d.get("data"), "pandas index data")
        if values.dtype.hasobject and not all(isinstance(v, str | int | float) for v in values):
            raise UnsafePickleError("pandas index holding objects refused.")
        return pd.Index(values, name=d.get("name"))
    raise UnsafePickleError(f"unsupported pandas index {type(rec).__name__} refused.")


def _frame_from_record(rec: _FrameRecord):
    """Rebuild a DataFrame of numeric columns from its recorded pickle state."""
    import pandas as pd

    state = rec.state
    mgr = state.get("_mgr") if isinstance(state, dict) else None
    if not isinstance(mgr, _ManagerRecord):
        raise UnsafePickleError("pandas DataFrame of an unsupported layout refused.")
    if mgr.state is None and len(mgr.args) == 2:  # pandas 2: BlockManager(blocks, axes)
        blocks, axes = mgr.args
    elif (
        isinstance(mgr.state, tuple) and len(mgr.state) == 4 and isinstance(mgr.state[3], dict)
    ):  # older pandas: __setstate__((axes, values, items, {"0.14.1": {...}}))
        extra = mgr.state[3].get("0.14.1", {})
        axes = extra.get("axes")
        blocks = extra.get("blocks", [])
        if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
            raise UnsafePickleError("pandas DataFrame of an unsupported layout refused.")
        blocks = [_BlockRecord(b.get("values"), b.get("mgr_locs")) for b in blocks]
    else:
        raise UnsafePickleError("pandas DataFrame of an unsupported layout refused.")
    if not isinstance(blocks, list | tuple) or not all(
        isinstance(b, _BlockRecord) for b in blocks
    ):
        raise UnsafePickleError("pandas DataFrame with unknown blocks refused.")
    blocks = [(_array_of(b.values, "pandas block"), b.placement) for b in blocks]
    if not isinstance(axes, list) or len(axes) != 2:
        raise UnsafePickleError("pandas DataFrame must have two axes.")
    columns, index = (_index_from_record(a) for a in axes)
    if len(columns) * len(index) != sum(v.size for v, _ in blocks):
        raise UnsafePickleError("pandas DataFrame whose blocks do not fill its axes refused.")
    values = np.zeros((len(columns), len(index)), np.float64)
    filled = np.zeros(len(columns), bool)
    for block_values, locs in blocks:
        if not isinstance(block_values, np.ndarray):
            raise UnsafePickleError("pandas DataFrame block without array values refused.")
        if block_values.dtype.hasobject:  # scvi-tools' history: Python floats in objects
            if not all(
                v is None or isinstance(v, float | int | np.number) for v in block_values.flat
            ):
                raise UnsafePickleError("pandas DataFrame with non-numeric values refused.")
            block_values = np.array(
                [np.nan if v is None else float(v) for v in block_values.flat]
            ).reshape(block_values.shape)
        elif block_values.dtype.kind not in "fiub":
            raise UnsafePickleError("pandas DataFrame with non-numeric columns refused.")
        if isinstance(locs, slice):
            locs = np.arange(len(columns))[locs]
        elif isinstance(locs, _ArrayRecord):
            locs = _array_of(locs, "pandas block placement")
        locs = np.asarray(locs, np.int64).ravel()
        if len(locs) * len(index) != block_values.size:
            raise UnsafePickleError("pandas DataFrame with inconsistent block placement.")
        block_values = block_values.reshape(len(locs), len(index))
        if np.any(locs < 0) or np.any(locs >= len(columns)) or np.any(filled[locs]):
            raise UnsafePickleError("pandas DataFrame with inconsistent block placement.")
        values[locs] = block_values
        filled[locs] = True
    if not filled.all():
        raise UnsafePickleError("pandas DataFrame with missing columns refused.")
    return pd.DataFrame(values.T, index=index, columns=columns)


def _tree_size(obj, sizes: dict, depth: int = 0) -> int:
    """Values reached from ``obj`` with every shared reference counted each time (what a
    consumer walking the result visits); memoised, so linear in the distinct objects."""
    if depth > MAX_DEPTH:
        raise UnsafePickleError(f"model file nests containers more than {MAX_DEPTH} deep.")
    key = id(obj)
    if key in sizes:
        return sizes[key]
    if isinstance(obj, dict):
        n = 1 + sum(_tree_size(v, sizes, depth + 1) for v in obj.values()) + len(obj)
    elif isinstance(obj, list | tuple):
        n = 1 + sum(_tree_size(v, sizes, depth + 1) for v in obj)
    elif isinstance(obj, _ArrayRecord) and obj.array is not None and obj.array.dtype.hasobject:
        n = 1 + obj.array.size
    elif isinstance(obj, _Record):
        n = 1 + _tree_size(obj.args, sizes, depth + 1) + _tree_size(obj.state, sizes, depth + 1)
    else:
        n = 1
    if n > MAX_TREE_NODES:
        raise UnsafePickleError(
            f"model file whose shared references expand to more than {MAX_TREE_NODES:,} values "
            "refused (a 'billion laughs' file)."
        )
    sizes[key] = n
    return n


def _materialise(obj, memo: dict, depth: int = 0):
    """Replace records by arrays and DataFrames and refuse any other leftover record; a
    shared object stays shared (``memo``), so the work is linear in the distinct objects."""
    if depth > MAX_DEPTH:
        raise UnsafePickleError(f"model file nests containers more than {MAX_DEPTH} deep.")
    key = id(obj)
    if key in memo:
        return memo[key][1]
    if isinstance(obj, _ArrayRecord):
        out = _array_of(obj, "a value")
    elif isinstance(obj, _DtypeRecord):
        out = obj.dtype
    elif isinstance(obj, _FrameRecord):
        out = _frame_from_record(obj)
    elif isinstance(obj, _Record | _IndexRecord | _BlockRecord | _Storage | _ClassRef):
        raise UnsafePickleError(f"a bare {type(obj).__name__} outside a DataFrame refused.")
    elif isinstance(obj, OrderedDict):
        out = OrderedDict((k, _materialise(v, memo, depth + 1)) for k, v in obj.items())
    elif isinstance(obj, dict):
        out = {k: _materialise(v, memo, depth + 1) for k, v in obj.items()}
    elif isinstance(obj, list):
        out = [_materialise(v, memo, depth + 1) for v in obj]
    elif isinstance(obj, tuple):
        out = tuple(_materialise(v, memo, depth + 1) for v in obj)
    else:
        out = obj
    memo[key] = (obj, out)  # holding obj keeps its id from being reused
    return out


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


# --------------------------------------------------------------------------- writer
class Tensor:
    """A NumPy array to be written as a torch tensor by :func:`save`.

    Parameters
    ----------
    array
        Any shape; dtype one of float16/32/64, int8/16/32/64, uint8, bool.
    """

    __slots__ = ("array",)

    def __init__(self, array):
        arr = np.array(array, order="C", copy=True)
        if arr.dtype not in _DTYPE_STORAGE:
            raise TypeError(f"dtype {arr.dtype} cannot be written as a torch tensor.")
        self.array = arr


class _Global:
    """A reference written as a pickle GLOBAL without importing its module."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise TypeError(f"{self.module}.{self.name} is a reference for writing only.")


class _StorageRef:
    __slots__ = ("key", "tensor")

    def __init__(self, key: str, tensor: Tensor):
        self.key, self.tensor = key, tensor


_REBUILD = _Global("torch._utils", "_rebuild_tensor_v2")


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file):
        super().__init__(file, protocol=2)
        self.storages: list[_StorageRef] = []

    def persistent_id(self, obj):
        if isinstance(obj, _StorageRef):
            storage_type = _Global("torch", _DTYPE_STORAGE[obj.tensor.array.dtype])
            return ("storage", storage_type, obj.key, "cpu", int(obj.tensor.array.size))
        return None

    def _save_global_ref(self, obj: _Global):
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

    def _save_tensor(self, obj: Tensor):
        ref = _StorageRef(str(len(self.storages)), obj)
        self.storages.append(ref)
        arr = obj.array
        stride = tuple(s // arr.itemsize for s in arr.strides) if arr.ndim else ()
        args = (ref, 0, tuple(arr.shape), stride, False, OrderedDict())
        self.save_reduce(_REBUILD, args, obj=obj)

    dispatch[_Global] = _save_global_ref
    dispatch[Tensor] = _save_tensor


def _aligned_info(zf: zipfile.ZipFile, name: str, alignment: int = 64) -> zipfile.ZipInfo:
    """A stored ZipInfo whose data starts at a multiple of ``alignment`` (as torch writes)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    offset = zf.fp.tell() + 30 + len(name.encode())
    pad = (-(offset + 4)) % alignment
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # "FB" padding, as torch
    return info


def save(obj: Any, path: str, archive_name: str = "model") -> None:
    """Write ``obj`` in ``torch.save``'s zip format, without torch.

    Parameters
    ----------
    obj
        Plain containers, str / numbers / None, NumPy arrays, pandas DataFrames and
        :class:`Tensor` wrappers (written as torch tensors; everything else is pickled as
        itself, so ``torch.load(..., weights_only=False)`` returns it as written).
    path
        Output file.
    archive_name
        The zip's top folder (``torch.save`` uses the file's stem).
    """
    buf = io.BytesIO()
    pickler = _Pickler(buf)
    pickler.dump(obj)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        records = [
            ("data.pkl", buf.getvalue()),
            (".format_version", b"1"),
            (".storage_alignment", b"64"),
            ("byteorder", b"little"),
        ]
        records += [(f"data/{r.key}", r.tensor.array.tobytes()) for r in pickler.storages]
        records += [("version", b"3\n"), (".data/serialization_id", b"0" * 40)]
        for name, data in records:
            zf.writestr(_aligned_info(zf, f"{archive_name}/{name}"), data)
