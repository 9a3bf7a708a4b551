"""The ``adata.obs`` columns a registry reads: categories, their codes and numeric
covariates, each refused with a message naming the column when missing or unusable."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd


class MissingColumnError(KeyError, ValueError):
    """A registered ``adata.obs`` column is absent. Both a ``KeyError`` (what scvi-tools
    raises, and its callers catch) and a ``ValueError`` (what jaxvi raised before); the
    message is shown without ``KeyError``'s quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _warn_small_categories(codes: np.ndarray, name: str) -> None:
    """scvi-tools' warning for categories (by code) with fewer than 3 cells."""
    counts = np.bincount(codes)
    for cat, n in enumerate(counts):
        if 0 < n < 3:
            warnings.warn(
                f"Category {cat} in adata.obs['{name}'] has fewer than 3 cells. Models may "
                "not train properly.",
                UserWarning,
                stacklevel=4,
            )


def _categories(adata, key, arg) -> list[str]:
    if key is None:
        return ["0"]
    if key not in adata.obs:
        raise MissingColumnError(f"`{arg}`: column '{key}' not found in adata.obs.")
    col = adata.obs[key]
    if col.isna().any():
        raise ValueError(
            f"adata.obs['{key}'] has {int(col.isna().sum())} missing values; fill them first."
        )
    cat = col.astype("category")
    return [str(c) for c in cat.cat.categories]


def _codes(adata, key, categories) -> np.ndarray:
    if key is None:
        return np.zeros(adata.n_obs, np.int32)
    if key not in adata.obs:
        raise MissingColumnError(f"Column '{key}' not found in adata.obs.")
    col = adata.obs[key]
    if col.isna().any():
        raise ValueError(f"adata.obs['{key}'] has missing values.")
    values = col.astype(str).to_numpy()
    lookup = pd.Index(categories)
    codes = lookup.get_indexer(values)
    if np.any(codes < 0):
        unseen = sorted(set(values[codes < 0]))[:5]
        raise ValueError(
            f"adata.obs['{key}'] has categories the model was not set up with: {unseen}."
        )
    return codes.astype(np.int32)


def _numeric_column(adata, key) -> np.ndarray:
    if key not in adata.obs:
        raise MissingColumnError(f"Column '{key}' not found in adata.obs.")
    col = adata.obs[key]
    if not pd.api.types.is_numeric_dtype(col):
        raise ValueError(f"adata.obs['{key}'] must be numeric, got dtype {col.dtype}.")
    vals = col.to_numpy(dtype=np.float32)
    if not np.all(np.isfinite(vals)):
        raise ValueError(f"adata.obs['{key}'] contains NaN or infinite values.")
    return vals
