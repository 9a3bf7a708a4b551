"""How close jaxvi's training step comes to the FLOP and memory-bandwidth limits of the device.

For each batch size, XLA's own cost analysis of one compiled training step (the epoch program
over a single minibatch: ELBO forward and backward, Adam update) gives its floating-point
operations and bytes accessed; the steady epoch time of the real epoch program (10k x 2k
synthetic cells by default) turns them into achieved FLOP/s and bytes/s. XLA counts the bytes
of every operand of every operation, most of which stay in cache; the *essential* traffic (the
minibatch read once, parameters and optimizer state read and written once, the gradient
written and read) is what the bandwidth share is computed from. The limits are
measured on the same device in the same run: a large float32 matrix product (the best FLOP/s
XLA reaches here; with ``--precision bf16`` also in bfloat16) and a large elementwise copy
(read + write bandwidth). Where the device is known (``--peak-tflops``, ``--peak-gbps``) the
nominal figures are reported too.

Usage::

    python benchmarks/roofline.py                          # this machine, batch 128 and 2048
    python benchmarks/roofline.py --batch-sizes 128 512 4096 --accelerator
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def _median_time(fn, *args, repeats: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_limits(args) -> dict:
    """Best matmul FLOP/s and copy bandwidth XLA reaches on the default device."""
    import jax
    import jax.numpy as jnp

    out = {}
    n = args.matmul_size
    for dtype in ("float32", "bfloat16"):
        a = jnp.ones((n, n), dtype) * 0.5
        fn = jax.jit(lambda a, b: a @ b)
        s = _median_time(fn, a, a)
        out[f"matmul_{dtype}_gflops"] = 2 * n**3 / s / 1e9
    m = args.copy_mib * 2**20 // 4
    x = jnp.ones((m,), jnp.float32)
    fn = jax.jit(lambda v: v * 1.0001)
    s = _median_time(fn, x)
    out["copy_gbps"] = 2 * 4 * m / s / 1e9  # one read and one write per element
    out["matmul_size"], out["copy_mib"] = n, args.copy_mib
    return out


def measure_step(args, batch_size: int) -> dict:
    """Cost analysis of one training step and the steady epoch time at ``batch_size``."""
    import jax
    import jax.numpy as jnp
    from compare_scvi import synthetic_adata

    import jaxvi
    from jaxvi.train import split_indices

    adata = synthetic_adata(args.n_cells, args.n_genes, 0)
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch")
    model = jaxvi.SCVI(adata, n_hidden=128, n_latent=10)
    train_idx, _, _ = split_indices(adata.n_obs, 0.9, batch_size=batch_size, seed=0)
    fn = C.JaxviEpoch(model, adata, train_idx, batch_size)
    one = C.JaxviEpoch(model, adata, train_idx[:batch_size], batch_size)
    state = fn.state
    key = jax.random.key(0)
    lowered = one.fn.lower(*one.args(state, key, jnp.ones((1,), jnp.float32)))
    cost = lowered.compile().cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per device program
        cost = cost[0]
    n_steps = fn.n_steps
    kl = jnp.ones((n_steps,), jnp.float32)

    def epoch(state):
        return fn(state, key, kl)

    out = jax.block_until_ready(epoch(state))  # compile
    times = []
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        out = jax.block_until_ready(epoch(out[0]))
        times.append(time.perf_counter() - t0)
    epoch_s = sorted(times)[len(times) // 2]
    step_s = epoch_s / n_steps
    flops = float(cost.get("flops", float("nan")))
    nbytes = float(cost.get("bytes accessed", float("nan")))
    # The traffic no step can avoid: the minibatch's counts read once, and every parameter
    # and optimizer-state array read and written once, plus the gradient written and read.
    tree_bytes = sum(
        a.size * a.dtype.itemsize
        for a in jax.tree_util.tree_leaves((state.params, state.opt_state))
        if hasattr(a, "dtype")
    )
    param_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(state.params))
    essential = batch_size * args.n_genes * 4 + 2 * tree_bytes + 2 * param_bytes
    return {
        "batch_size": batch_size,
        "n_steps": n_steps,
        "epoch_s": epoch_s,
        "cells_per_s": int(train_idx.shape[0]) / epoch_s,
        "step_ms": 1e3 * step_s,
        "step_gflop": flops / 1e9,
        "step_mb_accessed": nbytes / 1e6,
        "arithmetic_intensity_flop_per_byte": flops / nbytes,
        "achieved_gflops": flops / step_s / 1e9,
        "achieved_gbps": nbytes / step_s / 1e9,
        "essential_mb_per_step": essential / 1e6,
        "essential_gbps": essential / step_s / 1e9,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--n-cells", type=int, default=10_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--copy-mib", type=int, default=512)
    p.add_argument("--peak-tflops", type=float, default=None, help="nominal float32 peak")
    p.add_argument("--peak-gbps", type=float, default=None, help="nominal memory bandwidth")
    p.add_argument("--accelerator", action="store_true", help="results named for the GPU/TPU")
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)

    payload = {
        **C.run_header("roofline"),
        "settings": vars(args),
    }
    with C.LoadProbe() as probe:
        limits = measure_limits(args)
        steps = [measure_step(args, bs) for bs in args.batch_sizes]
    payload["load"] = probe.result
    for s in steps:
        s["share_of_matmul_peak"] = s["achieved_gflops"] / limits["matmul_float32_gflops"]
        s["share_of_copy_bandwidth"] = s["essential_gbps"] / limits["copy_gbps"]
        if args.peak_tflops:
            s["share_of_nominal_flops"] = s["achieved_gflops"] / (1e3 * args.peak_tflops)
        if args.peak_gbps:
            s["share_of_nominal_bandwidth"] = s["achieved_gbps"] / args.peak_gbps
    payload["limits"], payload["steps"] = limits, steps

    lines = [
        f"Limits measured here: float32 matmul {limits['matmul_float32_gflops']:.0f} GFLOP/s, "
        f"bfloat16 matmul {limits['matmul_bfloat16_gflops']:.0f} GFLOP/s, "
        f"copy {limits['copy_gbps']:.1f} GB/s",
        "",
        "| batch | cells/s | ms/step | GFLOP/step | MB/step (XLA) | FLOP/byte | GFLOP/s | "
        "share of matmul peak | essential MB/step | essential GB/s | share of copy bandwidth |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in steps:
        lines.append(
            f"| {s['batch_size']} | {s['cells_per_s']:,.0f} | {s['step_ms']:.2f} | "
            f"{s['step_gflop']:.3f} | {s['step_mb_accessed']:.1f} | "
            f"{s['arithmetic_intensity_flop_per_byte']:.1f} | {s['achieved_gflops']:.0f} | "
            f"{100 * s['share_of_matmul_peak']:.0f}% | {s['essential_mb_per_step']:.1f} | "
            f"{s['essential_gbps']:.2f} | {100 * s['share_of_copy_bandwidth']:.0f}% |"
        )
    table = "\n".join(lines)
    print(table)
    payload["table_md"] = table
    tag = args.tag or ("accelerator" if args.accelerator else None)
    out = C.write_json(C.result_path("roofline", tag), payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
