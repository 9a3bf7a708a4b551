"""``setup_anndata``: validate an AnnData and record how the model reads it.

The registry is a plain, JSON-serialisable dict stored in ``adata.uns["_jaxvi"]``. It holds
the setup arguments, gene names, category mappings (pandas categorical order, as
scvi-tools) and summary statistics. :func:`registry_arrays` turns any AnnData with the same
genes into host arrays using a registry's mappings, so a trained model can read new data.

The passes over the counts that setup needs (the checks of :func:`setup_anndata`, the totals
of :func:`cell_totals`) go through the matrix in pieces of at most
``settings.stream_max_host_bytes / 32`` stored values (:func:`count_pieces`): for an AnnData
opened with ``backed="r"`` only those pieces are read from disk, so registering it takes host
memory bounded by the setting (plus ``O(cells)`` for the CSR row pointers), not by the
dataset.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from jaxvi._settings import settings
from jaxvi.data._checks import (
    check_counts_piece,
    check_csr_parts,
    check_index_range,
    check_indptr,
)
from jaxvi.data._columns import (
    MissingColumnError,
    _categories,
    _codes,
    _numeric_column,
    _warn_small_categories,
)

__all__ = [
    "UNS_KEY",
    "MissingColumnError",
    "cell_totals",
    "check_counts_piece",
    "check_csr_parts",
    "check_counts_structure",
    "column_sums",
    "count_pieces",
    "get_registry",
    "registry_arrays",
    "setup_anndata",
]

UNS_KEY = "_jaxvi"


def setup_anndata(
    adata,
    layer: str | None = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    size_factor_key: str | None = None,
    categorical_covariate_keys: list[str] | None = None,
    continuous_covariate_keys: list[str] | None = None,
) -> dict:
    """Register an AnnData for scVI and return the registry (also stored in ``adata.uns``).

    Raises ``ValueError`` for an empty AnnData, a missing layer or obs column, negative, NaN
    or infinite counts, and missing values in a registered obs column; warns, as
    scvi-tools does, when counts are not integers.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes).")
    if getattr(adata, "is_view", False):
        raise ValueError(
            "setup_anndata got a view of an AnnData (e.g. adata[cells]); it writes to "
            "adata.obs and adata.uns. Please run `adata = adata.copy()` first."
        )
    for axis, names in (("obs", adata.obs_names), ("var", adata.var_names)):
        if not names.is_unique:
            dup = names[names.duplicated()].unique()[:3].tolist()
            warnings.warn(
                f"adata.{axis}_names are not unique (e.g. {dup}); outputs indexed by these "
                f"names will be ambiguous. Consider `adata.{axis}_names_make_unique()`.",
                UserWarning,
                stacklevel=3,
            )
    setup_args = {
        "layer": layer,
        "batch_key": batch_key,
        "labels_key": labels_key,
        "size_factor_key": size_factor_key,
        "categorical_covariate_keys": list(categorical_covariate_keys or []) or None,
        "continuous_covariate_keys": list(continuous_covariate_keys or []) or None,
    }
    source = _counts_source(adata, layer)
    if source.layout == "csc":
        warnings.warn(
            "Training will be faster when sparse matrix is formatted as CSR. It is safe to "
            "cast before model initialization.",
            UserWarning,
            stacklevel=3,
        )
    _check_counts(source, layer)
    batch_cats = _categories(adata, batch_key, "batch_key")
    label_cats = _categories(adata, labels_key, "labels_key")
    cat_keys = list(categorical_covariate_keys or [])
    cont_keys = list(continuous_covariate_keys or [])
    cov_cats = {k: _categories(adata, k, "categorical_covariate_keys") for k in cat_keys}
    for key in cont_keys + ([size_factor_key] if size_factor_key else []):
        _numeric_column(adata, key)
    registry = {
        "model_name": "SCVI",
        "setup_args": setup_args,
        "var_names": [str(v) for v in adata.var_names],
        "batch_categories": batch_cats,
        "labels_categories": label_cats,
        "categorical_covariate_categories": cov_cats,
        "summary_stats": {
            "n_cells": int(adata.n_obs),
            "n_vars": int(adata.n_vars),
            "n_batch": len(batch_cats),
            "n_labels": len(label_cats),
            "n_extra_categorical_covs": len(cat_keys),
            "n_extra_continuous_covs": len(cont_keys),
        },
    }
    adata.uns[UNS_KEY] = registry
    arrays = registry_arrays(adata, registry, counts=False)
    adata.obs["_scvi_batch"] = arrays["batch_index"]
    adata.obs["_scvi_labels"] = arrays["labels"]
    _warn_small_categories(arrays["batch_index"], "_scvi_batch")
    _warn_small_categories(arrays["labels"], "_scvi_labels")
    return registry


