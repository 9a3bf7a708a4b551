"""Cost of the non-finite guard: the compiled epoch with and without it.

The guard checks every step's loss, gradients and optimizer update for NaN/inf and selects
the previous state when a step fails (``jaxvi.train.make_train_epoch(guard=...)``). This
script compiles both variants on the synthetic data of ``compare_scvi.py`` and times epochs
alternately (guard, no guard, guard, ...) so that background load hits both alike; it
reports the median wall and process-CPU seconds per epoch of each and their ratios (on a
shared machine the CPU time is the steadier measure).

Usage::

    python benchmarks/guard_overhead.py                     # 10k x 2k, batch 128, 7 epochs each
    python benchmarks/guard_overhead.py --n-cells 4000 --epochs 5
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-cells", type=int, default=10_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--epochs", type=int, default=7, help="timed epochs per variant")
    p.add_argument("--data-seed", type=int, default=0)
    args = p.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    from compare_scvi import synthetic_adata

    import jaxvi
    from jaxvi.train import PlanConfig, init_train_state, make_train_epoch, split_indices

    git_start = C.git_info()
    adata = synthetic_adata(args.n_cells, args.n_genes, args.data_seed)
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = jaxvi.SCVI(adata)
    data = model._device_data(adata, False)
    train_idx, _, _ = split_indices(adata.n_obs, batch_size=args.batch_size, seed=0)
    train_idx = jnp.asarray(train_idx.astype(np.int32))
    n_steps = -(-train_idx.shape[0] // args.batch_size)
    kl = jnp.full((n_steps,), 0.01, jnp.float32)
    plan = PlanConfig()
    states, fns, compile_s = {}, {}, {}
    for guard in (True, False):
        state, tx = init_train_state(model.module, model.variables, plan)
        fn = make_train_epoch(model.module, tx, args.batch_size, guard=guard)
        t0 = time.perf_counter()
        state, info = fn(state, data, train_idx, jax.random.key(0), kl)
        jax.block_until_ready(info)
        compile_s[guard] = time.perf_counter() - t0  # first epoch: compile + run
        states[guard], fns[guard] = state, fn
    times = {True: [], False: []}
    cpu = {True: [], False: []}
    for e in range(args.epochs):
        for guard in (True, False) if e % 2 == 0 else (False, True):
            t0, c0 = time.perf_counter(), time.process_time()
            states[guard], info = fns[guard](
                states[guard], data, train_idx, jax.random.key(e + 1), kl
            )
            jax.block_until_ready(info)
            times[guard].append(time.perf_counter() - t0)
            cpu[guard].append(time.process_time() - c0)
    on, off = statistics.median(times[True]), statistics.median(times[False])
    con, coff = statistics.median(cpu[True]), statistics.median(cpu[False])
    same = all(
        bool(np.array_equal(a, b))
        for a, b in zip(
            jax.tree_util.tree_leaves(states[True].params),
            jax.tree_util.tree_leaves(states[False].params),
            strict=True,
        )
    )
    result = {
        "benchmark": "guard_overhead",
        "settings": vars(args),
        "n_steps_per_epoch": n_steps,
        "median_s_per_epoch": {"guard": on, "no_guard": off},
        "median_cpu_s_per_epoch": {"guard": con, "no_guard": coff},
        "epoch_s": {"guard": times[True], "no_guard": times[False]},
        "epoch_cpu_s": {"guard": cpu[True], "no_guard": cpu[False]},
        "cpu_overhead_ratio": con / coff,
        "first_epoch_s_incl_compile": {"guard": compile_s[True], "no_guard": compile_s[False]},
        "overhead_ratio": on / off,
        "overhead_ms_per_step": 1e3 * (on - off) / n_steps,
        "same_parameters_after_training": same,
        "machine": C.machine_info(),
        "versions": C.versions(),
        "git": {"start": git_start, "end": C.git_info()},
        "timestamp_utc": C.utc_timestamp(),
    }
    path = C.write_json(C.result_path("guard_overhead"), result)
    print(
        f"guard {on:.3f} s/epoch, no guard {off:.3f} s/epoch: ratio {on / off:.3f} "
        f"({result['overhead_ms_per_step']:+.2f} ms/step); CPU s/epoch {con:.3f} vs "
        f"{coff:.3f}: ratio {con / coff:.3f}; identical params: {same} -> {path}"
    )
    return result


if __name__ == "__main__":
    main()
