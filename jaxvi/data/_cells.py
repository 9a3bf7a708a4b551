"""Cells on the device: counts (dense, or CSR densified per minibatch) and covariates.

:func:`to_device` moves the registered fields of an AnnData to the device once;
:func:`gather` builds a :class:`~jaxvi.data.Minibatch` for a vector of cell indices inside a
jitted program, densifying CSR rows there.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from jax.scipy.special import gammaln
from scipy.special import gammaln as scipy_gammaln

from jaxvi.parallel import constrain_cells
from jaxvi.parallel.memory import is_out_of_memory, out_of_memory_error

__all__ = [
    "CellData",
    "Minibatch",
    "gather",
    "host_covariates",
    "host_log_factorial",
    "is_host",
    "pad_indices",
    "take_rows",
    "to_device",
    "host_cell_data",
    "with_log_factorial",
]


class Minibatch(NamedTuple):
    """A minibatch of cells, as the module consumes it.

    Attributes
    ----------
    x
        Counts, ``(cells, genes)`` float32.
    batch_index
        Batch codes, ``(cells,)`` int32.
    labels
        Label codes, ``(cells,)`` int32.
    cat_covs
        Extra categorical covariate codes, ``(cells, K)`` int32, or None.
    cont_covs
        Continuous covariates, ``(cells, C)`` float32, or None.
    size_factor
        Size factors, ``(cells,)`` float32, or None.
    mask
        1.0 for real cells and 0.0 for padding, ``(cells,)`` float32, or None (all real).
    qz_m, qz_v
        Cached posterior mean and variance ``(cells, n_latent)`` of a minified AnnData, or
        None; when set, :meth:`VAE.inference` skips the encoder.
    observed_lib_size
        Cached total counts ``(cells,)`` of a minified AnnData, or None.
    log_x_factorial
        ``sum over genes of lgamma(x + 1)`` per cell, ``(cells,)``, computed once per dataset
        (:func:`jaxvi.data.to_device`), or None. The loss then uses the likelihood's
        ``log_prob_no_factorial`` and adds this, instead of evaluating ``lgamma`` per step.
    labelled
        A second minibatch of labelled cells drawn alongside this one (scANVI's semi-supervised
        step: the classification loss is computed on it), with its own ``mask``; or None.
    """

    x: jax.Array
    batch_index: jax.Array
    labels: jax.Array
    cat_covs: jax.Array | None = None
    cont_covs: jax.Array | None = None
    size_factor: jax.Array | None = None
    mask: jax.Array | None = None
    qz_m: jax.Array | None = None
    qz_v: jax.Array | None = None
    observed_lib_size: jax.Array | None = None
    log_x_factorial: jax.Array | None = None
    labelled: Minibatch | None = None


@flax.struct.dataclass
class CellData:
    """All cells of a dataset as device arrays (a pytree; pass it into jitted functions).

    Either ``x`` (dense ``(cells, genes)``) or the CSR triplet ``indptr`` ``(cells + 1,)``,
    ``indices`` and ``data`` ``(nnz,)`` is set. ``max_row_nnz`` bounds the non-zeros of one row.
    ``qz_m``/``qz_v`` ``(cells, n_latent)`` and ``observed_lib_size`` ``(cells,)`` hold the
    cached posterior of a minified AnnData (None otherwise). ``log_x_factorial`` ``(cells,)``
    is ``sum over genes of lgamma(x + 1)`` (see :class:`~jaxvi.data.Minibatch`), or None.
    ``mesh`` is the ``jax.sharding.Mesh`` the cells are sharded over (:mod:`jaxvi.parallel`),
    or None.
    """

    x: jax.Array | None
    indptr: jax.Array | None
    indices: jax.Array | None
    data: jax.Array | None
    batch_index: jax.Array
    labels: jax.Array
    cat_covs: jax.Array | None
    cont_covs: jax.Array | None
    size_factor: jax.Array | None
    n_genes: int = flax.struct.field(pytree_node=False)
    max_row_nnz: int = flax.struct.field(pytree_node=False, default=0)
    qz_m: jax.Array | None = None
    qz_v: jax.Array | None = None
    observed_lib_size: jax.Array | None = None
    log_x_factorial: jax.Array | None = None
    mesh: Any = flax.struct.field(pytree_node=False, default=None)

    @property
    def n_cells(self) -> int:
        """Number of cells."""
        return int(self.batch_index.shape[0])


def to_device(arrays: dict, *, sparse: bool = False, max_row_nnz: int | None = None) -> CellData:
    """Move host arrays to the device; see :func:`_to_device`. A device out-of-memory error
    becomes a ``MemoryError`` that names the size of the counts and the alternatives."""
    try:
        return _to_device(arrays, sparse=sparse, max_row_nnz=max_row_nnz)
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        x = arrays["X"]
        n_bytes = x.data.nbytes * 2 if sp.issparse(x) and sparse else x.shape[0] * x.shape[1] * 4
        raise out_of_memory_error("The count matrix", n_bytes, e) from None


def _to_device(arrays: dict, *, sparse: bool = False, max_row_nnz: int | None = None) -> CellData:
    """Move host arrays from :func:`jaxvi.data.registry.registry_arrays` to the device.

    Parameters
    ----------
    arrays
        Output of ``registry_arrays``; ``X`` is ``(cells, genes)``, dense or scipy sparse.
        An optional ``log_x_factorial`` ``(cells,)`` is used as given.
    sparse
        Keep counts as CSR on the device and densify each minibatch in the step.
    max_row_nnz
        With ``sparse``: a fixed bound on the non-zeros of a row (at least the real one), and
        the stored values padded to a power of two, so that blocks of the same dataset share
        one compiled program (:mod:`jaxvi.data`).
    """
    x = arrays["X"]
    n_genes = x.shape[1]
    dense = indptr = indices = data = None
    max_row_nnz = max_row_nnz if sparse else 0
    if sparse:
        csr = sp.csr_matrix(x, dtype=np.float32)
        csr.sort_indices()
        row_nnz = int(np.diff(csr.indptr).max(initial=0))
        cols, vals = csr.indices.astype(np.int32), csr.data.astype(np.float32, copy=False)
        if max_row_nnz is None:
            max_row_nnz = row_nnz
        else:
            if max_row_nnz < row_nnz:
                raise ValueError(f"max_row_nnz={max_row_nnz} < {row_nnz}, a row's non-zeros.")
            cap = 1 << max(csr.nnz - 1, 1).bit_length()  # never read past indptr[-1]
            cols = np.concatenate([cols, np.zeros(cap - csr.nnz, np.int32)])
            vals = np.concatenate([vals, np.zeros(cap - csr.nnz, np.float32)])
        indptr = jnp.asarray(csr.indptr.astype(np.int64 if csr.nnz >= 2**31 else np.int32))
        indices, data = jnp.asarray(cols), jnp.asarray(vals)
    else:
        host = x.toarray() if sp.issparse(x) else np.asarray(x)
        dense = jnp.asarray(host.astype(np.float32, copy=False))
    log_x_factorial = arrays.get("log_x_factorial")
    if log_x_factorial is None and sp.issparse(x):  # from the non-zeros only, on the host
        log_x_factorial = host_log_factorial(x)
    if log_x_factorial is not None:
        log_x_factorial = jnp.asarray(np.asarray(log_x_factorial, np.float32))
    elif dense is not None:
        log_x_factorial = _dense_log_factorial(dense)
    else:
        log_x_factorial = _csr_log_factorial(indptr, data[: csr.nnz], int(x.shape[0]))

    def opt(a, dtype):
        return None if a is None else jnp.asarray(np.asarray(a, dtype=dtype))

    return CellData(
        x=dense,
        indptr=indptr,
        indices=indices,
        data=data,
        batch_index=jnp.asarray(arrays["batch_index"], jnp.int32),
        labels=jnp.asarray(arrays["labels"], jnp.int32),
        cat_covs=opt(arrays["cat_covs"], np.int32),
        cont_covs=opt(arrays["cont_covs"], np.float32),
        size_factor=opt(arrays["size_factor"], np.float32),
        n_genes=n_genes,
        max_row_nnz=max_row_nnz,
        qz_m=opt(arrays.get("qz_m"), np.float32),
        qz_v=opt(arrays.get("qz_v"), np.float32),
        observed_lib_size=opt(arrays.get("observed_lib_size"), np.float32),
        log_x_factorial=log_x_factorial,
    )


def host_log_factorial(x: sp.spmatrix | sp.sparray) -> np.ndarray:
    """Per-row ``sum of lgamma(x + 1)`` of sparse counts, from the stored values only.

    Returns
    -------
    float32 ``(rows,)``.
    """
    csr = sp.csr_matrix(x)
    csr.sum_duplicates()
    terms = scipy_gammaln(np.asarray(csr.data, np.float64) + 1.0)
    cum = np.concatenate([[0.0], np.cumsum(terms)])
    return (cum[csr.indptr[1:]] - cum[csr.indptr[:-1]]).astype(np.float32)


def with_log_factorial(data: CellData) -> CellData:
    """``data`` with ``log_x_factorial`` (``(cells,)``, sum over genes of ``lgamma(x + 1)``)
    computed on the device from its counts (dense or CSR; sharded counts give a sharded
    result)."""
    if data.x is not None:
        return data.replace(log_x_factorial=_dense_log_factorial(data.x))
    return data.replace(log_x_factorial=_csr_log_factorial(data.indptr, data.data, data.n_cells))


@jax.jit
def _dense_log_factorial(x: jax.Array) -> jax.Array:
    return jnp.sum(gammaln(x + 1.0), axis=-1)


@functools.partial(jax.jit, static_argnums=2)
def _csr_log_factorial(indptr: jax.Array, data: jax.Array, n_cells: int) -> jax.Array:
    rows = jnp.searchsorted(indptr, jnp.arange(data.shape[0], dtype=indptr.dtype), side="right")
    return jax.ops.segment_sum(gammaln(data + 1.0), rows - 1, num_segments=n_cells)


def host_cell_data(arrays: dict) -> CellData:
    """A :class:`CellData` of host (numpy) arrays: nothing is moved to the device.

    Counts stay as given (dense, or CSR as ``indptr``/``indices``/``data``); prediction
    methods move bounded pieces with :func:`take_rows` (see :func:`jaxvi.posterior.run_chunked`).
    """
    x = arrays["X"]
    dense = indptr = indices = data = None
    max_row_nnz = 0
    if sp.issparse(x):
        csr = sp.csr_matrix(x, dtype=np.float32)
        indptr, indices, data = csr.indptr, csr.indices, csr.data
        max_row_nnz = int(np.diff(indptr).max(initial=0))
    else:
        dense = np.asarray(x, np.float32)

    return CellData(
        x=dense,
        indptr=indptr,
        indices=indices,
        data=data,
        n_genes=int(x.shape[1]),
        max_row_nnz=max_row_nnz,
        **host_covariates(arrays),
    )


def host_covariates(arrays: dict) -> dict:
    """The per-cell fields of :class:`CellData` other than the counts, as numpy arrays (int32
    codes, float32 values; optional ones None), from
    :func:`jaxvi.data.registry.registry_arrays`."""

    def opt(a, dtype):
        return None if a is None else np.asarray(a, dtype=dtype)

    return {
        "batch_index": np.asarray(arrays["batch_index"], np.int32),
        "labels": np.asarray(arrays["labels"], np.int32),
        "cat_covs": opt(arrays["cat_covs"], np.int32),
        "cont_covs": opt(arrays["cont_covs"], np.float32),
        "size_factor": opt(arrays["size_factor"], np.float32),
        "qz_m": opt(arrays.get("qz_m"), np.float32),
        "qz_v": opt(arrays.get("qz_v"), np.float32),
        "observed_lib_size": opt(arrays.get("observed_lib_size"), np.float32),
    }


def is_host(data: CellData) -> bool:
    """Whether ``data`` holds numpy arrays (from :func:`to_host`)."""
    return isinstance(data.batch_index, np.ndarray)


def take_rows(data: CellData, rows: np.ndarray) -> CellData:
    """The cells ``rows`` (``(m,)`` int, repeats allowed) of host ``data`` as a host
    :class:`CellData` with dense ``(m, genes)`` counts, ready for ``jax.device_put``."""
    rows = np.asarray(rows)
    if data.x is not None:
        x = data.x[rows]
    else:
        n_cells = data.batch_index.shape[0]
        csr = sp.csr_matrix((data.data, data.indices, data.indptr), (n_cells, data.n_genes))
        x = csr[rows].toarray()

    def take(a):
        return None if a is None else a[rows]

    return CellData(
        x=np.asarray(x, np.float32),
        indptr=None,
        indices=None,
        data=None,
        batch_index=data.batch_index[rows],
        labels=data.labels[rows],
        cat_covs=take(data.cat_covs),
        cont_covs=take(data.cont_covs),
        size_factor=take(data.size_factor),
        n_genes=data.n_genes,
        qz_m=take(data.qz_m),
        qz_v=take(data.qz_v),
        observed_lib_size=take(data.observed_lib_size),
        log_x_factorial=take(data.log_x_factorial),
    )


def _dense_rows(data: CellData, idx: jax.Array) -> jax.Array:
    if is_host(data):  # outside jit only (tests, small helpers)
        return jnp.asarray(take_rows(data, np.asarray(idx)).x)
    if data.x is not None:
        return data.x[idx]
    if data.data.shape[0] == 0:  # e.g. a minified AnnData: no stored counts
        return jnp.zeros((idx.shape[0], data.n_genes), jnp.float32)
    starts = data.indptr[idx]
    lengths = data.indptr[idx + 1] - starts
    offs = jnp.arange(max(data.max_row_nnz, 1), dtype=starts.dtype)
    valid = offs[None, :] < lengths[:, None]
    pos = jnp.where(valid, starts[:, None] + offs[None, :], 0)
    cols = data.indices[pos]
    vals = jnp.where(valid, data.data[pos], 0.0)
    rows = jnp.arange(idx.shape[0])[:, None]
    return jnp.zeros((idx.shape[0], data.n_genes), jnp.float32).at[rows, cols].add(vals)


def gather(data: CellData, idx: jax.Array, mask: jax.Array | None = None) -> Minibatch:
    """Minibatch of the cells ``idx`` (``(cells,)`` int); ``mask`` marks real cells."""

    def take(a):
        return None if a is None else jnp.asarray(a)[idx]

    batch = Minibatch(
        x=_dense_rows(data, idx),
        batch_index=data.batch_index[idx],
        labels=data.labels[idx],
        cat_covs=take(data.cat_covs),
        cont_covs=take(data.cont_covs),
        size_factor=take(data.size_factor),
        mask=mask,
        qz_m=take(data.qz_m),
        qz_v=take(data.qz_v),
        observed_lib_size=take(data.observed_lib_size),
        log_x_factorial=take(data.log_x_factorial),
    )
    return constrain_cells(batch, data.mesh)  # split over the devices of a sharded dataset


def pad_indices(indices: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into rows of ``batch_size``, padding the last with masked zeros.

    Returns
    -------
    ``(idx, mask)``, each ``(n_chunks, batch_size)``: int32 cell indices and float32 mask.
    """
    n = len(indices)
    n_chunks = max(1, -(-n // batch_size))
    idx = np.zeros(n_chunks * batch_size, np.int32)
    mask = np.zeros(n_chunks * batch_size, np.float32)
    idx[:n] = indices
    mask[:n] = 1.0
    return idx.reshape(n_chunks, batch_size), mask.reshape(n_chunks, batch_size)