def get_registry(adata) -> dict:
    """Return the registry written by :func:`setup_anndata`, with a clear error if absent."""
    reg = adata.uns.get(UNS_KEY) if hasattr(adata, "uns") else None
    if reg is None:
        raise ValueError(
            "This AnnData has not been set up: call `jaxvi.SCVI.setup_anndata(adata, ...)` first."
        )
    return reg


def registry_arrays(adata, registry: dict, counts: bool = True) -> dict:
    """Host arrays of the registered fields of ``adata`` under ``registry``'s mappings.

    Checks that ``adata`` has the registry's genes (warning when they are in another order)
    and categories. With ``counts=False`` the count matrix is not read (``X`` is None; the
    layer must still exist).

    Returns
    -------
    dict with ``X`` (``(cells, genes)``, dense ndarray or CSR, float32), ``batch_index`` and
    ``labels`` (``(cells,)`` int32), ``cat_covs`` (``(cells, K)`` int32 or None),
    ``cont_covs`` (``(cells, C)`` float32 or None), ``size_factor`` (``(cells,)`` or None).
    """
    args = registry["setup_args"]
    var_names = [str(v) for v in adata.var_names]
    order = None
    if var_names != registry["var_names"]:
        ref = registry["var_names"]
        missing = [g for g in ref if g not in set(var_names)][:5]
        same_set = not missing and len(var_names) == len(ref)
        unique = len(set(ref)) == len(ref) and len(set(var_names)) == len(var_names)
        if not (same_set and unique):
            raise ValueError(
                f"The genes of this AnnData ({len(var_names)}) do not match the {len(ref)} "
                "genes the model was set up with"
                + (f"; missing e.g. {missing}." if missing else " (names not unique).")
            )
        warnings.warn(
            "`var_names` of this AnnData are the model's genes in another order; the columns "
            "are reordered to the model's order.",
            UserWarning,
            stacklevel=3,
        )
        order = pd.Index(var_names).get_indexer(ref)
    x = None
    if not counts:
        _counts_source(adata, args["layer"])  # a missing layer is still an error; nothing read
    else:
        x = _get_counts(adata, args["layer"])
        # queries read data setup_anndata never saw: broken structure would make a later
        # densification write outside its buffer, bad values would give NaN silently
        check_counts_piece(x, f"adata.layers['{args['layer']}']" if args["layer"] else "adata.X")
        if sp.issparse(x):
            x = sp.csr_matrix(x, dtype=np.float32)
        else:
            x = np.ascontiguousarray(np.asarray(x), dtype=np.float32)
        if order is not None:
            x = x[:, order]
    out = {
        "X": x,
        "batch_index": _codes(adata, args["batch_key"], registry["batch_categories"]),
        "labels": _codes(adata, args["labels_key"], registry["labels_categories"]),
        "cat_covs": None,
        "cont_covs": None,
        "size_factor": None,
    }
    cat_keys = args["categorical_covariate_keys"] or []
    if cat_keys:
        cats = registry["categorical_covariate_categories"]
        out["cat_covs"] = np.stack([_codes(adata, k, cats[k]) for k in cat_keys], axis=1)
    cont_keys = args["continuous_covariate_keys"] or []
    if cont_keys:
        out["cont_covs"] = np.stack([_numeric_column(adata, k) for k in cont_keys], axis=1)
    if args["size_factor_key"]:
        sf = _numeric_column(adata, args["size_factor_key"])
        if np.any(sf <= 0):
            raise ValueError(f"Size factors in obs['{args['size_factor_key']}'] must be > 0.")
        out["size_factor"] = sf
    return out


def _get_counts(adata, layer):
    """The registered counts, loaded whole (dense ndarray, CSR or CSC)."""
    src = _counts_source(adata, layer)
    if src.layout == "dense":
        x = src.x
        if not isinstance(x, np.ndarray):
            x = np.asarray(x[...] if _is_on_disk(x) else x)  # backed dense: read it all
        return x
    if src.matrix is not None:
        return src.matrix
    arrays = (np.asarray(src.data[...]), np.asarray(src.indices[...]), np.asarray(src.indptr[...]))
    cls = sp.csr_matrix if src.layout == "csr" else sp.csc_matrix
    return cls(arrays, shape=src.shape)


