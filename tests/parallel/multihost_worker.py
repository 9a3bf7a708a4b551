"""One of the processes launched by ``tests/test_sharding.py``: ``python multihost_worker.py
RANK N_PROCESSES PORT OUT_DIR [stream]``. Trains on the mesh of all processes' devices and
writes its parameters and what it loaded to ``OUT_DIR/rank<RANK>.npz``. With ``N_PROCESSES``
0 it trains on one device without joining a job (the reference run). With ``stream`` the
cells are streamed from a backed h5ad (each process reading its rows of every block) and the
output files are named ``stream_*.npz``."""

from __future__ import annotations

import sys

import jax
import numpy as np
from sharded_worker import make_adata


def main(rank: int, n_proc: int, port: int, out_dir: str, stream: bool = False) -> None:
    from jaxvi import SCVI
    from jaxvi.data import make_source
    from jaxvi.parallel import distributed as distributed

    if n_proc:
        distributed.initialize(f"127.0.0.1:{port}", num_processes=n_proc, process_id=rank)
    adata = make_adata()
    reads = []
    tag = f"rank{rank}" if n_proc else "single"
    if stream:
        adata = backed_copy(adata, f"{out_dir}/cells_{tag}.h5ad", reads)
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
    if n_proc and not stream:
        data = make_source(adata, model.registry_, purpose="train", mesh=model._mesh).data
        rows = sum(int(s.data.shape[0]) for s in data.x.addressable_shards)
    if stream:
        rows = np.asarray(reads)  # training only; queries then read from disk, on the mesh
    latent = model.get_latent_representation()
    np.savez(
        f"{out_dir}/{'stream_' if stream else ''}{tag}.npz",
        latent=latent,
        elbo=model.history["elbo_validation"].to_numpy(),
        local_rows=rows,
        n_processes=jax.process_count(),
        **{f"v:{k}": v for k, v in flat.items()},
    )


def backed_copy(adata, path: str, reads: list):
    """``adata`` written to ``path`` (CSR) and opened backed, with streaming set to blocks of
    256 cells (chunks of 64); the number of rows of every disk read is appended to ``reads``."""
    import anndata
    import scipy.sparse as sp

    from jaxvi import settings
    from jaxvi.data import _streaming as streaming

    adata.X = sp.csr_matrix(adata.X)
    adata.write_h5ad(path)
    settings.stream_chunk_cells = 64
    settings.stream_max_host_bytes = 2 * 256 * adata.n_vars * 4
    real_read = streaming._Reader.read

    def spy(self, rows, max_gap=4096, **kwargs):
        reads.append(len(rows))
        return real_read(self, rows, max_gap, **kwargs)

    streaming._Reader.read = spy
    return anndata.read_h5ad(path, backed="r")


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        sys.argv[4],
        len(sys.argv) > 5 and sys.argv[5] == "stream",
    )
