"""The first minute of a new user: compilation with a cold and a warm persistent cache.

Each run is a fresh Python process (``--worker``) doing what a script does on the bundled PBMC
data (``jaxvi.data.pbmc68k_reduced``, 700 x 765): import jaxvi, ``SCVI.setup_anndata`` and
``SCVI(adata)``, ``train()`` with the default recipe (400 epochs here; the time to the end of
the first epoch, and XLA's compile time of the epoch as jaxvi logs it), then the first and a
second call of each query method. Three cache states, in this order for each repetition:

``off``
    ``JAXVI_CACHE_DIR=""``: no persistent cache (what jaxvi did before).
``cold``
    A new, empty cache directory: everything compiles, and is written to the cache.
``warm``
    The same directory again: a second run of the same script.

Usage::

    python benchmarks/first_minute.py                 # 2 repetitions, ~5 min on 2 CPU cores
    python benchmarks/first_minute.py --reps 1 --epochs 20 --no-save   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MODES = ("off", "cold", "warm")
QUERIES = (
    "get_latent_representation",
    "get_normalized_expression",
    "get_elbo",
    "get_reconstruction_error",
    "get_marginal_ll",
    "get_likelihood_parameters",
    "posterior_predictive_sample",
    "differential_expression",
)


def _query(model, name: str):
    """One call of query ``name`` with the arguments a first script would use."""
    if name == "get_marginal_ll":
        return model.get_marginal_ll(n_mc_samples=100)
    if name == "differential_expression":
        group = model.adata.obs["bulk_labels"].cat.categories[0]
        return model.differential_expression(groupby="bulk_labels", group1=group)
    return getattr(model, name)()


def worker(args) -> dict:
    """One fresh process: import, model, train, queries; seconds of each, compile counts."""
    t_start = time.perf_counter()
    import logging

    import jaxvi
    from jaxvi._compilation import count_compiles

    out = {"import_s": time.perf_counter() - t_start, "cache_dir": None}
    out["cache_dir"] = jaxvi.settings.compilation_cache_dir
    logged = []

    class Record(logging.Handler):
        def emit(self, record):
            logged.append((time.perf_counter(), record.getMessage()))

    logger = logging.getLogger("jaxvi")
    logger.addHandler(Record())
    logger.setLevel(logging.INFO)

    adata = jaxvi.data.pbmc68k_reduced()
    t0 = time.perf_counter()
    with count_compiles() as n:
        jaxvi.SCVI.setup_anndata(adata)
        model = jaxvi.SCVI(adata)
    out["model_init_s"], out["model_init_programs"] = time.perf_counter() - t0, n.compiles

    ends = []

    class EpochTimes:
        def on_epoch_end(self, model, epoch, metrics):
            ends.append(time.perf_counter())

    t0 = time.perf_counter()
    with count_compiles() as n:
        model.train(max_epochs=args.epochs, enable_progress_bar=False, callbacks=[EpochTimes()])
    out["train_s"] = time.perf_counter() - t0
    out["train_programs"], out["train_cache_hits"] = n.compiles, n.hits
    out["first_epoch_s"] = ends[0] - t0
    out["steady_epoch_s"] = (ends[-1] - ends[0]) / max(len(ends) - 1, 1)
    compiles = [m for _, m in logged if m.startswith("Compiled the training epoch in")]
    out["epoch_compile_s"] = float(compiles[0].split(" in ")[1].split(" s")[0])
    for name in QUERIES:
        for call in ("first", "second"):
            t0 = time.perf_counter()
            with count_compiles() as n:
                _query(model, name)
            out[f"{name}_{call}_s"] = time.perf_counter() - t0
            out[f"{name}_{call}_programs"] = n.compiles
    out["process_s"] = time.perf_counter() - t_start
    return out


def run_worker(args, mode: str, cache: str) -> dict:
    env = dict(os.environ, JAXVI_CACHE_DIR="" if mode == "off" else cache)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(C.REPO_DIR), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", "--epochs", str(args.epochs)]
    with C.LoadProbe() as probe:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"worker ({mode}) failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["mode"], res["load"] = mode, probe.result
    res["cache_files"] = len(os.listdir(cache)) if mode != "off" and os.path.isdir(cache) else 0
    return res


ROWS = [
    ("import jaxvi", "import_s"),
    ("SCVI(adata)", "model_init_s"),
    ("train(): first epoch, from the call", "first_epoch_s"),
    ("  of which XLA compile of the epoch", "epoch_compile_s"),
    ("train(): all epochs", "train_s"),
    *[(f"{q}: first call", f"{q}_first_s") for q in QUERIES],
    ("all queries, first calls", "queries_first_s"),
    ("the whole script (process)", "process_s"),
]


def summarize(runs: list[dict]) -> dict:
    """Median seconds of each measure per mode."""
    out = {}
    for mode in MODES:
        rs = [r for r in runs if r["mode"] == mode]
        for r in rs:
            r["queries_first_s"] = sum(r[f"{q}_first_s"] for q in QUERIES)
        keys = [k for k in rs[0] if k.endswith(("_s", "_programs", "_hits"))] if rs else []
        out[mode] = {k: statistics.median(r[k] for r in rs) for k in keys}
    return out


def markdown(summary: dict) -> str:
    lines = [
        "| step | no cache s | cold cache s | warm cache s | warm vs cold |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, key in ROWS:
        vals = [summary[m].get(key) for m in MODES]
        ratio = "" if not vals[2] else f"{vals[1] / vals[2]:.1f}x"
        cells = " | ".join("—" if v is None else f"{v:.2f}" for v in vals)
        lines.append(f"| {label} | {cells} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=400, help="train() epochs (default recipe)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    runs = []
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="jaxvi-first-minute-") as tmp:
            cache = os.path.join(tmp, "xla")
            for mode in MODES:
                print(f"[first_minute] repetition {rep + 1}, cache {mode}", flush=True)
                res = run_worker(args, mode, cache)
                res["rep"] = rep
                runs.append(res)
                print(f"  process {res['process_s']:.1f} s, first epoch "
                      f"{res['first_epoch_s']:.2f} s, train programs {res['train_programs']} "
                      f"({res['train_cache_hits']} from the cache)", flush=True)  # fmt: skip
    summary = summarize(runs)
    table = markdown(summary)
    print(table)
    payload = {
        **C.run_header("first_minute"),
        "settings": {"epochs": args.epochs, "reps": args.reps, "data": "pbmc68k_reduced"},
        "summary": summary,
        "runs": runs,
        "table_md": table,
    }
    if not args.no_save:
        print("wrote", C.write_json(C.result_path("first_minute", "pbmc"), payload))
    return payload


if __name__ == "__main__":
    main()
