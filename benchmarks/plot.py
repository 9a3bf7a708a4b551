"""Figures from the committed benchmark JSON (``benchmarks/results``) for the README.

For each kind of result the newest file is used (or ``--files``): ``throughput`` (cells/s
against each swept axis, both tools), ``time_to_quality`` (held-out ELBO against wall time,
both tools) and ``stream_loader`` (loader and training throughput with peak memory). Figures
are written to ``benchmarks/figures/<kind>.png``.

Usage::

    python benchmarks/plot.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

FIG_DIR = C.BENCH_DIR / "figures"
COLORS = {"jaxvi": "#1f77b4", "scvi": "#d62728"}
NAMES = {"jaxvi": "jaxvi", "scvi": "scvi-tools"}


def newest(kind: str) -> Path | None:
    """The newest ``results/<kind>_*.json``, by the ``YYYYMMDD-HHMM`` stamp in its name
    (file times are those of the checkout, not of the run)."""

    def stamp(p: Path) -> str:
        m = re.search(r"_(\d{8}-\d{4})", p.name)
        return m.group(1) if m else ""

    files = sorted(C.RESULTS_DIR.glob(f"{kind}_*.json"), key=lambda p: (stamp(p), p.name))
    return files[-1] if files else None


def load(kind: str, path: Path | None = None) -> dict | None:
    path = path or newest(kind)
    return None if path is None else json.loads(Path(path).read_text())


def plot_throughput(result: dict, ax_list=None):
    """One panel per swept axis: cells/s of each tool (log scale)."""
    import matplotlib.pyplot as plt

    axes = list(dict.fromkeys(r["axis"] for r in result["rows"]))
    if ax_list is None:
        fig, ax_list = plt.subplots(1, len(axes), figsize=(3.2 * len(axes), 3), squeeze=False)
        ax_list = ax_list[0]
    else:
        fig = ax_list[0].figure
    for ax, axis in zip(ax_list, axes, strict=False):
        rows = [r for r in result["rows"] if r["axis"] == axis]
        labels = [str(r["point"][axis]) for r in rows]
        for tool in ("jaxvi", "scvi"):
            ys = [(r.get(tool) or {}).get("cells_per_s") for r in rows]
            xs = [i for i, y in enumerate(ys) if y]
            ax.plot(xs, [ys[i] for i in xs], "o-", color=COLORS[tool], label=NAMES[tool])
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yscale("log")
        ax.set_title(axis)
        ax.set_ylabel("cells / s")
    ax_list[0].legend()
    fig.suptitle(f"training throughput — {result['machine']['cpu_model'][:40]}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_time_to_quality(result: dict, ax=None):
    """Validation negative ELBO against wall time for both tools, with the target."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3.5))
    else:
        fig = ax.figure
    for tool in ("jaxvi", "scvi"):
        run = result["runs"][tool]
        first = run.get("first_epoch_s") or 0.0
        t = [first + o for o in run["epoch_end_offsets_s"]]
        ax.plot(t, run["elbo_validation_history"][: len(t)], color=COLORS[tool], label=NAMES[tool])
    ax.axhline(result["summary"]["target_elbo_validation"], color="k", ls="--", lw=0.8)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("validation -ELBO per cell")
    hist = result["runs"]["scvi"]["elbo_validation_history"]
    ax.set_ylim(min(hist) * 0.995, hist[len(hist) // 10] * 1.01)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_stream(result: dict, ax=None):
    """Loader and training throughput of streaming, with the memory used vs the data size."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 3))
    else:
        fig = ax.figure
    vals = [result["loader"]["cells_per_s"], result["training"]["cells_per_s_one_epoch"]]
    ax.bar(["loader", "training"], vals, color=["#7f7f7f", COLORS["jaxvi"]])
    ax.set_ylabel("cells / s")
    store = result["store"]
    ax.set_title(
        f"{store['cells']:,} x {store['genes']:,} on disk ({store['dense_gb']:.0f} GB dense); "
        f"peak RSS {result['training']['peak_rss_mb'] / 1024:.1f} GB",
        fontsize=8,
    )
    fig.tight_layout()
    return fig


PLOTS = {
    "throughput": plot_throughput,
    "time_to_quality": plot_time_to_quality,
    "stream_loader": plot_stream,
}


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default=",".join(PLOTS))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    FIG_DIR.mkdir(exist_ok=True)
    written = []
    for kind in args.kinds.split(","):
        result = load(kind)
        if result is None:
            print(f"no {kind} results")
            continue
        fig = PLOTS[kind](result)
        out = FIG_DIR / f"{kind}.png"
        fig.savefig(out, dpi=110)
        written.append(out)
        print("wrote", out)
    return written


if __name__ == "__main__":
    main()
