"""Cost of the non-finite guard: the compiled epoch with and without it.

``jaxvi.train.make_train_epoch(guard=...)`` has three variants: ``"detect"`` (what
``fit`` runs: a scalar loss test per step and one parameter sum per epoch; a failing epoch is
replayed with ``"step"``), ``"step"`` (every step checks loss, gradients and update and stops
updating at the first failure) and ``False``. This script compiles all three on the synthetic
data of ``compare_scvi.py`` and times epochs in rotating order so that background load hits
them alike; it reports the median and minimum wall and process-CPU seconds per epoch and the
median ratios to ``False`` (on a shared machine the CPU time and the minima are the steadier
measures).

Usage::

    python benchmarks/guard_overhead.py                     # 10k x 2k, batch 128, 7 epochs each
    python benchmarks/guard_overhead.py --n-cells 4000 --epochs 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=10_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=7, help="timed epochs per variant")
    p.add_argument("--data-seed", type=int, default=0)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    from compare_scvi import synthetic_adata

    import jaxvi
    from jaxvi.train import split_indices

    git_start = C.git_info()
    adata = synthetic_adata(args.n_cells, args.n_genes, args.data_seed)
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = jaxvi.SCVI(adata)
    train_idx, _, _ = split_indices(adata.n_obs, batch_size=args.batch_size, seed=0)
    states, fns, compile_s = {}, {}, {}
    variants = ("detect", "step", False)
    for guard in variants:
        fn = C.JaxviEpoch(model, adata, train_idx, args.batch_size, guard=guard)
        n_steps, state = fn.n_steps, fn.state
        kl = jnp.full((n_steps,), 0.01, jnp.float32)
        t0 = time.perf_counter()
        state, info = fn(state, jax.random.key(0), kl)
        jax.block_until_ready(info)
        compile_s[guard] = time.perf_counter() - t0  # first epoch: compile + run
        states[guard], fns[guard] = state, fn
    times = {g: [] for g in variants}
    cpu = {g: [] for g in variants}
    for e in range(args.epochs):
        order = variants[e % 3 :] + variants[: e % 3]
        for guard in order:
            t0, c0 = time.perf_counter(), time.process_time()
            states[guard], info = fns[guard](states[guard], jax.random.key(e + 1), kl)
            jax.block_until_ready(info)
            times[guard].append(time.perf_counter() - t0)
            cpu[guard].append(time.process_time() - c0)
    name = {"detect": "detect", "step": "step", False: "none"}
    wall = {name[g]: statistics.median(times[g]) for g in variants}
    cpus = {name[g]: statistics.median(cpu[g]) for g in variants}
    result = {
        "benchmark": "guard_overhead",
        "settings": vars(args),
        "n_steps_per_epoch": n_steps,
        "median_s_per_epoch": wall,
        "median_cpu_s_per_epoch": cpus,
        "min_s_per_epoch": {name[g]: min(times[g]) for g in variants},
        "min_cpu_s_per_epoch": {name[g]: min(cpu[g]) for g in variants},
        "wall_ratio_to_none": {k: v / wall["none"] for k, v in wall.items()},
        "cpu_ratio_to_none": {k: v / cpus["none"] for k, v in cpus.items()},
        "epoch_s": {name[g]: times[g] for g in variants},
        "epoch_cpu_s": {name[g]: cpu[g] for g in variants},
        "first_epoch_s_incl_compile": {name[g]: compile_s[g] for g in variants},
        "machine": C.machine_info(),
        "versions": C.versions(),
        "git": {"start": git_start, "end": C.git_info()},
        "timestamp_utc": C.utc_timestamp(),
    }
    path = C.write_json(C.result_path("guard_overhead"), result)
    keys = ("median_s_per_epoch", "median_cpu_s_per_epoch", "min_cpu_s_per_epoch")
    keys += ("wall_ratio_to_none", "cpu_ratio_to_none")
    print(json.dumps({k: result[k] for k in keys}), "->", path)
    return result


if __name__ == "__main__":
    main()
