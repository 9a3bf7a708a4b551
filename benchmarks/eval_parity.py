"""Same weights, two evaluators: the held-out ELBO of one trained model in jaxvi and in
scvi-tools 1.4.2 (issue 19).

The seed table (``seed_parity.py``) compares models that each tool trained itself. This script
rules out the other explanation of a difference there, the evaluation: jaxvi trains one model
with ``seed_parity``'s recipe, data and split, its weights are copied into ``scvi.model.SCVI``
(:func:`jaxvi.io.bridge.load_into_scvi_tools`), and both libraries' ``get_elbo`` evaluate the
validation cells ``--reps`` times (one z draw per cell each time, each library's own random
numbers). The evaluators agree if the difference of the means is within Monte-Carlo noise:
``z = (mean_jaxvi - mean_scvi) / sqrt(var_jaxvi / n + var_scvi / n)``.

Usage::

    python benchmarks/eval_parity.py --dataset pbmc --reps 30
    python benchmarks/eval_parity.py --dataset synthetic --reps 30      # 10k x 2k, 400 epochs
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import compare_scvi as CS  # noqa: E402
import seed_parity as SP  # noqa: E402


def compare(jaxvi_elbos: list[float], scvi_elbos: list[float]) -> dict:
    """The two evaluators' means, spreads, difference and its z (in standard errors)."""
    mj, ms = statistics.mean(jaxvi_elbos), statistics.mean(scvi_elbos)
    sj, ss = statistics.stdev(jaxvi_elbos), statistics.stdev(scvi_elbos)
    se = math.sqrt(sj**2 / len(jaxvi_elbos) + ss**2 / len(scvi_elbos))
    return {
        "jaxvi_mean": mj,
        "jaxvi_sd": sj,
        "scvi_mean": ms,
        "scvi_sd": ss,
        "diff": mj - ms,
        "diff_se": se,
        "z": (mj - ms) / se if se > 0 else None,
    }


def run(args) -> dict:
    """Train jaxvi, copy the weights into scvi-tools, evaluate both ``args.reps`` times."""
    import numpy as np
    import scvi
    import torch

    import jaxvi
    from jaxvi.io.bridge import load_into_scvi_tools

    torch.set_num_threads(1)  # tiny matmuls: OpenMP threads only spin against each other
    adata, batch_key = CS.make_adata(args, "jaxvi")
    epochs = args.epochs or SP.default_epochs(adata.n_obs)
    jaxvi.settings.seed = args.seed
    adata_j = adata.copy()
    jaxvi.SCVI.setup_anndata(adata_j, batch_key=batch_key)
    model = jaxvi.SCVI(adata_j, **CS.MODEL_KWARGS)
    t0 = C.now()
    model.train(
        max_epochs=epochs,
        batch_size=args.batch_size,
        train_size=args.train_size,
        seed=args.seed,
        enable_progress_bar=False,
    )
    train_s = C.now() - t0
    val = np.asarray(model.validation_indices)

    adata_s = adata.copy()
    scvi.model.SCVI.setup_anndata(adata_s, batch_key=batch_key)
    reference = scvi.model.SCVI(adata_s, **CS.MODEL_KWARGS)
    load_into_scvi_tools(reference, model)
    reference.module.eval()
    reference.is_trained_ = True
    scvi.settings.seed = args.seed
    elbos = {
        name: [
            float(m.get_elbo(indices=val, batch_size=args.batch_size)) for _ in range(args.reps)
        ]
        for name, m in (("jaxvi", model), ("scvi", reference))
    }
    return {
        "epochs": epochs,
        "train_s": train_s,
        "n_validation": int(val.size),
        "jaxvi_elbos": elbos["jaxvi"],
        "scvi_elbos": elbos["scvi"],
        **compare(elbos["jaxvi"], elbos["scvi"]),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=CS.DATASETS, default="pbmc")
    p.add_argument("--epochs", type=int, default=None, help="default: scvi-tools' heuristic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps", type=int, default=30, help="evaluations per library")
    p.add_argument("--n-cells", type=int, default=10_000, help="synthetic cells")
    p.add_argument("--n-genes", type=int, default=2_000, help="synthetic genes")
    p.add_argument("--data-seed", type=int, default=0, help="synthetic data seed")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
    args = p.parse_args(argv)
    if args.reps < 2:
        p.error("--reps must be at least 2 (the spread of the evaluations is needed)")
    args.train_size, args.batch_size = 0.9, 128
    header = C.run_header("eval_parity")
    result = run(args)
    tag = args.dataset if args.dataset == "pbmc" else f"{args.n_cells}x{args.n_genes}"
    out = Path(args.out) if args.out else C.result_path("eval_parity", tag)
    payload = {**header, "settings": vars(args), **result}
    C.write_json(out, payload)
    print(
        f"[eval_parity] {args.dataset}, {result['epochs']} epochs, seed {args.seed}: "
        f"jaxvi {result['jaxvi_mean']:.3f} +- {result['jaxvi_sd']:.3f}, scvi-tools "
        f"{result['scvi_mean']:.3f} +- {result['scvi_sd']:.3f} ({args.reps} evaluations each); "
        f"difference {result['diff']:+.3f} = {result['z']:+.2f} standard errors  ({out})"
    )
    return {**result, "path": str(out)}


if __name__ == "__main__":
    main()
