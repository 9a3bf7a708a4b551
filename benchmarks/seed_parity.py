"""Seed table: held-out ELBO of jaxvi and scvi-tools over seeds, paired (issue 19).

For each seed both tools train with the default recipe (``max_epochs`` from scvi-tools'
heuristic, 400 for PBMC and for 10k cells; batch 128; Adam 1e-3; KL warm-up over 400 epochs;
no validation during training) on the same data and the same seeded 90/10 split, each run in a
fresh process (``compare_scvi.py``'s worker). The seed sets the split (identical in both tools,
checked), the initial weights, the minibatch order and the noise (each tool's own generators:
only the split is shared). The held-out ELBO is ``get_elbo`` on the validation cells (higher is
better; one z draw per cell), averaged over ``--elbo-reps`` evaluations.

Per seed, ``d = jaxvi - scvi-tools`` (positive: jaxvi better); over the seeds,
``t = mean(d) / (sd(d) / sqrt(n))`` with ``n - 1`` degrees of freedom and its two-sided p-value.
The JSON is rewritten after every seed, so an interrupted run keeps what it finished and
``--resume`` continues it, with the seeds and settings it was started with. Runs of disjoint
seeds, e.g. one per core, are joined with ``--merge``, which checks that their settings agree.

Usage::

    python benchmarks/seed_parity.py --dataset pbmc --seeds 8 --cores 1
    python benchmarks/seed_parity.py --dataset synthetic --seeds 8   # 10k x 2k, hours on 2 cores
    python benchmarks/seed_parity.py --resume benchmarks/results/seed_parity_....json
    taskset -c 1 python benchmarks/seed_parity.py --dataset synthetic --first-seed 4 --seeds 4 \
        --cores 1 --out b.json                     # beside a run of seeds 0-3 on core 0
    python benchmarks/seed_parity.py --merge a.json b.json --out merged.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import compare_scvi as CS  # noqa: E402

DATA_SIZE = {"pbmc": 700}  # cells of the bundled PBMC data (for the epoch heuristic)
# What ``--resume`` takes from the partial file rather than from the command line.
RESUMED_SETTINGS = ("dataset", "epochs", "n_cells", "n_genes", "data_seed", "elbo_reps",
                    "first_seed", "seeds", "cores")  # fmt: skip


def default_epochs(n_cells: int) -> int:
    """scvi-tools' ``max_epochs`` heuristic, ``min(round(20000 / n_cells * 400), 400)``."""
    return max(min(round(20_000 / n_cells * 400), 400), 1)


def paired_stats(diffs: list[float]) -> dict:
    """Mean, standard deviation, t and two-sided p of paired differences, and their signs."""
    n = len(diffs)
    out = {"n": n, "mean": None, "sd": None, "t": None, "p_two_sided": None}
    out["n_positive"] = sum(d > 0 for d in diffs)
    out["n_negative"] = sum(d < 0 for d in diffs)
    if n == 0:
        return out
    mean = sum(diffs) / n
    out["mean"] = mean
    if n < 2:
        return out
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    out["sd"] = sd
    if sd > 0:
        from scipy import stats

        t = mean / (sd / math.sqrt(n))
        out["t"] = t
        out["p_two_sided"] = float(2 * stats.t.sf(abs(t), n - 1))
    return out


def summarise(rows: list[dict]) -> dict:
    diffs = [r["jaxvi_heldout_elbo"] - r["scvi_heldout_elbo"] for r in rows]
    rel = [d / abs(r["scvi_heldout_elbo"]) for d, r in zip(diffs, rows, strict=True)]
    summary = {"diff": paired_stats(diffs), "rel_diff": paired_stats(rel)}
    t = summary["diff"]["t"]
    summary["no_significant_gap"] = None if t is None else abs(t) < 2.0
    summary["sign_varies"] = (
        summary["diff"]["n_positive"] > 0 and summary["diff"]["n_negative"] > 0
    )
    return summary


