"""Training from data larger than memory: shuffled contiguous chunks read from disk.

The cells stay in an on-disk AnnData (``anndata.read_h5ad(path, backed="r")``, dense or CSR).
Each epoch the training cells (in disk order) are cut into chunks of ``chunk_cells``
consecutive training cells; the chunk order is shuffled and consecutive chunks are grouped into
blocks of ``block_cells`` cells. A block is read (one contiguous range per chunk), densified
and moved to the device, and the compiled epoch program (:func:`jaxvi.train.make_train_epoch`)
runs over its minibatches, which are drawn from a fresh permutation of the block. A background
thread reads the next block while the device trains on the current one, so at most two blocks
are on the host at once: host memory is about ``2 * block_cells * genes * 4`` bytes whatever
the size of the dataset (``block_cells`` is derived from ``max_host_bytes``).

Every block has the same shape except the last, so training compiles twice per ``train()``.
The minibatches differ from in-memory training (cells are mixed within a block, not across
the whole dataset), as in other chunked loaders (annbatch, scDataset).

On a mesh (``mesh`` set; :mod:`jaxvi.parallel`) each block is placed sharded over the
``"cells"`` axis, zero-padded to a multiple of the number of devices (the padding rows are
never sampled), and its minibatches are split over the devices as in the in-memory mesh
path. The blocks, their order and the minibatches are those of the one-device run with the
same seed, so the result is the same up to the order of floating-point sums. With several
processes, each process reads from disk only the rows of each block that its own devices
hold (:func:`jaxvi.parallel.local_cell_range` of the block), so its host memory is its share
of two blocks.
"""

from __future__ import annotations

import concurrent.futures

import anndata
import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp

from jaxvi.data._cells import (
    CellData,
    host_covariates,
    host_log_factorial,
    to_device,
    with_log_factorial,
)
from jaxvi.data._placement import shard_local_rows
from jaxvi.data._source import Block, DataSource, HostSource
from jaxvi.data.registry import check_counts_piece, check_csr_parts, registry_arrays
from jaxvi.parallel import local_cell_range, to_host

__all__ = ["BackedCounts", "StreamingSource", "backed_cell_data", "bounded_runs", "read_rows"]


def read_rows(adata, registry: dict, rows: np.ndarray, max_gap: int = 4096) -> dict:
    """Registered arrays of the cells ``rows`` (sorted ints).

    Rows closer than ``max_gap`` are read as one contiguous range (the rows in between are
    read and dropped): a few large reads cost less than many small ones.

    Returns
    -------
    dict as :func:`jaxvi.data.registry.registry_arrays`, with ``X`` dense float32
    ``(len(rows), genes)``.
    """
    return _Reader(adata, registry).read(rows, max_gap)


def bounded_runs(rows: np.ndarray) -> list[np.ndarray]:
    """Split sorted ``rows`` into runs read as one range each, merging the smallest gaps
    while the rows read in between stay at most ``len(rows)`` in total: a read never
    touches more than twice the rows asked for."""
    rows = np.asarray(rows)
    skipped = np.diff(rows) - 1  # rows read and dropped if neighbours are merged
    order = np.argsort(skipped, kind="stable")
    n_merge = int(np.searchsorted(np.cumsum(skipped[order]), len(rows), side="right"))
    split = np.ones(len(skipped), bool)
    split[order[:n_merge]] = False
    return np.split(rows, np.flatnonzero(split) + 1)


