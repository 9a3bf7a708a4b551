"""One of the processes launched by ``tests/test_sharding.py``: ``python multihost_worker.py
RANK N_PROCESSES PORT OUT_DIR``. Trains on the mesh of all processes' devices and writes its
parameters and what it loaded to ``OUT_DIR/rank<RANK>.npz``. With ``N_PROCESSES`` 0 it trains

on one device without joining a job (the reference run)."""

from __future__ import annotations

import sys

import jax
import numpy as np
from sharded_worker import make_adata


def main(rank: int, n_proc: int, port: int, out_dir: str) -> None:
    from jaxvi import SCVI, distributed

    if n_proc:
        distributed.initialize(f"127.0.0.1:{port}", num_processes=n_proc, process_id=rank)
    adata = make_adata()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=32, n_latent=4)
    model.train(
        max_epochs=3,
        batch_size=64,
        enable_progress_bar=False,
        check_val_every_n_epoch=1,
        devices=-1 if n_proc else "auto",
    )
    flat = {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_leaves_with_path(model.variables)
    }
    rows = 0
    if n_proc:
        data = model._device_data(adata, None)
        rows = sum(int(s.data.shape[0]) for s in data.x.addressable_shards)
    latent = model.get_latent_representation()
    np.savez(
        f"{out_dir}/rank{rank}.npz" if n_proc else f"{out_dir}/single.npz",
        latent=latent,
        elbo=model.history["elbo_validation"].to_numpy(),
        local_rows=rows,
        n_processes=jax.process_count(),
        **{f"v:{k}": v for k, v in flat.items()},
    )


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
