"""jaxvi.SCVI vs scvi-tools' SCVI: how well the latent space integrates batches, scIB metrics.

Both tools train the same model with the same settings on the same multi-batch data, and
both latent spaces (``get_latent_representation()``, the posterior mean) are scored with
scib-metrics (the scverse JAX implementation of the scIB metrics of Luecken et al. 2022),
next to an unintegrated baseline (PCA of the log-normalised counts).

Datasets (known batches and cell types in both):

``pbmc``
    The bundled PBMC counts (``jaxvi.data.pbmc68k_reduced()``, 700 cells x 765 genes, 10 cell
    types in ``obs["bulk_labels"]``) come from one sample, so the batch effect is simulated
    (:func:`pbmc_with_batches`): with ``rng = numpy.random.default_rng(data_seed)`` each cell
    is put into one of ``--pbmc-batches`` (3) batches uniformly at random, each (batch, gene)
    pair gets a log-normal factor ``exp(N(0, batch_sd^2))`` (``--batch-sd``, 0.5), and every
    count is drawn again as ``Poisson(count * factor[batch, gene])``. ``data_seed`` is 0.
``synthetic``
    ``compare_scvi.synthetic_adata`` (ZINB counts, log-normal gene frequencies, per-batch
    log-fold shifts N(0, 0.3) of every gene, cell groups up/down-regulating ~10% of the
    genes, log-normal library sizes): ``--n-cells`` 1,000 x ``--n-genes`` 500, 6 groups
    (the cell types), 3 batches, data seed 0.

Training, per dataset, tool and seed (``--seeds``): ``SCVI.setup_anndata(adata,
batch_key="batch")``, ``SCVI(adata)`` with scvi-tools' defaults (10 latent dimensions, 128
hidden units, 1 layer, ZINB, gene dispersion), ``train()`` with scvi-tools' defaults (the epoch
heuristic: 400 epochs below 20,000 cells; batch 128; 90% of the cells trained on) unless
``--epochs``. Both tools run in this one process, one after the other. torch gets
``--torch-threads`` (1) threads: on a shared 2-core machine its OpenMP threads wait at
barriers whenever another process runs, and 400 PBMC epochs took over 9 minutes instead of
under one. The training times are recorded for information, not as a speed benchmark
(``compare_scvi.py`` is that).

Scoring: ``scib_metrics.benchmark.Benchmarker`` with its default metrics. Bio conservation:
isolated labels, k-means NMI and ARI, silhouette of the cell types, cLISI. Batch correction:
BRAS (scib-metrics 0.5's batch silhouette), iLISI, kBET per cell type, graph connectivity, PCR
comparison. Scores are raw (``min_max_scale=False``), so files compare with each other; each
aggregate is the mean of its group and Total = 0.6 bio + 0.4 batch, as scIB weighs them.
Two departures from the Benchmarker's defaults, both for time on a 2-core CPU: neighbours are
exact (scikit-learn, brute force) instead of pynndescent's approximate ones, whose numba
compilation alone takes over a minute here; and ``--quick`` leaves out kBET and BRAS (their
JAX programs take most of the metrics' compile time). The unintegrated baseline and the
pre-integration embedding of PCR comparison are the same 50-component PCA
(``sc.pp.normalize_total(target_sum=1e4)``, ``sc.pp.log1p``, ``sc.tl.pca(svd_solver="arpack")``).

Targets (this benchmark's own; the issue names none): per dataset, jaxvi's mean bio
conservation and batch correction aggregates over seeds are no more than 0.02 below
scvi-tools', and both tools' batch correction beats the unintegrated PCA's.

Usage::

    python benchmarks/integration.py                 # both datasets, 3 seeds, both tools
    python benchmarks/integration.py --quick         # seconds-long smoke test, nothing saved
    python benchmarks/integration.py --datasets pbmc --tools jaxvi --seeds 0
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.util
import logging
import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TAG = "integration"
DATASETS = ("pbmc", "synthetic")
BASELINE = "Unintegrated"
BATCH_KEY = "batch"
LABEL_KEYS = {"pbmc": "bulk_labels", "synthetic": "group"}
AGGREGATES = ("Bio conservation", "Batch correction", "Total")
# The largest shortfall of jaxvi's mean aggregates against scvi-tools' that counts as equal.
TOLERANCE = 0.02
_EXTRA_PACKAGES = ("scib-metrics", "scanpy", "pynndescent", "scikit-learn", "umap-learn")


# =========================================================================== data
def pbmc_with_batches(n_batches: int = 3, batch_sd: float = 0.5, seed: int = 0):
    """The bundled PBMC counts with a simulated batch effect.

    Parameters
    ----------
    n_batches
        Batches ``b0``, ``b1``, ...; each cell joins one uniformly at random.
    batch_sd
        Standard deviation of the log of each (batch, gene) factor.
    seed
        Seed of ``numpy.random.default_rng``; draws, in order: the batches (cells,), the
        factors (n_batches, genes), the new counts (cells, genes).

    Returns
    -------
    AnnData (700, 765): float32 CSR counts ``Poisson(count * factor[batch, gene])`` in ``X``,
    ``obs["batch"]`` (categorical), the cell types in ``obs["bulk_labels"]``.
    """
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    import jaxvi.data

    if int(n_batches) != n_batches or n_batches < 2:
        raise ValueError(f"n_batches must be an integer >= 2, got {n_batches!r}.")
    if not batch_sd >= 0:
        raise ValueError(f"batch_sd must be >= 0, got {batch_sd!r}.")
    adata = jaxvi.data.pbmc68k_reduced()
    rng = np.random.default_rng(seed)
    batch = rng.integers(n_batches, size=adata.n_obs)
    factors = rng.lognormal(0.0, batch_sd, size=(n_batches, adata.n_vars))
    counts = rng.poisson(adata.X.toarray() * factors[batch])
    adata.X = sp.csr_matrix(counts.astype(np.float32))
    adata.obs[BATCH_KEY] = pd.Categorical([f"b{b}" for b in batch])
    return adata


def make_dataset(name: str, args):
    """``(adata, label_key)`` of dataset ``name`` with counts in ``X`` and ``obs["batch"]``."""
    if name == "pbmc":
        adata = pbmc_with_batches(args.pbmc_batches, args.batch_sd, args.data_seed)
    else:
        import compare_scvi

        adata = compare_scvi.synthetic_adata(
            args.n_cells, args.n_genes, args.data_seed, n_groups=6, n_batches=3
        )
    return adata, LABEL_KEYS[name]


def digest(x) -> str:
    """First 16 hex digits of the SHA-1 of an array's bytes (dense or CSR)."""
    import numpy as np

    if hasattr(x, "toarray"):
        x = x.toarray()
    return hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()[:16]


