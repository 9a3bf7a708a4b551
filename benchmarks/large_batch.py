"""Large-batch recipes: does scaling the learning rate with the batch keep the held-out ELBO?

Trains jaxvi on the same data and split with scvi-tools' default recipe (batch 128, Adam lr
1e-3) and with larger batches, each with the learning rate unchanged, scaled by the square
root of the batch ratio, and scaled linearly; the same number of epochs each (so larger
batches take fewer, larger steps). Reports train() wall time, cells/s and the held-out ELBO
(``get_elbo`` on the validation cells, mean of 3 evaluations) against the batch-128 run.

Usage::

    python benchmarks/large_batch.py                        # synthetic 10k x 2k, 100 epochs
    python benchmarks/large_batch.py --batch-sizes 512 2048 --epochs 200
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BASE_BATCH, BASE_LR = 128, 1e-3
RULES = {"same": lambda r: 1.0, "sqrt": math.sqrt, "linear": lambda r: r}


def run(args, batch_size: int, lr: float) -> dict:
    import numpy as np
    from compare_scvi import synthetic_adata

    import jaxvi

    jaxvi.settings.seed = args.seed
    adata = synthetic_adata(args.n_cells, args.n_genes, args.data_seed)
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = jaxvi.SCVI(adata, n_hidden=128, n_latent=10)
    t0 = C.now()
    model.train(
        max_epochs=args.epochs,
        batch_size=batch_size,
        seed=args.seed,
        plan_kwargs={"lr": lr},
        enable_progress_bar=False,
    )
    train_s = C.now() - t0
    val = model.validation_indices
    elbo = float(np.mean([model.get_elbo(indices=val) for _ in range(3)]))
    n_train = len(model.train_indices)
    return {
        "batch_size": batch_size,
        "lr": lr,
        "epochs": args.epochs,
        "train_s": train_s,
        "cells_per_s_incl_compile": n_train * args.epochs / train_s,
        "held_out_elbo": elbo,
        "final_elbo_train": float(model.history_["elbo_train"].iloc[-1, 0]),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--n-cells", type=int, default=10_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)

    payload = {
        **C.run_header("large_batch"),
        "settings": vars(args),
        "runs": [],
    }
    plan = [("default", BASE_BATCH, BASE_LR)]
    for bs in args.batch_sizes:
        for rule in args.rules:
            plan.append((rule, bs, BASE_LR * RULES[rule](bs / BASE_BATCH)))
    with C.LoadProbe() as probe:
        for rule, bs, lr in plan:
            r = run(args, bs, lr)
            r["rule"] = rule
            payload["runs"].append(r)
            print(
                f"[large_batch] {rule:8s} batch {bs:5d} lr {lr:.2e}: train {r['train_s']:.1f} s, "
                f"held-out ELBO {r['held_out_elbo']:.2f}",
                flush=True,
            )
    payload["load"] = probe.result
    base = payload["runs"][0]
    lines = [
        "| rule | batch | lr | epochs | train() s | cells/s (incl. compile) | held-out ELBO | "
        "vs batch 128 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["runs"]:
        r["held_out_elbo_rel_diff"] = (r["held_out_elbo"] - base["held_out_elbo"]) / abs(
            base["held_out_elbo"]
        )
        r["train_s_ratio"] = r["train_s"] / base["train_s"]
        lines.append(
            f"| {r['rule']} | {r['batch_size']} | {r['lr']:.2e} | {r['epochs']} | "
            f"{r['train_s']:.1f} | {r['cells_per_s_incl_compile']:,.0f} | "
            f"{r['held_out_elbo']:.2f} | {100 * r['held_out_elbo_rel_diff']:+.2f}% |"
        )
    payload["table_md"] = "\n".join(lines)
    print(payload["table_md"])
    out = C.write_json(C.result_path("large_batch", args.tag), payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
