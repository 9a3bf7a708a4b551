"""The quickstart notebook runs end to end (on 2 epochs)."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(monkeypatch):
    monkeypatch.setenv("JAXVI_NB_EPOCHS", "2")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3")
    client.execute(cwd=str(NOTEBOOK.parent))
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "held-out ELBO:" in text
    assert "reloaded from" in text
    assert os.environ["JAXVI_NB_EPOCHS"] == "2"
