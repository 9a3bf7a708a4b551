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
"""

from __future__ import annotations

import concurrent.futures
import dataclasses

import jax
import numpy as np
import scipy.sparse as sp

from jaxvi.dataset import to_device
from jaxvi.registry import registry_arrays

__all__ = ["StreamingData", "read_rows"]


def read_rows(adata, registry: dict, rows: np.ndarray, max_gap: int = 4096) -> dict:
    """Registered arrays of the cells ``rows`` (sorted ints).

    Rows closer than ``max_gap`` are read as one contiguous range (the rows in between are
    read and dropped): a few large reads cost less than many small ones.

    Returns
    -------
    dict as :func:`jaxvi.registry.registry_arrays`, with ``X`` dense float32
    ``(len(rows), genes)``.
    """
    rows = np.asarray(rows)
    if len(rows) == 0:
        raise ValueError("No rows to read.")
    breaks = np.flatnonzero(np.diff(rows) > max_gap) + 1
    parts = []
    for run in np.split(rows, breaks):
        lo = int(run[0])
        arrays = registry_arrays(adata[lo : int(run[-1]) + 1], registry)
        keep = run - lo
        x = arrays["X"]
        arrays["X"] = (x[keep].toarray() if sp.issparse(x) else np.asarray(x)[keep]).astype(
            np.float32, copy=False
        )
        parts.append({k: None if v is None or k == "X" else v[keep] for k, v in arrays.items()})
        parts[-1]["X"] = arrays["X"]
    return {
        k: None if parts[0][k] is None else np.concatenate([p[k] for p in parts])
        for k in parts[0]
    }


@dataclasses.dataclass
class StreamingData:
    """Cells of an on-disk AnnData, streamed in blocks (see the module docstring).

    Parameters
    ----------
    adata
        AnnData registered with ``SCVI.setup_anndata``, typically backed.
    registry
        The model's registry.
    train_idx, val_idx
        Training and validation cells.
    chunk_cells
        Consecutive training cells per disk read.
    max_host_bytes
        Bound on the host memory of the two blocks in flight (dense float32 counts).
    block_cells
        Cells per block (default: the most ``max_host_bytes`` allows, a multiple of
        ``chunk_cells``, at least one chunk).
    """

    adata: object
    registry: dict
    train_idx: np.ndarray
    val_idx: np.ndarray
    chunk_cells: int = 1024
    max_host_bytes: int = 2**30
    block_cells: int | None = None

    def __post_init__(self):
        self.train_idx = np.sort(np.asarray(self.train_idx, np.int64))
        self.val_idx = np.sort(np.asarray(self.val_idx, np.int64))
        n_genes = int(self.adata.n_vars)
        if self.chunk_cells < 1:
            raise ValueError(f"chunk_cells must be >= 1, got {self.chunk_cells}.")
        if self.block_cells is None:
            per_block = int(self.max_host_bytes) // (2 * n_genes * 4)
            n_chunks = max(1, per_block // self.chunk_cells)
            self.block_cells = n_chunks * self.chunk_cells
        elif self.block_cells % self.chunk_cells:
            raise ValueError("block_cells must be a multiple of chunk_cells.")
        self.mesh = None

    # ------------------------------------------------------------------ layout
    def _blocks(self, rng: np.random.Generator | None, cells: np.ndarray) -> list[np.ndarray]:
        """Blocks of sorted cell ids: chunks in shuffled order (the ragged chunk last)."""
        chunks = [cells[i : i + self.chunk_cells] for i in range(0, len(cells), self.chunk_cells)]
        full = [c for c in chunks if len(c) == self.chunk_cells]
        ragged = [c for c in chunks if len(c) < self.chunk_cells]
        if rng is not None:
            full = [full[i] for i in rng.permutation(len(full))]
        chunks = full + ragged
        per = self.block_cells // self.chunk_cells
        return [np.sort(np.concatenate(chunks[i : i + per])) for i in range(0, len(chunks), per)]

    def n_steps(self, batch_size: int, drop_last: bool) -> int:
        """Minibatches per epoch (blocks are whole minibatches except possibly the last)."""
        sizes = [len(b) for b in self._blocks(None, self.train_idx)]
        if drop_last:
            return sum(s // batch_size for s in sizes)
        return sum(-(-s // batch_size) for s in sizes)

    def _stream(self, blocks):
        """Yield ``(cells, CellData)`` per block, reading the next block in the background."""
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(read_rows, self.adata, self.registry, blocks[0])
            for i, cells in enumerate(blocks):
                arrays = pending.result()
                if i + 1 < len(blocks):
                    pending = pool.submit(read_rows, self.adata, self.registry, blocks[i + 1])
                yield cells, to_device(arrays)

    # ------------------------------------------------------------------ running
    def run_epoch(self, epoch_fn, state, key, kl_weights: np.ndarray, batch_size: int, drop_last):
        """One epoch over all blocks; returns ``(state, EpochInfo summed over blocks)``."""
        seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
        blocks = self._blocks(np.random.default_rng(seed), self.train_idx)
        total = None
        start = 0
        for b, (cells, data) in enumerate(self._stream(blocks)):
            n = len(cells)
            steps = n // batch_size if drop_last else -(-n // batch_size)
            if steps == 0:
                continue
            kl = np.asarray(kl_weights[start : start + steps], np.float32)
            start += steps
            local = np.arange(n, dtype=np.int32)
            state, info = epoch_fn(state, data, local, jax.random.fold_in(key, b), kl)
            total = info if total is None else jax.tree_util.tree_map(np.add, total, info)
        return state, total

    def evaluate(self, evaluate, eval_fn, variables, key, batch_size: int):
        """Per-cell ``(rec, kl_z, kl_l)`` of the validation cells, block by block (in the
        order of ``val_idx`` sorted)."""
        parts = []
        for b, (cells, data) in enumerate(self._stream(self._blocks(None, self.val_idx))):
            local = np.arange(len(cells))
            parts.append(
                evaluate(eval_fn, variables, data, local, jax.random.fold_in(key, b), batch_size)
            )
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))
