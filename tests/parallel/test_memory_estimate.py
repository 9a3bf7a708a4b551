"""``jaxvi.memory.estimate``: device memory of training, against XLA's own buffer assignment of
the compiled epoch (``memory_analysis()``, which the CPU backend reports too)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

import jaxvi
from jaxvi.data import CellData
from jaxvi.module import VAEConfig, vae_model_def
from jaxvi.parallel.memory import estimate, largest_dataset, scvi_parameter_count
from jaxvi.train import (
    PlanConfig,
    epoch_grid,
    init_train_state,
    make_optimizer,
    make_train_epoch,
)


def _shapes(config: VAEConfig):
    """The model, its variables' and training state's shapes and its optimizer (no arrays:
    nothing is computed but shapes)."""
    model_def = vae_model_def(config)
    variables = jax.eval_shape(model_def.init, jax.random.key(0))
    plan = PlanConfig()
    state = jax.eval_shape(lambda v: init_train_state(model_def, v, plan)[0], variables)
    return model_def, variables, state, make_optimizer(plan, model_def.trainable(state.params))


def _size(tree, keep=lambda a: True) -> int:
    return sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(tree) if keep(a))


@pytest.mark.parametrize(
    ("n_layers", "n_batch", "options"),
    [
        (1, 1, {}),
        (2, 3, {"dispersion": "gene-batch", "use_observed_lib_size": False}),
        (3, 2, {"dispersion": "gene-cell", "gene_likelihood": "nb", "n_labels": 4}),
    ],
)
def test_parameter_count_is_the_models(n_layers, n_batch, options):
    config = VAEConfig(40, n_batch, n_hidden=8, n_latent=3, n_layers=n_layers, **options)
    _, variables, state, _ = _shapes(config)
    moments = _size(state.opt_state, lambda a: a.ndim > 0)  # Adam's mu and nu
    expected = (_size(variables), moments // 2)
    assert scvi_parameter_count(40, 8, 3, n_layers, n_batch, **options) == expected


def _cells(n_cells, n_genes, sparse, density):
    f32, i32 = jnp.float32, jnp.int32

    def shape(*dims, dtype=f32):
        return jax.ShapeDtypeStruct(dims, dtype)

    nnz = int(density * n_cells * n_genes)
    return CellData(
        x=None if sparse else shape(n_cells, n_genes),
        indptr=shape(n_cells + 1, dtype=i32) if sparse else None,
        indices=shape(nnz, dtype=i32) if sparse else None,
        data=shape(nnz) if sparse else None,
        batch_index=shape(n_cells, dtype=i32),
        labels=shape(n_cells, dtype=i32),
        cat_covs=None,
        cont_covs=None,
        size_factor=None,
        n_genes=n_genes,
        max_row_nnz=int(3 * density * n_genes) if sparse else 0,
        log_x_factorial=shape(n_cells),
    )


@pytest.mark.parametrize("sparse", [False, True])
def test_estimate_matches_the_compiled_epoch(sparse):
    """Within 25% of XLA's plan for the epoch: its arguments (cells, state, grid), outputs (a
    new state: the input is not donated) and temporaries (one step's working memory)."""
    n_cells, n_genes, batch, n_batch, density = 4096, 800, 256, 2, 0.2
    model_def, _, state, tx = _shapes(VAEConfig(n_genes, n_batch, n_hidden=64))
    epoch = make_train_epoch(model_def, tx, guard="detect")
    n_steps = n_cells // batch
    data = _cells(n_cells, n_genes, sparse, density)
    key, idx, mask = epoch_grid(
        jax.random.key(0), jnp.arange(n_cells), n_steps=n_steps, batch_size=batch
    )
    plan = epoch.lower(key, state, data, idx, mask, jnp.ones(n_steps)).compile()
    used = plan.memory_analysis()
    measured = (
        used.argument_size_in_bytes
        + used.output_size_in_bytes
        + used.temp_size_in_bytes
        - used.alias_size_in_bytes
    )
    guess = jaxvi.memory.estimate(
        n_cells, n_genes, batch, n_hidden=64, n_batch=n_batch, sparse=sparse, density=density
    )
    assert 0.8 < guess.total / measured < 1.25, (guess, used)
    assert 0.75 < guess.activations / used.temp_size_in_bytes < 1.33, (guess, used)
    assert guess.parameters + guess.optimizer_state == pytest.approx(4 * _size(state), rel=0.02)
    counts = 4 * _size((data.x, data.indptr, data.indices, data.data))
    assert guess.data == pytest.approx(counts, rel=0.1)


def test_largest_dataset_is_the_edge_of_the_estimate():
    gb = 40e9
    for sparse in (False, True):
        n = largest_dataset(gb, 2000, 128, sparse=sparse, density=0.1)
        assert estimate(n, 2000, 128, sparse=sparse).total <= 0.9 * gb
        assert estimate(n + 128, 2000, 128, sparse=sparse).total > 0.9 * gb
    dense, csr = largest_dataset(gb, 2000), largest_dataset(gb, 2000, sparse=True, density=0.1)
    assert 4e6 < dense < 5e6  # 8 kB of counts per cell
    assert 4 * dense < csr < 6 * dense
    assert largest_dataset(1e6, 30_000, 4096) == 0


def test_estimate_refuses_what_is_not_a_dataset():
    with pytest.raises(ValueError, match="positive"):
        estimate(0, 100)
    with pytest.raises(ValueError, match="density"):
        estimate(10, 100, sparse=True, density=0.0)