class _Reader:
    """Reads rows of an AnnData. For a backed h5ad the counts come straight from its HDF5
    arrays (the CSR ``indptr`` is read once, ``O(cells)``) and the covariates from arrays
    computed once; otherwise through AnnData views. Genes come out in the registry's order."""

    def __init__(self, adata, registry: dict):
        self.adata, self.registry = adata, registry
        self.n_genes = int(adata.n_vars)
        self.x = self.indptr = self.obs = self.order = None
        if not getattr(adata, "isbacked", False) or adata.is_view:
            return  # a view's rows are not the file's: the generic path indexes through it
        layer = registry["setup_args"]["layer"]
        if layer is not None and layer not in adata.layers:
            return  # the generic path names the missing layer
        node = adata.file["X" if layer is None else f"layers/{layer}"]
        encoding = node.attrs.get("encoding-type", "array")
        if hasattr(node, "shape") and encoding == "array":
            self.x = node  # dense HDF5 dataset
        elif encoding == "csr_matrix":
            self.x = node
            self.indptr = np.asarray(node["indptr"][:], np.int64)
        else:
            return  # CSC and others: the generic path
        empty = sp.csr_matrix((adata.n_obs, self.n_genes), dtype=np.float32)
        shell = anndata.AnnData(
            empty,
            obs=adata.obs,
            var=adata.var,
            layers=None if layer is None else {layer: empty},
        )
        self.obs = registry_arrays(shell, registry)  # checks the genes, warns on a reorder
        names = [str(v) for v in adata.var_names]
        if names != list(registry["var_names"]):
            self.order = pd.Index(names).get_indexer(registry["var_names"])

    def _range(self, lo: int, hi: int) -> np.ndarray | sp.csr_matrix:
        layer = self.registry["setup_args"]["layer"]
        where = f"adata.layers['{layer}']" if layer else "adata.X"
        if self.indptr is None:
            x = np.asarray(self.x[lo:hi], np.float32)
            check_counts_piece(x, where)
            return x
        s, e = int(self.indptr[lo]), int(self.indptr[hi])
        data = np.asarray(self.x["data"][s:e], np.float32)
        idx = np.asarray(self.x["indices"][s:e])
        indptr = self.indptr[lo : hi + 1] - s
        # checked before scipy sees them: its densification trusts the indices
        check_csr_parts(data, idx, indptr, self.n_genes, where)
        return sp.csr_matrix((data, idx, indptr), (hi - lo, self.n_genes))

    def _run_rows(self, run: np.ndarray) -> np.ndarray | sp.csr_matrix:
        lo, hi = int(run[0]), int(run[-1]) + 1
        part = self._range(lo, hi)
        return part if hi - lo == len(run) else part[run - lo]

    def read(self, rows: np.ndarray, max_gap: int | None = 4096, dense: bool = True) -> dict:
        """Registered arrays of the sorted ``rows``; rows at most ``max_gap`` apart are read
        as one range (``None``: :func:`bounded_runs`). With ``dense=False`` a CSR file's
        counts come back as a CSR matrix (with ``log_x_factorial``)."""
        rows = np.asarray(rows)
        if len(rows) == 0:
            raise ValueError("No rows to read.")
        if max_gap is None:
            runs = bounded_runs(rows)
        else:
            runs = np.split(rows, np.flatnonzero(np.diff(rows) > max_gap) + 1)
        if self.obs is not None:
            # each run's rows, one at a time: one range read, the rows in its gaps dropped
            parts = (self._run_rows(run) for run in runs)
            out = {k: None if v is None else v[rows] for k, v in self.obs.items() if k != "X"}
            if self.indptr is not None and not dense:
                parts = list(parts)
                x = parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")
                out["X"] = x if self.order is None else x[:, self.order]
                out["log_x_factorial"] = host_log_factorial(x)
                return out
            x = np.zeros((len(rows), self.n_genes), np.float32)  # filled part by part
            pos = 0
            for part in parts:
                if sp.issparse(part):
                    part.toarray(out=x[pos : pos + part.shape[0]])
                else:
                    x[pos : pos + part.shape[0]] = part
                pos += part.shape[0]
            out["X"] = x if self.order is None else x[:, self.order]
            return out
        parts = []
        for run in runs:
            lo = int(run[0])
            arrays = registry_arrays(self.adata[lo : int(run[-1]) + 1], self.registry)
            keep = run - lo
            x = arrays.pop("X")
            part = {k: None if v is None else v[keep] for k, v in arrays.items()}
            part["X"] = (x[keep].toarray() if sp.issparse(x) else np.asarray(x)[keep]).astype(
                np.float32, copy=False
            )
            parts.append(part)
        return {
            k: None if parts[0][k] is None else np.concatenate([p[k] for p in parts])
            for k in parts[0]
        }


