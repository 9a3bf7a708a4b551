"""Checks of counts as they enter training or a query: sparse structure that scipy's
densification would trust (and write out of bounds on) and values that would make the
likelihood NaN. :func:`jaxvi.data.registry.setup_anndata` runs the same checks over a whole
AnnData in bounded pieces; these run on what a read has already put in memory."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def check_counts_piece(x, where: str = "adata.X") -> None:
    """Refuse counts read for training or a query that would write out of bounds or give
    NaN: broken sparse structure (``indptr`` length or monotonicity, lengths, an index
    outside the matrix), complex dtype, NaN, infinite or negative values.

    Parameters
    ----------
    x
        ``(cells, genes)`` counts: an ndarray or a scipy sparse matrix or array.
    where
        How the message names the matrix.

    Raises
    ------
    ValueError
        Naming ``where`` and the problem.
    """
    if not sp.issparse(x):
        _check_values(np.asarray(x), where)
        return
    if x.format not in ("csr", "csc"):
        x = x.tocsr()
    n_major, n_minor = x.shape if x.format == "csr" else x.shape[::-1]
    check_indptr(
        np.asarray(x.indptr),
        x.indices.dtype,
        (len(x.data), len(x.indices)),
        n_major,
        x.format,
        where,
    )
    check_index_range(x.indices, n_minor, x.format, where)
    _check_values(x.data, where)


def check_csr_parts(data, indices, indptr, n_cols: int, where: str = "adata.X") -> None:
    """:func:`check_counts_piece` for the raw parts of a CSR block read from disk, before
    scipy builds (and trusts) a matrix from them.

    Parameters
    ----------
    data, indices
        ``(nnz,)`` values and column indices.
    indptr
        ``(rows + 1,)`` row pointers into this block's ``data``, starting at 0.
    n_cols
        Number of columns (genes).
    """
    indices = np.asarray(indices)
    check_indptr(
        np.asarray(indptr), indices.dtype, (len(data), len(indices)), len(indptr) - 1, "csr", where
    )
    check_index_range(indices, n_cols, "csr", where)
    _check_values(np.asarray(data), where)


def check_indptr(indptr, indices_dtype, lengths, n_major: int, layout: str, where: str) -> int:
    """Check ``indptr`` (``(n_major + 1,)`` integers rising from 0) against the lengths of
    ``data`` and ``indices``; returns the number of stored values."""
    name = f"{where} is a broken {layout.upper()} matrix"
    if indptr.ndim != 1 or len(indptr) != n_major + 1:
        raise ValueError(f"{name}: its indptr has {indptr.shape} entries, expected {n_major + 1}.")
    if indptr.dtype.kind not in "iu" or np.dtype(indices_dtype).kind not in "iu":
        raise ValueError(f"{name}: non-integer indptr or indices.")
    indptr = indptr.astype(np.int64)
    if indptr[0] != 0 or np.any(np.diff(indptr) < 0):
        raise ValueError(f"{name}: its indptr does not rise monotonically from 0.")
    nnz = int(indptr[-1])
    if lengths[0] != nnz or lengths[1] != nnz:
        raise ValueError(
            f"{name}: indptr ends at {nnz} but data has {lengths[0]} and indices {lengths[1]} "
            "entries."
        )
    return nnz


def check_index_range(indices, n_minor: int, layout: str, where: str) -> None:
    """Every index of ``indices`` (a piece of a sparse matrix's) lies in ``[0, n_minor)``."""
    if len(indices) == 0:
        return
    lo, hi = int(np.min(indices)), int(np.max(indices))
    if lo < 0 or hi >= n_minor:
        axis = "column" if layout == "csr" else "row"
        raise ValueError(
            f"{where} is a broken {layout.upper()} matrix: it holds {axis} index "
            f"{lo if lo < 0 else hi}, outside [0, {n_minor}) (scipy's densification would "
            "write outside its buffer)."
        )


def _check_values(values: np.ndarray, where: str) -> None:
    if np.issubdtype(values.dtype, np.complexfloating):
        raise ValueError(f"{where} has complex dtype {values.dtype}; scVI needs counts.")
    if values.size and np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"{where} contains NaN or infinite values; scVI needs raw counts.")
    if values.size and np.any(values < 0):
        raise ValueError(f"{where} contains negative values; scVI needs raw counts.")
