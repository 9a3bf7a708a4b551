"""Every GPU figure in one command, within a device-time budget (8 minutes by default).

Run on a machine with a GPU (``python benchmarks/gpu_suite.py``) it writes
``results/gpu_suite_<device>_<date>.json`` with:

``throughput``
    Training cells/s of the compiled epoch (the program ``train()`` runs, Adam and the
    non-finite guard included) against the batch size, and against the number of cells up
    to the largest that fits (``jaxvi.memory.largest_dataset``; the counts are made on the
    device by repeating a block of synthetic cells, and each point runs a fixed number of
    steps drawn from all cells, so that a 10M-cell point costs seconds, not an epoch).
``roofline``
    XLA's FLOPs and bytes per step, the achieved FLOP/s and bytes/s against the float32 and
    bfloat16 matmul rate and the copy bandwidth measured on the device, and against the
    device's nominal peaks (:data:`PEAKS`, by device name).
``memory``
    ``jaxvi.memory.estimate`` against the peak device memory a fresh process reaches
    (``device.memory_stats()["peak_bytes_in_use"]``); on a CPU, against XLA's plan of the
    compiled epoch (``memory_analysis()``).
``streaming``
    Training cells/s streamed from a backed h5ad store against the same cells in memory.
``time_to_quality``
    The PBMC default recipe with validation every epoch: the wall time to scvi-tools' final
    validation ELBO (scvi-tools on the same GPU when installed; otherwise the target of the
    newest committed CPU run).
``scvi_tools``
    With scvi-tools installed: both tools' cells/s at two points, in fresh processes
    (``compare_scvi.py``'s worker).

Sections run in that order; one whose usual GPU time no longer fits in ``--budget-s``
(450 s: the rest of the 8 minutes is start-up) is skipped and named in ``skipped``.
``--smoke`` runs the same code on tiny sizes on the CPU (``tests/test_benchmarks.py``).

Usage::

    python benchmarks/gpu_suite.py                  # on a GPU, ~8 min
    python benchmarks/gpu_suite.py --smoke --out /tmp/gpu_suite.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

sys.path.insert(0, str(C.REPO_DIR))  # this checkout's jaxvi, whose commit the JSON records

# Nominal dense peaks (vendor datasheets, no sparsity): float32 (non-tensor), TF32 and BF16
# tensor-core TFLOP/s, memory bandwidth GB/s, memory GB. Matched by substring of the JAX
# device kind, most specific first.
PEAKS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "gbps": 4800, "gb": 141},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "gbps": 2000, "gb": 80},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "gbps": 3350, "gb": 80},
    "A100-SXM4-80GB": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "gbps": 2039, "gb": 80},
    "A100-PCIE-80GB": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "gbps": 1935, "gb": 80},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "gbps": 1555, "gb": 40},
    "L40S": {"fp32": 91.6, "tf32": 183.0, "bf16": 362.1, "gbps": 864, "gb": 48},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "gbps": 300, "gb": 24},
    "A10": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0, "gbps": 600, "gb": 24},
    "V100": {"fp32": 15.7, "tf32": None, "bf16": None, "gbps": 900, "gb": 32},
    "T4": {"fp32": 8.1, "tf32": None, "bf16": None, "gbps": 320, "gb": 16},
}
N_GENES = 2000
SIZES = {  # (full, smoke)
    "batch_sizes": ([128, 512, 2048, 8192], [128]),
    "batch_n_cells": (100_000, 1024),
    "cell_counts": ([10_000, 100_000, 1_000_000], [1024]),
    "cells_batch": (1024, 128),
    "cells_per_point": (500_000, 512),
    "memory_points": ([(100_000, 128), (1_000_000, 1024), (4_000_000, 4096)], [(2048, 128)]),
    "stream_cells": (200_000, 2000),
}


def peaks_for(kind: str) -> dict | None:
    """Nominal peaks of a device kind (``jax.devices()[0].device_kind``), or None."""
    for name, peak in PEAKS.items():
        if name.lower() in kind.lower():
            return {"matched": name, **peak}
    return None


# ------------------------------------------------------------------ device-side training
def make_point(n_cells: int, n_genes: int, batch: int, n_steps: int, hidden: int = 128):
    """Model state, optimizer, compiled epoch and arguments for ``n_cells`` synthetic cells
    made on the device (a block of at most 8192 cells repeated)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxvi.data import CellData
    from jaxvi.module import VAEConfig, vae_model_def
    from jaxvi.train import PlanConfig, epoch_grid, init_train_state, make_train_epoch

    model_def = vae_model_def(VAEConfig(n_genes, 2, n_hidden=hidden))
    state, tx = init_train_state(model_def, model_def.init(jax.random.key(0)), PlanConfig())
    rng = np.random.default_rng(0)
    base = min(n_cells, 8192)
    mu = rng.gamma(0.5, 2.0, (1, n_genes)) * rng.lognormal(0, 0.5, (base, 1))
    block = jax.device_put(rng.poisson(mu).astype(np.float32))
    reps = -(-n_cells // base)
    x = jax.jit(lambda b: jnp.tile(b, (reps, 1))[:n_cells])(block)
    del block
    codes = jax.device_put(np.arange(n_cells, dtype=np.int32) % 2)
    data = CellData(
        x=x,
        indptr=None,
        indices=None,
        data=None,
        batch_index=codes,
        labels=jnp.zeros_like(codes),
        cat_covs=None,
        cont_covs=None,
        size_factor=None,
        n_genes=n_genes,
        log_x_factorial=jnp.zeros((n_cells,), jnp.float32),
    )
    epoch = make_train_epoch(model_def, tx, guard="detect")
    key, idx, mask = epoch_grid(
        jax.random.key(1), jnp.arange(n_cells, dtype=jnp.int32), n_steps=n_steps, batch_size=batch
    )
    return state, epoch, (key, state, data, idx, mask, jnp.ones((n_steps,), jnp.float32))


def time_point(n_cells: int, n_genes: int, batch: int, cells_per_point: int) -> dict:
    """Cells/s of the compiled epoch over ``n_cells`` cells; XLA's cost and memory plan."""
    import jax

    n_steps = max(4, min(1000, cells_per_point // batch))
    t0 = time.perf_counter()
    state, epoch, args = make_point(n_cells, n_genes, batch, n_steps)
    setup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = epoch.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(epoch(*args))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(epoch(*args))
        times.append(time.perf_counter() - t0)
    run_s = sorted(times)[1]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    mem = compiled.memory_analysis()
    tree = sum(a.nbytes for a in jax.tree_util.tree_leaves((state.params, state.opt_state)))
    params = sum(a.nbytes for a in jax.tree_util.tree_leaves(state.params))
    out = {
        "n_cells": n_cells,
        "n_genes": n_genes,
        "batch_size": batch,
        "n_steps": n_steps,
        "setup_s": setup_s,
        "compile_s": compile_s,
        "epoch_s": run_s,
        "cells_per_s": n_steps * batch / run_s,
        "step_ms": 1e3 * run_s / n_steps,
        "step_gflop": float(cost.get("flops", 0.0)) / n_steps / 1e9,
        "step_mb_xla": float(cost.get("bytes accessed", 0.0)) / n_steps / 1e6,
        "essential_mb": (batch * n_genes * 4 + 2 * tree + 2 * params) / 1e6,
        "planned_bytes": None,
    }
    if mem is not None:
        out["planned_bytes"] = (
            mem.argument_size_in_bytes
            + mem.output_size_in_bytes
            + mem.temp_size_in_bytes
            - mem.alias_size_in_bytes
        )
    del state, epoch, args, compiled
    return out


def measure_limits(smoke: bool) -> dict:
    """Best float32 / bfloat16 matmul FLOP/s and copy bandwidth XLA reaches here."""
    import jax
    import jax.numpy as jnp

    def best(fn, *a):
        jax.block_until_ready(fn(*a))
        ts = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*a))
            ts.append(time.perf_counter() - t0)
        return min(ts)

    n = 256 if smoke else 8192
    out = {"matmul_size": n}
    for dtype in ("float32", "bfloat16"):
        a = jnp.full((n, n), 0.5, dtype)
        out[f"matmul_{dtype}_tflops"] = 2 * n**3 / best(jax.jit(jnp.matmul), a, a) / 1e12
    m = (2**20 if smoke else 2**28) // 4
    x = jnp.ones((m,), jnp.float32)
    out["copy_gbps"] = 8 * m / best(jax.jit(lambda v: v * 1.0001), x) / 1e9
    return out


def roofline(points: list[dict], limits: dict, peaks: dict | None) -> list[dict]:
    rows = []
    for p in points:
        step_s = p["step_ms"] / 1e3
        row = {
            "batch_size": p["batch_size"],
            "step_ms": p["step_ms"],
            "step_gflop": p["step_gflop"],
            "achieved_tflops": p["step_gflop"] / step_s / 1e3,
            "xla_gbps": p["step_mb_xla"] / step_s / 1e3,
            "essential_gbps": p["essential_mb"] / step_s / 1e3,
        }
        row["share_of_measured_fp32_matmul"] = (
            row["achieved_tflops"] / limits["matmul_float32_tflops"]
        )
        row["share_of_measured_copy_bw"] = row["essential_gbps"] / limits["copy_gbps"]
        if peaks:
            row["share_of_nominal_fp32"] = row["achieved_tflops"] / peaks["fp32"]
            if peaks.get("tf32"):
                row["share_of_nominal_tf32"] = row["achieved_tflops"] / peaks["tf32"]
            row["share_of_nominal_bw"] = row["xla_gbps"] / peaks["gbps"]
        rows.append(row)
    return rows


# -------------------------------------------------------------------------- memory
def memory_worker(n_cells: int, batch: int) -> dict:
    """In a fresh process: one epoch's peak device memory against the estimate."""
    import jax

    import jaxvi

    state, epoch, args = make_point(n_cells, N_GENES, batch, n_steps=8)
    out = epoch(*args)  # the input state stays alive, as in fit()
    jax.block_until_ready(out)
    stats = jax.local_devices()[0].memory_stats() or {}
    guess = jaxvi.memory.estimate(n_cells, N_GENES, batch, n_batch=2)
    return {
        "n_cells": n_cells,
        "batch_size": batch,
        "peak_bytes": stats.get("peak_bytes_in_use"),
        "estimate": guess._asdict(),
    }


def memory_section(smoke: bool, points: list, planned: list[dict], genes: int) -> list[dict]:
    """Estimate against measured peaks (fresh processes) on a GPU, against XLA's plan of the
    throughput programs on a CPU."""
    import jax

    import jaxvi

    rows = []
    if jax.default_backend() == "cpu":
        for p in planned:
            if p.get("planned_bytes"):
                guess = jaxvi.memory.estimate(p["n_cells"], genes, p["batch_size"], n_batch=2)
                rows.append({**_ratio(guess.total, p["planned_bytes"]), "source": "plan", **p})
        return rows
    for n_cells, batch in points:
        cmd = [sys.executable, __file__, "--memory-worker", str(n_cells), str(batch)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            rows.append({"n_cells": n_cells, "error": proc.stderr[-1500:]})
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res.update(_ratio(res["estimate"]["total"], res["peak_bytes"]), source="peak")
        rows.append(res)
    return rows


def _ratio(guess: float, measured: float | None) -> dict:
    ratio = guess / measured if measured else None
    return {"estimate_bytes": guess, "measured_bytes": measured, "estimate_over_measured": ratio}


# ------------------------------------------------------------------ streaming, quality
class _EpochTimes:
    """A training callback keeping each epoch's end time (and validation ELBO)."""

    def __init__(self):
        self.ends, self.values = [], []

    def on_epoch_end(self, model, epoch, metrics):
        self.ends.append(time.perf_counter())
        self.values.append(metrics.get("elbo_validation"))


def streaming_section(smoke: bool, tmp: Path) -> dict:
    import anndata
    from stream_loader import build_store

    import jaxvi

    n = SIZES["stream_cells"][smoke]
    genes = 230 if smoke else N_GENES  # smoke: the model of pbmc_small (quality section)
    path = tmp / "stream.h5ad"
    store = build_store(path, n, genes, 0.05, 0)
    out = {"n_cells": n, "n_genes": genes, "store": store}
    # The smoke run streams only (its in-memory twin is the throughput section's program).
    variants = (("streamed", "r"),) if smoke else (("in_memory", None), ("streamed", "r"))
    for name, backed in variants:
        adata = anndata.read_h5ad(path, backed=backed)
        jaxvi.SCVI.setup_anndata(adata, batch_key=None if smoke else "batch")
        model = jaxvi.SCVI(adata)
        times = _EpochTimes()
        t0 = time.perf_counter()
        model.train(
            max_epochs=2 if smoke else 3,
            batch_size=128 if smoke else 1024,
            train_size=1.0,
            enable_progress_bar=False,
            callbacks=[times],
        )
        steady = (times.ends[-1] - times.ends[0]) / (len(times.ends) - 1)
        out[name] = {"train_s": time.perf_counter() - t0, "cells_per_s": n / steady}
        del model, adata
    if "in_memory" in out:
        ratio = out["streamed"]["cells_per_s"] / out["in_memory"]["cells_per_s"]
        out["streamed_over_in_memory"] = ratio
    return out


def _accelerator() -> str:
    """scvi-tools' accelerator on the device JAX uses."""
    import jax

    return "gpu" if jax.default_backend() == "gpu" else "cpu"


def quality_section(smoke: bool, has_scvi: bool, epochs: int | None = None) -> dict:
    """PBMC default recipe with validation every epoch: seconds to scvi-tools' final
    validation ELBO (jaxvi in this process, from its first call: compilation included)."""
    import jaxvi

    out = {"target_source": None}
    epochs = epochs or (3 if smoke else 400)
    if has_scvi and not smoke:
        import compare_scvi as CS

        wargs = argparse.Namespace(
            seed=0, data_seed=0, train_size=0.9, elbo_reps=1, batch_size=128, n_cells=0,
            n_genes=0, scvi_accelerator=_accelerator(), wait_quiet=0.0, worker_timeout=1200.0,
            jax_cache_dir=None, precision=None, devices=None, validate_every=1,
        )  # fmt: skip
        sc = CS.run_worker_once(wargs, "scvi", "pbmc", epochs)
        out["scvi"] = {k: sc.get(k) for k in ("train_wall_s", "first_epoch_s", "heldout_elbo")}
        out["target"] = sc["elbo_validation_history"][-1]
        out["target_source"] = "scvi-tools on this device"
        from time_to_quality import time_to

        out["scvi_time_to_target_s"] = time_to(sc, out["target"])
    else:
        runs = sorted(C.RESULTS_DIR.glob("time_to_quality_*_pbmc.json"))
        if runs:
            out["target"] = json.loads(runs[-1].read_text())["summary"]["target_elbo_validation"]
            out["target_source"] = runs[-1].name
    adata = jaxvi.data.pbmc_small() if smoke else jaxvi.data.pbmc68k_reduced()
    jaxvi.SCVI.setup_anndata(adata)
    model = jaxvi.SCVI(adata)
    rec = _EpochTimes()
    t0 = time.perf_counter()
    model.train(
        max_epochs=epochs, check_val_every_n_epoch=1, enable_progress_bar=False, callbacks=[rec]
    )
    out["jaxvi_train_s"] = time.perf_counter() - t0
    out["jaxvi_final_elbo_validation"] = rec.values[-1]
    target = out.get("target")
    hit = [e - t0 for e, v in zip(rec.ends, rec.values, strict=True) if target and v <= target]
    out["jaxvi_time_to_target_s"] = hit[0] if hit else None
    if out.get("scvi_time_to_target_s") and hit:
        out["speedup"] = out["scvi_time_to_target_s"] / hit[0]
    return out


def scvi_section(n_cells: int = 100_000, batches=(128, 1024)) -> list[dict]:
    """Both tools' cells/s in fresh processes (``throughput.py``'s points)."""
    import throughput as TP

    acc = _accelerator()
    args = argparse.Namespace(
        seed=0, data_seed=0, train_size=0.9, elbo_reps=1, scvi_accelerator=acc,
        wait_quiet=0.0, worker_timeout=1200.0, jax_cache_dir=None, accelerator=acc == "gpu",
    )  # fmt: skip
    rows = []
    for batch in batches:
        point = {**TP.BASE, "n_cells": n_cells, "batch_size": batch}
        rows.append(TP.run_point(args, point, ["jaxvi", "scvi"]))
    return rows


# ---------------------------------------------------------------------------- main
def markdown(res: dict) -> str:
    lines = ["| what | n_cells | batch | cells/s | ms/step | TFLOP/s | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for axis in ("batch_size", "n_cells"):
        for p in res.get("throughput", {}).get(axis, []):
            tflops = p["step_gflop"] / p["step_ms"]
            lines.append(
                f"| {axis} | {p['n_cells']:,} | {p['batch_size']} | {p['cells_per_s']:,.0f} | "
                f"{p['step_ms']:.3f} | {tflops:.2f} | {p['compile_s']:.1f} |"
            )
    for m in res.get("memory", []):
        if m.get("estimate_over_measured"):
            lines.append(
                f"\nmemory estimate / measured at {m['n_cells']:,} cells, batch "
                f"{m['batch_size']}: {m['estimate_over_measured']:.2f} ({m['source']})"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (the CPU test)")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip sections after this")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--memory-worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(*args.memory_worker)))
        return {}
    t_start = time.perf_counter()
    import tempfile

    import jax

    from jaxvi.memory import largest_dataset

    smoke = int(args.smoke)
    device = jax.local_devices()[0]
    stats = device.memory_stats() or {}
    kind = device.device_kind
    out = args.out or C.RESULTS_DIR / (
        f"gpu_suite_{C.slug(device.device_kind)}_{time.strftime('%Y%m%d-%H%M')}.json"
    )
    res = {
        **C.run_header("gpu_suite"),
        "device": {"platform": device.platform, "kind": kind, "memory_stats": stats},
        "peaks": peaks_for(kind),
        "smoke": bool(args.smoke),
        "skipped": [],
        "section_s": {},
    }

    def section(name, fn, expect_s=0.0):
        """Run a section unless the budget cannot hold it (its usual GPU time)."""
        if time.perf_counter() - t_start + (0.0 if args.smoke else expect_s) > args.budget_s:
            res["skipped"].append(name)
            return
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failing section must not lose the others
            if args.smoke:
                raise
            res[name] = {"error": f"{type(e).__name__}: {e}"[-2000:]}
        res["section_s"][name] = time.perf_counter() - t0
        print(f"[gpu_suite] {name}: {res['section_s'][name]:.1f} s", flush=True)
        C.write_json(out, res)  # a run cut short by the device's time limit keeps what it had

    section("limits", lambda: measure_limits(args.smoke))
    genes = 64 if smoke else N_GENES
    per_point = SIZES["cells_per_point"][smoke]
    cells = list(SIZES["cell_counts"][smoke])
    limit = stats.get("bytes_limit")
    if limit and not smoke:  # up to the largest that fits, dense
        top = largest_dataset(limit, N_GENES, SIZES["cells_batch"][0], n_batch=2, usable=0.85)
        cells += [c for c in (top // 2, top) if c > cells[-1]]
    res["throughput"] = {"batch_size": [], "n_cells": []}
    done = {}  # a point of both grids is measured once

    def grid(axis, values, fixed):
        for v in values:
            n, b = (fixed, v) if axis == "batch_size" else (v, fixed)
            if time.perf_counter() - t_start + (0 if args.smoke else 15) > args.budget_s:
                res["skipped"].append(f"throughput {axis}={v}")
                continue
            if (n, b) not in done:
                done[(n, b)] = time_point(n, genes, b, per_point)
            res["throughput"][axis].append(done[(n, b)])
            print(f"[gpu_suite] {axis}={v}: {res['throughput'][axis][-1]['cells_per_s']:,.0f} "
                  "cells/s", flush=True)  # fmt: skip
        return res["throughput"][axis]

    section("throughput_batch", lambda: len(grid("batch_size", SIZES["batch_sizes"][smoke],
                                                  SIZES["batch_n_cells"][smoke])))  # fmt: skip
    section("throughput_cells", lambda: len(grid("n_cells", cells, SIZES["cells_batch"][smoke])))
    if "limits" in res and "error" not in res["limits"]:
        res["roofline"] = roofline(res["throughput"]["batch_size"], res["limits"], res["peaks"])
    planned = list(done.values())
    section(
        "memory",
        lambda: memory_section(args.smoke, SIZES["memory_points"][smoke], planned, genes),
        60,
    )
    with tempfile.TemporaryDirectory(prefix="jaxvi-gpu-suite-") as tmp:
        section("streaming", lambda: streaming_section(args.smoke, Path(tmp)), 60)
    try:
        import scvi  # noqa: F401

        has_scvi = True
    except Exception as e:  # noqa: BLE001 - a broken install must not cost the jaxvi figures
        has_scvi = False
        res["scvi_tools_import_error"] = f"{type(e).__name__}: {e}"[-500:]
    res["scvi_tools_installed"] = has_scvi
    section("time_to_quality", lambda: quality_section(args.smoke, has_scvi), 60)
    if has_scvi and not args.smoke:
        section("scvi_tools", scvi_section, 90)
    res["total_s"] = time.perf_counter() - t_start
    res["table_md"] = markdown(res)
    print(res["table_md"])
    print("wrote", C.write_json(out, res))
    return res


if __name__ == "__main__":
    main()
