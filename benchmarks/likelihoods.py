"""Compare the count likelihoods on real and synthetic data: JSON + figure.

For every likelihood (default: poisson, nb, zinb, zip, zinb-gene) one ``SCVI`` is trained on the
same cells with the same seed, and scored on the same held-out cells
(:func:`jaxvi.analysis.likelihood_comparison.compare_likelihoods`): importance-sampled marginal
log-likelihood, ELBO, posterior predictive CV agreement, per-gene zero-fraction calibration,
training speed.

* ``pbmc``: the 700 x 765 PBMC counts shipped with jaxvi;
* ``synthetic``: for each likelihood, counts drawn from it with known parameters
  (:func:`jaxvi.analysis.likelihood_comparison.synthetic_counts`), and every likelihood fitted
  to them;
  the true one should have (close to) the best held-out marginal log-likelihood. Nested models
  (nb inside zinb, zinb-gene inside zinb) can tie with it.

Usage::

    python benchmarks/likelihoods.py                       # both, default settings
    python benchmarks/likelihoods.py --pbmc-epochs 100 --synthetic-epochs 60 --n-mc 100

Writes ``results/likelihoods_<machine>_<time>.json`` and a PNG of the same name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SCALARS = (
    "marginal_ll",
    "elbo",
    "cv_log_ratio",
    "cv_pearson",
    "zero_mae",
    "zero_bias",
    "train_s",
    "cells_per_s",
    "epochs",
    "n_heldout",
)


def run_pbmc(args) -> dict:
    import jaxvi
    from jaxvi.analysis.likelihood_comparison import compare_likelihoods

    adata = jaxvi.data.pbmc68k_reduced()
    jaxvi.SCVI.setup_anndata(adata)
    table, extra = compare_likelihoods(
        adata,
        args.likelihoods,
        max_epochs=args.pbmc_epochs,
        n_mc_samples=args.n_mc,
        n_pp_samples=args.n_pp,
        seed=args.seed,
        per_gene=True,
    )
    print("PBMC 700 x 765, held-out cells:", flush=True)
    print(table.round(4).to_string(), flush=True)
    return {
        "data": "pbmc68k_reduced 700 x 765",
        "table": {n: {k: table.loc[n, k] for k in SCALARS} for n in table.index},
        "per_gene": {n: extra[n] for n in table.index},
    }


def run_synthetic(args) -> dict:
    import jaxvi
    from jaxvi.analysis.likelihood_comparison import compare_likelihoods, synthetic_counts

    out = {}
    for true in args.likelihoods:
        adata = synthetic_counts(true, args.n_cells, args.n_genes, seed=args.seed)
        jaxvi.SCVI.setup_anndata(adata)
        table, _ = compare_likelihoods(
            adata,
            args.likelihoods,
            max_epochs=args.synthetic_epochs,
            n_mc_samples=args.n_mc,
            n_pp_samples=args.n_pp,
            seed=args.seed,
        )
        best = table["marginal_ll"].idxmax()
        rank = int((table["marginal_ll"] > table.loc[true, "marginal_ll"]).sum()) + 1
        print(
            f"synthetic from {true}: best {best}, true ranks {rank}; "
            + ", ".join(f"{n} {v:.2f}" for n, v in table["marginal_ll"].items()),
            flush=True,
        )
        out[true] = {
            "best_by_marginal_ll": best,
            "rank_of_true": rank,
            "gap_true_to_best": float(table["marginal_ll"].max() - table.loc[true, "marginal_ll"]),
            "table": {n: {k: table.loc[n, k] for k in SCALARS} for n in table.index},
        }
    return out


def figure(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    liks = payload["args"]["likelihoods"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 9))
    pbmc = payload.get("pbmc")
    if pbmc:
        t = pbmc["table"]
        ax = axes[0, 0]
        ll = np.array([t[n]["marginal_ll"] for n in liks])
        elbo = np.array([t[n]["elbo"] for n in liks])
        pos = np.arange(len(liks))
        ax.bar(pos - 0.2, ll - ll.max(), 0.4, label="marginal LL")
        ax.bar(pos + 0.2, elbo - ll.max(), 0.4, label="ELBO")
        ax.set_xticks(pos, liks)
        ax.set_ylabel("held-out per cell, minus best marginal LL")
        ax.set_title("PBMC: held-out log-likelihood")
        ax.legend()
        ax = axes[0, 1]
        for n in liks:
            g = pbmc["per_gene"][n]
            ax.scatter(
                g["zero_obs"],
                g["zero_pred"],
                s=4,
                alpha=0.5,
                label=f"{n} (MAE {t[n]['zero_mae']:.3f})",
            )
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlabel("observed zero fraction per gene")
        ax.set_ylabel("posterior predictive zero fraction")
        ax.set_title("PBMC: zero calibration (held-out cells)")
        ax.legend(markerscale=3, fontsize=8)
        ax = axes[1, 0]
        for n in liks:
            g = pbmc["per_gene"][n]
            ax.scatter(
                g["cv_obs"],
                g["cv_pred"],
                s=4,
                alpha=0.5,
                label=f"{n} (r {t[n]['cv_pearson']:.3f})",
            )
        ax.set_xscale("log")
        ax.set_yscale("log")
        lim = ax.get_xlim()
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set_xlabel("observed CV per gene")
        ax.set_ylabel("posterior predictive CV")
        ax.set_title("PBMC: CV agreement (held-out cells)")
        ax.legend(markerscale=3, fontsize=8)
    syn = payload.get("synthetic")
    if syn:
        ax = axes[1, 1]
        trues = list(syn)
        m = np.array([[syn[tr]["table"][f]["marginal_ll"] for f in liks] for tr in trues])
        d = m - m.max(1, keepdims=True)
        im = ax.imshow(d, cmap="viridis", vmin=max(d.min(), -20.0), vmax=0)
        for i in range(len(trues)):
            for j in range(len(liks)):
                color = "k" if d[i, j] > -5 else "w"
                ax.text(j, i, f"{d[i, j]:.1f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(liks)), liks)
        ax.set_yticks(range(len(trues)), trues)
        ax.set_xlabel("fitted likelihood")
        ax.set_ylabel("data drawn from")
        ax.set_title("synthetic: held-out marginal LL minus row best")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--likelihoods", nargs="+", default=["poisson", "nb", "zinb", "zip", "zinb-gene"]
    )
    ap.add_argument("--only", choices=["pbmc", "synthetic"], default=None)
    ap.add_argument("--pbmc-epochs", type=int, default=200)
    ap.add_argument("--synthetic-epochs", type=int, default=100)
    ap.add_argument("--n-cells", type=int, default=1000)
    ap.add_argument("--n-genes", type=int, default=200)
    ap.add_argument("--n-mc", type=int, default=200, help="importance samples per cell")
    ap.add_argument("--n-pp", type=int, default=10, help="posterior predictive draws per cell")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default=None)
    ap.add_argument(
        "--jax-cache",
        default="/tmp/jaxvi-jax-cache",
        help="persistent XLA compilation cache ('' to disable): the same programs recur",
    )
    ap.add_argument("--replot", default=None, help="only redraw the PNG of this result JSON")
    args = ap.parse_args(argv)
    if args.replot:
        import json

        path = Path(args.replot)
        figure(json.loads(path.read_text()), path.with_suffix(".png"))
        return {}
    if args.jax_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", args.jax_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

    payload = {
        "benchmark": "likelihoods",
        "timestamp_utc": C.utc_timestamp(),
        "args": vars(args),
        "machine": C.machine_info(),
        "versions": C.versions(),
        "git_start": C.git_info(),
    }
    with C.LoadProbe() as probe:
        if args.only in (None, "pbmc"):
            payload["pbmc"] = run_pbmc(args)
        if args.only in (None, "synthetic"):
            payload["synthetic"] = run_synthetic(args)
    payload["load"] = probe.result
    payload["git_end"] = C.git_info()
    path = C.write_json(C.result_path("likelihoods", args.tag), payload)
    png = path.with_suffix(".png")
    figure(payload, png)
    print(f"wrote {path} and {png}")
    return payload


if __name__ == "__main__":
    main()