class BackedCounts:
    """The counts of a backed AnnData, read from disk on demand.

    ``counts[rows]`` (``(m,)`` int, any order, repeats allowed) reads only those rows (plus at
    most as many in the gaps between them, see :func:`bounded_runs`) and returns them dense,
    float32 ``(m, genes)``. :func:`jaxvi.data.take_rows` indexes it like an ndarray, so
    :func:`jaxvi.posterior.run_chunked` moves bounded pieces of a backed AnnData to the device
    without loading the rest. Passed whole into a jitted function (as a pytree leaf) it reads
    every row.

    Attributes
    ----------
    shape
        ``(cells, genes)``.
    rows_read
        Rows read so far (a diagnostic).
    """

    dtype = np.dtype(np.float32)

    def __init__(self, reader: _Reader):
        self.reader = reader
        self.shape = (int(reader.adata.n_obs), len(reader.registry["var_names"]))
        self.rows_read = 0

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows).reshape(-1)
        if len(rows) == 0:
            return np.zeros((0, self.shape[1]), np.float32)
        unique, inverse = np.unique(rows, return_inverse=True)
        if unique[0] < 0 or unique[-1] >= self.shape[0]:
            raise IndexError(f"Rows out of range for {self.shape[0]} cells.")
        x = self.reader.read(unique, max_gap=None)["X"]
        self.rows_read += len(unique)
        if len(unique) == len(rows) and np.array_equal(unique, rows):
            return x  # sorted and distinct already: no reordering copy
        return x[inverse]

    def to_memory(self) -> np.ndarray:
        """All rows, dense ``(cells, genes)``."""
        return self[np.arange(self.shape[0])]


jax.tree_util.register_pytree_node(
    BackedCounts, lambda c: ((c.to_memory(),), None), lambda _, leaves: leaves[0]
)


def backed_cell_data(adata, registry: dict) -> CellData | None:
    """Host :class:`~jaxvi.data.CellData` of a backed AnnData whose counts stay on disk.

    The covariates (``O(cells)``) are loaded; the counts are a :class:`BackedCounts`, read
    in the pieces that :func:`jaxvi.posterior.run_chunked` asks for.

    Returns
    -------
    CellData, or None when ``adata`` is not backed, is a view (``backed[idx]``: its rows are
    not the file's), or its counts are not stored as a dense or CSR HDF5 array (the caller
    then loads them).
    """
    if not getattr(adata, "isbacked", False):
        return None
    reader = _Reader(adata, registry)
    if reader.obs is None:
        return None
    return CellData(
        x=BackedCounts(reader),
        indptr=None,
        indices=None,
        data=None,
        n_genes=len(registry["var_names"]),
        **host_covariates(reader.obs),
    )


