"""The benchmarks cannot rot: ``benchmarks/gpu_suite.py --smoke`` runs every section of the
GPU suite on tiny sizes on the CPU and writes the JSON the GPU run writes; the side-by-side
scripts run in their quick modes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The smoke runs check that the scripts work, not their speed. torch's OpenMP threads
# spin-wait against the suite's other worker on a 2-core machine; one thread avoids that.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_gpu_suite_smoke_writes_every_section(tmp_path):
    out = tmp_path / "gpu_suite.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
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


def test_compare_scanvi_quick_runs_both_tools(tmp_path):
    """``compare_scanvi.py --quick``: both tools train scANVI on the same hidden cells, the
    JSON has per-tool accuracies, their gap and the speed ratio."""
    out = tmp_path / "compare_scanvi.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare_scanvi.py"), "--quick"]
    proc = subprocess.run(
        [*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["complete"]
    row = res["results"]["scratch/0"]
    for tool in ("scvi", "jaxvi"):
        m = row["tools"][tool]
        assert m["epochs"] == 3
        assert m["steady_cells_per_s"] > 0
        assert 0.0 <= m["accuracy_hidden"] <= 1.0
    assert row["ratios"]["same_hidden_cells"]
    assert row["ratios"]["steady_cells_per_s_speedup"] > 0
    assert res["raw"]["scratch/0/jaxvi"]["n_hidden"] == 350  # half of the 700 PBMC cells
    acc = {tool: row["tools"][tool]["accuracy_hidden"] for tool in ("scvi", "jaxvi")}
    gap = 100 * (acc["jaxvi"] - acc["scvi"])
    assert abs(row["ratios"]["accuracy_gap_pp"] - gap) < 1e-9
    assert "scratch" in res["summary"]
    assert "| scratch | 0 |" in res["markdown"]


def test_compare_scvi_quick_runs_jaxvi(tmp_path):
    """The side-by-side benchmark wraps jaxvi's epoch to time it; a change of the engine's
    calling convention must fail here, not in the next benchmark session."""
    out = tmp_path / "compare.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ONE_THREAD}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare_scvi.py"), "--quick",
           "--tools", "jaxvi", "--wait-quiet", "0", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())["results"]["synthetic"]["tools"]["jaxvi"]
    assert res["steady_cells_per_s"] > 0
    assert res["epoch_fn_compilations"] == 1  # the timed wrapper did not recompile
    assert res["heldout_elbo"] < 0


def test_integration_quick_scores_latent_spaces(tmp_path, xla_flags_as_given):
    """benchmarks/integration.py trains on the PBMC data with simulated batches and scores
    every latent space with scib-metrics' Benchmarker (scvi-tools too when installed)."""
    pytest.importorskip("scib_metrics")
    out = tmp_path / "integration.json"
    # XLA's usual optimisation: the scIB metrics' JAX loops dominate, not compilation.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": xla_flags_as_given, **ONE_THREAD}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "integration.py"), "--quick",
           "--datasets", "pbmc", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    res = payload["results"]["pbmc"]
    # the simulated batches of data seed 0 (notebooks/integration.ipynb draws the same)
    assert res["batches"] == {"b0": 222, "b1": 225, "b2": 253}
    has_scvi = importlib.util.find_spec("scvi") is not None
    tools = ["scvi", "jaxvi"] if has_scvi else ["jaxvi"]
    assert payload["config"]["tools"] == tools
    assert bool(payload["skipped"]) is not has_scvi
    assert sorted(res["scores"]) == sorted(["Unintegrated"] + [f"{t}_seed0" for t in tools])
    for name, scores in res["scores"].items():
        for metric in ("Bio conservation", "Batch correction", "Total", "iLISI", "cLISI"):
            assert 0.0 <= scores[metric] <= 1.0, (name, metric, scores[metric])
    # PCR comparison of the baseline against itself is 0 by construction
    assert res["scores"]["Unintegrated"]["PCR comparison"] == pytest.approx(0.0, abs=1e-6)
    assert "| **Total** | aggregate |" in res["table_md"]
    assert payload["versions"]["scib-metrics"].startswith("0.5")