class _CountsSource(NamedTuple):
    """Where the registered counts are, without reading them.

    ``layout`` is ``"dense"`` (``x``: an ndarray or an on-disk array sliced by rows, e.g. an
    h5py dataset) or ``"csr"`` / ``"csc"`` (``data``, ``indices``, ``indptr``: ndarrays, or
    HDF5 datasets of a backed AnnData; ``matrix``: the scipy matrix when in memory).
    """

    layout: str
    shape: tuple
    dtype: np.dtype
    x: object = None
    data: object = None
    indices: object = None
    indptr: object = None
    matrix: object = None


def _is_on_disk(x) -> bool:
    return not isinstance(x, np.ndarray) and not sp.issparse(x) and hasattr(x, "shape")


def _counts_source(adata, layer) -> _CountsSource:
    """The registered counts of ``adata`` as a :class:`_CountsSource` (nothing is read from
    disk). Raises ``ValueError`` for a missing layer, ``X`` None or a sparse format other
    than CSR / CSC."""
    if layer is None:
        x = adata.X
    else:
        if layer not in adata.layers:
            raise ValueError(
                f"Layer '{layer}' not found in adata.layers (available: {list(adata.layers)})."
            )
        x = adata.layers[layer]
    if x is None:
        raise ValueError("adata.X is None; pass `layer=` naming the layer with counts.")
    where = f"adata.layers['{layer}']" if layer else "adata.X"
    group = getattr(x, "group", None)
    if hasattr(x, "to_memory") and group is not None and hasattr(x, "format"):
        # a backed sparse dataset: its HDF5 arrays, read in pieces
        fmt = str(x.format)
        if fmt not in ("csr", "csc"):
            raise ValueError(f"{where} is a sparse {fmt.upper()} matrix; only CSR and CSC.")
        return _CountsSource(
            fmt,
            tuple(x.shape),
            np.dtype(group["data"].dtype),
            data=group["data"],
            indices=group["indices"],
            indptr=group["indptr"],
        )
    if hasattr(x, "to_memory"):  # another on-disk sparse type: load it
        x = x.to_memory()
    if sp.issparse(x):
        if x.format not in ("csr", "csc"):
            raise ValueError(
                f"{where} is a sparse {x.format.upper()} matrix. Only CSR and CSC matrices "
                "are supported; convert it, e.g. `adata.X = adata.X.tocsr()`."
            )
        return _CountsSource(
            x.format,
            tuple(x.shape),
            np.dtype(x.dtype),
            data=x.data,
            indices=x.indices,
            indptr=x.indptr,
            matrix=x,
        )
    if _is_on_disk(x) and hasattr(x, "dtype") and len(x.shape) == 2:
        return _CountsSource("dense", tuple(x.shape), np.dtype(x.dtype), x=x)  # h5py / zarr
    x = np.asarray(x)
    return _CountsSource("dense", tuple(x.shape), x.dtype, x=x)


