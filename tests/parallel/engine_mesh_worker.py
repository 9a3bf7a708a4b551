"""Worker for tests/parallel/test_sharding.py: the second model of tests/train/second_model.py
(outside the package) trained on one device and data-parallel on 8 fake CPU devices, then
queried on both. Prints one JSON line of relative differences."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata
import jax
import numpy as np
import pandas as pd
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from second_model import gaussian_ae  # noqa: E402

from jaxvi import SCVI  # noqa: E402
from jaxvi.data import make_source  # noqa: E402
from jaxvi.data.registry import get_registry  # noqa: E402
from jaxvi.parallel import data_mesh, to_host  # noqa: E402
from jaxvi.posterior import Query, elbo_terms_program, run_query  # noqa: E402
from jaxvi.train import PlanConfig, fit, init_train_state  # noqa: E402

N_CELLS, N_GENES = 160, 20


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def main() -> None:
    rng = np.random.default_rng(0)
    x = rng.negative_binomial(3, 0.3, size=(N_CELLS, N_GENES)).astype(np.float32)
    adata = anndata.AnnData(sp.csr_matrix(x))
    adata.obs["batch"] = pd.Categorical(np.where(np.arange(N_CELLS) % 2 == 0, "a", "b"))
    SCVI.setup_anndata(adata, batch_key="batch")
    registry = get_registry(adata)
    model = gaussian_ae(N_GENES)
    plan = PlanConfig(lr=1e-2, n_epochs_kl_warmup=None)
    out = {}
    for name, mesh in (("one", None), ("eight", data_mesh())):
        state, _ = init_train_state(model, model.init(jax.random.key(0)), plan)
        state, history, _ = fit(
            model,
            state,
            make_source(adata, registry, purpose="train", mesh=mesh),
            train_idx=np.arange(128),
            val_idx=np.arange(128, N_CELLS),
            plan=plan,
            max_epochs=3,
            batch_size=32,
            check_val_every_n_epoch=1,
            progress_bar=False,
        )
        params = jax.tree_util.tree_map(to_host, state.params)
        source = make_source(adata, registry, purpose="query", mesh=mesh)
        query = Query(
            model, {"params": params, "batch_stats": {}}, source, np.arange(N_CELLS), None, 32
        )
        terms = run_query(elbo_terms_program(model), query)
        out[name] = (params, history, terms)
    (p1, h1, t1), (p8, h8, t8) = out["one"], out["eight"]
    print(
        json.dumps(
            {
                "n_devices": jax.device_count(),
                "param_rel_diff": max(
                    _rel(a, b)
                    for a, b in zip(
                        jax.tree_util.tree_leaves(p8), jax.tree_util.tree_leaves(p1), strict=True
                    )
                ),
                "penalty_train_rel_diff": _rel(h8["penalty_train"], h1["penalty_train"]),
                "elbo_val_rel_diff": _rel(h8["elbo_validation"], h1["elbo_validation"]),
                "query_rel_diff": _rel(t8["reconstruction_loss"], t1["reconstruction_loss"]),
                "loss_fell": bool(h1["train_loss"].iloc[-1, 0] < h1["train_loss"].iloc[0, 0]),
            }
        )
    )


if __name__ == "__main__":
    main()
