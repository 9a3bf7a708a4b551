"""Where the cells live: one abstraction for training blocks and query pieces.

A :class:`DataSource` answers two questions, whatever the storage:

* *training*: :meth:`DataSource.blocks` yields the :class:`Block` s of one pass over a set of
  cells: device-ready cell data, the positions of the pass's cells in it, and the block's
  key. Cells in device memory are one block; a streamed AnnData is several, read from disk
  one after the other (the next one in the background).
* *queries*: :meth:`DataSource.piece` returns device-ready cell data holding a given set of
  rows (a bounded piece moved to the device when the cells live on the host or on disk; the
  whole resident data otherwise) and the rows' positions in it.

Every source also places small replicated values (:meth:`DataSource.replicate`: keys, index
vectors, the training state) the way its cells are placed. :func:`~jaxvi.data.make_source`
is the one place that decides which source an AnnData gets, from the registry, the device
mesh and the options of ``train()`` and the queries.

The sources:

``DeviceSource``
    Every cell in device memory, counts dense or CSR (densified per minibatch inside the
    compiled step); sharded over a mesh when its :class:`~jaxvi.data.CellData` is.
``HostSource``
    Cells in host memory, or with counts left on disk (a backed AnnData); each query call
    moves only its own rows to the device (sharded over the mesh, each process reading its
    share).
``StreamingSource`` (:mod:`jaxvi.data._streaming`)
    Cells of an on-disk AnnData, streamed in shuffled blocks with read-ahead.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxvi.data._cells import CellData, Minibatch, gather, take_rows
from jaxvi.data._placement import shard_host_data
from jaxvi.parallel import local_cell_range, replicate, to_host

__all__ = [
    "COVARIATES",
    "Block",
    "DataSource",
    "DeviceSource",
    "HostSource",
    "as_source",
    "covariate_data",
]

# The per-cell fields other than the counts.
COVARIATES = ("batch_index", "labels", "cat_covs", "cont_covs", "size_factor")


class Block(NamedTuple):
    """One block of a pass over cells (:meth:`DataSource.blocks`).

    Attributes
    ----------
    data
        Device-ready :class:`~jaxvi.data.CellData` holding the block's cells.
    cells
        ``(n,)`` int32 host array: the positions in ``data`` of the block's cells.
    rows
        ``(n,)`` int host array: the dataset rows of the same cells, aligned with ``cells``
        (a streamed block holds its cells in disk order, not in the order they were asked for).
    key
        The block's PRNG key: the pass's key for a single block, ``fold_in(key, b)`` for the
        ``b``-th of several.
    """

    data: CellData
    cells: np.ndarray
    rows: np.ndarray
    key: jax.Array | None


class DataSource(abc.ABC):
    """Cells of one dataset, wherever they live (see the module docstring).

    Attributes
    ----------
    n_cells, n_genes
        The dataset's shape.
    mesh
        The ``jax.sharding.Mesh`` the cells are placed on (its ``"cells"`` axis), or None
        (JAX's default device).
    resident
        True when the cells already live on the devices, so a query piece moves nothing and
        may hold any number of rows; False when each piece is moved (and bounded by
        ``settings.inference_bytes_per_call``).
    """

    n_cells: int
    n_genes: int
    mesh = None
    resident = False

    def block_sizes(self, cells: np.ndarray) -> list[int]:
        """Cells in each block of a pass over ``cells``, known without reading anything
        (the training engine derives its step count from them)."""
        return [len(cells)]

    @abc.abstractmethod
    def blocks(self, cells: np.ndarray, key, *, shuffle: bool = False) -> Iterator[Block]:
        """The blocks of one pass over ``cells`` (``(n,)`` int dataset rows).

        ``shuffle`` (training) lets a source that reads blocks from disk choose their order
        and grouping at random from ``key``; within a block the cells come in the order of
        ``Block.cells`` (the training engine permutes them itself).
        """

    @abc.abstractmethod
    def piece(self, rows: np.ndarray) -> tuple[CellData, np.ndarray]:
        """Device-ready cells holding ``rows`` (``(m,)`` int, repeats allowed) and the
        ``(m,)`` int32 positions of ``rows`` in them."""

    @abc.abstractmethod
    def covariates(self, rows: np.ndarray) -> dict:
        """Host arrays of the :data:`COVARIATES` of ``rows`` (None for unregistered ones)."""

    def minibatch(self, rows: np.ndarray) -> Minibatch:
        """The :class:`~jaxvi.data.Minibatch` of ``rows`` on the device (counts dense)."""
        data, pos = self.piece(np.asarray(rows))
        return _gather(data, jnp.asarray(pos, jnp.int32))

    def replicate(self, tree):
        """``tree`` placed like this source's small replicated values: on every device of
        the mesh (each process passing the same values), or on JAX's default device. One of
        the engine's explicit host-to-device transfers (keys, index grids, KL weights)."""
        return jax.device_put(tree) if self.mesh is None else replicate(tree, self.mesh)


@jax.jit
def _gather(data: CellData, idx: jax.Array) -> Minibatch:
    return gather(data, idx)


class DeviceSource(DataSource):
    """Every cell in device memory (a :class:`~jaxvi.data.CellData` from
    :func:`~jaxvi.data.to_device`, or sharded over a mesh by
    :func:`~jaxvi.data.sharded_cell_data`): one block, and queries index it in place."""

    resident = True

    def __init__(self, data: CellData):
        self.data = data
        self.mesh = data.mesh
        self.n_cells = data.n_cells
        self.n_genes = data.n_genes

    def blocks(self, cells, key, *, shuffle=False):
        """One block: all the cells."""
        yield Block(self.data, np.asarray(cells, np.int32), np.asarray(cells), key)

    def piece(self, rows):
        """The resident data itself."""
        return self.data, np.asarray(rows, np.int32)

    def covariates(self, rows):
        """Read back from the device (all-gathered when sharded over processes)."""
        rows = np.asarray(rows)
        return {
            k: None if getattr(self.data, k) is None else to_host(getattr(self.data, k))[rows]
            for k in COVARIATES
        }


class HostSource(DataSource):
    """Cells in host memory (numpy, dense or CSR) or with counts on disk (a backed AnnData,
    :func:`~jaxvi.data.backed_cell_data`): each piece reads and moves only its own rows.

    Parameters
    ----------
    data
        Host :class:`~jaxvi.data.CellData` (:func:`~jaxvi.data.host_cell_data`).
    mesh
        Shard each piece over this mesh (each process reading only its share), or None.
    """

    def __init__(self, data: CellData, mesh=None):
        self.data = data
        self.mesh = mesh
        self.n_cells = data.n_cells
        self.n_genes = data.n_genes

    def blocks(self, cells, key, *, shuffle=False):
        """One block: the cells moved to the device together."""
        data, pos = self.piece(np.asarray(cells))
        yield Block(data, pos, np.asarray(cells), key)

    def piece(self, rows):
        """The rows, densified, moved to the device (or this process's share of them,
        sharded over the mesh)."""
        rows = np.asarray(rows)
        if self.mesh is None:
            data = jax.device_put(take_rows(self.data, rows))
        else:
            start, stop = local_cell_range(len(rows), self.mesh)
            data = shard_host_data(take_rows(self.data, rows[start:stop]), len(rows), self.mesh)
        return data, np.arange(len(rows), dtype=np.int32)

    def covariates(self, rows):
        """Indexed on the host."""
        rows = np.asarray(rows)
        return {
            k: None if getattr(self.data, k) is None else getattr(self.data, k)[rows]
            for k in COVARIATES
        }


def covariate_data(covariates: dict, n_genes: int) -> CellData:
    """Device :class:`~jaxvi.data.CellData` of cells known by their covariates only
    (``{name: (cells, ...)}`` as :meth:`DataSource.covariates` returns): no counts are
    stored, and a minibatch gathered from it has all-zero counts (programs that do not read
    them compile them away)."""
    n = len(covariates["batch_index"])

    def opt(a, dtype):
        return None if a is None else jnp.asarray(np.asarray(a, dtype))

    return CellData(
        x=None,
        indptr=jnp.zeros((n + 1,), jnp.int32),
        indices=jnp.zeros((0,), jnp.int32),
        data=jnp.zeros((0,), jnp.float32),
        batch_index=jnp.asarray(np.asarray(covariates["batch_index"], np.int32)),
        labels=jnp.asarray(np.asarray(covariates["labels"], np.int32)),
        cat_covs=opt(covariates.get("cat_covs"), np.int32),
        cont_covs=opt(covariates.get("cont_covs"), np.float32),
        size_factor=opt(covariates.get("size_factor"), np.float32),
        n_genes=int(n_genes),
    )


def as_source(data) -> DataSource:
    """``data`` if it is a :class:`DataSource`; a device :class:`~jaxvi.data.CellData` as
    a :class:`DeviceSource`, a host one as a :class:`HostSource`."""
    if isinstance(data, DataSource):
        return data
    if isinstance(data, CellData):
        if isinstance(data.batch_index, np.ndarray):
            return HostSource(data, data.mesh)
        return DeviceSource(data)
    raise TypeError(f"Expected a DataSource or CellData, got {type(data).__name__}.")