def _piece_elements() -> int:
    """Stored values per piece: ``stream_max_host_bytes / 32`` (a piece and the temporaries
    made from it, up to ~32 bytes per value, stay within the setting)."""
    return max(1, int(settings.stream_max_host_bytes) // 32)


def count_pieces(
    adata, layer: str | None = None, max_elements: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The registered counts of ``adata`` in pieces of at most ``max_elements`` stored values.

    For a backed AnnData each piece is read from disk when it is yielded (a CSR matrix also
    reads its row pointers, ``O(cells)``); nothing else of the matrix is read. Each stored
    value is yielded exactly once (a piece holds at least one row of a dense matrix or of a
    CSR matrix, whatever ``max_elements``).

    Parameters
    ----------
    adata
        An AnnData, in memory or backed.
    layer
        Layer with the counts (None: ``X``).
    max_elements
        Bound on the stored values per piece (default ``settings.stream_max_host_bytes / 32``).

    Yields
    ------
    values
        Stored values in their stored dtype: ``(m, genes)`` rows of a dense matrix or
        ``(k,)`` non-zero entries of a sparse one.
    rows
        ``(m,)`` the cells of the rows, or ``(k,)`` the cell of each entry.
    """
    src = _counts_source(adata, layer)
    for piece in _pieces(src, _piece_elements() if max_elements is None else int(max_elements)):
        yield piece.values, piece.rows()


class _Piece(NamedTuple):
    """Stored values of some cells: rows ``lo:hi`` of a dense matrix (``values`` 2-D); the
    entries of rows ``lo:hi`` of a CSR matrix, ``offsets`` ``(hi - lo + 1,)`` into
    ``values``; or entries of a CSC matrix, ``cells`` their rows. ``start`` is the position
    of the first sparse entry in the stored arrays."""

    values: np.ndarray
    lo: int = 0
    hi: int = 0
    offsets: np.ndarray | None = None
    cells: np.ndarray | None = None
    start: int = 0

    def rows(self) -> np.ndarray:
        """The cell of each row (dense) or of each entry (sparse)."""
        if self.cells is not None:
            return self.cells
        if self.offsets is None:
            return np.arange(self.lo, self.hi)
        return np.repeat(np.arange(self.lo, self.hi), np.diff(self.offsets))


def _pieces(src: _CountsSource, budget: int) -> Iterator[_Piece]:
    n_cells, n_genes = src.shape
    if src.layout == "dense":
        step = max(1, budget // max(n_genes, 1))
        for lo in range(0, n_cells, step):
            hi = min(n_cells, lo + step)
            yield _Piece(np.asarray(src.x[lo:hi]), lo, hi)
        return
    if src.layout == "csc":  # the row of each entry is its index
        nnz = int(src.indptr[-1])
        for s in range(0, nnz, budget):
            e = min(nnz, s + budget)
            cells = np.asarray(src.indices[s:e], np.int64)
            yield _Piece(np.asarray(src.data[s:e]), cells=cells, start=s)
        return
    indptr = np.asarray(src.indptr[...], np.int64)  # O(cells)
    lo = 0
    while lo < n_cells:
        hi = int(np.searchsorted(indptr, indptr[lo] + budget, side="right")) - 1
        hi = min(n_cells, max(lo + 1, min(hi, lo + budget)))
        s, e = int(indptr[lo]), int(indptr[hi])
        yield _Piece(np.asarray(src.data[s:e]), lo, hi, offsets=indptr[lo : hi + 1] - s, start=s)
        lo = hi


def cell_totals(adata, layer: str | None = None) -> np.ndarray:
    """Total count of every cell (the sum of its row as float32 values), read in pieces.

    Parameters
    ----------
    adata
        An AnnData, in memory or backed (read in bounded pieces, :func:`count_pieces`).
    layer
        Layer with the counts (None: ``X``).

    Returns
    -------
    float64 ``(cells,)``.
    """
    totals = np.zeros(int(adata.n_obs), np.float64)
    for piece in _pieces(_counts_source(adata, layer), _piece_elements()):
        values = piece.values.astype(np.float32, copy=False)
        if values.ndim == 2:
            totals[piece.lo : piece.hi] = values.sum(axis=1, dtype=np.float64)
        elif piece.offsets is None:
            totals += np.bincount(piece.cells, weights=values, minlength=len(totals))
        else:  # CSR: a sum per non-empty row, over its run of entries
            starts = piece.offsets[:-1]
            full = np.flatnonzero(np.diff(piece.offsets) > 0)
            if len(full):
                sums = np.add.reduceat(values, starts[full], dtype=np.float64)
                totals[piece.lo + full] = sums
    return totals


def column_sums(adata, layer: str | None, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sums over cells of the counts and of their non-zero indicator, in one pass
    over bounded pieces (:func:`count_pieces`; a backed AnnData is not loaded).

    Parameters
    ----------
    adata
        An AnnData, in memory or backed.
    layer
        Layer with the counts (None: ``X``).
    weights
        ``(k, cells)`` float weights, finite.

    Returns
    -------
    ``(sums, nonzero)``, each float64 ``(k, genes)`` in ``adata``'s gene order:
    ``sums[j, g] = sum_c weights[j, c] * x[c, g]`` and ``nonzero[j, g] = sum_c weights[j, c]
    * (x[c, g] != 0)``.
    """
    src = _counts_source(adata, layer)
    weights = np.asarray(weights, np.float64)
    n_genes = src.shape[1]
    sums = np.zeros((len(weights), n_genes))
    nonzero = np.zeros((len(weights), n_genes))
    indptr = None if src.layout != "csc" else np.asarray(src.indptr[...], np.int64)
    for piece in _pieces(src, _piece_elements()):
        values = piece.values.astype(np.float64)
        if values.ndim == 2:
            w = weights[:, piece.lo : piece.hi]
            sums += w @ values
            nonzero += w @ (values != 0)
            continue
        positions = slice(piece.start, piece.start + len(values))
        if indptr is None:  # CSR: the stored column indices
            genes = np.asarray(src.indices[positions], np.int64)
        else:  # CSC: the column of each entry from the column pointers
            genes = np.searchsorted(indptr, np.arange(piece.start, positions.stop), "right") - 1
        rows = piece.rows()
        for j, w in enumerate(weights):
            wr = w[rows]
            sums[j] += np.bincount(genes, weights=wr * values, minlength=n_genes)
            nonzero[j] += np.bincount(genes, weights=wr * (values != 0), minlength=n_genes)
    return sums, nonzero


def check_counts_structure(adata, layer: str | None = None) -> None:
    """Refuse sparse counts whose structure would make a later densification write outside
    its buffer: ``indptr`` of the wrong length, not starting at 0 or decreasing, ``data`` /
    ``indices`` lengths other than ``indptr[-1]``, or an index outside the matrix. Reads
    ``indptr`` (``O(rows)``) and ``indices`` in bounded pieces; nothing for dense counts.

    Parameters
    ----------
    adata
        An AnnData, in memory or backed.
    layer
        Layer with the counts (None: ``X``).

    Raises
    ------
    ValueError
        Naming the matrix and the first problem found.
    """
    _check_structure(_counts_source(adata, layer), layer)


def _check_structure(src: _CountsSource, layer) -> None:
    if src.layout == "dense":
        return
    where = f"adata.layers['{layer}']" if layer else "adata.X"
    n_major, n_minor = src.shape if src.layout == "csr" else src.shape[::-1]
    nnz = check_indptr(
        np.asarray(src.indptr[...]),
        np.dtype(src.indices.dtype),
        (src.data.shape[0], src.indices.shape[0]),
        n_major,
        src.layout,
        where,
    )
    step = _piece_elements()
    for s in range(0, nnz, step):
        check_index_range(np.asarray(src.indices[s : s + step]), n_minor, src.layout, where)


def _check_counts(source: _CountsSource, layer) -> None:
    """Refuse broken sparse structure, non-numeric or complex, NaN, infinite, negative
    counts or counts beyond float32's range; warn on non-integers. One pass in bounded
    pieces; the problems are reported in that order whatever piece they are in."""
    where = f"adata.layers['{layer}']" if layer else "adata.X"
    _check_structure(source, layer)
    size = int(source.indptr[-1]) if source.layout != "dense" else int(np.prod(source.shape))
    if size and np.issubdtype(source.dtype, np.complexfloating):
        raise ValueError(f"{where} has complex dtype {source.dtype}; scVI needs counts.")
    if size and not np.issubdtype(source.dtype, np.number):
        raise ValueError(f"{where} must be numeric, got dtype {source.dtype}.")
    floating = np.issubdtype(source.dtype, np.floating)
    wide = floating and np.dtype(source.dtype).itemsize > 4
    nonfinite = negative = nonint = too_large = False
    for piece in _pieces(source, _piece_elements()):
        values = piece.values
        if floating and not np.all(np.isfinite(values)):
            nonfinite = True
            break
        negative = negative or bool(np.any(values < 0))
        too_large = too_large or (wide and bool(np.any(values > np.finfo(np.float32).max)))
        if floating and not nonint:
            nonint = bool(np.any(values != np.round(values)))
    if nonfinite:
        raise ValueError(f"{where} contains NaN or infinite values; scVI needs raw counts.")
    if too_large:
        raise ValueError(
            f"{where} contains values above float32's maximum (3.4e38), which scVI computes in; "
            "these are not counts."
        )
    if negative:
        raise ValueError(f"{where} contains negative values; scVI needs raw counts.")
    if nonint:
        warnings.warn(
            f"{where} contains non-integer values. Make sure the registered X field in "
            "anndata contains unnormalized count data.",
            UserWarning,
            stacklevel=3,
        )
