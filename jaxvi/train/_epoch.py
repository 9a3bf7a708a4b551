"""The training step and the compiled epoch, for any :class:`~jaxvi.module.ModelDef`.

Three layers, each a pure function of explicit inputs, key first:

* :func:`make_step` ``step(key, state, batch, kl_weight) -> (state, StepInfo)``: the loss's
  value and gradient, an optax update and the non-finite guard, for one minibatch (shaped
  like a blackjax kernel);
* :func:`epoch_grid` ``(key, cells) -> (step_key, idx, mask)``: one epoch's minibatches, a
  fresh on-device permutation of the cells cut into ``(n_steps, batch_size)`` with the
  ragged last minibatch masked (never padded with duplicated cells);
* :func:`make_train_epoch` ``epoch(key, state, data, idx, mask, kl_weights)``: one
  ``jax.jit`` call, a ``lax.scan`` of the step over the rows of the grid.

The grid and the per-step KL weights are arguments, so nothing recompiles between epochs;
metrics stay on the device and are read once per epoch. :func:`make_evaluate` is the
evaluation-mode counterpart (validation, and the ELBO queries of :mod:`jaxvi.posterior`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxvi.data import CellData, gather
from jaxvi.module import ModelDef
from jaxvi.train._state import EpochInfo, StepInfo, TrainState, variables_of

__all__ = ["epoch_grid", "make_evaluate", "make_step", "make_train_epoch"]

GUARDS = ("step", "detect", False)


def _tree_sum(tree) -> jax.Array:
    leaves = [jnp.sum(x) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.sum(jnp.stack(leaves)) if leaves else jnp.float32(0.0)


def _term_sums(terms, mask, n):
    """Per-cell terms summed over the real cells; scalar terms weighted by their number."""
    return {k: jnp.sum(v * mask) if jnp.ndim(v) else v * n for k, v in terms.items()}


def _check_guard(guard):
    guard = "step" if guard is True else guard
    if guard not in GUARDS:
        raise ValueError(f"guard must be 'step', 'detect' or False, got {guard!r}.")
    return guard


def make_step(
    model_def: ModelDef,
    tx: optax.GradientTransformation,
    *,
    guard: bool | str = "step",
    network_training: bool = True,
):
    """One training step of ``model_def`` with optimizer ``tx`` (traced inside the epoch).

    Parameters
    ----------
    model_def
        The model: its ``loss`` is differentiated with respect to ``state.params``.
    tx
        The optimizer (:func:`jaxvi.train.make_optimizer`).
    guard
        ``"step"`` (or True): check the loss, the gradients and the update, and take no step
        (updates zeroed, batch-norm statistics and step counter kept) when one is not finite
        or when ``healthy`` is False. ``"detect"``: only test the loss. False: no checks.
    network_training
        Run the loss in training mode (dropout, batch statistics); False trains with the
        network in evaluation mode (scvi-tools' scArches query training).

    Returns
    -------
    ``step(key, state, batch, kl_weight, healthy=True) -> (state, StepInfo)`` where ``batch``
    is a :class:`jaxvi.data.Minibatch` with its ``mask`` ``(cells,)`` set, ``kl_weight`` a
    ``()`` float and ``healthy`` a ``()`` bool (False once an earlier step failed).
    """
    guard = _check_guard(guard)

    def step(key, state: TrainState, batch, kl_weight, healthy=True):
        def loss_fn(params):
            variables = variables_of(state._replace(params=params))
            out, new_stats = model_def.loss(
                key, variables, batch, training=network_training, kl_weight=kl_weight
            )
            return out.loss, (out, new_stats)

        (loss, (out, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        n = jnp.sum(batch.mask)
        info = StepInfo(n, loss * n, _term_sums(out.terms, batch.mask, n), jnp.int32(0))
        if guard != "step":
            params = optax.apply_updates(state.params, updates)
            new = TrainState(params, new_stats, state.buffers, opt_state, state.step + 1)
            kind = jnp.where(jnp.isfinite(loss), 0, 1) if guard == "detect" else 0
            return new, info._replace(kind=jnp.int32(kind))
        # One scalar per tree: a NaN or inf anywhere makes the sum non-finite.
        # Non-finite gradients give non-finite Adam updates, so the update sum covers both;
        # the gradient sum is only evaluated (lax.cond) to name the culprit.
        loss_ok = jnp.isfinite(loss)
        updates_ok = jnp.isfinite(_tree_sum(updates))
        grads_ok = jax.lax.cond(
            updates_ok, lambda: jnp.bool_(True), lambda: jnp.isfinite(_tree_sum(grads))
        )
        kind = jnp.where(~loss_ok, 1, jnp.where(~grads_ok, 2, jnp.where(~updates_ok, 3, 0)))
        ok = (kind == 0) & healthy
        # Zeroed updates fuse into the elementwise optimizer arithmetic: parameters stay at
        # the last finite step at no extra pass over memory. Small trees are selected.
        updates = jax.tree_util.tree_map(lambda u: jnp.where(ok, u, 0.0), updates)
        params = optax.apply_updates(state.params, updates)
        stats = jax.tree_util.tree_map(
            lambda a, b: jnp.where(ok, a, b), new_stats, state.batch_stats
        )
        new = TrainState(
            params, stats, state.buffers, opt_state, state.step + ok.astype(jnp.int32)
        )
        return new, info._replace(kind=kind.astype(jnp.int32))

    return step


@functools.partial(jax.jit, static_argnames=("n_steps", "batch_size"))
def epoch_grid(key, cells, *, n_steps: int, batch_size: int):
    """One epoch's minibatches: a fresh permutation of ``cells`` cut into a grid.

    Parameters
    ----------
    key
        The epoch's (or block's) key; split into the permutation's key and the steps' key.
    cells
        ``(n_cells,)`` int32 indices into the cell data.
    n_steps, batch_size
        The grid's shape (``n_steps`` from :func:`jaxvi.train.steps_per_epoch`): cells past
        ``n_steps * batch_size`` (a dropped ragged minibatch) are left out.

    Returns
    -------
    ``(step_key, idx, mask)``: the key of the epoch's steps, ``(n_steps, batch_size)`` int32
    cell indices and float32 mask (1 for real cells, 0 for the padding of the last row).
    """
    k_perm, k_steps = jax.random.split(key)
    perm = jax.random.permutation(k_perm, cells)
    n_used = min(cells.shape[0], n_steps * batch_size)
    pad = n_steps * batch_size - n_used
    idx = jnp.concatenate([perm[:n_used], jnp.zeros((pad,), perm.dtype)])
    mask = (jnp.arange(n_steps * batch_size) < n_used).astype(jnp.float32)
    return k_steps, idx.reshape(n_steps, batch_size), mask.reshape(n_steps, batch_size)


def make_train_epoch(
    model_def: ModelDef,
    tx: optax.GradientTransformation,
    guard: bool | str = "step",
    network_training: bool = True,
):
    """Compile-once epoch function of ``model_def`` (see :func:`make_step`).

    ``guard`` chooses how non-finite values are caught:

    ``"step"`` (or True)
        Every step checks that its loss, gradients and optimizer update are finite (one sum
        per tree); from the first step that fails, parameter updates are zeroed and
        batch-norm statistics and the step counter kept, so the returned state holds the
        parameters of the last finite step (the optimizer moments are then not meaningful),
        and ``EpochInfo.bad_step`` / ``bad_kind`` say where and what failed (metrics cover
        the finite steps only). ``state`` is donated.
    ``"detect"``
        Nearly free: each step only tests its (scalar) loss, and the parameters are summed
        once at the end of the epoch. ``bad_step`` is the first step with a non-finite loss,
        or ``n_steps`` when only the parameters went non-finite; -1 if all is well. The
        state is *not* donated, so the caller can replay the epoch from it with ``"step"``
        to locate the failure and recover the last finite parameters (what
        :func:`jaxvi.train.fit` does).
    False
        No checks.

    Returns
    -------
    ``epoch(key, state, data, idx, mask, kl_weights, pair_idx=None, pair_mask=None) ->
    (state, EpochInfo)``: ``key`` the steps' key (step ``i`` uses ``fold_in(key, i)``),
    ``data`` a :class:`jaxvi.data.CellData`, ``idx`` and ``mask`` the
    ``(n_steps, batch_size)`` grid of :func:`epoch_grid` and ``kl_weights`` ``(n_steps,)``
    float32. ``pair_idx`` and ``pair_mask`` ``(n_steps, pair_size)``, when given, are a
    second grid: step ``i``'s minibatch carries the cells of its row as
    ``Minibatch.labelled`` (:func:`jaxvi.train.paired_grid`; scANVI's labelled cells).
    """
    guard = _check_guard(guard)
    step = make_step(model_def, tx, guard=guard, network_training=network_training)

    def epoch(
        key,
        state: TrainState,
        data: CellData,
        idx,
        mask,
        kl_weights,
        pair_idx=None,
        pair_mask=None,
    ):
        n_steps = idx.shape[0]

        def body(carry, xs):
            state, bad_step, bad_kind = carry
            i, idx_i, mask_i, kl_i, pair_i = xs
            batch = _paired_batch(data, idx_i, mask_i, pair_i)
            new, info = step(jax.random.fold_in(key, i), state, batch, kl_i, bad_step < 0)
            first = (info.kind != 0) & (bad_step < 0)
            sums = info._replace(kind=None)
            if guard == "step":
                ok = (info.kind == 0) & (bad_step < 0)
                sums = jax.tree_util.tree_map(lambda v: jnp.where(ok, v, 0.0), sums)
            bad_step = jnp.where(first, i, bad_step)
            bad_kind = jnp.where(first, info.kind, bad_kind)
            return (new, bad_step, bad_kind), sums

        carry = (state, jnp.int32(-1), jnp.int32(0))
        pair = None if pair_idx is None else (pair_idx, jnp.asarray(pair_mask, jnp.float32))
        steps = jnp.arange(n_steps, dtype=jnp.int32)
        xs = (steps, idx, mask, kl_weights.astype(jnp.float32), pair)
        (state, bad_step, bad_kind), sums = jax.lax.scan(body, carry, xs)
        if guard == "detect":
            params_ok = jnp.isfinite(_tree_sum(state.params))
            bad_step = jnp.where((bad_step < 0) & ~params_ok, n_steps, bad_step)
        total = jax.tree_util.tree_map(jnp.sum, sums)
        return state, EpochInfo(total.n_obs, total.loss_sum, total.terms, bad_step, bad_kind)

    return jax.jit(epoch, donate_argnums=() if guard == "detect" else (1,))


@functools.lru_cache(maxsize=32)
def make_evaluate(model_def: ModelDef):
    """Jitted loss and per-cell terms in evaluation mode (running BN statistics, no dropout),
    one per model (repeated fits share its compiled programs).

    Returns
    -------
    ``evaluate(key, variables, data, idx, mask=None, kl_weight=1.0, pair_idx=None,
    pair_mask=None) -> (loss, terms)`` for ``idx`` (and ``mask``) of shape
    ``(n_chunks, batch)``: ``loss`` ``(n_chunks,)`` is each chunk's loss (the mean over its
    real cells at ``kl_weight``), ``terms`` maps each named term of the loss to
    ``(n_chunks, batch)`` per-cell values (``(n_chunks,)`` for a scalar term). One draw per
    cell from ``fold_in(key, chunk)`` (as scvi-tools' ``get_elbo`` and validation), or the
    posterior mean when ``key`` is None. ``pair_idx`` / ``pair_mask`` ``(n_chunks, m)``: a
    second minibatch per chunk, as in :func:`make_train_epoch`.
    """

    def run(key, variables, data, idx, mask=None, kl_weight=1.0, pair_idx=None, pair_mask=None):
        def body(_, xs):
            i, idx_i, mask_i, pair_i = xs
            batch = _paired_batch(data, idx_i, mask_i, pair_i)
            k = None if key is None else jax.random.fold_in(key, i)
            out, _ = model_def.loss(k, variables, batch, training=False, kl_weight=kl_weight)
            return None, (out.loss, dict(out.terms))

        masks = None if mask is None else jnp.asarray(mask, jnp.float32)
        pair = None if pair_idx is None else (pair_idx, jnp.asarray(pair_mask, jnp.float32))
        _, outs = jax.lax.scan(body, None, (jnp.arange(idx.shape[0]), idx, masks, pair))
        return outs

    return jax.jit(run)


def _paired_batch(data: CellData, idx, mask, pair):
    """The minibatch of ``idx``, with the cells of ``pair = (pair_idx, pair_mask)`` (one row
    of the second grid) as its ``labelled`` minibatch when given."""
    batch = gather(data, idx, mask)
    if pair is None:
        return batch
    return batch._replace(labelled=gather(data, pair[0], pair[1]))
