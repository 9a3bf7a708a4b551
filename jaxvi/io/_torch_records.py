"""The inert records :mod:`jaxvi.io.torchfile`'s unpickler maps NumPy and pandas names to,
and their reconstruction by jaxvi once the whole file is read (see that module's docstring
for what is allowed). Also the error type and the limits the reader shares with them.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from typing import Any

import numpy as np


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


class _Storage:
    """A storage read from ``data/<key>``: a flat NumPy array."""

    __slots__ = ("array", "kind")

    def __init__(self, array: np.ndarray, kind: str):
        self.array, self.kind = array, kind


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
