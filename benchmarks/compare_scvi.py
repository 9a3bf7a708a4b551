"""jaxvi.SCVI vs scvi-tools' scvi.model.SCVI: speed, memory and held-out ELBO, same settings.

Each (tool, dataset, epochs) measurement runs in its own Python subprocess
(``compare_scvi.py --worker TOOL --dataset D --epochs N``) that prints one JSON line, so peak
RSS (``ru_maxrss``), thread setup and JIT caches are isolated. The parent runs the workers one
after another, derives steady-state throughput and ratios, prints a markdown table and writes
``benchmarks/results/compare_scvi_<cpu>-<cores>c_<date>.json``.

Per tool and dataset the parent runs ``train(max_epochs=N)`` and, for a cross-check,
``train(max_epochs=1)`` on a fresh model in a fresh process. Steady seconds / epoch is taken two
ways: (1) from epoch-end timestamps inside training, excluding the first epoch (a Lightning
callback for scvi-tools; a thin timing wrapper around jaxvi's compiled epoch function, which
blocks on its output exactly where ``fit`` reads the metrics anyway), and (2) from
``(wall_N - wall_1) / (N - 1)``. Held-out ELBO is ``get_elbo(indices=validation_indices)``
(higher is better; one z sample per cell, averaged over ``--elbo-reps`` evaluations).

Usage::

    python benchmarks/compare_scvi.py                  # 10k x 2k synthetic (20 ep) + PBMC (400 ep)
    python benchmarks/compare_scvi.py --quick          # seconds-long smoke test, nothing saved
    python benchmarks/compare_scvi.py --datasets synthetic --synthetic-epochs 10 --tools jaxvi
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MARKER = "@@COMPARE_SCVI_RESULT@@ "
DATASETS = ("synthetic", "pbmc")

# Targets from the project brief (synthetic 10k x 2k, batch 128, this 2-core CPU).
TARGETS = {
    "cells_per_s_speedup_min": 3.0,
    "train_wall_ratio_max": 0.5,
    "heldout_elbo_rel_diff_max": 0.005,
}


# scvi-tools' SCVI defaults, spelled out so that both tools get the same model.
MODEL_KWARGS = {"n_hidden": 128, "n_latent": 10, "n_layers": 1, "gene_likelihood": "zinb",
                "dispersion": "gene"}  # fmt: skip


# =========================================================================== data
def synthetic_adata(n_cells: int, n_genes: int, seed: int, n_groups: int = 5, n_batches: int = 2):
    """Seeded ZINB counts with cell groups, a batch effect and per-cell library sizes.

    Genes have log-normal base frequencies; each of ``n_groups`` groups up/down-regulates ~10% of
    genes (log-fold-changes N(0, 1.5)); each batch shifts every gene by N(0, 0.3) in log space;
    a continuous within-group "activity" axis modulates another 5% of genes. Library sizes are
    log-normal around 1,500 UMIs; per-gene NB inverse dispersion is log-normal around 3; per-gene
    zero inflation is Beta(1, 12). Stored as float32 CSR in ``X``.
    """
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    log_base = rng.normal(0.0, 1.5, n_genes)
    de = rng.random((n_groups, n_genes)) < 0.10
    lfc = rng.normal(0.0, 1.5, (n_groups, n_genes)) * de
    batch_lfc = rng.normal(0.0, 0.3, (n_batches, n_genes))
    activity_genes = rng.normal(0.0, 1.0, n_genes) * (rng.random(n_genes) < 0.05)
    groups = rng.integers(n_groups, size=n_cells)
    batches = rng.integers(n_batches, size=n_cells)
    activity = rng.normal(0.0, 1.0, n_cells)
    library = rng.lognormal(np.log(1500.0), 0.35, n_cells)
    theta = rng.lognormal(np.log(3.0), 0.5, n_genes)
    pi = rng.beta(1.0, 12.0, n_genes)

    x = np.empty((n_cells, n_genes), np.float32)
    for start in range(0, n_cells, 2000):  # chunks keep float64 temporaries small
        s = slice(start, start + 2000)
        logits = (
            log_base
            + lfc[groups[s]]
            + batch_lfc[batches[s]]
            + activity[s, None] * activity_genes[None, :]
        )
        logits -= logits.max(axis=1, keepdims=True)
        freq = np.exp(logits)
        freq /= freq.sum(axis=1, keepdims=True)
        mu = library[s, None] * freq
        lam = rng.gamma(theta[None, :], mu / theta[None, :])
        counts = rng.poisson(lam).astype(np.float32)
        counts[rng.random(counts.shape) < pi[None, :]] = 0.0
        x[s] = counts
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([f"batch{b}" for b in batches]),
            "group": pd.Categorical([f"group{g}" for g in groups]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    return anndata.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)


def make_adata(args, tool: str):
    if args.dataset == "synthetic":
        return synthetic_adata(args.n_cells, args.n_genes, args.data_seed), "batch"
    return C.pbmc_adata(tool), None


# ========================================================================= worker
def _index_digest(idx) -> str:
    import numpy as np

    return hashlib.sha1(np.sort(np.asarray(idx, np.int64)).tobytes()).hexdigest()[:16]


def _history_last(history: dict, key: str):
    if key not in history:
        return None
    frame = history[key]
    return float(frame.iloc[-1, 0])


def worker(args) -> dict:
    """Train one tool on one dataset for ``args.epochs`` epochs and measure it."""
    cores = C.n_cores()
    res: dict = {"tool": args.worker, "dataset": args.dataset, "epochs": args.epochs}
    t0 = C.now()
    if args.worker == "scvi":
        import torch

        torch.set_num_threads(cores)
        import scvi
        from lightning.pytorch.callbacks import Callback

        scvi.settings.seed = args.seed
        torch.set_num_threads(cores)  # scvi's seed setup must not change it; set again
        res["torch_threads"] = torch.get_num_threads()
        res["torch_interop_threads"] = torch.get_num_interop_threads()
    else:
        import jax

        import jaxvi

        try:  # where fit looks make_train_epoch up
            from jaxvi.train import _fit as jtrain
        except ImportError:  # a jaxvi from before the redesign (speed checks against old commits)
            import jaxvi.train as jtrain

        jaxvi.settings.seed = args.seed
        res["jax_backend"] = jax.default_backend()
    res["import_s"] = C.now() - t0
    res["rss_after_import_mb"] = C.current_rss_mb()

    t0 = C.now()
    adata, batch_key = make_adata(args, args.worker)
    res["data_s"] = C.now() - t0
    res["n_cells"], res["n_genes"] = int(adata.n_obs), int(adata.n_vars)
    res["nnz_fraction"] = float(adata.X.nnz / (adata.n_obs * adata.n_vars))
    res["mean_library"] = float(adata.X.sum(axis=1).mean())
    res["rss_after_data_mb"] = C.current_rss_mb()

    train_kwargs = dict(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        train_size=args.train_size,
        enable_progress_bar=False,
        check_val_every_n_epoch=getattr(args, "validate_every", None),
    )
    if args.precision:
        train_kwargs["precision"] = args.precision
    res["precision"] = args.precision
    res["devices"] = args.devices
    epoch_starts: list[float] = []
    epoch_ends: list[float] = []

    if args.worker == "scvi":

        class EpochTimer(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                epoch_starts.append(time.perf_counter())

            def on_train_epoch_end(self, trainer, pl_module):
                epoch_ends.append(time.perf_counter())

        t0 = C.now()
        scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
        model = scvi.model.SCVI(adata, **MODEL_KWARGS)
        res["init_s"] = C.now() - t0
        t0 = C.now()
        with C.LoadProbe() as probe:
            model.train(
                accelerator=args.scvi_accelerator, callbacks=[EpochTimer()], **train_kwargs
            )
        res["train_wall_s"] = C.now() - t0
    else:
        original = jtrain.make_train_epoch

        def timed_make_train_epoch(*args, **kwargs):
            fn = original(*args, **kwargs)

            class TimedEpoch:
                """Blocks on each epoch's output (``fit`` reads it right after anyway)."""

                def __call__(self, *a, **k):
                    epoch_starts.append(time.perf_counter())
                    out = jax.block_until_ready(fn(*a, **k))
                    epoch_ends.append(time.perf_counter())
                    return out

                def _cache_size(self):
                    return fn._cache_size()

                def lower(self, *a):
                    # fit compiles each program ahead of its first call (announced compiles)
                    return fn.lower(*a)

            return TimedEpoch()

        jtrain.make_train_epoch = timed_make_train_epoch
        t0 = C.now()
        jaxvi.SCVI.setup_anndata(adata, batch_key=batch_key)
        model = jaxvi.SCVI(adata, **MODEL_KWARGS)
        res["init_s"] = C.now() - t0
        t0 = C.now()
        with C.LoadProbe() as probe:
            model.train(seed=args.seed, devices=args.devices or "auto", **train_kwargs)
        res["train_wall_s"] = C.now() - t0
        jtrain.make_train_epoch = original
        res["epoch_fn_compilations"] = int(model._epoch_fn._cache_size())
        try:
            from jaxvi.data import DENSE_LIMIT_BYTES
        except ImportError:  # before the redesign
            from jaxvi.model import DENSE_LIMIT_BYTES

        dense_bytes = adata.n_obs * adata.n_vars * 4
        res["jaxvi_counts_on_device"] = "csr" if dense_bytes > DENSE_LIMIT_BYTES else "dense"

    res["train_load"] = probe.result
    res["rss_after_train_mb"] = C.current_rss_mb()
    res["epoch_durations_s"] = [e - s for s, e in zip(epoch_starts, epoch_ends, strict=False)]
    res["epoch_end_offsets_s"] = [e - epoch_ends[0] for e in epoch_ends] if epoch_ends else []
    res["first_epoch_s"] = res["epoch_durations_s"][0] if epoch_starts else None
    res["steady_s_per_epoch"] = C.steady_from_epoch_ends(epoch_ends)
    res["n_epochs_run"] = len(epoch_ends)

    train_idx = model.train_indices
    val_idx = model.validation_indices
    res["n_train"], res["n_validation"] = len(train_idx), len(val_idx)
    res["validation_digest"] = _index_digest(val_idx)
    history = model.history
    res["final_train_loss"] = _history_last(history, "train_loss")
    res["final_elbo_train"] = _history_last(history, "elbo_train")
    res["final_kl_weight"] = _history_last(history, "kl_weight")
    if "elbo_validation" in history:
        res["elbo_validation_history"] = [
            float(v) for v in history["elbo_validation"].to_numpy().ravel()
        ]

    t0 = C.now()
    elbos = []
    if len(val_idx) > 0:
        for _ in range(args.elbo_reps):
            elbos.append(float(model.get_elbo(indices=val_idx, batch_size=args.batch_size)))
    res["elbo_eval_s"] = C.now() - t0
    res["heldout_elbo_reps"] = elbos
    res["heldout_elbo"] = sum(elbos) / len(elbos) if elbos else None
    res["peak_rss_mb"] = C.peak_rss_mb()
    res["peak_device_mb"] = _peak_device_mb(args.worker)
    return res


