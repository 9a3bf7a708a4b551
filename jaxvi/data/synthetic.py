"""``synthetic_iid``: scvi-tools' i.i.d. synthetic counts (``scvi.data.synthetic_iid``).

Every entry is drawn independently: RNA counts from numpy's negative binomial NB(n=5, p=0.3)
(failures before the 5th success: mean 11.67, variance 38.9), then multiplied by a
Bernoulli(``dropout_ratio``) mask. ``dropout_ratio`` is therefore the probability of
*keeping* a value: the default 0.7 leaves about 30% zeros (scvi-tools' docstring calls it the
expected fraction of zeros; its code does the opposite, and so does this one). There is no
structure to learn; the data are for tests and for checking a model's calibration.

Draws are made in scvi-tools' order from a ``numpy.random.RandomState``, so
``synthetic_iid(seed=s)`` equals ``np.random.seed(s); scvi.data.synthetic_iid()``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["synthetic_iid"]

_SPARSE_FORMATS = {"csr_matrix": sp.csr_matrix, "csc_matrix": sp.csc_matrix}


def synthetic_iid(
    batch_size: int = 200,
    n_genes: int = 100,
    n_proteins: int = 100,
    n_regions: int = 100,
    n_batches: int = 2,
    n_labels: int = 3,
    dropout_ratio: float = 0.7,
    sparse_format: str | None = None,
    generate_coordinates: bool = False,
    return_mudata: bool = False,
    seed: int | None = None,
    rna_dist: str = "nb",
):
    """Synthetic single-cell data of independent, identically distributed entries.

    Parameters
    ----------
    batch_size
        Cells per batch; the data hold ``batch_size * n_batches`` cells.
    n_genes, n_proteins, n_regions
        Numbers of genes, proteins (``obsm["protein_expression"]``, NB(5, 0.3) without the
        mask) and accessibility regions (``obsm["accessibility"]``, masked like the RNA).
        0 proteins or regions leaves that field out.
    n_batches
        Batches ``batch_0``, ``batch_1``, ... in contiguous blocks of ``batch_size`` cells.
    n_labels
        Labels ``label_0``, ... drawn uniformly per cell (``obs["labels"]``); 0 leaves them out.
    dropout_ratio
        Probability that an RNA / accessibility value is kept (not zeroed), in [0, 1].
    sparse_format
        None (dense int64 ``ndarray``), ``"csr_matrix"`` or ``"csc_matrix"``.
    generate_coordinates
        Add ``obsm["coordinates"]``, standard normal ``(cells, 2)``.
    return_mudata
        Return a MuData with modalities ``rna``, ``accessibility``, ``protein_expression``
        (needs the ``mudata`` package).
    seed
        Seed of a ``numpy.random.RandomState``; None draws from numpy's global generator, as
        scvi-tools does.
    rna_dist
        ``"nb"`` (counts) or ``"normal"`` (N(5, 2) values, masked).

    Returns
    -------
    AnnData of shape ``(batch_size * n_batches, n_genes)`` with ``obs["batch"]``,
    ``obs["labels"]`` (categorical), ``var_names`` ``gene_0 ...``; or a MuData.
    """
    for name, value in (
        ("batch_size", batch_size),
        ("n_genes", n_genes),
        ("n_batches", n_batches),
    ):
        if int(value) != value or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    for name, value in (
        ("n_proteins", n_proteins),
        ("n_regions", n_regions),
        ("n_labels", n_labels),
    ):
        if int(value) != value or value < 0:
            raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
    if not 0.0 <= float(dropout_ratio) <= 1.0:
        raise ValueError(
            f"`dropout_ratio` is the probability of keeping a value and must lie in [0, 1], "
            f"got {dropout_ratio!r}."
        )
    if sparse_format is not None and sparse_format not in _SPARSE_FORMATS:
        raise ValueError(
            f"`sparse_format` must be None, 'csr_matrix' or 'csc_matrix', got {sparse_format!r}."
        )
    if rna_dist not in ("nb", "normal"):
        raise ValueError(f"`rna_dist` must be 'nb' or 'normal', got {rna_dist!r}.")
    import anndata

    rng = np.random if seed is None else np.random.RandomState(seed)
    n_obs = batch_size * n_batches

    def as_format(a):
        return a if sparse_format is None else _SPARSE_FORMATS[sparse_format](a)

    if rna_dist == "normal":
        rna = rng.normal(loc=5, scale=2, size=(n_obs, n_genes))
    else:
        rna = rng.negative_binomial(5, 0.3, size=(n_obs, n_genes))
    rna = as_format(rna * rng.binomial(n=1, p=dropout_ratio, size=(n_obs, n_genes)))
    protein = region = labels = coords = None
    if n_proteins > 0:
        protein = as_format(rng.negative_binomial(5, 0.3, size=(n_obs, n_proteins)))
    if n_regions > 0:
        region = rng.negative_binomial(5, 0.3, size=(n_obs, n_regions))
        region = as_format(region * rng.binomial(n=1, p=dropout_ratio, size=(n_obs, n_regions)))
    if n_labels > 0:
        labels = np.array([f"label_{i}" for i in rng.randint(0, n_labels, size=(n_obs,))])
    if generate_coordinates:
        coords = rng.normal(size=(n_obs, 2))

    adata = anndata.AnnData(rna)
    adata.var_names = [f"gene_{i}" for i in range(n_genes)]
    protein_names = np.array([f"protein_{i}" for i in range(n_proteins)])
    if return_mudata:
        try:
            import mudata
        except ImportError as err:
            raise ImportError("return_mudata=True needs the `mudata` package.") from err
        mods = {"rna": adata}
        if region is not None:
            mods["accessibility"] = anndata.AnnData(region)
            mods["accessibility"].var_names = [f"region_{i}" for i in range(n_regions)]
        if protein is not None:
            mods["protein_expression"] = anndata.AnnData(protein)
            mods["protein_expression"].var_names = protein_names
        adata = mudata.MuData(mods)
    else:
        if region is not None:
            adata.obsm["accessibility"] = region
        if protein is not None:
            adata.obsm["protein_expression"] = protein
            adata.uns["protein_names"] = protein_names
    batches = [f"batch_{i}" for i in range(n_batches) for _ in range(batch_size)]
    adata.obs["batch"] = pd.Categorical(batches)
    if labels is not None:
        adata.obs["labels"] = pd.Categorical(labels)
    if coords is not None:
        adata.obsm["coordinates"] = coords
    return adata
