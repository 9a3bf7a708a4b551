"""The main job: train scVI on the built-in PBMC counts and report what it learned.

``python -m jaxvi.demo [--out DIR] [--max-epochs N]`` trains ``SCVI`` with scvi-tools'
defaults on :func:`jaxvi.data.pbmc68k_reduced` (700 cells x 765 genes, 10 cell types),
prints the held-out ELBO and how well the latent space separates the known cell types
(adjusted Rand index of a k-means clustering, silhouette width), and writes the model, the
latent coordinates and 2-D pictures of the latent space coloured by cell type: a t-SNE
(scikit-learn) and, when scanpy is installed (the ``demo`` extra), the UMAP a scanpy user
would draw (``sc.pp.neighbors(use_rep="X_scVI")`` + ``sc.tl.umap``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import threading
import time

import numpy as np

import jaxvi
from jaxvi import SCVI

__all__ = ["main", "run"]


def run(out: str = "results/pbmc_demo", max_epochs: int | None = None, seed: int = 0) -> dict:
    """Train, evaluate and write outputs to ``out``; return the metrics dict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    from sklearn.cluster import KMeans
    from sklearn.manifold import TSNE
    from sklearn.metrics import adjusted_rand_score, silhouette_score


    os.makedirs(out, exist_ok=True)
    warm_umap = _start_umap_warmup()
    adata = jaxvi.data.pbmc68k_reduced()
    SCVI.setup_anndata(adata, labels_key="bulk_labels")
    model = SCVI(adata)
    print(model)
    start = time.perf_counter()
    model.train(max_epochs=max_epochs, seed=seed)
    train_s = time.perf_counter() - start

    labels = adata.obs["bulk_labels"].astype(str).to_numpy()
    z = model.get_latent_representation()
    n_types = len(np.unique(labels))
    clusters = KMeans(n_clusters=n_types, n_init=10, random_state=seed).fit_predict(z)
    metrics = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "epochs": int(len(model.history["train_loss"])),
        "train_seconds": round(train_s, 2),
        "elbo_train": model.get_elbo(indices=model.train_indices),
        "elbo_heldout": model.get_elbo(indices=model.validation_indices),
        "ari_kmeans_vs_cell_type": float(adjusted_rand_score(labels, clusters)),
        "silhouette_cell_type": float(silhouette_score(z, labels)),
    }
    model.save(os.path.join(out, "model"), overwrite=True)
    pd.DataFrame(z, index=adata.obs_names, columns=[f"z{i}" for i in range(z.shape[1])]).assign(
        cell_type=labels
    ).to_csv(os.path.join(out, "latent.csv"))

    emb = TSNE(n_components=2, random_state=seed, init="pca").fit_transform(z)
    fig, ax = plt.subplots(figsize=(7, 6))
    for t in sorted(np.unique(labels)):
        sel = labels == t
        ax.scatter(emb[sel, 0], emb[sel, 1], s=6, label=t)
    ax.set(xlabel="t-SNE 1", ylabel="t-SNE 2", title="jaxvi latent space, PBMC 700 cells")
    ax.legend(markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "latent_tsne.png"), dpi=120)
    plt.close(fig)
    if warm_umap is not None:
        warm_umap.join()
    umap_note = _write_umap(z, labels, out, seed)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)

    print(f"trained {metrics['epochs']} epochs in {metrics['train_seconds']} s")
    print(f"held-out ELBO (validation cells): {metrics['elbo_heldout']:.2f}")
    print(f"train ELBO: {metrics['elbo_train']:.2f}")
    print(f"ARI (k-means on latent vs cell type): {metrics['ari_kmeans_vs_cell_type']:.3f}")
    print(f"silhouette (latent, cell type): {metrics['silhouette_cell_type']:.3f}")
    print(umap_note)
    print(f"wrote {out}/model, {out}/latent.csv, {out}/latent_tsne.png, {out}/metrics.json")
    return metrics


def _start_umap_warmup() -> threading.Thread | None:
    """Start scanpy's UMAP on a few random cells in a background thread, or return None
    without scanpy.

    Importing umap-learn compiles pynndescent's numba kernels (15 s on a 2-core CPU, in every
    new process) and the first neighbour graph compiles umap's (10 s). Begun before training,
    part of that runs while XLA compiles (which releases the GIL): the demo's UMAP costs
    about 11 s of wall time at 400 epochs instead of about 25. The draw is thrown away; an
    error in it is left for :func:`_write_umap` to raise on the real data.
    """
    if importlib.util.find_spec("scanpy") is None:
        return None

    def warm():
        try:
            import anndata
            import scanpy as sc

            dummy = anndata.AnnData(np.zeros((40, 1), np.float32))
            dummy.obsm["X_scVI"] = (
                np.random.default_rng(0).normal(size=(40, 10)).astype(np.float32)
            )
            sc.pp.neighbors(dummy, use_rep="X_scVI", n_neighbors=15, random_state=0)
            sc.tl.umap(dummy, random_state=0)
        except Exception:  # a failed warm-up only loses the head start
            pass

    thread = threading.Thread(target=warm, name="jaxvi-demo-umap-warmup", daemon=True)
    thread.start()
    return thread


def _write_umap(z: np.ndarray, labels: np.ndarray, out: str, seed: int) -> str:
    """Write ``out/latent_umap.png``, scanpy's UMAP of the latent space ``z`` (cells, n_latent)
    coloured by ``labels`` (cells,), and return a line saying so; without scanpy, write
    nothing and return a line saying why."""
    if importlib.util.find_spec("scanpy") is None:
        return "UMAP skipped: scanpy is not installed (pip install 'jaxvi[demo]' adds it)"
    import anndata
    import matplotlib.pyplot as plt
    import pandas as pd
    import scanpy as sc

    adata = anndata.AnnData(obs=pd.DataFrame({"cell_type": pd.Categorical(labels)}))
    adata.obsm["X_scVI"] = np.asarray(z, dtype=np.float32)
    sc.pp.neighbors(adata, use_rep="X_scVI", random_state=seed)
    sc.tl.umap(adata, random_state=seed)
    fig, ax = plt.subplots(figsize=(9, 6))  # room for the legend of 10 cell types
    sc.pl.umap(adata, color="cell_type", ax=ax, show=False, title="jaxvi latent space, UMAP")
    fig.tight_layout()
    path = os.path.join(out, "latent_umap.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"UMAP (scanpy neighbours on X_scVI): {path}"


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/pbmc_demo", help="output directory")
    p.add_argument("--max-epochs", type=int, default=None, help="default: scVI's heuristic")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run(args.out, args.max_epochs, args.seed)


if __name__ == "__main__":
    main()