def _peak_device_mb(tool: str) -> float | None:
    """Peak accelerator memory of this process (None on the CPU)."""
    if tool == "scvi":
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
        return None
    import jax

    stats = jax.local_devices()[0].memory_stats() if jax.default_backend() != "cpu" else None
    if not stats:
        return None
    return stats.get("peak_bytes_in_use", 0) / 2**20


# ========================================================================= parent
def run_worker_once(args, tool: str, dataset: str, epochs: int) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        tool,
        "--dataset",
        dataset,
        "--epochs",
        str(epochs),
        "--seed",
        str(args.seed),
        "--data-seed",
        str(args.data_seed),
        "--n-cells",
        str(args.n_cells),
        "--n-genes",
        str(args.n_genes),
        "--batch-size",
        str(args.batch_size),
        "--train-size",
        str(args.train_size),
        "--elbo-reps",
        str(args.elbo_reps),
        "--scvi-accelerator",
        args.scvi_accelerator,
    ]
    if getattr(args, "precision", None):
        cmd += ["--precision", args.precision]
    if getattr(args, "devices", None):
        cmd += ["--devices", str(args.devices)]
    if getattr(args, "validate_every", None):
        cmd += ["--validate-every", str(args.validate_every)]
    quiet = C.wait_for_quiet(args.wait_quiet, window_s=10.0) if args.wait_quiet > 0 else None
    name = C.TOOL_NAMES[tool]
    print(f"[compare_scvi] {name:10s} {dataset:9s} {epochs:4d} epochs ...", flush=True)
    env = dict(os.environ)
    # jaxvi's persistent compilation cache only with --jax-cache-dir: a plain run compiles.
    env["JAXVI_CACHE_DIR"] = str(Path(args.jax_cache_dir).resolve()) if args.jax_cache_dir else ""
    if tool == "jaxvi" and args.jax_cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = str(Path(args.jax_cache_dir).resolve())
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    t0 = C.now()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=args.worker_timeout, env=env
    )
    wall = C.now() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            res = json.loads(line[len(MARKER) :])
            res["process_wall_s"] = wall
            res["wait_for_quiet"] = quiet
            sps = res.get("steady_s_per_epoch")
            print(
                f"[compare_scvi]   train {res['train_wall_s']:.2f} s"
                + (f", steady {sps:.4f} s/epoch" if sps else "")
                + f", held-out ELBO {res['heldout_elbo']:.3f}, peak RSS {res['peak_rss_mb']:.0f}"
                f" MiB, other load {res['train_load'].get('foreign_cores', float('nan')):.2f}"
                f" cores (process {wall:.1f} s)",
                flush=True,
            )
            return res
    tail = (proc.stderr or "")[-4000:]
    raise RuntimeError(f"worker {tool}/{dataset}/{epochs} failed (rc {proc.returncode}):\n{tail}")


