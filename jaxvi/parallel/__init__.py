"""Many devices and many hosts: array-level mesh primitives (:mod:`jaxvi.parallel.mesh`),
multi-process start-up (:mod:`jaxvi.parallel.distributed`) and the device-memory policy
(:mod:`jaxvi.parallel.memory`). Nothing here imports the rest of jaxvi."""

from jaxvi.parallel import distributed, memory
from jaxvi.parallel.distributed import initialize
from jaxvi.parallel.mesh import (
    CELLS,
    constrain_cells,
    data_mesh,
    local_cell_range,
    padded_cells,
    replicate,
    resolve_devices,
    shard_cells,
    to_host,
)

__all__ = [
    "CELLS",
    "constrain_cells",
    "data_mesh",
    "distributed",
    "initialize",
    "local_cell_range",
    "memory",
    "padded_cells",
    "replicate",
    "resolve_devices",
    "shard_cells",
    "to_host",
]
