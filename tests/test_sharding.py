"""Data parallelism (:mod:`jaxvi.sharding`) and several processes (:mod:`jaxvi.distributed`).

The device count of a JAX process is fixed when JAX starts, so the multi-device checks run in
subprocesses: ``sharded_worker.py`` with 8 fake CPU devices, and ``multihost_worker.py`` as
two processes joined on loopback plus a one-device reference run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxvi.sharding import data_mesh, resolve_devices

HERE = Path(__file__).parent


def _env(n_devices: int | None = None) -> dict:
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    if n_devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n_devices}"
    return env


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


def test_eight_devices_equal_one():
    """8 fake CPU devices, 300 cells (padded to 304), global batch 64: training, validation
    metrics and queries equal the single-device run with the same seed; the counts are split
    over the 8 devices; the step all-reduces, and its gradient is the mean of the 8 shards'
    gradients (not any one shard's)."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "sharded_worker.py")],
        env=_env(8),
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


def test_streaming_on_eight_devices_equals_one(tmp_path):
    """Streaming from a backed h5ad over 8 fake CPU devices: blocks of 256 cells (and the
    ragged 118-cell training block and 70-cell validation block, padded to 120 and 72) are
    split into 8 equal shards; the same cells are read, never more than one block at a
    time; parameters and training / validation ELBO equal the one-device streamed run.
    Queries on the backed AnnData then run on the mesh in bounded pieces read from disk, and
    equal the one-device queries."""
    proc = subprocess.run(
        [sys.executable, str(HERE / "stream_mesh_worker.py"), str(tmp_path)],
        env=_env(8),
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_two_processes_train_one_model(tmp_path, stream):
    """Two CPU processes joined with ``jaxvi.distributed.initialize`` on loopback: each loads
    only its half of the cells, both end with identical parameters and latents, and those
    match a single-process run. Streamed from a backed h5ad, each process reads from disk
    only its half of every block (128 of 256 cells, 7 of the ragged 14, 15 of the 30
    validation cells), and the result matches the one-process streamed run."""
    worker = str(HERE / "multihost_worker.py")
    port = str(_free_port())
    mode = ["stream"] if stream else []
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(rank), "2", port, str(tmp_path), *mode],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    single = subprocess.run(
        [sys.executable, worker, "0", "0", "0", str(tmp_path), *mode],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    prefix = "stream_" if stream else ""
    r0, r1, ref = (np.load(tmp_path / f"{prefix}{n}.npz") for n in ("rank0", "rank1", "single"))
    assert int(r0["n_processes"]) == int(r1["n_processes"]) == 2
    if stream:  # rows of each disk read, per epoch: training blocks then validation
        np.testing.assert_array_equal(ref["local_rows"], [256, 14, 30] * 3)
        np.testing.assert_array_equal(r0["local_rows"], [128, 7, 15] * 3)
        np.testing.assert_array_equal(r1["local_rows"], [128, 7, 15] * 3)
    else:
        assert int(r0["local_rows"]) == int(r1["local_rows"]) == 150
    keys = [k for k in r0.files if k.startswith("v:")]
    assert len(keys) > 10
    for k in keys:
        np.testing.assert_array_equal(r0[k], r1[k])
        np.testing.assert_allclose(r0[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_array_equal(r0["latent"], r1["latent"])
    np.testing.assert_allclose(r0["latent"], ref["latent"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r0["elbo"], ref["elbo"], rtol=1e-6)
