"""The one place that decides where the cells of an AnnData live for training and for
queries: :func:`make_source` picks a :class:`~jaxvi.data.DataSource` from the AnnData, the
registry, the device mesh and the options of ``train()``."""

from __future__ import annotations

import scipy.sparse as sp

from jaxvi._settings import settings
from jaxvi.data._cells import host_cell_data, to_device
from jaxvi.data._placement import sharded_cell_data
from jaxvi.data._source import DataSource, DeviceSource, HostSource
from jaxvi.data._streaming import StreamingSource, backed_cell_data
from jaxvi.data.registry import registry_arrays

__all__ = [
    "DENSE_LIMIT_BYTES",
    "LIB_KEY",
    "MINIFY_UNS_KEY",
    "QZM_KEY",
    "QZV_KEY",
    "cell_arrays",
    "device_source",
    "host_source",
    "make_source",
]

# Where a minified AnnData keeps q(z | x) and the library (scvi-tools' names).
MINIFY_UNS_KEY = "_scvi_adata_minify_type"
QZM_KEY, QZV_KEY, LIB_KEY = "scvi_latent_qzm", "scvi_latent_qzv", "observed_lib_size"

# Above this many bytes of dense float32 counts, sparse input stays CSR on the device.
DENSE_LIMIT_BYTES = 2**31


def cell_arrays(adata, registry: dict, counts: bool = True) -> dict:
    """The registered arrays of ``adata`` (:func:`jaxvi.data.registry.registry_arrays`),
    with the cached posterior (``qz_m``, ``qz_v``, ``observed_lib_size``) of a minified
    AnnData."""
    arrays = registry_arrays(adata, registry, counts=counts)
    if adata.uns.get(MINIFY_UNS_KEY) is not None:
        arrays["qz_m"] = adata.obsm[QZM_KEY]
        arrays["qz_v"] = adata.obsm[QZV_KEY]
        arrays["observed_lib_size"] = adata.obs[LIB_KEY].to_numpy()
    return arrays


def device_source(adata, registry: dict, mesh=None, load_sparse_tensor=None) -> DeviceSource:
    """Every cell of ``adata`` in device memory: sharded over ``mesh`` (dense counts, each
    process reading its own rows), or on JAX's default device with counts dense, or CSR when
    ``load_sparse_tensor`` (default: sparse input whose dense float32 counts would exceed
    :data:`DENSE_LIMIT_BYTES`; always for a minified AnnData without counts)."""
    if mesh is not None:
        return DeviceSource(sharded_cell_data(adata, registry, mesh))
    arrays = cell_arrays(adata, registry)
    x = arrays["X"]
    if adata.uns.get(MINIFY_UNS_KEY) == "latent_posterior_parameters":
        load_sparse_tensor = True  # all-zero counts: nothing to densify
    if load_sparse_tensor is None:
        load_sparse_tensor = sp.issparse(x) and x.shape[0] * x.shape[1] * 4 > DENSE_LIMIT_BYTES
    return DeviceSource(to_device(arrays, sparse=bool(load_sparse_tensor)))


def host_source(adata, registry: dict, mesh=None) -> DataSource:
    """The cells of ``adata`` for queries: counts left on disk for a backed AnnData (read
    piece by piece), sharded over ``mesh`` when given, else kept in host memory and moved
    piece by piece."""
    if getattr(adata, "isbacked", False) and adata.uns.get(MINIFY_UNS_KEY) is None:
        data = backed_cell_data(adata, registry)
        if data is not None:
            return HostSource(data, mesh)
    if mesh is not None:
        return device_source(adata, registry, mesh)
    return HostSource(host_cell_data(cell_arrays(adata, registry)))


def _default(value, name):
    return getattr(settings, name) if value is None else value


def make_source(
    adata,
    registry: dict,
    *,
    purpose: str,
    mesh=None,
    streaming: bool | None = None,
    load_sparse_tensor: bool | None = None,
    chunk_cells: int | None = None,
    max_host_bytes: int | None = None,
) -> DataSource:
    """The one place that decides where the cells of ``adata`` live.

    Parameters
    ----------
    adata
        AnnData registered with ``setup_anndata`` (in memory or backed).
    registry
        The model's registry.
    purpose
        ``"train"``: cells for the training engine (:func:`jaxvi.train.fit`): streamed from
        disk (:class:`~jaxvi.data.StreamingSource`) when ``streaming`` (default: when
        ``adata`` is backed), else in device memory (:class:`DeviceSource`, sharded over
        ``mesh`` if given). ``"query"``: cells for the query programs
        (:mod:`jaxvi.posterior`): a :class:`HostSource` moving bounded pieces (counts on
        disk for a backed AnnData), or a sharded :class:`DeviceSource` on a mesh.
    mesh
        A ``jax.sharding.Mesh`` with a ``"cells"`` axis, or None.
    streaming, load_sparse_tensor
        ``train()``'s options (training only).
    chunk_cells, max_host_bytes
        Streaming's read size and host-memory bound (``settings.stream_chunk_cells`` and
        ``settings.stream_max_host_bytes`` by default).

    Returns
    -------
    DataSource
    """
    if purpose == "query":
        return host_source(adata, registry, mesh)
    if purpose != "train":
        raise ValueError(f"purpose must be 'train' or 'query', got {purpose!r}.")
    if streaming is None:
        streaming = bool(getattr(adata, "isbacked", False))
    if streaming:
        return StreamingSource(
            adata,
            registry,
            chunk_cells=_default(chunk_cells, "stream_chunk_cells"),
            max_host_bytes=_default(max_host_bytes, "stream_max_host_bytes"),
            mesh=mesh,
        )
    return device_source(adata, registry, mesh, load_sparse_tensor)
