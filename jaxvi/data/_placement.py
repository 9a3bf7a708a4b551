"""Data assembly over a device mesh: a :class:`~jaxvi.data.CellData` whose cells are sharded
over the ``"cells"`` axis, each process holding only its own rows.

The array-level primitives (meshes, padding, placement of one array) are in
:mod:`jaxvi.parallel.mesh`; this module builds cell data with them.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh

from jaxvi.data._cells import host_cell_data, take_rows, with_log_factorial
from jaxvi.data.registry import registry_arrays
from jaxvi.parallel import local_cell_range, shard_cells

__all__ = ["shard_host_data", "shard_local_rows", "sharded_cell_data"]


def shard_local_rows(arrays: dict, n_cells: int, mesh: Mesh):
    """A :class:`~jaxvi.data.CellData` sharded over ``mesh`` from this process's rows.

    Parameters
    ----------
    arrays
        Registered arrays (:func:`jaxvi.data.registry.registry_arrays`) of the rows
        ``local_cell_range(n_cells, mesh)`` clipped to ``n_cells`` (possibly none); ``X``
        dense or sparse ``(local_rows, genes)``.
    n_cells
        Number of real cells of the whole (padded) array.
    mesh
        The data mesh.

    Returns
    -------
    CellData with dense counts of global shape ``(padded_cells(n_cells, mesh), genes)``.
    """
    return shard_host_data(host_cell_data(arrays), n_cells, mesh)


def shard_host_data(host, n_cells: int, mesh: Mesh):
    """:func:`shard_local_rows` for a host :class:`~jaxvi.data.CellData` (from
    :func:`host_cell_data` or :func:`jaxvi.data.take_rows`) of this process's rows;
    CSR counts are densified."""
    if host.x is None:  # CSR: densify the local rows
        host = take_rows(host, np.arange(host.n_cells))
    names = ("x", "batch_index", "labels", "cat_covs", "cont_covs", "size_factor")
    return host.replace(
        **shard_cells({k: getattr(host, k) for k in names}, n_cells, mesh), mesh=mesh
    )


def sharded_cell_data(adata, registry: dict, mesh: Mesh):
    """The registered fields of ``adata`` as a :class:`~jaxvi.data.CellData` sharded over
    ``mesh``, each process reading only its own rows (``adata[start:stop]``; for a backed
    AnnData only those rows are read from disk). Counts are stored dense, with the per-cell
    ``log_x_factorial`` the training loss uses."""
    n = adata.n_obs
    start, stop = local_cell_range(n, mesh)
    local = registry_arrays(adata[start : min(stop, n)], registry)
    return with_log_factorial(shard_local_rows(local, n, mesh))
