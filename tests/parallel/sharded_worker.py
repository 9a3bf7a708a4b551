"""Run by ``tests/test_sharding.py`` in a subprocess with 8 fake CPU devices (the device count
is fixed when JAX starts). Prints one JSON line of measurements."""

from __future__ import annotations

import json
import sys

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxvi import SCVI
from jaxvi.data import gather, sharded_cell_data, to_device
from jaxvi.data.registry import registry_arrays
from jaxvi.module import vae_loss
from jaxvi.parallel import data_mesh


def make_adata(n_cells=300, n_genes=40, seed=0):
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, n_cells)
    mu = rng.gamma(2.0, 2.0, size=(3, n_genes))[group] * rng.lognormal(0, 0.4, (n_cells, 1))
    x = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float32)
    x[:, 0] += 1
    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{i % 2}" for i in range(n_cells)])},
        index=[f"c{i}" for i in range(n_cells)],
    )
    return anndata.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(n_genes)]))


def max_rel(a, b):
    leaves_a = jax.tree_util.tree_leaves(a)
    leaves_b = jax.tree_util.tree_leaves(b)
    diffs = []
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        diffs.append(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-12)))
    return max(diffs)


def main():
    out = {"n_devices": jax.device_count()}
    adata = make_adata()
    SCVI.setup_anndata(adata, batch_key="batch")
    kwargs = {"max_epochs": 3, "batch_size": 64, "enable_progress_bar": False}
    single = SCVI(adata, n_hidden=32, n_latent=4)
    sharded = SCVI(adata, n_hidden=32, n_latent=4)
    init = jax.tree_util.tree_map(np.asarray, single.variables["params"])
    out["same_init"] = max_rel(sharded.variables, single.variables) == 0.0
    single.train(**kwargs, check_val_every_n_epoch=1)
    sharded.train(**kwargs, devices=8, check_val_every_n_epoch=1)
    out["param_rel_diff"] = max_rel(sharded.variables, single.variables)
    out["param_moved"] = max(
        float(np.max(np.abs(np.asarray(a) - b)))
        for a, b in zip(
            jax.tree_util.tree_leaves(single.variables["params"]),
            jax.tree_util.tree_leaves(init),
            strict=True,
        )
    )
    hs, hd = single.history["elbo_train"], sharded.history["elbo_train"]
    out["elbo_train_rel_diff"] = float(np.max(np.abs(hs.values - hd.values) / np.abs(hs.values)))
    vs, vd = single.history["elbo_validation"], sharded.history["elbo_validation"]
    out["elbo_val_rel_diff"] = float(np.max(np.abs(vs.values - vd.values) / np.abs(vs.values)))
    # Queries on the mesh equal queries on one device (same weights).
    latent_sharded = sharded.get_latent_representation()
    sharded.to_device("auto")
    latent_single = sharded.get_latent_representation()
    out["latent_rel_diff"] = float(
        np.max(np.abs(latent_sharded - latent_single)) / np.max(np.abs(latent_single))
    )
    # The data really is spread over the devices.
    mesh = data_mesh()
    data = sharded_cell_data(adata, sharded.registry_, mesh)
    out["x_shards"] = len({s.device for s in data.x.addressable_shards})
    out["x_shard_rows"] = int(data.x.addressable_shards[0].data.shape[0])

    # Gradient of one sharded step = mean over the shards' gradients (no batch norm, so the
    # loss is a plain mean over cells and shards of equal size).
    model = SCVI(adata, n_hidden=32, n_latent=4, use_batch_norm="none", dropout_rate=0.0)
    module, variables = model.module, model.variables
    idx = jnp.arange(64)

    def grad_fn(d, idx):
        def loss(params):
            o, _ = vae_loss(
                module, {**variables, "params": params}, gather(d, idx), key=None, training=True
            )
            return o.loss

        return jax.grad(loss)(variables["params"])

    data_s = sharded_cell_data(adata, model.registry_, mesh)
    g_sharded = jax.jit(grad_fn)(data_s, idx)
    hlo = jax.jit(grad_fn).lower(data_s, idx).compile().as_text()
    out["all_reduce_in_step"] = "all-reduce" in hlo
    local = to_device(registry_arrays(adata, model.registry_))
    per_shard = [jax.jit(grad_fn)(local, jnp.arange(8 * k, 8 * k + 8)) for k in range(8)]
    mean_grad = jax.tree_util.tree_map(lambda *g: sum(g) / len(g), *per_shard)
    out["grad_vs_mean_of_shards"] = max_rel(g_sharded, mean_grad)
    out["grad_vs_first_shard"] = max_rel(g_sharded, per_shard[0])
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
