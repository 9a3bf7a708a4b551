"""Paired minibatches in the engine (:mod:`jaxvi.train._paired`): a second minibatch per step,
drawn from a subset of the cells and cycled, as scvi-tools' semi-supervised loader.

The grid (shuffle, ragged row, ``drop_last``, cycling), the per-group subsampling, the
mapping to block positions, and the compiled epoch giving step ``i`` the cells of row ``i``
of the second grid (checked through a model whose loss reports those cells).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvi.data import CellData
from jaxvi.module import LossOutput, ModelDef
from jaxvi.train import (
    PairedCells,
    PlanConfig,
    epoch_grid,
    fit,
    init_train_state,
    make_evaluate,
    make_train_epoch,
    paired_grid,
    paired_positions,
)


def test_grid_cycles_the_pass():
    idx, mask = paired_grid(np.arange(10, 17), 5, 3)  # rows [10 11 12] [13 14 15] [16 . .]
    assert idx.shape == (5, 3)
    np.testing.assert_array_equal(idx[:3][mask[:3] > 0], np.arange(10, 17))
    np.testing.assert_array_equal(idx[3:], idx[:2])  # the same minibatches again
    np.testing.assert_array_equal(mask[:, 0], 1.0)
    np.testing.assert_array_equal(mask[2], [1, 0, 0])
    dropped, dmask = paired_grid(np.arange(7), 3, 3, drop_last=True)
    assert dmask.min() == 1.0
    np.testing.assert_array_equal(dropped[2], dropped[0])
    shuffled, _ = paired_grid(np.arange(50), 2, 25, rng=np.random.default_rng(0))
    assert sorted(shuffled.ravel()) == list(range(50))
    assert list(shuffled.ravel()) != list(range(50))
    with pytest.raises(ValueError, match="empty"):
        paired_grid(np.arange(2), 4, 3, drop_last=True)


def test_groups_are_subsampled_without_replacement():
    groups = (np.arange(0, 10), np.arange(10, 13), np.arange(20, 40))
    paired = PairedCells(groups, (np.arange(50, 60),), n_per_group=4)
    assert paired.n_cells("train") == 4 + 3 + 4
    rows = paired.rows("train", np.random.default_rng(1))
    assert len(rows) == 11
    assert len(set(rows.tolist())) == 11
    assert set(rows[:4]) <= set(groups[0].tolist())
    np.testing.assert_array_equal(rows[4:7], groups[1])  # fewer than 4: all kept
    assert set(rows[7:]) <= set(groups[2].tolist())
    other = paired.rows("train", np.random.default_rng(2))
    assert not np.array_equal(rows, other)  # drawn anew
    assert PairedCells(groups).n_cells("train") == 33
    with pytest.raises(ValueError, match=">= 1"):
        PairedCells(groups, n_per_group=0)


def test_positions_in_a_block():
    cells = np.array([40, 10, 30, 20])
    positions = np.array([0, 1, 2, 3])
    idx = np.array([[30, 10], [20, 0]])
    mask = np.array([[1, 1], [1, 0]], np.float32)
    np.testing.assert_array_equal(paired_positions(idx, mask, cells, positions), [[2, 1], [3, 0]])
    with pytest.raises(ValueError, match="among the cells"):
        paired_positions(np.array([[99]]), np.ones((1, 1)), cells, positions)


def _probe_model() -> ModelDef:
    """A one-parameter model whose loss reports the cells of its paired minibatch: the sum
    of their ``labels`` (set to the cell's row) times the first cell of the main one."""

    def loss(key, variables, batch, *, training, kl_weight=1.0):
        w = variables["params"]["w"]
        value = jnp.sum(jnp.square(w)) * jnp.sum(batch.mask)
        terms = {"rec": jnp.zeros_like(batch.mask)}
        if batch.labelled is not None:
            pair = jnp.sum(batch.labelled.labels * batch.labelled.mask)
            terms["paired"] = pair * batch.labels[0]
            terms["paired_n"] = jnp.sum(batch.labelled.mask)
        return LossOutput(value, terms), variables["batch_stats"]

    return ModelDef(
        "probe",
        lambda key: {"params": {"w": jnp.ones(())}, "batch_stats": {}},
        loss,
        lambda p: jax.tree_util.tree_map(lambda _: True, p),
        prefixed_terms=frozenset({"paired_n"}),
    )


def _data(n: int) -> CellData:
    return CellData(
        x=jnp.ones((n, 2)),
        indptr=None,
        indices=None,
        data=None,
        batch_index=jnp.zeros(n, jnp.int32),
        labels=jnp.arange(n, dtype=jnp.int32),
        cat_covs=None,
        cont_covs=None,
        size_factor=None,
        n_genes=2,
    )


def test_epoch_gives_step_i_row_i_of_the_second_grid():
    model = _probe_model()
    plan = PlanConfig()
    state, tx = init_train_state(model, model.init(jax.random.key(0)), plan)
    cells = jnp.arange(24, dtype=jnp.int32)
    k, idx, mask = epoch_grid(jax.random.key(3), cells, n_steps=3, batch_size=8)
    p_idx, p_mask = paired_grid(np.arange(5, 12), 3, 4)  # 2 rows, cycled
    epoch = make_train_epoch(model, tx, guard="detect")
    _, info = epoch(k, state, _data(24), idx, mask, jnp.ones(3), p_idx, p_mask)
    expected = sum(8 * (p_idx[i] * p_mask[i]).sum() * int(idx[i, 0]) for i in range(3))
    np.testing.assert_allclose(float(info.terms["paired"]), expected)
    np.testing.assert_allclose(float(info.terms["paired_n"]), 8 * (4 + 3 + 4))
    _, plain = make_train_epoch(model, tx, guard="detect")(
        k, state, _data(24), idx, mask, jnp.ones(3)
    )
    assert "paired" not in plain.terms  # without the second grid the minibatch has none
    evaluate = make_evaluate(model)
    _, terms = evaluate(None, model.init(None), _data(24), idx, mask, 1.0, p_idx, p_mask)
    np.testing.assert_allclose(terms["paired_n"], [4, 3, 4])


def test_fit_pairs_training_and_validation():
    model = _probe_model()
    state, _ = init_train_state(model, model.init(jax.random.key(0)), PlanConfig())
    paired = PairedCells((np.arange(0, 6),), (np.arange(20, 23),))
    _, history, _ = fit(
        model,
        state,
        _data(24),
        train_idx=np.arange(0, 16),
        val_idx=np.arange(16, 24),
        plan=PlanConfig(),
        max_epochs=2,
        batch_size=4,
        check_val_every_n_epoch=1,
        progress_bar=False,
        paired=paired,
    )
    # 4 steps of 4 cells, each paired with 4 then 2 labelled cells (cycled): 4*(4+2+4+2)/16
    np.testing.assert_allclose(history["train_paired_n"].to_numpy(), 3.0)
    # validation: 2 chunks of 4, each paired with the 3 validation cells
    np.testing.assert_allclose(history["validation_paired_n"].to_numpy(), 3.0)
    assert "paired_train" in history  # not prefixed: <name>_train
    with pytest.raises(ValueError, match="empty"):
        fit(
            model,
            state,
            _data(24),
            train_idx=np.arange(16),
            val_idx=np.arange(16, 24),
            plan=PlanConfig(),
            max_epochs=1,
            batch_size=8,
            drop_last=True,
            progress_bar=False,
            paired=paired,
        )
