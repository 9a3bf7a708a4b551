"""Where cells come from and where they live.

The registry (:mod:`jaxvi.data.registry`: ``setup_anndata``'s declared fields, checks and
bounded reads of the counts), cell data on the device or the host (:class:`CellData`,
:class:`Minibatch`), placement over a device mesh, backed and streamed AnnData, the data
sources that own where the cells live (:class:`DataSource`: :class:`DeviceSource`,
:class:`HostSource`, :class:`StreamingSource`, chosen by :func:`make_source`), and the bundled
datasets (:func:`pbmc68k_reduced`, :func:`pbmc_small`, :func:`synthetic_iid`).
"""

from jaxvi.data import registry
from jaxvi.data._bundled import pbmc68k_reduced, pbmc_small
from jaxvi.data._cells import (
    CellData,
    Minibatch,
    gather,
    host_cell_data,
    host_covariates,
    host_log_factorial,
    is_host,
    pad_indices,
    take_rows,
    to_device,
    with_log_factorial,
)
from jaxvi.data._factory import (
    DENSE_LIMIT_BYTES,
    LIB_KEY,
    MINIFY_UNS_KEY,
    QZM_KEY,
    QZV_KEY,
    cell_arrays,
    device_source,
    host_source,
    make_source,
)
from jaxvi.data._placement import shard_host_data, shard_local_rows, sharded_cell_data
from jaxvi.data._source import (
    COVARIATES,
    Block,
    DataSource,
    DeviceSource,
    HostSource,
    as_source,
    covariate_data,
)
from jaxvi.data._streaming import (
    BackedCounts,
    StreamingSource,
    backed_cell_data,
    bounded_runs,
    read_rows,
)
from jaxvi.data.synthetic import synthetic_iid

__all__ = [
    "COVARIATES",
    "DENSE_LIMIT_BYTES",
    "LIB_KEY",
    "MINIFY_UNS_KEY",
    "QZM_KEY",
    "QZV_KEY",
    "BackedCounts",
    "Block",
    "CellData",
    "DataSource",
    "DeviceSource",
    "HostSource",
    "Minibatch",
    "StreamingSource",
    "as_source",
    "backed_cell_data",
    "bounded_runs",
    "cell_arrays",
    "covariate_data",
    "device_source",
    "gather",
    "host_cell_data",
    "host_covariates",
    "host_source",
    "host_log_factorial",
    "is_host",
    "make_source",
    "pad_indices",
    "pbmc68k_reduced",
    "pbmc_small",
    "read_rows",
    "registry",
    "shard_host_data",
    "shard_local_rows",
    "sharded_cell_data",
    "synthetic_iid",
    "take_rows",
    "to_device",
    "with_log_factorial",
]