# ======================================================================= training
def train_latent(
    tool: str, adata, seed: int, epochs: int | None, batch_size: int, torch_threads: int = 1
) -> dict:
    """Train SCVI of ``tool`` on a copy of ``adata``; the latent means (cells, 10) and timing."""
    adata = adata.copy()
    if tool == "scvi":
        import scvi as lib
        import torch

        lib.settings.seed = seed
        torch.set_num_threads(torch_threads)  # after the seed: scvi's seed setup may change it
        fit_kwargs = {"accelerator": "cpu"}
    else:
        import jaxvi as lib

        lib.settings.seed = seed
        fit_kwargs = {"seed": seed}
    lib.model.SCVI.setup_anndata(adata, batch_key=BATCH_KEY)
    model = lib.model.SCVI(adata)
    t0 = C.now()
    with C.LoadProbe() as probe:
        model.train(
            max_epochs=epochs, batch_size=batch_size, enable_progress_bar=False, **fit_kwargs
        )
    wall = C.now() - t0
    z = model.get_latent_representation()
    return {
        "latent": z,
        "tool": tool,
        "seed": seed,
        "epochs": int(len(model.history["elbo_train"])),
        "train_wall_s": wall,
        "foreign_cores_during_train": probe.result.get("foreign_cores"),
        "n_latent": int(z.shape[1]),
    }


# ======================================================================== scoring
def exact_neighbors(x, k: int):
    """scib-metrics' ``NeighborsResults`` of the exact ``k`` nearest neighbours of every row
    of ``x`` (cells, dims), the cell itself first (as pynndescent's neighbour graph has it)."""
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    distances, indices = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    return NeighborsResults(indices=indices, distances=distances)