def markdown(rows: list[dict], summary: dict) -> str:
    lines = [
        "| seed | scvi-tools held-out ELBO | jaxvi held-out ELBO | jaxvi - scvi-tools | rel. |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["jaxvi_heldout_elbo"] - r["scvi_heldout_elbo"]
        lines.append(
            f"| {r['seed']} | {r['scvi_heldout_elbo']:.3f} | {r['jaxvi_heldout_elbo']:.3f} "
            f"| {d:+.3f} | {100 * d / abs(r['scvi_heldout_elbo']):+.3f}% |"
        )
    s = summary["diff"]
    if s["t"] is not None:
        lines.append(
            f"\nmean difference {s['mean']:+.3f} (sd {s['sd']:.3f}, n {s['n']}), paired t "
            f"{s['t']:+.2f}, two-sided p {s['p_two_sided']:.3f}; jaxvi better in "
            f"{s['n_positive']} of {s['n']} seeds."
        )
    return "\n".join(lines)


# the settings that make two runs' seeds comparable rows of one table
SAME_SETTINGS = ("dataset", "epochs", "n_cells", "n_genes", "data_seed", "elbo_reps", "cores")


def merge(payloads: list[dict], sources: list[str]) -> dict:
    """One result of several runs' payloads: their rows by seed, re-summarised.

    Raises ``ValueError`` when the runs' settings differ in :data:`SAME_SETTINGS`, or when
    one seed was run twice with different results. Header fields (machine, versions, git)
    are the first run's; each run's own are kept under ``merged_from``.
    """
    if not payloads:
        raise ValueError("nothing to merge")
    first = payloads[0]["settings"]
    for src, payload in zip(sources[1:], payloads[1:], strict=True):
        differ = {
            k: (first.get(k), payload["settings"].get(k))
            for k in SAME_SETTINGS
            if first.get(k) != payload["settings"].get(k)
        }
        if differ:
            raise ValueError(f"{src}: settings differ from {sources[0]}'s: {differ}")
    by_seed: dict[int, dict] = {}
    for src, payload in zip(sources, payloads, strict=True):
        for row in payload["rows"]:
            old = by_seed.setdefault(row["seed"], row)
            if old != row and any(
                old[f"{t}_heldout_elbo"] != row[f"{t}_heldout_elbo"] for t in ("scvi", "jaxvi")
            ):
                raise ValueError(f"seed {row['seed']} run twice, with different results ({src})")
    rows = [by_seed[k] for k in sorted(by_seed)]
    summary = summarise(rows)
    keep = ("started_utc", "machine", "versions", "git", "affinity_cores")
    return {
        **{k: v for k, v in payloads[0].items() if k not in ("rows", "summary", "markdown")},
        "merged_from": [
            {"path": src, "seeds": [r["seed"] for r in pl["rows"]], **{k: pl.get(k) for k in keep}}
            for src, pl in zip(sources, payloads, strict=True)
        ],
        "rows": rows,
        "summary": summary,
        "markdown": markdown(rows, summary),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=CS.DATASETS, default="pbmc")
    p.add_argument("--seeds", type=int, default=8, help="seeds 0 .. N-1 (with --first-seed)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="default: scvi-tools' heuristic")
    p.add_argument("--n-cells", type=int, default=10_000, help="synthetic cells")
    p.add_argument("--n-genes", type=int, default=2_000, help="synthetic genes")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--elbo-reps", type=int, default=3, help="held-out ELBO evaluations to average")
    p.add_argument(
        "--cores",
        type=int,
        default=None,
        help="run the workers on this many cores (CPU affinity; both tools then use that many "
        "threads). 1 avoids torch's OpenMP threads spinning against other jobs on a shared CPU",
    )
    p.add_argument("--scvi-accelerator", default="cpu")
    p.add_argument("--worker-timeout", type=float, default=4 * 3600.0)
    p.add_argument("--resume", default=None, help="a partial result JSON to continue")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    p.add_argument("--merge", nargs="+", default=None, help="result JSONs to join (with --out)")
    args = p.parse_args(argv)
    if args.merge:
        if not args.out:
            p.error("--merge needs --out")
        payload = merge([json.loads(Path(f).read_text()) for f in args.merge], args.merge)
        C.write_json(Path(args.out), payload)
        print(payload["markdown"])
        return {"rows": payload["rows"], "summary": payload["summary"], "path": args.out}

    done: list[dict] = []
    if args.resume:
        previous = json.loads(Path(args.resume).read_text())
        # The run continues as it was started: its data, recipe and seeds (a resumed run of
        # seeds 4-7 must not go on to seeds 0-3, which another process may be running).
        for key in RESUMED_SETTINGS:
            setattr(args, key, previous["settings"][key])
        done = previous["rows"]
        out = Path(args.resume)
    if args.epochs is None:
        n_cells = DATA_SIZE.get(args.dataset, args.n_cells)
        args.epochs = default_epochs(n_cells)
    # The workers import the jaxvi of this checkout, not whichever one is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(C.REPO_DIR), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    if args.cores:
        available = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, available[: args.cores])  # the workers inherit it
    # compare_scvi's worker settings: the default recipe, no validation during training.
    args.train_size, args.batch_size = 0.9, 128
    args.wait_quiet, args.jax_cache_dir = 0.0, None
    args.precision, args.devices, args.validate_every = None, None, None
    if not args.resume:
        tag = args.dataset if args.dataset == "pbmc" else f"{args.n_cells}x{args.n_genes}"
        out = Path(args.out) if args.out else C.result_path("seed_parity", tag)
    header = C.run_header("seed_parity")
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows = list(done)
    for seed in seeds:
        if any(r["seed"] == seed for r in rows):
            continue
        args.seed = seed
        runs = {
            tool: CS.run_worker_once(args, tool, args.dataset, args.epochs) for tool in C.TOOLS
        }
        sc, jx = runs["scvi"], runs["jaxvi"]
        if sc["validation_digest"] != jx["validation_digest"]:
            raise RuntimeError(f"seed {seed}: the two tools used different validation cells.")
        row = {"seed": seed}
        for tool, res in runs.items():
            for key in (
                "heldout_elbo",
                "heldout_elbo_reps",
                "final_train_loss",
                "final_elbo_train",
                "n_epochs_run",
                "train_wall_s",
                "n_train",
                "n_validation",
                "validation_digest",
            ):
                row[f"{tool}_{key}"] = res.get(key)
            row[f"{tool}_other_load_cores"] = res["train_load"].get("foreign_cores")
        rows.append(row)
        rows.sort(key=lambda r: r["seed"])
        summary = summarise(rows)
        payload = {
            **header,
            "settings": {k: v for k, v in vars(args).items() if k not in ("seed", "resume")},
            "affinity_cores": len(os.sched_getaffinity(0)),
            "rows": rows,
            "summary": summary,
            "markdown": markdown(rows, summary),
        }
        C.write_json(out, payload)
        d = row["jaxvi_heldout_elbo"] - row["scvi_heldout_elbo"]
        print(f"[seed_parity] seed {seed}: jaxvi - scvi-tools = {d:+.3f}  ({out})", flush=True)
    summary = summarise(rows)
    print(markdown(rows, summary))
    return {"rows": rows, "summary": summary, "path": str(out)}


if __name__ == "__main__":
    main()
