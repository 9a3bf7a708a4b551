"""GPU-ready, proven on the CPU: no hidden host round trip in the training loop or the main
queries (``jax.transfer_guard("disallow")``: only the explicit transfers the design names
may run), and no float64 or host callback in the compiled programs.

On a CPU JAX does not guard device-to-host reads (the host *is* the device), so the guard
proves the host-to-device side; reads back go through ``jax.device_get``
(:func:`jaxvi.parallel.to_host`), an explicit transfer on every platform.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvi
from jaxvi.data import make_source
from jaxvi.data.registry import get_registry
from jaxvi.train import (
    PlanConfig,
    epoch_grid,
    fit,
    init_train_state,
    make_train_epoch,
    steps_per_epoch,
)


def test_the_guard_catches_an_implicit_transfer_here():
    with jax.transfer_guard("disallow"), pytest.raises(Exception, match="Disallowed host-to"):
        jnp.asarray(np.ones(3)) + 1


def test_training_and_the_main_queries_run_under_the_transfer_guard(small_model):
    """The loop (epochs, validation, KL warm-up, history) and the latent representation,
    normalized expression (with samples and a gene list), ELBO and reconstruction error move
    data only where the design says: ``DataSource.replicate`` / ``piece``, the query runner's
    grid and cell arguments, ``jax.device_put`` of query options, and the seed's keys."""
    model = small_model
    adata = model.adata
    plan = PlanConfig()
    state, _ = init_train_state(model.model_def, model.variables, plan)
    source = make_source(adata, get_registry(adata), purpose="train")
    n = adata.n_obs
    with jax.transfer_guard("disallow"):
        state, history, _ = fit(
            model.model_def,
            state,
            source,
            train_idx=np.arange(n - 16),
            val_idx=np.arange(n - 16, n),
            plan=plan,
            max_epochs=2,
            check_val_every_n_epoch=1,
            progress_bar=False,
        )
        latent = model.get_latent_representation()
        expr = model.get_normalized_expression(n_samples=2, gene_list=adata.var_names[:5])
        elbo = model.get_elbo()
        reconstruction = model.get_reconstruction_error()
    assert np.isfinite(history["elbo_validation"].to_numpy()).all()
    assert int(jax.device_get(state.step)) == 2 * steps_per_epoch(n - 16, 128, False)
    assert latent.shape == (n, 3)
    assert expr.shape == (n, 5)
    assert np.isfinite(elbo)
    assert np.isfinite(reconstruction["reconstruction_loss"])


# Float64 types (StableHLO ``tensor<4xf64>``, HLO ``f64[4]``) and host callbacks (JAX's
# ``xla_ffi_python_cpu_callback`` custom calls and their GPU twins). The texts also hold source
# locations, so plain words would match this file's own names.
_PATTERNS = {
    "f64": re.compile(r"\bf64\[|[x<]f64>"),
    "callback": re.compile(r"python_(?:cpu|gpu)_callback"),
}


def _host_parts(text: str) -> list[str]:
    """Float64 values and host callbacks in a program's text."""
    return [name for name, pattern in _PATTERNS.items() if pattern.search(text)]


def test_compiled_epoch_and_queries_hold_no_float64_and_no_host_callback(small_model, monkeypatch):
    # The check catches what it looks for.
    spy = jax.jit(lambda x: jax.pure_callback(np.sin, x, x) + x.astype(jnp.float32))
    assert _host_parts(spy.lower(jnp.ones(2)).as_text()) == ["callback"]
    with jax.enable_x64(True):
        assert _host_parts(jax.jit(lambda x: x * 2).lower(np.ones(2)).as_text()) == ["f64"]

    model = small_model
    state, tx = init_train_state(model.model_def, model.variables, PlanConfig())
    source = make_source(model.adata, get_registry(model.adata), purpose="train")
    epoch = make_train_epoch(model.model_def, tx, guard="detect")
    n_train = int(0.9 * model.adata.n_obs)  # the shapes of the fixture's fit (a cache hit)
    key, idx, mask = epoch_grid(
        jax.random.key(0),
        jnp.arange(n_train, dtype=jnp.int32),
        n_steps=steps_per_epoch(n_train, 128, False),
        batch_size=128,
    )
    lowered = epoch.lower(key, state, source.data, idx, mask, jnp.ones(idx.shape[0]))
    assert _host_parts(lowered.as_text()) == []
    assert _host_parts(lowered.compile().as_text()) == []

    texts = []
    real = jaxvi.posterior.run_query

    def recording(program, query, *args, **kwargs):
        def run(*a):
            texts.append(program.lower(*a).compile().as_text())
            return program(*a)

        return real(run, query, *args, **kwargs)

    monkeypatch.setattr(jaxvi.posterior, "run_query", recording)
    monkeypatch.setattr("jaxvi.posterior._predictive.run_query", recording)
    model.get_latent_representation()
    model.get_normalized_expression()
    model.get_elbo()
    assert len(texts) == 3
    assert [_host_parts(t) for t in texts] == [[], [], []]
