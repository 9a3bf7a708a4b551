"""The notebooks run end to end (on 2 epochs)."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def _execute(name: str, monkeypatch, xla_flags: str | None = None) -> str:
    """Run a notebook in a fresh kernel on 2 epochs; its printed text. ``xla_flags`` replaces
    the suite's cheap-compilation ``XLA_FLAGS`` for notebooks whose time goes into sampling
    (posterior predictive draws, DE) rather than compiling: analysis and criticism, measured
    about twice as fast with XLA's usual optimisation; the others are faster without it."""
    if xla_flags is not None:
        monkeypatch.setenv("XLA_FLAGS", xla_flags)
    monkeypatch.setenv("JAXVI_NB_EPOCHS", "2")
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3")
    client.execute(cwd=str(path.parent))
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert os.environ["JAXVI_NB_EPOCHS"] == "2"
    return "".join(o.get("text", "") for o in outputs)


def test_quickstart_notebook_executes(monkeypatch):
    text = _execute("quickstart.ipynb", monkeypatch)
    assert "held-out ELBO:" in text
    assert "reloaded from" in text


def test_analysis_notebook_executes(monkeypatch, xla_flags_as_given):
    text = _execute("analysis.ipynb", monkeypatch, xla_flags_as_given)
    assert "ARI vs cell types:" in text
    assert "genes called DE at 5% FDR:" in text
    assert "Pearson r of gene-wise CV:" in text


def test_reference_mapping_notebook_executes(monkeypatch):
    text = _execute("reference_mapping.ipynb", monkeypatch)
    assert "batches: ['d0', 'd1', 'd2', 'd3']" in text
    assert "reference latent unchanged: True" in text
    assert "label transfer accuracy (15-NN):" in text


def test_label_transfer_notebook_executes(monkeypatch):
    text = _execute("label_transfer.ipynb", monkeypatch)
    assert "batches: ['d0', 'd1', 'd2', 'd3']" in text
    accuracy = float(text.split("label transfer accuracy (scANVI): ")[1].split()[0])
    assert 0.0 <= accuracy <= 1.0


def test_likelihoods_notebook_executes(monkeypatch):
    text = _execute("likelihoods.ipynb", monkeypatch)
    assert "held-out cells: 140, epochs: 2" in text
    assert "best held-out marginal LL:" in text


def test_criticism_notebook_executes(monkeypatch, xla_flags_as_given):
    pytest.importorskip("scanpy")
    pytest.importorskip("leidenalg")
    text = _execute("criticism.ipynb", monkeypatch, xla_flags_as_given)
    assert "cell-wise CV MAE" in text
    assert "card written to" in text
    assert "reloaded model has the same latent space: True" in text


def test_benchmarks_notebook_executes(monkeypatch):
    """The benchmarks notebook reads the committed JSON results and draws them."""
    text = _execute("benchmarks.ipynb", monkeypatch)
    assert "compare_scvi       compare_scvi_" in text
    assert "| synthetic | jaxvi |" in text  # the committed jaxvi vs scvi-tools table


def test_integration_notebook_executes(monkeypatch):
    pytest.importorskip("scanpy")
    pytest.importorskip("scib_metrics")
    text = _execute("integration.ipynb", monkeypatch)
    # the simulated batches of benchmarks/integration.py (data seed 0)
    assert "batch sizes: {'b0': 222, 'b1': 225, 'b2': 253}" in text
    assert "epochs: 2  latent: (700, 10)" in text
    for name in ("Unintegrated", "scVI (jaxvi)"):
        line = next(li for li in text.splitlines() if li.strip().startswith(f"{name}:"))
        total = float(line.rsplit("total ", 1)[1])
        assert 0.0 < total < 1.0, line
