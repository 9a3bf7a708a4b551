"""The benchmark that only a GPU runs in full cannot rot: ``benchmarks/gpu_suite.py --smoke``
runs every section of it on tiny sizes on the CPU and writes the JSON the GPU run writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_writes_every_section(tmp_path):
    out = tmp_path / "gpu_suite.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    for key in ("machine", "versions", "git", "device", "limits", "throughput", "roofline",
                "memory", "streaming", "time_to_quality", "skipped", "table_md"):  # fmt: skip
        assert key in res, key
    assert res["skipped"] == []
    points = res["throughput"]["batch_size"] + res["throughput"]["n_cells"]
    assert points
    assert all(p["cells_per_s"] > 0 and p["step_gflop"] > 0 for p in points)
    assert res["roofline"][0]["achieved_tflops"] > 0
    assert res["limits"]["copy_gbps"] > 0
    # On the CPU the estimate is checked against XLA's plan of the same programs.
    assert all(0.7 < m["estimate_over_measured"] < 1.4 for m in res["memory"]), res["memory"]
    assert res["streaming"]["streamed"]["cells_per_s"] > 0
    assert res["time_to_quality"]["jaxvi_final_elbo_validation"] > 0
    assert res["peaks"] is None  # no nominal peaks for a CPU


def test_compare_scvi_quick_runs_jaxvi(tmp_path):
    """The side-by-side benchmark wraps jaxvi's epoch to time it; a change of the engine's
    calling convention must fail here, not in the next benchmark session."""
    out = tmp_path / "compare.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare_scvi.py"), "--quick",
           "--tools", "jaxvi", "--wait-quiet", "0", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]["synthetic"]["tools"]["jaxvi"]
    assert res["steady_cells_per_s"] > 0
    assert res["epoch_fn_compilations"] == 1  # the timed wrapper did not recompile
    assert res["heldout_elbo"] < 0
