"""Small real count datasets shipped inside the package (no download needed).

``pbmc68k_reduced``: 700 peripheral blood mononuclear cells x 765 genes with 10 cell-type
labels (``obs["bulk_labels"]``). From scanpy's bundled ``10x_pbmc68k_reduced.h5ad`` (10x
Genomics "Fresh 68k PBMCs, Donor A", CC BY 4.0); raw UMI counts recovered from its ``.raw.X``
(log1p of counts per 10k) as ``round(expm1(raw) * n_counts / 1e4)``.

``pbmc_small``: 80 cells x 230 genes, Seurat's ``pbmc_small`` raw counts (Debian package
r-cran-seuratobject), with ``obs["groups"]``.
"""

from __future__ import annotations

from importlib import resources

import anndata

__all__ = ["pbmc68k_reduced", "pbmc_small"]


def _read(name: str) -> anndata.AnnData:
    with resources.as_file(resources.files("jaxvi") / "data" / name) as path:
        return anndata.read_h5ad(path)


def pbmc68k_reduced() -> anndata.AnnData:
    """700 PBMCs x 765 genes of raw counts (float32 CSR), cell types in ``obs["bulk_labels"]``."""
    return _read("pbmc68k_reduced_counts.h5ad")


def pbmc_small() -> anndata.AnnData:
    """80 PBMCs x 230 genes of raw counts (float32 CSR), clusters in ``obs["groups"]``."""
    return _read("pbmc_small.h5ad")
