"""Several processes (:mod:`jaxvi.parallel.distributed`): ``multihost_worker.py`` as two processes
joined on loopback, plus a one-device reference run (split from ``test_sharding.py`` so that
the two files run on different pytest-xdist workers)."""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stream", [False, True], ids=["memory", "stream"])
def test_two_processes_train_one_model(worker_env, worker_script, tmp_path, stream):
    """Two CPU processes joined with ``jaxvi.parallel.initialize`` on loopback: each loads
    only its half of the cells, both end with identical parameters and latents, and those
    match a single-process run. Streamed from a backed h5ad, each process reads from disk
    only its half of every block (128 of 256 cells, 7 of the ragged 14, 15 of the 30
    validation cells), and the result matches the one-process streamed run."""
    worker = worker_script("multihost_worker.py")
    port = str(_free_port())
    mode = ["stream"] if stream else []
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(rank), "2", port, str(tmp_path), *mode],
            env=worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    single = subprocess.run(
        [sys.executable, worker, "0", "0", "0", str(tmp_path), *mode],
        env=worker_env(),
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