def score(adata, label_key: str, embeddings: dict, quick: bool = False):
    """scIB metrics of every embedding and the unintegrated PCA baseline.

    Parameters
    ----------
    adata
        Counts in ``X``, ``obs["batch"]`` and ``obs[label_key]``.
    label_key
        Column of the cell types.
    embeddings
        Name -> (cells, dims) array.
    quick
        Leave out kBET and BRAS.

    Returns
    -------
    ``(raw, seconds)``: the Benchmarker's ``get_results(min_max_scale=False)`` frame (one row
    per embedding plus the ``Metric Type`` row; one column per metric and aggregate) and the
    wall seconds of the scoring.
    """
    import anndata
    import numpy as np
    import scanpy as sc
    import scib_metrics
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    scib_metrics.settings.verbosity = logging.WARNING
    t0 = C.now()
    scored = anndata.AnnData(adata.X.copy(), obs=adata.obs[[BATCH_KEY, label_key]].copy())
    sc.pp.normalize_total(scored, target_sum=1e4)
    sc.pp.log1p(scored)
    sc.tl.pca(scored, n_comps=50, svd_solver="arpack")
    scored.obsm[BASELINE] = scored.obsm["X_pca"]
    for name, z in embeddings.items():
        scored.obsm[name] = np.asarray(z, dtype=np.float32)
    batch_metrics = BatchCorrection(bras=False, kbet_per_label=False) if quick else None
    bench = Benchmarker(
        scored,
        batch_key=BATCH_KEY,
        label_key=label_key,
        embedding_obsm_keys=[BASELINE, *embeddings],
        pre_integrated_embedding_obsm_key="X_pca",
        bio_conservation_metrics=BioConservation(),
        batch_correction_metrics=batch_metrics or BatchCorrection(),
        progress_bar=False,
    )
    # The Benchmarker runs gc.collect() before every metric: with JAX, torch and scanpy loaded
    # that is ~0.3-0.6 s each, half the scoring time here. Freezing what exists now leaves
    # the collections only the objects the metrics make.
    gc.freeze()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bench.prepare(neighbor_computer=exact_neighbors)
            bench.benchmark()
    finally:
        gc.unfreeze()
    raw = bench.get_results(min_max_scale=False)
    return raw, C.now() - t0


def _as_dict(raw) -> dict:
    """``{embedding: {metric: score}}`` and ``metric_type`` ``{metric: group}``."""
    types = raw.loc["Metric Type"].to_dict()
    values = raw.drop(index="Metric Type").astype(float)
    return {"scores": values.to_dict(orient="index"), "metric_type": types}


def summarize(scores: dict, runs: list[dict], tools: list[str]) -> dict:
    """Per tool, mean and standard deviation over seeds of every metric; the targets."""
    metrics = list(scores[BASELINE])
    out: dict = {"tools": {}, "baseline": scores[BASELINE]}
    for tool in tools:
        names = [f"{tool}_seed{r['seed']}" for r in runs if r["tool"] == tool]
        per_metric = {}
        for m in metrics:
            vals = [scores[n][m] for n in names]
            per_metric[m] = {
                "mean": statistics.fmean(vals),
                "sd": statistics.stdev(vals) if len(vals) > 1 else None,
                "values": vals,
            }
        out["tools"][tool] = per_metric
    targets = {}
    for tool in tools:
        batch = out["tools"][tool]["Batch correction"]["mean"]
        targets[f"{tool}_batch_correction_beats_unintegrated"] = (
            batch > scores[BASELINE]["Batch correction"]
        )
    if "scvi" in tools and "jaxvi" in tools:
        gaps = {}
        for agg in AGGREGATES:
            gaps[agg] = out["tools"]["jaxvi"][agg]["mean"] - out["tools"]["scvi"][agg]["mean"]
        out["jaxvi_minus_scvi"] = gaps
        for agg in ("Bio conservation", "Batch correction"):
            key = f"jaxvi_{agg.lower().replace(' ', '_')}_within_{TOLERANCE}_of_scvi_or_better"
            targets[key] = gaps[agg] >= -TOLERANCE
    out["targets"] = targets
    return out


