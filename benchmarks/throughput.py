"""Training throughput of jaxvi and scvi-tools against batch size, genes, cells, precision and
devices, in the same run on the same synthetic data.

One axis is varied at a time around a base point (10k cells x 2k genes, batch 128, float32,
one device). Each point runs ``compare_scvi.py``'s worker for each tool in a fresh process
(steady seconds per epoch from epoch-end timestamps, first epoch excluded; peak host RSS; peak
device memory on a GPU; held-out ELBO) and reports cells/s and the jaxvi / scvi-tools ratio.
Device counts above one use JAX's fake CPU devices when there is no accelerator (they share
the CPU cores, so this checks the code path rather than the speed); scvi-tools is not run on
several devices.

Usage::

    python benchmarks/throughput.py                       # the CPU grid
    python benchmarks/throughput.py --grid gpu            # batch to 8192, cells to 10M, ...
    python benchmarks/throughput.py --axes batch_size --quick
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import compare_scvi as CS  # noqa: E402

GRIDS = {
    "cpu": {
        "batch_size": [128, 512, 2048, 8192],
        "n_genes": [1000, 2000, 5000],
        "n_cells": [10_000, 50_000],
        "precision": [None, "bf16-mixed"],
        "devices": [1, 2],
    },
    "gpu": {
        "batch_size": [128, 512, 1024, 2048, 4096, 8192],
        "n_genes": [1000, 2000, 5000, 10_000, 30_000],
        "n_cells": [10_000, 100_000, 1_000_000, 10_000_000],
        "precision": [None, "32-true", "bf16-mixed"],
        "devices": [1],
    },
}
BASE = {"batch_size": 128, "n_genes": 2000, "n_cells": 10_000, "precision": None, "devices": 1}


def epochs_for(n_cells: int, batch_size: int, min_steps: int = 60) -> int:
    """Enough epochs for a steady estimate: at least 3, and at least ``min_steps`` steps after
    the first epoch."""
    steps = max(1, int(n_cells * 0.9) // batch_size)
    return max(3, 1 + -(-min_steps // steps))


def run_point(args, point: dict, tools) -> dict:
    wargs = argparse.Namespace(**vars(args))
    wargs.n_cells, wargs.n_genes = point["n_cells"], point["n_genes"]
    wargs.batch_size, wargs.precision = point["batch_size"], point["precision"]
    wargs.devices = point["devices"] if point["devices"] > 1 else None
    epochs = epochs_for(point["n_cells"], point["batch_size"])
    row: dict = {"point": point, "epochs": epochs}
    for tool in tools:
        if tool == "scvi" and point["devices"] > 1:
            row[tool] = None
            continue
        old = os.environ.get("XLA_FLAGS")
        if tool == "jaxvi" and point["devices"] > 1 and not args.accelerator:
            os.environ["XLA_FLAGS"] = (
                f"{old or ''} --xla_force_host_platform_device_count={point['devices']}"
            )
        try:
            res = CS.run_worker_once(wargs, tool, "synthetic", epochs)
        except Exception as e:  # noqa: BLE001 - one failing point must not lose the others
            res = {"error": str(e)[-2000:]}
        finally:
            if old is None:
                os.environ.pop("XLA_FLAGS", None)
            else:
                os.environ["XLA_FLAGS"] = old
        if "error" not in res and res.get("steady_s_per_epoch"):
            res["cells_per_s"] = res["n_train"] / res["steady_s_per_epoch"]
        row[tool] = res
    jx, sc = row.get("jaxvi"), row.get("scvi")
    if jx and sc and jx.get("cells_per_s") and sc.get("cells_per_s"):
        row["speedup"] = jx["cells_per_s"] / sc["cells_per_s"]
        if jx.get("heldout_elbo") and sc.get("heldout_elbo"):
            row["heldout_elbo_rel_diff"] = (jx["heldout_elbo"] - sc["heldout_elbo"]) / abs(
                sc["heldout_elbo"]
            )
    return row


def _cell(res, key, spec):
    if not res or res.get(key) is None:
        return "—"
    return format(res[key], spec)


def markdown(rows) -> str:
    lines = [
        "| axis | value | jaxvi cells/s | scvi-tools cells/s | speed-up | jaxvi peak RSS MiB "
        "| scvi-tools peak RSS MiB | held-out ELBO diff |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        jx, sc = r.get("jaxvi"), r.get("scvi")
        diff = r.get("heldout_elbo_rel_diff")
        lines.append(
            f"| {r['axis']} | {r['point'][r['axis']]} | {_cell(jx, 'cells_per_s', '.0f')} | "
            f"{_cell(sc, 'cells_per_s', '.0f')} | "
            f"{'—' if r.get('speedup') is None else format(r['speedup'], '.2f') + 'x'} | "
            f"{_cell(jx, 'peak_rss_mb', '.0f')} | {_cell(sc, 'peak_rss_mb', '.0f')} | "
            f"{'—' if diff is None else format(100 * diff, '+.2f') + '%'} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=sorted(GRIDS), default="cpu")
    p.add_argument("--axes", default=",".join(BASE), help="comma list of axes to sweep")
    p.add_argument("--tools", default="jaxvi,scvi")
    p.add_argument("--accelerator", action="store_true", help="a GPU/TPU runs both tools")
    p.add_argument("--quick", action="store_true", help="two small points per axis")
    p.add_argument("--tag", default=None)
    p.add_argument(
        "--values",
        action="append",
        default=[],
        help="override an axis' values, e.g. --values batch_size=128,512 (repeatable)",
    )
    p.add_argument(
        "--extend",
        default=None,
        help="a previous throughput JSON: its rows (marked with their file and commit) and the "
        "new points go into one result, the table ordered by axis and value",
    )
    args = p.parse_args(argv)
    # what compare_scvi's worker expects
    args.seed, args.data_seed, args.train_size, args.elbo_reps = 0, 0, 0.9, 1
    args.scvi_accelerator = "gpu" if args.accelerator else "cpu"
    args.wait_quiet, args.worker_timeout, args.jax_cache_dir = 0.0, 3600.0, None
    tools = [t for t in args.tools.split(",") if t]
    grid = GRIDS[args.grid]
    base = dict(BASE)
    if args.quick:
        base.update(n_cells=2000, n_genes=300)
        grid = {k: v[:2] for k, v in grid.items()}
        grid["n_cells"], grid["n_genes"] = [2000, 4000], [300, 600]
    for override in args.values:
        axis, _, vals = override.partition("=")
        grid[axis] = [None if v == "None" else (v if axis == "precision" else int(v))
                      for v in vals.split(",")]  # fmt: skip
    out_path = C.result_path("throughput", args.tag)
    rows, done = [], {}
    earlier = []
    if args.extend:
        import json

        prev = json.loads(Path(args.extend).read_text())
        for r in prev["rows"]:
            r.setdefault("source", {"file": Path(args.extend).name, "commit": prev["git"]})
            earlier.append(r)
    for axis in [a for a in args.axes.split(",") if a]:
        for value in grid[axis]:
            point = {**base, axis: value}
            key = tuple(sorted(point.items(), key=lambda kv: kv[0]))
            print(f"[throughput] {axis}={value}", flush=True)
            if key in done:  # the base point of another axis: measured already
                row = {**done[key], "axis": axis}
            else:
                row = run_point(args, point, tools)
                row["axis"] = axis
                done[key] = row
            rows.append(row)
            print(markdown([row]).splitlines()[-1], flush=True)
            C.write_json(out_path, _payload(args, base, grid, _merged(earlier, rows)))
    rows = _merged(earlier, rows)
    print(markdown(rows))
    print("saved", out_path)
    return _payload(args, base, grid, rows)


def _merged(earlier: list, rows: list) -> list:
    """Earlier rows then new ones, grouped by axis (first-seen order) and sorted by value."""
    if not earlier:
        return rows
    order = list(dict.fromkeys(r["axis"] for r in earlier + rows))

    def key(r):
        v = r["point"][r["axis"]]
        return (order.index(r["axis"]), v is not None, v if isinstance(v, int) else str(v))

    return sorted(earlier + rows, key=key)


def _payload(args, base, grid, rows) -> dict:
    table = markdown(rows)
    return {
        **C.run_header("throughput"),
        "settings": {**vars(args), "base": base, "grid": grid},
        "rows": rows,
        "markdown": table,
    }


if __name__ == "__main__":
    main()
