"""Analysis speed, jaxvi vs scvi-tools holding the same weights: DE and marginal likelihood.

jaxvi is trained on the built-in PBMC data (700 cells x 765 genes, 10 cell types), its weights
are copied into an ``scvi.model.SCVI`` (``jaxvi.io.bridge.load_into_scvi_tools``), and both
libraries then run, in this one process on the same machine:

* ``differential_expression(groupby="bulk_labels")`` for all 10 cell types one-vs-rest, in
  vanilla and change mode (5000 posterior samples per group, the default);
* ``get_marginal_ll(n_mc_samples=1000)`` over all cells.

Each call is timed twice: the first jaxvi call includes XLA compilation, the second is warm.
Results are printed as a markdown table and saved as JSON (machine, versions, commit).

Usage::

    python benchmarks/compare_analysis.py [--epochs 100] [--per-pass 50] [--quick]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def _timed(fn, reps: int = 2) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(reps):
        t0 = C.now()
        out = fn()
        times.append(C.now() - t0)
    return times, out


def main(argv=None) -> dict:
    """Run the comparison and write the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=100, help="jaxvi training epochs")
    p.add_argument("--n-mc", type=int, default=1000, help="marginal LL samples per cell")
    p.add_argument("--per-pass", type=int, default=50, help="n_mc_samples_per_pass (both)")
    p.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.n_mc, args.per_pass = 2, 20, 10

    import numpy as np
    import scvi
    import torch

    import jaxvi
    from jaxvi.io.bridge import load_into_scvi_tools

    torch.set_num_threads(C.n_cores())
    jaxvi.settings.seed = args.seed
    scvi.settings.seed = args.seed
    base = jaxvi.data.pbmc68k_reduced()
    adata_j, adata_t = base.copy(), base.copy()
    jaxvi.SCVI.setup_anndata(adata_j)
    model_j = jaxvi.SCVI(adata_j)
    model_j.train(max_epochs=args.epochs, enable_progress_bar=False)
    scvi.model.SCVI.setup_anndata(adata_t)
    model_t = scvi.model.SCVI(adata_t)
    load_into_scvi_tools(model_t, model_j)
    model_t.module.eval()
    model_t.is_trained_ = True

    n_de = 500 if args.quick else 5000
    tasks = {
        "de_vanilla_10_types": lambda m: m.differential_expression(
            groupby="bulk_labels", silent=True, n_samples_overall=n_de
        ),
        "de_change_10_types": lambda m: m.differential_expression(
            groupby="bulk_labels", mode="change", silent=True, n_samples_overall=n_de
        ),
        "marginal_ll": lambda m: float(
            m.get_marginal_ll(n_mc_samples=args.n_mc, n_mc_samples_per_pass=args.per_pass)
        ),
    }
    results: dict = {}
    for name, task in tasks.items():
        row = {}
        for tool, model in (("jaxvi", model_j), ("scvi", model_t)):
            times, out = _timed(lambda model=model, task=task: task(model))
            row[tool] = {"first_s": times[0], "warm_s": times[1]}
            if name == "marginal_ll":
                row[tool]["value"] = out
        row["warm_speedup"] = row["scvi"]["warm_s"] / row["jaxvi"]["warm_s"]
        row["first_call_speedup"] = row["scvi"]["first_s"] / row["jaxvi"]["first_s"]
        if name == "marginal_ll":
            ref = row["scvi"]["value"]
            row["rel_diff"] = (row["jaxvi"]["value"] - ref) / abs(ref)
        results[name] = row
        print(name, row, flush=True)

    lines = [
        "| task | jaxvi first s | jaxvi warm s | scvi-tools first s | scvi-tools warm s "
        "| warm speed-up |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['jaxvi']['first_s']:.2f} | {row['jaxvi']['warm_s']:.2f} | "
            f"{row['scvi']['first_s']:.2f} | {row['scvi']['warm_s']:.2f} | "
            f"{row['warm_speedup']:.1f}x |"
        )
    markdown = "\n".join(lines)
    print(markdown)
    payload = {
        "benchmark": "compare_analysis",
        "started_utc": C.utc_timestamp(),
        "quick": args.quick,
        "machine": C.machine_info(),
        "versions": C.versions(),
        "git": C.git_info(),
        "settings": {
            "data": "jaxvi.data.pbmc68k_reduced() (700 x 765)",
            "jaxvi_train_epochs": args.epochs,
            "de_samples_per_group": n_de,
            "marginal_ll": {"n_mc_samples": args.n_mc, "n_mc_samples_per_pass": args.per_pass},
            "torch_threads": C.n_cores(),
            "seed": args.seed,
        },
        "results": results,
        "markdown": markdown,
        "numpy": np.__version__,
    }
    if not args.quick:
        path = C.write_json(C.result_path("compare_analysis"), payload)
        print(f"saved {path}")
    return payload


if __name__ == "__main__":
    main()