# ========================================================================= output
def markdown(dataset: str, summary: dict, metric_type: dict) -> str:
    """Per-metric table: unintegrated PCA, then each tool's mean ± sd over seeds."""
    tools = list(summary["tools"])
    head = "| metric | group | unintegrated PCA | " + " | ".join(C.TOOL_NAMES[t] for t in tools)
    lines = [f"**{dataset}**", "", head + " |", "|---|---|" + "---:|" * (1 + len(tools))]
    order = [m for m in summary["baseline"] if m not in AGGREGATES] + list(AGGREGATES)
    for m in order:
        group = metric_type.get(m, "")
        group = "aggregate" if group == "Aggregate score" else group.split()[0].lower()
        cells = [C.fmt(summary["baseline"][m], ".3f")]
        for t in tools:
            s = summary["tools"][t][m]
            sd = f" ± {s['sd']:.3f}" if s["sd"] is not None else ""
            cells.append(C.fmt(s["mean"], ".3f") + sd)
        name = f"**{m}**" if m in AGGREGATES else m
        lines.append(f"| {name} | {group} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# =========================================================================== main
def run_dataset(name: str, args, tools: list[str]) -> dict:
    adata, label_key = make_dataset(name, args)
    res: dict = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "label_key": label_key,
        "n_cell_types": int(adata.obs[label_key].nunique()),
        "batches": {str(k): int(v) for k, v in adata.obs[BATCH_KEY].value_counts().items()},
        "counts_digest": digest(adata.X),
        "runs": [],
    }
    print(
        f"[{TAG}] {name}: {adata.n_obs} cells x {adata.n_vars} genes, "
        f"{res['n_cell_types']} cell types, batches {res['batches']}",
        flush=True,
    )
    embeddings = {}
    for seed in args.seed_list:
        for tool in tools:
            out = train_latent(tool, adata, seed, args.epochs, args.batch_size, args.torch_threads)
            embeddings[f"{tool}_seed{seed}"] = out.pop("latent")
            res["runs"].append(out)
            print(
                f"[{TAG}]   {C.TOOL_NAMES[tool]:10s} seed {seed}: {out['epochs']} epochs in "
                f"{out['train_wall_s']:.1f} s",
                flush=True,
            )
    raw, seconds = score(adata, label_key, embeddings, quick=args.quick)
    res["scoring_s"] = seconds
    res.update(_as_dict(raw))
    res["summary"] = summarize(res["scores"], res["runs"], tools)
    res["table_md"] = markdown(name, res["summary"], res["metric_type"])
    print(f"[{TAG}]   scored {len(embeddings) + 1} embeddings in {seconds:.1f} s", flush=True)
    print(res["table_md"] + "\n", flush=True)
    for key, ok in res["summary"]["targets"].items():
        print(f"[{TAG}]   {key}: {'met' if ok else 'NOT met'}", flush=True)
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--datasets", default=",".join(DATASETS), help="comma list: pbmc,synthetic")
    p.add_argument("--tools", default=",".join(C.TOOLS), help="comma list: scvi,jaxvi")
    p.add_argument("--seeds", default="0,1,2", help="training seeds (comma list)")
    p.add_argument("--epochs", type=int, default=None, help="default: scVI's heuristic (400)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--pbmc-batches", type=int, default=3)
    p.add_argument("--batch-sd", type=float, default=0.5, help="sd of log batch factors (PBMC)")
    p.add_argument("--n-cells", type=int, default=1_000, help="synthetic cells")
    p.add_argument("--n-genes", type=int, default=500, help="synthetic genes")
    p.add_argument("--torch-threads", type=int, default=1, help="scvi-tools' torch threads")
    p.add_argument("--quick", action="store_true", help="smoke test; not saved unless --out")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--tag", default=None, help="suffix of the default JSON name")
    args = p.parse_args(argv)

    if args.quick:
        args.epochs = args.epochs or 2
        args.seeds = args.seeds if "--seeds" in (argv or sys.argv) else "0"
        args.n_cells, args.n_genes = min(args.n_cells, 300), min(args.n_genes, 200)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    datasets = [d for d in args.datasets.split(",") if d]
    tools = [t for t in args.tools.split(",") if t]
    for value, allowed, what in ((datasets, DATASETS, "dataset"), (tools, C.TOOLS, "tool")):
        bad = sorted(set(value) - set(allowed))
        if bad or not value:
            p.error(f"unknown or no {what}(s) {bad}; choose from {list(allowed)}")
    skipped = []
    if "scvi" in tools and importlib.util.find_spec("scvi") is None:
        tools.remove("scvi")
        skipped.append("scvi-tools is not installed: jaxvi only")
        print(f"[{TAG}] scvi-tools is not installed: scoring jaxvi only", flush=True)
    if not tools:
        p.error("no tool left to run")

    payload = C.run_header(TAG)
    payload["versions"].update(_extra_versions())
    payload["config"] = {
        **{k: v for k, v in vars(args).items() if k not in ("out", "seed_list")},
        "seeds": args.seed_list,
        "tools": tools,
        "datasets": datasets,
        "neighbors": "exact (scikit-learn)",
        "metrics": "Benchmarker defaults" + (" without kBET and BRAS" if args.quick else ""),
        "tolerance": TOLERANCE,
    }
    payload["skipped"] = skipped
    payload["results"] = {name: run_dataset(name, args, tools) for name in datasets}
    payload["targets_met"] = {
        name: all(r["summary"]["targets"].values()) for name, r in payload["results"].items()
    }
    payload["finished_utc"] = C.utc_timestamp()
    if args.out or not args.quick:
        path = Path(args.out) if args.out else C.result_path(TAG, args.tag)
        C.write_json(path, payload)
        print(f"[{TAG}] wrote {path}", flush=True)
    return payload


def _extra_versions() -> dict:
    """Versions of the scoring packages (None when one is not installed)."""
    from importlib import metadata

    out = {}
    for name in _EXTRA_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


if __name__ == "__main__":
    main()
