"""Data parallelism over a ``jax.sharding.Mesh``: parameters replicated, cells sharded.

jaxvi uses one mesh axis, ``"cells"``. Every array with a leading cell axis (the counts and
covariates of the dataset, and each minibatch built from them) is split over that axis; the
parameters, optimiser state and batch-norm statistics are replicated. The training step and
the inference programs are the same jitted functions as on one device: XLA's SPMD partitioner
turns the sums over the minibatch (the ELBO, its gradient, batch-norm statistics) into
all-reduces, so a sharded run computes what the single-device run computes for the same
global minibatch, up to the order of floating-point sums.

A :class:`~jaxvi.data.CellData` built by :func:`sharded_cell_data` carries its mesh (a
static field), and :func:`jaxvi.data.gather` shards every minibatch it builds over it, so
any program that takes the data trains or infers data-parallel without further arguments.

The same code runs over several processes (hosts) after :func:`jaxvi.parallel.initialize`:
arrays are then assembled from each process's own rows (:func:`shard_cells`). Streamed blocks
(:mod:`jaxvi.data`) and the pieces of a backed AnnData that queries read
(:func:`jaxvi.posterior.run_chunked`) are placed the same way, one block or piece at a time.

How a minibatch reaches the devices: its cells are gathered from the sharded dataset (each
device contributes the rows it holds, then an all-reduce of ``batch x genes`` values) and the
result is constrained to the cell axis, so each device computes the network for
``batch / n_devices`` cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "CELLS",
    "constrain_cells",
    "data_mesh",
    "local_cell_range",
    "padded_cells",
    "replicate",
    "resolve_devices",
    "shard_cells",
    "to_host",
]

CELLS = "cells"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh ``("cells",)`` over ``devices`` (default: every device of every
    process, ``jax.devices()``)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("A mesh needs at least one device.")
    return Mesh(np.array(devs), (CELLS,))


def resolve_devices(devices) -> Mesh | None:
    """The mesh selected by ``SCVI.train(devices=...)``.

    ``"auto"`` or ``None``: no mesh (JAX's default device). An int ``n``: the first ``n``
    devices of ``jax.devices()`` (``-1``: all). A list of devices, or a ``Mesh`` with a
    ``"cells"`` axis, as given.
    """
    if devices is None or (isinstance(devices, str) and devices == "auto"):
        return None
    if isinstance(devices, Mesh):
        if CELLS not in devices.axis_names:
            raise ValueError(f"The mesh needs an axis named {CELLS!r}; got {devices.axis_names}.")
        return devices
    all_devices = jax.devices()
    if isinstance(devices, bool) or not isinstance(devices, int | list | tuple):
        raise ValueError(
            f"devices must be 'auto', an int, a list of jax devices or a Mesh; got {devices!r}."
        )
    if isinstance(devices, int):
        n = len(all_devices) if devices == -1 else devices
        if not 1 <= n <= len(all_devices):
            raise ValueError(
                f"devices={devices} but JAX sees {len(all_devices)} device(s): {all_devices}."
            )
        return data_mesh(all_devices[:n])
    return data_mesh(list(devices))


def constrain_cells(tree, mesh: Mesh | None):
    """Inside a jitted function: shard axis 0 of every leaf of ``tree`` over ``mesh``.

    Leaves whose leading size is not a multiple of the number of devices are left to XLA
    (computed replicated). Without a mesh, ``tree`` is returned unchanged.
    """
    if mesh is None or mesh.size == 1:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec(CELLS))

    def one(a):
        if a is None or a.ndim == 0 or a.shape[0] % mesh.size:
            return a
        return jax.lax.with_sharding_constraint(a, sharding)

    return jax.tree_util.tree_map(one, tree)


def _global_array(local: np.ndarray, sharding: NamedSharding, global_shape) -> jax.Array:
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def replicate(tree, mesh: Mesh):
    """Place every leaf of ``tree`` on all devices of ``mesh`` (each process passes the same
    values). PRNG keys are carried as their key data."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def one(a):
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(a))
            return jax.random.wrap_key_data(
                _global_array(data, sharding, data.shape), impl=jax.random.key_impl(a)
            )
        host = np.asarray(a)
        return _global_array(host, sharding, host.shape)

    return jax.tree_util.tree_map(one, tree)


def padded_cells(n_cells: int, mesh: Mesh) -> int:
    """``n_cells`` rounded up to a multiple of the number of devices."""
    return -(-n_cells // mesh.size) * mesh.size


def local_cell_range(n_cells: int, mesh: Mesh) -> tuple[int, int]:
    """``(start, stop)`` of the padded cell rows this process holds (its devices are
    contiguous in the mesh, as :func:`data_mesh` orders ``jax.devices()``)."""
    n_pad = padded_cells(n_cells, mesh)
    per = n_pad // mesh.size
    mine = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()]
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise ValueError("This process's devices must be contiguous in the mesh.")
    return mine[0] * per, (mine[-1] + 1) * per


def shard_cells(arrays: dict, n_cells: int, mesh: Mesh) -> dict:
    """Global arrays from host arrays of this process's rows.

    Each device receives its own slice of the local rows (a view; only the slice that runs
    past ``n_cells`` is copied to add its zero rows), so no second copy of the local rows is
    made on the host.

    Parameters
    ----------
    arrays
        ``{name: ndarray or None}``; each array holds the rows ``local_cell_range(n_cells,
        mesh)`` of a ``(cells, ...)`` array (rows past ``n_cells`` may be left out: they are
        zero-padded here).
    n_cells
        Number of real cells of the dataset.
    mesh
        The data mesh.

    Returns
    -------
    dict of ``jax.Array`` of global shape ``(padded_cells, ...)`` sharded over ``"cells"``.
    """
    start, _ = local_cell_range(n_cells, mesh)
    n_pad = padded_cells(n_cells, mesh)
    sharding = NamedSharding(mesh, PartitionSpec(CELLS))
    out = {}
    for name, a in arrays.items():
        if a is None:
            out[name] = None
            continue
        a = np.asarray(a)
        shape = (n_pad, *a.shape[1:])
        pieces = []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            lo, hi, _ = index[0].indices(n_pad)
            piece = a[lo - start : hi - start]
            if piece.shape[0] < hi - lo:
                pad = np.zeros((hi - lo - piece.shape[0], *a.shape[1:]), a.dtype)
                piece = np.concatenate([piece, pad])
            pieces.append(jax.device_put(piece, device))
        out[name] = jax.make_array_from_single_device_arrays(shape, sharding, pieces)
    return out


def to_host(a) -> np.ndarray:
    """A host copy of ``a``; arrays spread over several processes are all-gathered first."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        from jax.experimental import multihost_utils

        if a.is_fully_replicated:
            return np.asarray(a.addressable_data(0))

        return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    # device_get: an explicit device-to-host transfer (allowed under jax.transfer_guard)
    return np.asarray(jax.device_get(a))
