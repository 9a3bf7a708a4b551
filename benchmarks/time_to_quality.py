"""Time to quality: wall time until jaxvi's held-out ELBO reaches what scvi-tools reaches with
its default recipe, on the same data and split, in the same run.

Both tools train with the default recipe (``max_epochs`` heuristic, KL warm-up, Adam 1e-3)
and validation every epoch, each in a fresh process (``compare_scvi.py``'s worker). The target
is scvi-tools' final ``elbo_validation`` (negative ELBO per cell, lower is better, one z draw
per cell). For each tool the time to target is the wall time from the start of ``train()`` to
the end of the first epoch whose validation value is at or below the target (the first epoch
includes compilation for jaxvi). Held-out ELBO after training (``get_elbo`` on the validation
cells, averaged) is reported too.

Usage::

    python benchmarks/time_to_quality.py [--dataset pbmc] [--epochs 400] [--tolerance 0.0]
    python benchmarks/time_to_quality.py --jax-cache-dir /tmp/c   # jaxvi with a warm cache

With ``--jax-cache-dir`` jaxvi's persistent compilation cache lives there, and a first jaxvi
run fills it before the measured one (a second run of the same script).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import compare_scvi as CS  # noqa: E402


def time_to(res: dict, target: float) -> float | None:
    """Seconds from the start of train() to the first epoch at or below ``target``."""
    hist = res.get("elbo_validation_history") or []
    first = res.get("first_epoch_s") or 0.0
    offsets = res.get("epoch_end_offsets_s") or []
    for i, v in enumerate(hist):
        if v <= target and i < len(offsets):
            return first + offsets[i]
    return None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=CS.DATASETS, default="pbmc")
    p.add_argument("--epochs", type=int, default=400)
    p.add_argument("--n-cells", type=int, default=10_000)
    p.add_argument("--n-genes", type=int, default=2_000)
    p.add_argument("--tolerance", type=float, default=0.0, help="relative slack on the target")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--accelerator", action="store_true")
    p.add_argument("--jax-cache-dir", default=None, help="warm persistent cache for jaxvi")
    args = p.parse_args(argv)
    args.data_seed, args.train_size, args.elbo_reps, args.batch_size = 0, 0.9, 3, 128
    args.scvi_accelerator = "gpu" if args.accelerator else "cpu"
    args.wait_quiet, args.worker_timeout = 0.0, 7200.0
    args.precision, args.devices, args.validate_every = None, None, 1
    if args.jax_cache_dir:  # fill the cache: the measured jaxvi run is a second run
        CS.run_worker_once(args, "jaxvi", args.dataset, 1)
    results = {t: CS.run_worker_once(args, t, args.dataset, args.epochs) for t in C.TOOLS}
    sc, jx = results["scvi"], results["jaxvi"]
    if sc["validation_digest"] != jx["validation_digest"]:
        raise RuntimeError("The two tools used different validation cells.")
    target = sc["elbo_validation_history"][-1] * (1 + args.tolerance)
    summary = {
        "target_elbo_validation": target,
        "scvi_time_to_target_s": time_to(sc, target),
        "jaxvi_time_to_target_s": time_to(jx, target),
        "scvi_train_wall_s": sc["train_wall_s"],
        "jaxvi_train_wall_s": jx["train_wall_s"],
        "scvi_final_elbo_validation": sc["elbo_validation_history"][-1],
        "jaxvi_final_elbo_validation": jx["elbo_validation_history"][-1],
        "jaxvi_best_elbo_validation": min(jx["elbo_validation_history"]),
        "scvi_heldout_elbo": sc["heldout_elbo"],
        "jaxvi_heldout_elbo": jx["heldout_elbo"],
    }
    if summary["jaxvi_time_to_target_s"] and summary["scvi_time_to_target_s"]:
        summary["speedup"] = summary["scvi_time_to_target_s"] / summary["jaxvi_time_to_target_s"]
    for k, v in summary.items():
        print(f"{k:32s} {v}")
    payload = {
        **C.run_header("time_to_quality"),
        "settings": vars(args),
        "summary": summary,
        "runs": results,
    }
    tag = args.dataset + ("-warm-cache" if args.jax_cache_dir else "")
    out = C.write_json(C.result_path("time_to_quality", tag), payload)
    print("saved", out)
    return payload


if __name__ == "__main__":
    main()
