"""Data parallelism (:mod:`jaxvi.parallel`); several processes are in ``test_distributed.py``.

The device count of a JAX process is fixed when JAX starts, so the multi-device checks run in
subprocesses: ``sharded_worker.py`` with 8 fake CPU devices.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxvi.parallel import data_mesh, resolve_devices


def test_resolve_devices():
    assert resolve_devices("auto") is None
    assert resolve_devices(None) is None
    mesh = resolve_devices(1)
    assert mesh.axis_names == ("cells",)
    assert mesh.size == 1
    assert resolve_devices(-1).size == jax.device_count()
    assert resolve_devices(mesh) is mesh
    assert resolve_devices(jax.devices()[:1]).size == 1
    with pytest.raises(ValueError, match="JAX sees"):
        resolve_devices(jax.device_count() + 1)
    with pytest.raises(ValueError, match="devices must be"):
        resolve_devices("gpu0")
    bad = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("batch",))
    with pytest.raises(ValueError, match="'cells'"):
        resolve_devices(bad)
    assert data_mesh().size == jax.device_count()


def test_train_on_a_one_device_mesh(tmp_path):
    """``devices=1`` goes through the sharded code path on this process's single device and
    gives the single-device result."""
    from sharded_worker import make_adata

    from jaxvi import SCVI

    adata = make_adata(120, 20)
    SCVI.setup_anndata(adata, batch_key="batch")
    a, b = SCVI(adata, n_hidden=16, n_latent=3), SCVI(adata, n_hidden=16, n_latent=3)
    kwargs = {"max_epochs": 2, "batch_size": 32, "enable_progress_bar": False}
    a.train(**kwargs)
    b.train(**kwargs, devices=1)
    for x, y in zip(
        jax.tree_util.tree_leaves(a.variables), jax.tree_util.tree_leaves(b.variables), strict=True
    ):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        b.get_latent_representation(), a.get_latent_representation(), rtol=1e-5, atol=1e-6
    )


def test_eight_devices_equal_one(worker_env, worker_script):
    """8 fake CPU devices, 300 cells (padded to 304), global batch 64: training, validation
    metrics and queries equal the single-device run with the same seed; the counts are split
    over the 8 devices; the step all-reduces, and its gradient is the mean of the 8 shards'
    gradients (not any one shard's)."""
    proc = subprocess.run(
        [sys.executable, worker_script("sharded_worker.py")],
        env=worker_env(8),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_devices"] == 8
    assert out["same_init"]
    assert out["param_moved"] > 1e-3
    assert out["param_rel_diff"] < 1e-5
    assert out["elbo_train_rel_diff"] < 1e-5
    assert out["elbo_val_rel_diff"] < 1e-5
    assert out["latent_rel_diff"] < 1e-5
    assert out["x_shards"] == 8
    assert out["x_shard_rows"] == 38
    assert out["all_reduce_in_step"]
    assert out["grad_vs_mean_of_shards"] < 1e-5
    assert out["grad_vs_first_shard"] > 1e-2


def test_streaming_on_eight_devices_equals_one(worker_env, worker_script, tmp_path):
    """Streaming from a backed h5ad over 8 fake CPU devices: blocks of 256 cells (and the
    ragged 118-cell training block and 70-cell validation block, padded to 120 and 72) are
    split into 8 equal shards; the same cells are read, never more than one block at a
    time; parameters and training / validation ELBO equal the one-device streamed run.
    Queries on the backed AnnData then run on the mesh in bounded pieces read from disk, and
    equal the one-device queries."""
    proc = subprocess.run(
        [sys.executable, worker_script("stream_mesh_worker.py"), str(tmp_path)],
        env=worker_env(8),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_devices"] == 8
    assert out["same_split"]
    assert (out["n_train"], out["n_val"]) == (630, 70)
    assert sorted(out["block_shards"]) == [[9] * 8, [15] * 8, [32] * 8]
    assert out["max_read_single"] == out["max_read_mesh"] == 256
    assert out["cells_read_single"] == out["cells_read_mesh"] == 2 * 700
    assert out["param_moved_single"] > 1e-3
    assert out["param_rel_diff"] < 1e-5
    assert out["elbo_train_rel_diff"] < 1e-5
    assert out["elbo_validation_rel_diff"] < 1e-5
    # Queries on the backed AnnData with the mesh: 64-cell reads, each sharded over 8 devices.
    assert out["query_max_read"] <= 64
    assert out["query_cells_read"] == 701  # and cell 0 again as padding of the last call
    assert out["query_shards"] == [8]
    assert out["query_latent_rel_diff"] < 1e-5
    assert out["query_elbo_rel_diff"] < 1e-5


def test_a_second_model_on_eight_devices_equals_one(worker_env, worker_script):
    """The model defined outside the package (tests/train/second_model.py) trains data-parallel
    on 8 fake CPU devices with the same results as on one, and is queried on the mesh."""
    proc = subprocess.run(
        [sys.executable, worker_script("engine_mesh_worker.py")],
        env=worker_env(8),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n_devices"] == 8
    assert out["loss_fell"]
    assert out["param_rel_diff"] < 1e-5
    assert out["penalty_train_rel_diff"] < 1e-5
    assert out["elbo_val_rel_diff"] < 1e-5
    assert out["query_rel_diff"] < 1e-5