class StreamingSource(DataSource):
    """Cells of an on-disk AnnData, streamed in blocks (see the module docstring).

    Parameters
    ----------
    adata
        AnnData registered with ``SCVI.setup_anndata``, typically backed.
    registry
        The model's registry.
    chunk_cells
        Consecutive cells per disk read.
    max_host_bytes
        Bound on the host memory of the two blocks in flight (dense float32 counts).
    block_cells
        Cells per block (default: the most ``max_host_bytes`` allows, a multiple of
        ``chunk_cells``, at least one chunk).
    mesh
        A ``jax.sharding.Mesh`` with a ``"cells"`` axis to shard each block over (None: JAX's
        default device).
    """

    def __init__(
        self,
        adata,
        registry: dict,
        *,
        chunk_cells: int = 1024,
        max_host_bytes: int = 2**30,
        block_cells: int | None = None,
        mesh=None,
    ):
        self.adata, self.registry, self.mesh = adata, registry, mesh
        self.n_cells = int(adata.n_obs)
        self.n_genes = len(registry["var_names"])
        self.chunk_cells = int(chunk_cells)
        if self.chunk_cells < 1:
            raise ValueError(f"chunk_cells must be >= 1, got {chunk_cells}.")
        if block_cells is None:
            per_block = int(max_host_bytes) // (2 * int(adata.n_vars) * 4)
            block_cells = max(1, per_block // self.chunk_cells) * self.chunk_cells
        elif block_cells % self.chunk_cells:
            raise ValueError("block_cells must be a multiple of chunk_cells.")
        self.block_cells = int(block_cells)
        self._reader = _Reader(adata, registry)
        # A CSR file streams as CSR blocks, densified per minibatch on the device (no dense
        # block is built on the host or copied to the device); one row bound for all blocks.
        indptr = self._reader.indptr
        self._csr = self.mesh is None and indptr is not None and self._reader.obs is not None
        self._max_row_nnz = int(np.diff(indptr).max(initial=1)) if self._csr else None
        self._queries = None

    # ------------------------------------------------------------------ layout
    def _layout(self, rng: np.random.Generator | None, cells: np.ndarray) -> list[np.ndarray]:
        """Blocks of sorted cell ids: chunks in shuffled order (the ragged chunk last)."""
        cells = np.sort(np.asarray(cells, np.int64))
        chunks = [cells[i : i + self.chunk_cells] for i in range(0, len(cells), self.chunk_cells)]
        full = [c for c in chunks if len(c) == self.chunk_cells]
        ragged = [c for c in chunks if len(c) < self.chunk_cells]
        if rng is not None:
            full = [full[i] for i in rng.permutation(len(full))]
        chunks = full + ragged
        per = self.block_cells // self.chunk_cells
        return [np.sort(np.concatenate(chunks[i : i + per])) for i in range(0, len(chunks), per)]

    def block_sizes(self, cells):
        """Blocks hold whole chunks; only the last may be shorter (shuffled or not)."""
        return [len(b) for b in self._layout(None, cells)]

    def local_rows(self, cells: np.ndarray) -> np.ndarray:
        """The cells of a block this process reads: all of them without a mesh, else those
        its devices hold (possibly none when the block is shorter than the mesh)."""
        if self.mesh is None:
            return cells
        start, stop = local_cell_range(len(cells), self.mesh)
        return cells[start : min(stop, len(cells))]

    def _read(self, cells):
        rows = self.local_rows(cells)
        if len(rows) == 0:  # this process's devices hold only padding rows of this block
            return {
                k: None if v is None else v[:0] for k, v in self._reader.read(cells[:1]).items()
            }
        return self._reader.read(rows, dense=not self._csr)

    def _place(self, arrays: dict, n_cells: int):
        if self._csr:
            return to_device(arrays, sparse=True, max_row_nnz=self._max_row_nnz)
        if self.mesh is None:
            return to_device(arrays)
        return with_log_factorial(shard_local_rows(arrays, n_cells, self.mesh))

    def _stream(self, blocks):
        """Yield ``(cells, CellData)`` per block, reading the next block in the background."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self._read, blocks[0])
            for i, cells in enumerate(blocks):
                arrays = pending.result()
                if i + 1 < len(blocks):
                    pending = pool.submit(self._read, blocks[i + 1])
                data = self._place(arrays, len(cells))
                del arrays  # the host copy goes before the device trains on the block
                yield cells, data

    # ------------------------------------------------------------------ DataSource
    def blocks(self, cells, key, *, shuffle=False):
        """Blocks read from disk one after the other (the next one in the background),
        each with ``fold_in(key, b)``; ``shuffle`` orders the chunks at random from ``key``
        (a fresh grouping every epoch). Cells in ``Block.cells`` are ``arange(len(block))``:
        a block's data holds exactly its cells, in disk order."""
        rng = None
        if shuffle:
            rng = np.random.default_rng(int(to_host(jax.random.randint(key, (), 0, 2**31 - 1))))
        layout = self._layout(rng, cells)
        for b, (block_cells, data) in enumerate(self._stream(layout)):
            positions = np.arange(len(block_cells), dtype=np.int32)
            yield Block(data, positions, np.asarray(block_cells), _fold(key, b))

    def _query_source(self) -> HostSource:
        if self._queries is None:
            data = backed_cell_data(self.adata, self.registry)
            if data is None:  # not a backed dense / CSR file: read through AnnData views
                data = CellData(
                    x=BackedCounts(self._reader),
                    indptr=None,
                    indices=None,
                    data=None,
                    n_genes=self.n_genes,
                    **host_covariates(registry_arrays(self.adata, self.registry, counts=False)),
                )
            self._queries = HostSource(data, self.mesh)
        return self._queries

    def piece(self, rows):
        """The rows read from disk (at most twice as many rows read as asked for) and moved
        to the device, sharded over the mesh if any."""
        return self._query_source().piece(rows)

    def covariates(self, rows):
        """From the covariates loaded once (``O(cells)``)."""
        return self._query_source().covariates(rows)


def _fold(key, b: int):
    return None if key is None else jax.random.fold_in(key, b)
