"""The one chunked runner of every query program, and the value a query is: :class:`Query`.

A query program is a jitted ``program(key, variables, data, idx, *args)`` over ``idx`` of shape
``(n_chunks, batch)`` (a ``lax.scan`` over the chunks, the module in evaluation mode). The
runner (:func:`run_query`) cuts the query's cells into chunks of ``batch_size``, asks the
query's :class:`~jaxvi.data.DataSource` for a device-ready piece holding each call's cells
(the resident data itself, or a bounded piece read and moved for cells on the host or on
disk), runs the program and stitches the host results back into cell order. Chunk counts are
padded to powers of two, so a program compiles for a handful of shapes whatever the number of
cells; programs are cached per model, so repeated calls do not recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxvi._settings import settings
from jaxvi.data import DataSource, pad_indices
from jaxvi.parallel import to_host

__all__ = [
    "MAX_CHUNKS_PER_CALL",
    "Query",
    "bucket",
    "chunks_per_call",
    "last_run",
    "run_query",
]

MAX_CHUNKS_PER_CALL = 64


@dataclasses.dataclass(frozen=True, eq=False)
class Query:
    """What a query runs on: a value, not the model object.

    Attributes
    ----------
    module
        What the program runs: a Flax module (the VAE's programs call its ``inference`` /
        ``generative`` methods), or a :class:`~jaxvi.module.ModelDef` (programs that need only
        the model's loss, such as :func:`jaxvi.posterior.get_elbo_terms`).
    variables
        The model's variables pytree (``{"params", "batch_stats"[, "buffers"]}``).
    source
        Where the cells live (:func:`jaxvi.data.make_source` with ``purpose="query"``).
    indices
        ``(n,)`` int64 rows of the source to query, in the order of the results.
    key
        The query's PRNG key (call ``c > 0`` of the runner uses ``fold_in(key, c)``), or None.
    batch_size
        Cells per chunk.
    """

    module: Any
    variables: dict
    source: DataSource
    indices: np.ndarray
    key: jax.Array | None
    batch_size: int

    def replace(self, **changes) -> Query:
        """A copy with ``changes`` (e.g. other ``indices`` or ``key``)."""
        return dataclasses.replace(self, **changes)


def bucket(n_chunks: int, limit: int = MAX_CHUNKS_PER_CALL) -> int:
    """Chunks per call: the next power of two, at most ``limit``."""
    return min(limit, 1 << max(n_chunks - 1, 0).bit_length())


# Statistics of the latest run_query call: device calls, and the most cells / bytes of counts
# moved to the device in one call (sources that move pieces only).
last_run: dict = {}


def chunks_per_call(n_genes: int, batch_size: int) -> int:
    """Chunks of ``batch_size`` cells per device call under
    ``settings.inference_bytes_per_call``: a power of two, between 1 and
    ``MAX_CHUNKS_PER_CALL``."""
    cells = int(settings.inference_bytes_per_call) // max(4 * int(n_genes), 1)
    chunks = max(1, min(MAX_CHUNKS_PER_CALL, cells // int(batch_size)))
    return 1 << (chunks.bit_length() - 1)


def run_query(program, query: Query, *args, cell_args=(), cell_axis: int = 0):
    """Run ``program`` over the query's cells in chunks and stitch host arrays together.

    Parameters
    ----------
    program
        ``program(key, variables, data, idx, *cell_args, *args)`` with ``idx``
        ``(n_chunks, batch)``.
    query
        The model's variables, the source, the cells, the key and the chunk size.
    *args
        Further arguments of the program, passed to every call.
    cell_args
        Host arrays ``(n_cells, ...)`` aligned with ``query.indices``, passed to the program
        chunked like ``idx`` (``(n_chunks, batch, ...)``, zero-padded).
    cell_axis
        Where the cell axis of the results goes (see Returns).

    Calls hold at most ``MAX_CHUNKS_PER_CALL`` chunks; when the source moves pieces to the
    device (cells on the host or on disk), at most ``settings.inference_bytes_per_call``
    bytes of counts, so device memory is bounded whatever the size of the dataset.

    Returns
    -------
    The program's outputs with ``(n_chunks, *pre, batch, *post)`` made ``(*pre, n_cells,
    *post)``, where ``pre`` has ``cell_axis`` dimensions, as host arrays.
    """
    source, bs = query.source, int(query.batch_size)
    idx, mask = pad_indices(np.asarray(query.indices), bs)
    n_chunks = idx.shape[0]
    cell_args = [_chunked(np.asarray(a), n_chunks, bs) for a in cell_args]
    per_call = MAX_CHUNKS_PER_CALL if source.resident else chunks_per_call(source.n_genes, bs)
    stats = {"calls": 0, "max_cells_per_call": 0, "max_bytes_per_call": 0}
    parts = []
    for call, start in enumerate(range(0, n_chunks, per_call)):
        part = idx[start : start + per_call]
        n = part.shape[0]
        padded = np.zeros((bucket(n, per_call), bs), np.int32)
        padded[:n] = part
        data, pos = source.piece(padded.reshape(-1))
        if not source.resident:
            stats["max_cells_per_call"] = max(stats["max_cells_per_call"], padded.size)
            stats["max_bytes_per_call"] = max(stats["max_bytes_per_call"], _count_bytes(data))
        key = query.key
        if call > 0 and key is not None:
            key = jax.random.fold_in(key, jax.device_put(np.int32(call)))
        chunks = [_padded(a[start : start + n], padded.shape[0]) for a in cell_args]
        # The runner's explicit host-to-device transfers: the grid and the cell arguments.
        grid = jax.device_put(pos.reshape(padded.shape))
        out = program(key, query.variables, data, grid, *chunks, *args)
        parts.append(jax.tree_util.tree_map(lambda a, n=n: to_host(a)[:n], out))
        stats["calls"] += 1
        del data, out  # the piece goes before the next call reads its cells
    last_run.clear()
    last_run.update(stats)
    out = jax.tree_util.tree_map(lambda *a: np.concatenate(a, axis=0), *parts)
    keep = mask.reshape(-1) > 0

    def stitch(a):
        a = np.moveaxis(a, 0, cell_axis)  # (*pre, n_chunks, batch, *post)
        shape = a.shape
        a = a.reshape(
            *shape[:cell_axis], shape[cell_axis] * shape[cell_axis + 1], *shape[cell_axis + 2 :]
        )
        return np.compress(keep, a, axis=cell_axis)

    return jax.tree_util.tree_map(stitch, out)


def _chunked(a: np.ndarray, n_chunks: int, batch_size: int) -> np.ndarray:
    out = np.zeros((n_chunks * batch_size, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out.reshape(n_chunks, batch_size, *a.shape[1:])


def _padded(a: np.ndarray, size: int) -> jax.Array:
    pad = np.zeros((size - a.shape[0], *a.shape[1:]), a.dtype)
    return jax.device_put(np.concatenate([a, pad]))


def _count_bytes(data) -> int:
    """Bytes of the counts one process moved for a piece (its own rows on a mesh)."""
    return sum(int(s.data.nbytes) for s in data.x.addressable_shards)