def _bench(name: str):
    """The benchmark script ``benchmarks/<name>.py`` as a module."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _seed_parity():
    return _bench("seed_parity")


def _seed_run(seed_list, diffs, **settings):
    rows = [
        {"seed": s, "scvi_heldout_elbo": -680.0, "jaxvi_heldout_elbo": -680.0 + d}
        for s, d in zip(seed_list, diffs, strict=True)
    ]
    base = {"dataset": "synthetic", "epochs": 400, "n_cells": 10_000, "n_genes": 2000,
            "data_seed": 0, "elbo_reps": 3, "cores": 1}  # fmt: skip
    return {"benchmark": "seed_parity", "settings": {**base, **settings}, "rows": rows}


def test_seed_parity_paired_t_is_scipys():
    from scipy import stats

    sp = _seed_parity()
    diffs = [-2.3, -1.3, -1.2, -0.2, 0.5, -1.9, 0.8, 1.1]
    got = sp.paired_stats(diffs)
    ref = stats.ttest_1samp(diffs, 0.0)
    assert got["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert got["p_two_sided"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert (got["n_positive"], got["n_negative"]) == (3, 5)


def test_seed_parity_resume_runs_only_the_missing_seeds_of_its_range(tmp_path, monkeypatch):
    sp = _seed_parity()
    # cores=None: a resumed run pins itself to its cores, which this test process must not.
    partial = _seed_run([4], [0.3], first_seed=4, seeds=3, cores=None)
    path = tmp_path / "b.json"
    path.write_text(json.dumps(partial))
    ran = []

    def fake_worker(args, tool, dataset, epochs):
        ran.append((tool, args.seed, dataset, epochs, args.n_cells))
        return {"heldout_elbo": -680.0 - args.seed, "validation_digest": "d", "train_load": {}}

    monkeypatch.setattr(sp.CS, "run_worker_once", fake_worker)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # main() extends it
    # The command line's defaults (seeds 0-7, PBMC) do not override the file's settings.
    result = sp.main(["--resume", str(path)])
    assert ran == [(t, s, "synthetic", 400, 10_000) for s in (5, 6) for t in sp.C.TOOLS]
    assert [r["seed"] for r in result["rows"]] == [4, 5, 6]
    saved = json.loads(path.read_text())
    assert [r["seed"] for r in saved["rows"]] == [4, 5, 6]
    assert (saved["settings"]["first_seed"], saved["settings"]["seeds"]) == (4, 3)


def test_seed_parity_merges_runs_of_disjoint_seeds():
    sp = _seed_parity()
    a, b = _seed_run([0, 1, 2], [-1.0, 0.5, -0.2]), _seed_run([3, 4], [0.3, -0.4])
    merged = sp.merge([b, a], ["b.json", "a.json"])
    assert [r["seed"] for r in merged["rows"]] == [0, 1, 2, 3, 4]
    assert merged["summary"]["diff"]["n"] == 5
    assert merged["summary"]["sign_varies"] is True
    assert [m["seeds"] for m in merged["merged_from"]] == [[3, 4], [0, 1, 2]]
    assert "| 4 |" in merged["markdown"]
    # the same seed in both runs with the same result is one row
    assert len(sp.merge([a, a], ["a.json", "a2.json"])["rows"]) == 3
    with pytest.raises(ValueError, match="settings differ.*epochs"):
        sp.merge([a, _seed_run([3], [0.1], epochs=200)], ["a.json", "c.json"])
    with pytest.raises(ValueError, match="seed 1 run twice"):
        sp.merge([a, _seed_run([1], [0.9])], ["a.json", "d.json"])


def test_eval_parity_same_weights_same_elbo_in_both_libraries(tmp_path, scvi_ref):
    """``eval_parity.py``: one jaxvi model, its weights copied into scvi-tools, both
    libraries' held-out ``get_elbo``; the difference is Welch's t of the two samples."""
    from scipy import stats

    ep = _bench("eval_parity")
    out = tmp_path / "eval.json"
    argv = ["--dataset", "synthetic", "--n-cells", "300", "--n-genes", "60", "--epochs", "3",
            "--reps", "4", "--out", str(out)]  # fmt: skip
    result = ep.main(argv)
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "eval_parity"
    assert saved["n_validation"] == 30
    assert len(saved["jaxvi_elbos"]) == len(saved["scvi_elbos"]) == 4
    welch = stats.ttest_ind(saved["jaxvi_elbos"], saved["scvi_elbos"], equal_var=False)
    assert result["z"] == pytest.approx(welch.statistic, rel=1e-9)
    # Evaluators that disagreed (a term missing, another normalisation) would be many
    # standard errors and far more than the noise apart; the same evaluator is not.
    assert abs(result["z"]) < 6, result
    assert abs(result["diff"]) < 0.01 * abs(result["scvi_mean"]), result