def run_worker(args, tool: str, dataset: str, epochs: int) -> dict:
    """Run a worker until other processes used <= ``--max-foreign-cores`` during train()
    (:func:`_common.least_loaded`: up to ``--max-attempts`` runs, the least loaded kept)."""
    return C.least_loaded(
        lambda: run_worker_once(args, tool, dataset, epochs),
        args.max_attempts,
        args.max_foreign_cores,
        f"{tool}/{dataset}/{epochs} epochs",
        "compare_scvi",
    )


def derive(full: dict, single: dict | None) -> dict:
    """Throughput, compile estimates and the cross-check from the two runs of one tool."""
    n_train = full["n_train"]
    d = {
        "train_wall_s": full["train_wall_s"],
        "init_s": full["init_s"],
        "init_plus_train_s": full["init_s"] + full["train_wall_s"],
        "epochs": full["n_epochs_run"],
        "n_train": n_train,
        "steady_s_per_epoch": full["steady_s_per_epoch"],
        "steady_cells_per_s": (
            n_train / full["steady_s_per_epoch"] if full["steady_s_per_epoch"] else None
        ),
        "first_epoch_s": full["first_epoch_s"],
        "first_epoch_minus_steady_s": (
            full["first_epoch_s"] - full["steady_s_per_epoch"]
            if full["steady_s_per_epoch"]
            else None
        ),
        "overall_cells_per_s": n_train * full["n_epochs_run"] / full["train_wall_s"],
        "heldout_elbo": full["heldout_elbo"],
        "final_elbo_train": full["final_elbo_train"],
        "final_train_loss": full["final_train_loss"],
        "peak_rss_mb": full["peak_rss_mb"],
        "foreign_cores_during_train": full["train_load"].get("foreign_cores"),
        "clean": full.get("clean", True) and (single is None or single.get("clean", True)),
    }
    if "epoch_fn_compilations" in full:
        d["epoch_fn_compilations"] = full["epoch_fn_compilations"]
    if single is not None and full["n_epochs_run"] > 1:
        s_wall = (full["train_wall_s"] - single["train_wall_s"]) / (full["n_epochs_run"] - 1)
        d["train_wall_1_epoch_s"] = single["train_wall_s"]
        d["steady_s_per_epoch_from_walls"] = s_wall
        d["steady_cells_per_s_from_walls"] = n_train / s_wall if s_wall > 0 else None
        if full["steady_s_per_epoch"]:
            d["wall_1_minus_steady_s"] = single["train_wall_s"] - full["steady_s_per_epoch"]
        d["peak_rss_1_epoch_mb"] = single["peak_rss_mb"]
    return d


