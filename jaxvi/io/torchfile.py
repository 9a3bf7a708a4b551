"""Read and write PyTorch's ``torch.save`` zip files without torch and without running code.

A ``model.pt`` written by ``torch.save`` is a zip archive ``<name>/data.pkl`` (a pickle, protocol
2) plus one raw little-endian file ``<name>/data/<key>`` per tensor storage. Unpickling it with
:mod:`pickle` would import and call whatever the file names, so :func:`load` uses its own
unpickler that resolves only an allow-list of names and maps each to a jaxvi function that
builds plain data:

- tensors (``torch._utils._rebuild_tensor_v2`` over ``torch.<Type>Storage``) become NumPy
  arrays read from the storage files, with their offset, shape and strides bounds-checked;
- NumPy arrays, dtypes and scalars (``numpy._core.multiarray._reconstruct`` / ``scalar``,
  ``numpy.dtype``, ``numpy.ndarray``), ``collections.OrderedDict``, ``collections.defaultdict``
  (read as a dict), ``slice``, ``bytes`` (``_codecs.encode`` with ``latin1`` only);
- pandas DataFrames (scvi-tools' training history): the DataFrame, BlockManager, block and
  Index names are mapped to inert record objects; once the whole file is read, each recorded
  frame is rebuilt by jaxvi from its arrays with ``pandas.DataFrame(values, index, columns)``.
  Frames of any other layout (several blocks, object values, MultiIndex, ...) are refused.

Every other name (``os.system``, ``builtins.eval``, any class) raises
:class:`UnsafePickleError` naming it, before anything is called. ``BUILD`` is only applied to
NumPy arrays/dtypes and the inert records, and ``NEWOBJ`` only to allowed classes, so a file
cannot set attributes on jaxvi's own functions either.

:func:`save` writes the same format (protocol 2 pickle, 64-byte-aligned storages, the records
``torch.save`` writes), again without torch: tensors are given as :class:`Tensor` wrappers of
NumPy arrays and are written as ``torch._utils._rebuild_tensor_v2`` references, which
``torch.load`` (as scvi-tools calls it) turns back into tensors.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["Tensor", "UnsafePickleError", "load", "save"]


class UnsafePickleError(ValueError):
    """A ``torch.save`` file refers to something jaxvi refuses to load."""


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

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, *rest):
    """``torch._utils._rebuild_tensor_v2`` as a bounds-checked NumPy view, copied."""
    if not isinstance(storage, _Storage):
        raise UnsafePickleError("tensor rebuilt from something that is not a storage.")
    if hooks:
        raise UnsafePickleError("tensor with backward hooks refused.")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(offset)
    flat = storage.array
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise UnsafePickleError(f"tensor with invalid layout (size {size}, stride {stride}).")
    if 0 in size:
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
def _np_reconstruct(cls, shape, dtype_code):
    if cls is not np.ndarray:
        raise UnsafePickleError(f"numpy array subclass {cls!r} refused.")
    return np.ndarray.__new__(np.ndarray, tuple(shape), dtype_code)


def _np_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy dtype from {type(spec).__name__} refused.")
    return np.dtype(spec, bool(align), bool(copy))


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafePickleError("numpy scalar of an object dtype refused.")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


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
        values = d.get("data")
        if not isinstance(values, np.ndarray):
            raise UnsafePickleError("pandas index without array data refused.")
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
        blocks = [_BlockRecord(b["values"], b["mgr_locs"]) for b in extra.get("blocks", [])]
    else:
        raise UnsafePickleError("pandas DataFrame of an unsupported layout refused.")
    if not all(isinstance(b, _BlockRecord) for b in blocks):
        raise UnsafePickleError("pandas DataFrame with unknown blocks refused.")
    blocks = [(b.values, b.placement) for b in blocks]
    if not isinstance(axes, list) or len(axes) != 2:
        raise UnsafePickleError("pandas DataFrame must have two axes.")
    columns, index = (_index_from_record(a) for a in axes)
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
        locs = np.asarray(locs, np.int64).ravel()
        block_values = block_values.reshape(len(locs), len(index))
        if np.any(locs < 0) or np.any(locs >= len(columns)) or np.any(filled[locs]):
            raise UnsafePickleError("pandas DataFrame with inconsistent block placement.")
        values[locs] = block_values
        filled[locs] = True
    if not filled.all():
        raise UnsafePickleError("pandas DataFrame with missing columns refused.")
    return pd.DataFrame(values.T, index=index, columns=columns)


def _materialise(obj, depth: int = 0):
    """Replace recorded DataFrames by real ones and refuse any other leftover record."""
    if depth > 100:
        raise UnsafePickleError("model file nests containers more than 100 deep.")
    if isinstance(obj, _FrameRecord):
        return _frame_from_record(obj)
    if isinstance(obj, _Record | _IndexRecord | _BlockRecord | _Storage):
        raise UnsafePickleError(f"a bare {type(obj).__name__} outside a DataFrame refused.")
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        plain = (str, bytes, int, float, bool, np.number, np.bool_, type(None))
        bad = next((v for v in obj.flat if not isinstance(v, plain)), None)
        if bad is not None:
            raise UnsafePickleError(f"an object array holding a {type(bad).__name__} refused.")
        return obj
    if isinstance(obj, OrderedDict):
        return OrderedDict((k, _materialise(v, depth + 1)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _materialise(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_materialise(v, depth + 1) for v in obj)
    return obj


# --------------------------------------------------------------------------- unpickler
_NP_CORE = ("numpy._core.multiarray", "numpy.core.multiarray")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("collections", "defaultdict"): _defaultdict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "slice"): slice,
    ("builtins", "bytes"): _bytes,
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "dtype"): _np_dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
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

# Objects BUILD may be applied to, and classes NEWOBJ may instantiate.
_BUILDABLE = (np.ndarray, np.dtype, _Record)
_NEWABLE = (OrderedDict, dict, _FrameRecord, _ManagerRecord)


class _Unpickler(pickle._Unpickler):  # the pure-Python one: its opcodes can be restricted
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, read_storage):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"the model file refers to {module}.{name}, which jaxvi does not load "
                "(only tensors, NumPy arrays, pandas history tables and plain containers); "
                "refused without running it."
            )
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise UnsafePickleError(f"unknown persistent id {pid!r} refused.")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError("persistent storage of an unknown type refused.")
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self._storages:
            raw = self._read_storage(key)
            dtype = storage_type.dtype
            if len(raw) % dtype.itemsize:
                raise UnsafePickleError(f"storage {key} has a truncated last element.")
            arr = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
            if storage_type.name != "UntypedStorage" and arr.size < int(numel):
                raise UnsafePickleError(f"storage {key} holds fewer elements than declared.")
            self._storages[key] = _Storage(arr)
        return self._storages[key]

    def _load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if type(inst) is OrderedDict and isinstance(state, dict):
            return  # a state dict's ``_metadata`` (module versions): not needed, dropped
        if not isinstance(inst, _BUILDABLE):
            raise UnsafePickleError(f"setting the state of a {type(inst).__name__} refused.")
        inst.__setstate__(state)

    def _load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        if cls not in _NEWABLE:
            raise UnsafePickleError(f"creating a {cls!r} refused.")
        self.append(cls.__new__(cls, *args) if cls in (OrderedDict, dict) else cls(*args))

    def _refuse(self):
        raise UnsafePickleError("pickle opcode not allowed in a model file.")

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _refuse
    dispatch[pickle.INST[0]] = _refuse
    dispatch[pickle.OBJ[0]] = _refuse


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
        If the file refers to any name outside the allow-list (the message names it), or its
        tensors or frames are malformed. Nothing the file names is ever called.
    ValueError
        If the file is not a zip-format torch file.
    """
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(
            f"{path} is not a zip-format torch file (legacy torch.save files are not read)."
        ) from e
    with zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path} is not a torch.save archive (no <name>/data.pkl).")
        prefix = pkl[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        if order in names and zf.read(order).strip() not in (b"little", b""):
            raise ValueError(f"{path} was written big-endian; not supported.")

        def read_storage(key: str) -> bytes:
            name = f"{prefix}data/{key}"
            if name not in names:
                raise UnsafePickleError(f"storage {key!r} is missing from {path}.")
            return zf.read(name)

        try:
            obj = _Unpickler(zf.read(pkl[0]), read_storage).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as e:
            raise UnsafePickleError(f"{path}: malformed or disallowed pickle ({e}).") from e
    return _materialise(obj)


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
