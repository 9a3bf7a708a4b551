"""The writer of :mod:`jaxvi.io.torchfile`: ``torch.save``'s zip format without torch
(see :func:`save`).
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any

import numpy as np

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
