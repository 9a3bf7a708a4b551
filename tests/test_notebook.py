"""The notebooks run end to end (on 2 epochs)."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


@pytest.fixture(scope="module")
def kernel(xla_flags_as_given):
    """``kernel(flags) -> KernelManager``: one kernel per ``XLA_FLAGS`` value, started on first
    use and shared by this file's notebooks. A kernel imports JAX, jaxvi and scanpy and
    compiles numba's UMAP functions (15-20 s) once instead of once per notebook; each notebook
    starts with ``%reset -f``, so none sees another's variables. ``flags=None`` keeps the
    suite's cheap-compilation ``XLA_FLAGS``; the notebooks whose time goes into sampling
    (posterior predictive draws, DE: analysis and criticism, measured about twice as fast
    with XLA's usual optimisation) take the flags the suite was started with."""
    from jupyter_client.manager import KernelManager

    started: dict = {}

    def get(flags: str | None):
        if flags not in started:
            env = {**os.environ, "JAXVI_NB_EPOCHS": "2"}
            if flags is not None:
                env["XLA_FLAGS"] = flags
            km = KernelManager(kernel_name="python3")
            km.start_kernel(env=env, cwd=str(NOTEBOOKS))
            started[flags] = km
        return started[flags]

    yield get
    for km in started.values():
        km.shutdown_kernel(now=True)


def _execute(name: str, km) -> str:
    """Run a notebook on 2 epochs (``JAXVI_NB_EPOCHS``) in the kernel ``km``, after clearing
    the kernel's namespace; its printed text."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("get_ipython().run_line_magic('reset', '-f')"))
    client = nbclient.NotebookClient(nb, km=km, timeout=300, kernel_name="python3")
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    return "".join(o.get("text", "") for o in outputs)


def test_quickstart_notebook_executes(kernel):
    text = _execute("quickstart.ipynb", kernel(None))
    assert "held-out ELBO:" in text
    assert "reloaded from" in text


def test_analysis_notebook_executes(kernel, xla_flags_as_given):
    text = _execute("analysis.ipynb", kernel(xla_flags_as_given))
    assert "ARI vs cell types:" in text
    assert "genes called DE at 5% FDR:" in text
    assert "Pearson r of gene-wise CV:" in text


def test_reference_mapping_notebook_executes(kernel):
    text = _execute("reference_mapping.ipynb", kernel(None))
    assert "batches: ['d0', 'd1', 'd2', 'd3']" in text
    assert "reference latent unchanged: True" in text
    assert "label transfer accuracy (15-NN):" in text


def test_label_transfer_notebook_executes(kernel):
    text = _execute("label_transfer.ipynb", kernel(None))
    assert "batches: ['d0', 'd1', 'd2', 'd3']" in text
    accuracy = float(text.split("label transfer accuracy (scANVI): ")[1].split()[0])
    assert 0.0 <= accuracy <= 1.0


def test_likelihoods_notebook_executes(kernel):
    text = _execute("likelihoods.ipynb", kernel(None))
    assert "held-out cells: 140, epochs: 2" in text
    assert "best held-out marginal LL:" in text


def test_criticism_notebook_executes(kernel, xla_flags_as_given):
    pytest.importorskip("scanpy")
    pytest.importorskip("leidenalg")
    text = _execute("criticism.ipynb", kernel(xla_flags_as_given))
    assert "cell-wise CV MAE" in text
    assert "card written to" in text
    assert "reloaded model has the same latent space: True" in text


def test_benchmarks_notebook_executes(kernel):
    """The benchmarks notebook reads the committed JSON results and draws them."""
    text = _execute("benchmarks.ipynb", kernel(None))
    assert "compare_scvi       compare_scvi_" in text
    assert "| synthetic | jaxvi |" in text  # the committed jaxvi vs scvi-tools table


def test_integration_notebook_executes(kernel):
    pytest.importorskip("scanpy")
    pytest.importorskip("scib_metrics")
    text = _execute("integration.ipynb", kernel(None))
    # the simulated batches of benchmarks/integration.py (data seed 0)
    assert "batch sizes: {'b0': 222, 'b1': 225, 'b2': 253}" in text
    assert "epochs: 2  latent: (700, 10)" in text
    for name in ("Unintegrated", "scVI (jaxvi)"):
        line = next(li for li in text.splitlines() if li.strip().startswith(f"{name}:"))
        total = float(line.rsplit("total ", 1)[1])
        assert 0.0 < total < 1.0, line
