"""Device memory policy (:mod:`jaxvi.parallel.memory`)."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import pytest

from jaxvi import SCVI
from jaxvi import data as datasets
from jaxvi.data import _cells as dataset_module
from jaxvi.model import _training as model_module
from jaxvi.parallel import memory as memory

OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 17179869184 bytes."


def test_configure_before_jax_starts():
    code = (
        "import os, jaxvi.parallel.memory as m\n"
        "env = m.configure(preallocate=False, fraction=0.4, allocator='platform')\n"
        "import jax.numpy as jnp; jnp.ones(3).block_until_ready()\n"
        "print(env == {k: os.environ[k] for k in env}, sorted(env))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_PYTHON_CLIENT")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert "True ['XLA_PYTHON_CLIENT_ALLOCATOR', 'XLA_PYTHON_CLIENT_MEM_FRACTION'" in out


def test_configure_refuses_after_jax_started():
    jax.numpy.ones(1).block_until_ready()
    with pytest.raises(RuntimeError, match="already initialised"):
        memory.configure(preallocate=False)
    with pytest.raises(ValueError, match="fraction"):
        memory.configure(fraction=1.5)
    with pytest.raises(ValueError, match="allocator"):
        memory.configure(allocator="cuda")


def test_out_of_memory_becomes_a_clear_error(monkeypatch):
    adata = datasets.pbmc_small()
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=16, n_latent=3)

    def boom(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(OOM)

    monkeypatch.setattr(dataset_module, "_to_device", boom)
    with pytest.raises(MemoryError, match=r"The count matrix \(0.00 GiB\) does not fit.*backed="):
        model.train(max_epochs=1)
    monkeypatch.undo()
    monkeypatch.setattr(model_module, "fit", boom)
    with pytest.raises(MemoryError, match="A training step does not fit.*batch_size"):
        model.train(max_epochs=1)

    def other(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(model_module, "fit", other)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        model.train(max_epochs=1)