def ratios(jx: dict, sc: dict) -> dict:
    def div(a, b):
        return a / b if a is not None and b else None

    out = {
        "steady_cells_per_s_speedup": div(jx["steady_cells_per_s"], sc["steady_cells_per_s"]),
        "train_wall_ratio": div(jx["train_wall_s"], sc["train_wall_s"]),
        "init_plus_train_ratio": div(jx["init_plus_train_s"], sc["init_plus_train_s"]),
        "overall_cells_per_s_speedup": div(jx["overall_cells_per_s"], sc["overall_cells_per_s"]),
        "peak_rss_ratio": div(jx["peak_rss_mb"], sc["peak_rss_mb"]),
        # (jaxvi - scvi) / |scvi|; ELBO is higher-is-better, so > 0 means jaxvi fits better.
        "heldout_elbo_rel_diff": (
            (jx["heldout_elbo"] - sc["heldout_elbo"]) / abs(sc["heldout_elbo"])
            if jx["heldout_elbo"] is not None and sc["heldout_elbo"]
            else None
        ),
        "final_elbo_train_rel_diff": (
            (jx["final_elbo_train"] - sc["final_elbo_train"]) / abs(sc["final_elbo_train"])
            if jx["final_elbo_train"] is not None and sc["final_elbo_train"]
            else None
        ),
    }
    if jx.get("steady_cells_per_s_from_walls") and sc.get("steady_cells_per_s_from_walls"):
        out["steady_cells_per_s_speedup_from_walls"] = (
            jx["steady_cells_per_s_from_walls"] / sc["steady_cells_per_s_from_walls"]
        )
    return out


