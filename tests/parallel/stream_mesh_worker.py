"""Run by ``tests/test_sharding.py`` in a subprocess with 8 fake CPU devices: streamed
training from a backed h5ad on one device and on the 8-device mesh, same seed. ``python
stream_mesh_worker.py OUT_DIR``; prints one JSON line of measurements."""

from __future__ import annotations

import json
import sys

import anndata
import jax
import numpy as np
import scipy.sparse as sp
from sharded_worker import make_adata, max_rel

from jaxvi import SCVI, settings
from jaxvi.data import _source
from jaxvi.data import _streaming as streaming


def main(out_dir: str) -> None:
    out = {"n_devices": jax.device_count()}
    mem = make_adata(700, 30)
    mem.X = sp.csr_matrix(mem.X)
    path = f"{out_dir}/cells.h5ad"
    mem.write_h5ad(path)
    settings.stream_chunk_cells = 64
    settings.stream_max_host_bytes = 2 * 256 * 30 * 4  # blocks of 4 chunks: 256 cells

    reads, shards = [], []
    real_read, real_place = streaming._Reader.read, streaming.StreamingSource._place

    def spy_read(self, rows, max_gap=4096, **kwargs):
        reads.append(len(rows))
        return real_read(self, rows, max_gap, **kwargs)

    def spy_place(self, arrays, n_cells):
        data = real_place(self, arrays, n_cells)
        if self.mesh is not None:
            shards.append(sorted(int(s.data.shape[0]) for s in data.x.addressable_shards))
        return data

    streaming._Reader.read = spy_read
    streaming.StreamingSource._place = spy_place

    kwargs = {
        "max_epochs": 2,
        "batch_size": 64,
        "enable_progress_bar": False,
        "check_val_every_n_epoch": 1,
    }
    models = {}
    for name, devices in (("single", "auto"), ("mesh", 8)):
        backed = anndata.read_h5ad(path, backed="r")
        SCVI.setup_anndata(backed, batch_key="batch")
        model = SCVI(backed, n_hidden=32, n_latent=4)
        init = jax.tree_util.tree_map(np.asarray, model.variables["params"])
        reads.clear()
        model.train(**kwargs, devices=devices)
        out[f"max_read_{name}"] = max(reads)
        out[f"cells_read_{name}"] = sum(reads)
        models[name] = model
        moved = jax.tree_util.tree_map(
            lambda a, b: np.max(np.abs(a - b)), model.variables["params"], init
        )
        out[f"param_moved_{name}"] = float(max(jax.tree_util.tree_leaves(moved)))
    single, mesh = models["single"], models["mesh"]
    out["n_train"] = len(single.train_indices)
    out["n_val"] = len(single.validation_indices)
    out["same_split"] = bool(np.array_equal(single.train_indices, mesh.train_indices))
    out["param_rel_diff"] = max_rel(mesh.variables, single.variables)
    for key in ("elbo_train", "elbo_validation"):
        a, b = single.history[key].to_numpy(), mesh.history[key].to_numpy()
        out[f"{key}_rel_diff"] = float(np.max(np.abs(a - b) / np.abs(a)))
    # Queries on the backed AnnData, on the mesh: bounded reads, each call's cells sharded.
    settings.inference_bytes_per_call = 64 * 30 * 4  # 64 cells a call
    backed = mesh.adata
    reads.clear()
    query_shards = []
    real_shard = _source.shard_host_data

    def spy_shard(host, n_cells, mesh):
        data = real_shard(host, n_cells, mesh)
        query_shards.append(len({s.device for s in data.x.addressable_shards}))
        return data

    _source.shard_host_data = spy_shard
    latent_mesh = mesh.get_latent_representation(backed, batch_size=32)
    out["query_max_read"] = max(reads)
    out["query_cells_read"] = sum(reads)
    out["query_shards"] = sorted(set(query_shards))
    calls = mesh._n_calls
    elbo_mesh = mesh.get_elbo(backed, batch_size=32)
    mesh.to_device("auto")
    latent_one = mesh.get_latent_representation(backed, batch_size=32)
    mesh._n_calls = calls
    elbo_one = mesh.get_elbo(backed, batch_size=32)
    out["query_latent_rel_diff"] = float(
        np.max(np.abs(latent_mesh - latent_one)) / np.max(np.abs(latent_one))
    )
    out["query_elbo_rel_diff"] = abs(elbo_mesh - elbo_one) / abs(elbo_one)
    out["block_shards"] = [list(s) for s in {tuple(s) for s in shards}]
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
