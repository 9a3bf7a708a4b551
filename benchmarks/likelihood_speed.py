"""Steady training speed of each likelihood: the compiled epoch, timed per likelihood.

Used to check that expressing the built-in likelihoods through the public interface
(``jaxvi.likelihoods.Likelihood``) costs nothing: run it before and after a change, on the same
machine, and compare the medians. The likelihoods are interleaved over ``--repeats`` rounds so
that a burst of load from other processes hits all of them alike.

Usage::

    python benchmarks/likelihood_speed.py --tag before
    python benchmarks/likelihood_speed.py --likelihoods zinb nb poisson normal zip zinb-gene
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--likelihoods", nargs="+", default=["zinb", "nb", "poisson", "normal"])
    ap.add_argument("--n-cells", type=int, default=4000)
    ap.add_argument("--n-genes", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per round")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    ap.add_argument("--tag", default=None)
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from compare_scvi import synthetic_adata

    import jaxvi
    from jaxvi.train import split_indices

    git_start = C.git_info()
    adata = synthetic_adata(args.n_cells, args.n_genes, 0)
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch")
    train_idx, _, _ = split_indices(adata.n_obs, 0.9, batch_size=args.batch_size, seed=0)
    n_steps = -(-len(train_idx) // args.batch_size)
    kl = jnp.full((n_steps,), 0.01, jnp.float32)

    runs = {}
    for name in args.likelihoods:
        model = jaxvi.SCVI(adata, gene_likelihood=name)
        fn = C.JaxviEpoch(model, adata, train_idx, args.batch_size)
        t0 = time.perf_counter()
        state, _ = jax.block_until_ready(fn(fn.state, jax.random.key(1), kl))
        runs[name] = {"fn": fn, "state": state, "first_call_s": C.now() - t0}

    times: dict[str, list[float]] = {name: [] for name in args.likelihoods}
    with C.LoadProbe() as probe:
        for r in range(args.repeats):
            for name in args.likelihoods:
                run = runs[name]
                for e in range(args.epochs):
                    t0 = time.perf_counter()
                    run["state"], _ = jax.block_until_ready(
                        run["fn"](run["state"], jax.random.key(r + e), kl)
                    )
                    times[name].append(time.perf_counter() - t0)

    n_train = len(train_idx)
    results = {}
    for name in args.likelihoods:
        med = statistics.median(times[name])
        results[name] = {
            "first_call_s": runs[name]["first_call_s"],
            "median_epoch_s": med,
            "min_epoch_s": min(times[name]),
            "epoch_s": times[name],
            "cells_per_s": n_train / med,
            "ms_per_step": 1e3 * med / n_steps,
        }
        print(
            f"{name:10s} median {med:.4f} s/epoch  min {min(times[name]):.4f}  "
            f"{n_train / med:,.0f} cells/s",
            flush=True,
        )
    payload = {
        "benchmark": "likelihood_speed",
        "timestamp_utc": C.utc_timestamp(),
        "args": vars(args),
        "machine": C.machine_info(),
        "versions": C.versions(),
        "git_start": git_start,
        "git_end": C.git_info(),
        "load": probe.result,
        "n_train": n_train,
        "n_steps": n_steps,
        "results": results,
    }
    path = C.write_json(C.result_path("likelihood_speed", args.tag), payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
