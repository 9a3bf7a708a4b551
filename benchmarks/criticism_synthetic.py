"""Model-card CV metrics on ``synthetic_iid()``: jaxvi vs scvi-tools, 1 and 400 epochs.

The scvi-hub example card's settings (400 cells x 100 genes, n_hidden 128, n_latent 10,
n_layers 1, dropout 0.1, gene dispersion, zinb, normal latent, no batch or labels key).
For each seed and epoch count, jaxvi and scvi-tools 1.4.2 are each trained on the same data
(``jaxvi.data.synthetic_iid(seed=s)`` = ``np.random.seed(s); scvi.data.synthetic_iid()``),
and the card's CV numbers are computed as ``create_criticism_report`` does (5 posterior
predictive samples of all cells; cell-wise on the train / validation split, gene-wise on
all cells). Additionally, the jaxvi weights are copied into the scvi-tools model
(``jaxvi.io.bridge``) and scvi-tools' own sampler is run on them: the same weights must give
the same metrics up to sampling noise (``same_weights`` rows).

Usage::

    python benchmarks/criticism_synthetic.py [--seeds 0 1 2] [--epochs 1 400] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SETTINGS = dict(
    n_hidden=128,
    n_latent=10,
    n_layers=1,
    dropout_rate=0.1,
    dispersion="gene",
    gene_likelihood="zinb",
    latent_distribution="normal",
)


def _card_numbers(cv_cell, cv_gene, train, val) -> dict:
    from jaxvi.criticism import cv_scores

    m, o = cv_cell["model"].to_numpy(), cv_cell["Raw"].to_numpy()
    return {
        "cell_train": cv_scores(m[train], o[train]),
        "cell_validation": cv_scores(m[val], o[val]),
        "gene": cv_scores(cv_gene["model"].to_numpy(), cv_gene["Raw"].to_numpy()),
    }


def _jaxvi_numbers(model) -> dict:
    from jaxvi.criticism import PosteriorPredictiveCheck

    ppc = PosteriorPredictiveCheck(model.adata, {"model": model}, n_samples=5)
    return _card_numbers(
        ppc.coefficient_of_variation("features"),
        ppc.coefficient_of_variation("cells"),
        model.train_indices,
        model.validation_indices,
    )


def _scvi_numbers(model, train, val) -> dict:
    from scvi.criticism import PosteriorPredictiveCheck

    ppc = PosteriorPredictiveCheck(model.adata, {"model": model}, n_samples=5)
    ppc.coefficient_of_variation("features")
    ppc.coefficient_of_variation("cells")
    return _card_numbers(ppc.metrics["cv_cell"], ppc.metrics["cv_gene"], train, val)


def main(argv=None) -> dict:
    """Run the comparison and write the JSON result."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 400])
    p.add_argument("--no-scvi", action="store_true", help="jaxvi only")
    p.add_argument("--quick", action="store_true", help="one seed, 1 and 5 epochs")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = [0], [1, 5]
    warnings.filterwarnings("ignore")

    import jaxvi
    from jaxvi.data import synthetic_iid

    if not args.no_scvi:
        import scvi
        import torch

        from jaxvi.io.bridge import load_into_scvi_tools

        torch.set_num_threads(C.n_cores())

    rows = []
    for seed in args.seeds:
        for epochs in args.epochs:
            jaxvi.settings.seed = seed
            adata = synthetic_iid(seed=seed)
            jaxvi.SCVI.setup_anndata(adata)
            mj = jaxvi.SCVI(adata, **SETTINGS)
            t0 = C.now()
            mj.train(max_epochs=epochs, enable_progress_bar=False)
            row = {"seed": seed, "epochs": epochs, "jaxvi_train_s": C.now() - t0}
            row["jaxvi"] = _jaxvi_numbers(mj)
            if not args.no_scvi:
                scvi.settings.seed = seed
                adata_t = synthetic_iid(seed=seed)  # = np.random.seed(seed); scvi's
                scvi.model.SCVI.setup_anndata(adata_t)
                mt = scvi.model.SCVI(adata_t, **SETTINGS)
                t0 = C.now()
                mt.train(max_epochs=epochs, enable_progress_bar=False)
                row["scvi_train_s"] = C.now() - t0
                row["scvi"] = _scvi_numbers(mt, mt.train_indices, mt.validation_indices)
                # jaxvi's weights, scvi-tools' sampler and metric code
                load_into_scvi_tools(mt, mj)
                mt.module.eval()
                row["same_weights_scvi"] = _scvi_numbers(
                    mt, mj.train_indices, mj.validation_indices
                )
            rows.append(row)
            brief = {
                k: {s: round(v[s]["mae"], 3) for s in v}
                for k, v in row.items()
                if isinstance(v, dict)
            }
            print(seed, epochs, brief, flush=True)

    lines = [
        "| seed | epochs | tool | cell MAE train | cell MAE val | gene MAE | cell R² train "
        "| gene R² |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        for tool in ("jaxvi", "scvi", "same_weights_scvi"):
            if tool not in r:
                continue
            v = r[tool]
            lines.append(
                f"| {r['seed']} | {r['epochs']} | {tool} | {v['cell_train']['mae']:.3f} | "
                f"{v['cell_validation']['mae']:.3f} | {v['gene']['mae']:.3f} | "
                f"{v['cell_train']['r2']:.2f} | {v['gene']['r2']:.2f} |"
            )
    markdown = "\n".join(lines)
    print(markdown)
    payload = {
        "benchmark": "criticism_synthetic",
        "started_utc": C.utc_timestamp(),
        "quick": args.quick,
        "machine": C.machine_info(),
        "versions": C.versions(),
        "git": C.git_info(),
        "settings": {
            "data": "synthetic_iid(seed) (400 x 100)",
            "model": SETTINGS,
            "n_samples": 5,
            "seeds": args.seeds,
            "epochs": args.epochs,
        },
        "results": rows,
        "markdown": markdown,
    }
    if not args.quick:
        path = C.write_json(C.result_path("criticism_synthetic"), payload)
        print(f"saved {path}")
    return payload


if __name__ == "__main__":
    main()