def check_targets(r: dict) -> dict:
    sp, wr, ed = (
        r["steady_cells_per_s_speedup"],
        r["train_wall_ratio"],
        r["heldout_elbo_rel_diff"],
    )
    return {
        "cells_per_s_speedup>=3": None if sp is None else sp >= TARGETS["cells_per_s_speedup_min"],
        "train_wall_ratio<=0.5": None if wr is None else wr <= TARGETS["train_wall_ratio_max"],
        # "within 0.5% or better": |diff| <= 0.5%, or jaxvi's ELBO is higher.
        "heldout_elbo_within_0.5%_or_better": (
            None if ed is None else (ed >= -TARGETS["heldout_elbo_rel_diff_max"])
        ),
    }


def markdown(results: dict) -> str:
    lines = [
        "| dataset | tool | epochs | train() s | SCVI() s | steady s/epoch | steady cells/s "
        "| s/epoch (wall diff) | 1st epoch − steady s | peak RSS MiB | held-out ELBO "
        "| final elbo_train | other load (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ds, block in results.items():
        for tool in C.TOOLS:
            m = block["tools"].get(tool)
            if m is None:
                continue
            mark = "" if m["clean"] else " (LOADED)"
            lines.append(
                f"| {ds} | {C.TOOL_NAMES[tool]}{mark} | {m['epochs']} "
                f"| {C.fmt(m['train_wall_s'], '.2f')} "
                f"| {C.fmt(m['init_s'], '.2f')} "
                f"| {C.fmt(m['steady_s_per_epoch'], '.4f')} "
                f"| {C.fmt(m['steady_cells_per_s'], ',.0f')} "
                f"| {C.fmt(m.get('steady_s_per_epoch_from_walls'), '.4f')} "
                f"| {C.fmt(m['first_epoch_minus_steady_s'], '.2f')} "
                f"| {C.fmt(m['peak_rss_mb'], '.0f')} | {C.fmt(m['heldout_elbo'], '.2f')} "
                f"| {C.fmt(m['final_elbo_train'], '.2f')} "
                f"| {C.fmt(m['foreign_cores_during_train'], '.2f')} |"
            )
    lines += [
        "",
        "| dataset | cells/s speed-up (jaxvi / scvi-tools) | train() wall ratio "
        "| SCVI() + train() ratio | held-out ELBO rel. diff | peak RSS ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for ds, block in results.items():
        r = block.get("ratios")
        if not r:
            continue
        lines.append(
            f"| {ds} | {C.fmt(r['steady_cells_per_s_speedup'], '.2f')}x "
            f"(wall-diff: {C.fmt(r.get('steady_cells_per_s_speedup_from_walls'), '.2f')}x) "
            f"| {C.fmt(r['train_wall_ratio'], '.3f')} "
            f"| {C.fmt(r['init_plus_train_ratio'], '.3f')} "
            f"| {C.fmt(None if r['heldout_elbo_rel_diff'] is None else 100 * r['heldout_elbo_rel_diff'], '+.3f')}% "  # noqa: E501
            f"| {C.fmt(r['peak_rss_ratio'], '.2f')} |"
        )
    return "\n".join(lines)


def parent(args) -> dict:
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    for d in datasets:
        if d not in DATASETS:
            raise SystemExit(f"unknown dataset {d!r}; choose from {DATASETS}")
    for t in tools:
        if t not in C.TOOLS:
            raise SystemExit(f"unknown tool {t!r}; choose from {C.TOOLS}")
    started = C.utc_timestamp()
    git_start = C.git_info()  # the tree may change while we run (shared checkout)
    t_start = C.now()
    results: dict = {}
    raw: dict = {}
    for ds in datasets:
        epochs = args.synthetic_epochs if ds == "synthetic" else args.pbmc_epochs
        block = {"epochs": epochs, "tools": {}}
        for tool in tools:
            if tool == "jaxvi" and args.jax_cache_dir:
                print("[compare_scvi] warming the JAX compilation cache", flush=True)
                run_worker_once(args, tool, ds, 2)
            full = run_worker(args, tool, ds, epochs)
            single = None
            if not args.no_single_epoch and epochs > 1:
                single = run_worker(args, tool, ds, 1)
            raw[f"{ds}/{tool}"] = {"full": full, "single_epoch": single}
            block["tools"][tool] = derive(full, single)
            block.setdefault(
                "data",
                {
                    k: full[k]
                    for k in ("n_cells", "n_genes", "nnz_fraction", "mean_library")
                    if k in full
                },
            )
            block.setdefault(
                "split", {"n_train": full["n_train"], "n_validation": full["n_validation"]}
            )
        if all(t in block["tools"] for t in C.TOOLS):
            digests = {t: raw[f"{ds}/{t}"]["full"]["validation_digest"] for t in C.TOOLS}
            block["same_validation_cells"] = len(set(digests.values())) == 1
            block["ratios"] = ratios(block["tools"]["jaxvi"], block["tools"]["scvi"])
            block["all_clean"] = all(block["tools"][t]["clean"] for t in C.TOOLS)
            if ds == "synthetic" and not args.quick:
                block["targets"] = check_targets(block["ratios"])
                if not block["all_clean"]:
                    block["targets"]["unreliable"] = (
                        "other processes loaded the CPU during some runs; rerun"
                    )
        results[ds] = block
    table = markdown(results)
    git_end = C.git_info()
    payload = {
        "benchmark": "compare_scvi",
        "started_utc": started,
        "total_wall_s": C.now() - t_start,
        "quick": args.quick,
        "machine": C.machine_info(with_jax=True),
        "versions": C.versions(),
        "git": git_start,
        "git_end": git_end,
        "jaxvi_changed_during_run": C.git_changed_between(git_start["commit"], git_end["commit"])
        or (git_start["dirty_jaxvi_paths"] != git_end["dirty_jaxvi_paths"]),
        "settings": {
            "model": {**MODEL_KWARGS, "dropout_rate": 0.1},
            "train": {
                "batch_size": args.batch_size,
                "train_size": args.train_size,
                "optimizer": "default plan (Adam lr 1e-3, eps 0.01, weight_decay 1e-6, "
                "KL warm-up 400 epochs)",
                "check_val_every_n_epoch": None,
                "scvi_accelerator": args.scvi_accelerator,
                "seed": args.seed,
            },
            "synthetic": {
                "n_cells": args.n_cells,
                "n_genes": args.n_genes,
                "data_seed": args.data_seed,
                "epochs": args.synthetic_epochs,
                "n_groups": 5,
                "n_batches": 2,
                "storage": "float32 CSR",
            },
            "pbmc": {"source": "jaxvi.data.pbmc68k_reduced()", "epochs": args.pbmc_epochs},
            "elbo_reps": args.elbo_reps,
            "jax_cache_dir": args.jax_cache_dir,
            "single_epoch_runs": not args.no_single_epoch,
            "targets": TARGETS,
        },
        "results": results,
        "raw": raw,
        "markdown": table,
    }
    print()
    print(table)
    for ds, block in results.items():
        if "targets" in block:
            print(f"\ntargets ({ds}): {block['targets']}")
        if "same_validation_cells" in block:
            print(f"same validation cells ({ds}): {block['same_validation_cells']}")
    if not args.no_save:
        path = Path(args.out) if args.out else C.result_path("compare_scvi")
        C.write_json(path, payload)
        print(f"\nsaved {path}")
    return payload


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--datasets", default=None, help="comma list (default synthetic,pbmc; --quick: synthetic)"
    )
    p.add_argument("--tools", default="scvi,jaxvi", help="comma list: scvi,jaxvi")
    p.add_argument("--synthetic-epochs", type=int, default=20)
    p.add_argument("--pbmc-epochs", type=int, default=400)
    p.add_argument("--n-cells", type=int, default=10_000, help="synthetic cells")
    p.add_argument("--n-genes", type=int, default=2_000, help="synthetic genes")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train-size", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="model / split / training seed")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--elbo-reps", type=int, default=3, help="held-out ELBO evaluations to average")
    p.add_argument("--no-single-epoch", action="store_true", help="skip the 1-epoch cross-check")
    p.add_argument("--scvi-accelerator", default="cpu")
    p.add_argument("--precision", default=None, help="Lightning precision name, both tools")
    p.add_argument("--devices", type=int, default=None, help="jaxvi data-parallel devices")
    p.add_argument("--validate-every", type=int, default=None, help="validation every N epochs")
    p.add_argument("--worker-timeout", type=float, default=3600.0)
    p.add_argument(
        "--max-foreign-cores",
        type=float,
        default=0.1,
        help="accept a run when other processes used at most this many cores during train()",
    )
    p.add_argument("--max-attempts", type=int, default=6, help="runs per measurement at most")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=120.0,
        help="before each worker wait up to this many s for other processes to go idle (0: no)",
    )
    p.add_argument(
        "--jax-cache-dir",
        default=None,
        help="run jaxvi with JAX's persistent compilation cache here, warmed by one run first "
        "(measures a repeat user's compile cost); default: cold, no cache",
    )
    p.add_argument("--quick", action="store_true", help="tiny smoke test; not saved unless --out")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--no-save", action="store_true")
    # internal
    p.add_argument("--worker", choices=C.TOOLS, help=argparse.SUPPRESS)
    p.add_argument("--dataset", choices=DATASETS, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        res = worker(args)
        print(MARKER + json.dumps(res, default=C._json_default), flush=True)
        return
    if args.quick:
        args.n_cells, args.n_genes = 600, 200
        args.synthetic_epochs, args.pbmc_epochs = 3, 3
        args.elbo_reps = 1
        args.no_single_epoch = True
        args.wait_quiet = 0.0
        args.max_attempts = 1
        args.datasets = args.datasets or "synthetic"
        if args.out is None:
            args.no_save = True
    args.datasets = args.datasets or "synthetic,pbmc"
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    parent(args)


if __name__ == "__main__":
    main()
