"""Training engine: split, heuristics, KL warm-up, compile-once epochs, masking, determinism."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxvi.data import gather, to_device, with_log_factorial
from jaxvi.module import VAE, VAEConfig, init_variables, vae_loss, vae_model_def
from jaxvi.train import (
    PlanConfig,
    compute_kl_weight,
    fit,
    get_max_epochs_heuristic,
    init_train_state,
    make_optimizer,
    split_indices,
)


def _arrays(n=90, g=30, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.negative_binomial(3, 0.3, size=(n, g)).astype(np.float32)
    return {
        "X": x,
        "batch_index": (np.arange(n) % 2).astype(np.int32),
        "labels": np.zeros(n, np.int32),
        "cat_covs": None,
        "cont_covs": None,
        "size_factor": None,
    }


def _state(config, plan, seed=0):
    variables = init_variables(config, jax.random.key(seed))
    return init_train_state(vae_model_def(config), variables, plan)[0]


CONFIG = VAEConfig(n_input=30, n_batch=2, n_hidden=16, n_latent=4)


def _fit(plan=None, n_train=90, n_val=0, max_epochs=2, **kwargs):
    """Train the small CONFIG model on _arrays(): cells [0, n_train) train, the next n_val
    validate."""
    plan = plan or PlanConfig()
    return fit(
        vae_model_def(CONFIG),
        _state(CONFIG, plan),
        to_device(_arrays()),
        train_idx=np.arange(n_train),
        val_idx=np.arange(n_train, n_train + n_val),
        plan=plan,
        max_epochs=max_epochs,
        batch_size=32,
        progress_bar=False,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("n_obs", "expected"), [(400, 400), (20_000, 400), (50_000, 160), (1_000_000, 8)]
)
def test_max_epochs_heuristic(n_obs, expected):
    assert get_max_epochs_heuristic(n_obs) == expected


def test_max_epochs_heuristic_warns_at_one():
    with pytest.warns(UserWarning, match="set to 1"):
        assert get_max_epochs_heuristic(10_000_000) == 1


@pytest.mark.parametrize(("n", "n_train", "n_val"), [(400, 360, 40), (1000, 900, 100)])
def test_split_sizes_match_reference(n, n_train, n_val):
    train, val, test = split_indices(n, seed=0)
    assert (len(train), len(val), len(test)) == (n_train, n_val, 0)
    assert len(np.intersect1d(train, val)) == 0
    perm = np.random.RandomState(0).permutation(n)
    np.testing.assert_array_equal(val, perm[:n_val])  # validation first, then train


def test_split_moves_tiny_last_batch_to_validation():
    train, val, _ = split_indices(1291, seed=0)  # 1162 = 9 * 128 + 10: nothing moves
    assert (len(train), len(val)) == (1162, 129)
    with pytest.warns(UserWarning, match="moved from training set"):
        train, val, _ = split_indices(144, batch_size=128, seed=1)  # ceil(129.6) = 128 + 2
    assert (len(train), len(val)) == (128, 16)
    with pytest.warns(UserWarning, match="small size of 2"):
        train, val, _ = split_indices(144, train_size=0.9, batch_size=128, seed=1)
    assert (len(train), len(val)) == (130, 14)


def test_split_with_test_set_and_bad_sizes():
    train, val, test = split_indices(100, train_size=0.5, validation_size=0.3, seed=0)
    assert (len(train), len(val), len(test)) == (50, 30, 20)
    with pytest.raises(ValueError, match="train_size"):
        split_indices(100, train_size=1.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_indices(100, train_size=0.8, validation_size=0.5)


def test_kl_weight_epoch_and_step_modes():
    plan = PlanConfig()
    np.testing.assert_allclose(compute_kl_weight(plan, 3, np.arange(2)), [0.0075, 0.0075])
    np.testing.assert_allclose(compute_kl_weight(plan, 500, np.arange(1)), [1.0])
    steps = PlanConfig(n_epochs_kl_warmup=None, n_steps_kl_warmup=10)
    np.testing.assert_allclose(compute_kl_weight(steps, 0, np.array([0, 5, 12])), [0, 0.5, 1])
    none = PlanConfig(n_epochs_kl_warmup=None)
    np.testing.assert_allclose(compute_kl_weight(none, 0, np.arange(1)), [1.0])


def test_plan_kwargs_unknown_name():
    with pytest.raises(ValueError, match="Unknown plan_kwargs"):
        PlanConfig.from_kwargs({"learning_rate": 1e-3})


def test_optimizer_is_coupled_l2_adam():
    """One step equals torch Adam with weight_decay added to the gradient."""
    plan = PlanConfig(weight_decay=0.1)
    tx = make_optimizer(plan)
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([0.5, 0.25])}
    upd, _ = tx.update(g, tx.init(p), p)
    g_l2 = g["w"] + 0.1 * p["w"]
    m, v = 0.1 * g_l2, 0.001 * g_l2**2
    expected = -1e-3 * (m / 0.1) / (jnp.sqrt(v / 0.001) + 0.01)
    np.testing.assert_allclose(upd["w"], expected, rtol=1e-5)


def test_epoch_compiles_once_and_metrics_are_finite():
    state, history, epoch_fn = _fit(n_train=80, n_val=10, max_epochs=4, check_val_every_n_epoch=2)
    assert epoch_fn._cache_size() == 1  # KL weight changed every epoch, no recompilation
    assert int(state.step) == 4 * 3
    assert list(history["kl_weight"]["kl_weight"]) == [0.0, 1 / 400, 2 / 400, 3 / 400]
    assert list(history["elbo_validation"].index) == [1, 3]
    for key in ("train_loss", "elbo_train", "reconstruction_loss_train", "kl_local_train"):
        assert np.all(np.isfinite(history[key][key]))
    h = history
    np.testing.assert_allclose(
        h["elbo_train"]["elbo_train"],
        h["reconstruction_loss_train"]["reconstruction_loss_train"]
        + h["kl_local_train"]["kl_local_train"],
    )


def test_training_is_deterministic_and_seed_dependent():
    def run(seed):
        state, hist, _ = _fit(seed=seed)
        return state.params, hist["train_loss"]["train_loss"].to_numpy()

    p1, l1 = run(0)
    p2, l2 = run(0)
    p3, l3 = run(1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p1, p2)
    np.testing.assert_array_equal(l1, l2)
    assert not np.array_equal(l1, l3)


def test_loss_decreases():
    _, hist, _ = _fit(PlanConfig(lr=1e-2), max_epochs=15)
    loss = hist["reconstruction_loss_train"]["reconstruction_loss_train"].to_numpy()
    assert loss[-1] < 0.9 * loss[0]


def test_masked_padding_equals_real_cells_only():
    """A ragged batch padded with masked cells gives the loss, gradients and BN stats of the
    real cells alone."""
    config = VAEConfig(n_input=30, n_batch=2, n_hidden=16, n_latent=4, dropout_rate=0.0)
    module = VAE(config)
    v = init_variables(config, jax.random.key(0))
    data = to_device(_arrays())
    real = jnp.arange(5)
    padded = jnp.concatenate([real, jnp.array([7, 8, 9])])
    mask = jnp.array([1, 1, 1, 1, 1, 0, 0, 0], jnp.float32)

    @jax.jit
    def loss_and_grad(params, idx, mask):
        def f(p):
            out, stats = vae_loss(
                module, {**v, "params": p}, gather(data, idx, mask), key=None, training=True
            )
            return out.loss, stats

        return jax.value_and_grad(f, has_aux=True)(params)

    (l1, s1), g1 = loss_and_grad(v["params"], real, jnp.ones(5))
    (l2, s2), g2 = loss_and_grad(v["params"], padded, mask)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g2)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), s1, s2)


def test_drop_last_uses_full_batches_only():
    state, _, _ = _fit(drop_last=True)
    assert int(state.step) == 2 * 2


def test_early_stopping_stops():
    # lr 0: nothing improves, so training stops after `patience` validations.
    _, hist, _ = _fit(
        PlanConfig(lr=0.0),
        n_train=80,
        n_val=10,
        max_epochs=50,
        early_stopping=True,
        early_stopping_patience=3,
    )
    assert len(hist["train_loss"]) < 50


def test_reduce_lr_on_plateau_lowers_lr():
    # No epoch improves by 1e9, so the rate falls after every second epoch.
    plan = PlanConfig(reduce_lr_on_plateau=True, lr_patience=1, lr_threshold=1e9)
    state, _, _ = _fit(plan, n_train=80, n_val=10, max_epochs=6)
    assert float(state.opt_state.hyperparams["learning_rate"]) < 1e-3


def test_sparse_and_dense_device_data_agree():
    import scipy.sparse as sp

    arrays = _arrays()
    dense = to_device(arrays)
    sparse = to_device({**arrays, "X": sp.csr_matrix(arrays["X"])}, sparse=True)
    idx = jnp.array([3, 0, 89, 17])
    np.testing.assert_array_equal(
        jax.jit(lambda d: gather(d, idx).x)(dense), jax.jit(lambda d: gather(d, idx).x)(sparse)
    )


def test_optimizer_options():
    assert isinstance(make_optimizer(PlanConfig(optimizer="AdamW")), optax.GradientTransformation)
    with pytest.raises(ValueError, match="optimizer"):
        PlanConfig.from_kwargs({"optimizer": "SGD"})


def test_unused_parameters_are_never_updated():
    """As in PyTorch, parameters without a gradient get no weight decay and no Adam step."""
    from jaxvi.module import trainable_mask

    start = init_variables(CONFIG, jax.random.key(0))["params"]
    state, _, _ = _fit(max_epochs=2)
    mask = trainable_mask(CONFIG, start)
    assert not mask["l_encoder"]["mean_encoder"]["kernel"]
    assert not mask["decoder"]["px_r_decoder"]["kernel"]
    assert mask["decoder"]["px_dropout_decoder"]["kernel"]  # zinb uses it
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), start, state.params)
    assert jax.tree_util.tree_leaves(changed) == jax.tree_util.tree_leaves(mask)
    poisson = VAEConfig(n_input=30, gene_likelihood="poisson")
    pmask = trainable_mask(poisson, init_variables(poisson, jax.random.key(0))["params"])
    assert not pmask["px_r"]
    assert not pmask["decoder"]["px_dropout_decoder"]["bias"]


def test_precomputed_log_factorial_gives_the_same_loss_and_gradients():
    """to_device sums lgamma(x + 1) per cell once; the loss then skips it per step."""
    import scipy.sparse as sp
    from scipy.special import gammaln

    arrays = _arrays()
    x = arrays["X"].astype(np.float64)
    for data in (
        to_device(arrays),
        to_device({**arrays, "X": sp.csr_matrix(arrays["X"])}, sparse=True),
    ):
        np.testing.assert_allclose(data.log_x_factorial, gammaln(x + 1).sum(1), rtol=1e-6)
        on_device = with_log_factorial(data.replace(log_x_factorial=None))  # dense / CSR jit
        np.testing.assert_allclose(on_device.log_x_factorial, gammaln(x + 1).sum(1), rtol=1e-6)
    data = to_device(arrays)
    module = VAE(CONFIG)
    variables = init_variables(CONFIG, jax.random.key(1))
    idx = jnp.arange(32)

    @functools.partial(jax.jit, static_argnums=1)
    def loss_and_grad(variables, precomputed):
        batch = gather(data, idx)
        if not precomputed:
            batch = batch._replace(log_x_factorial=None)

        def f(params):
            out, _ = vae_loss(
                module,
                {**variables, "params": params},
                batch,
                key=jax.random.key(2),
                training=True,
            )
            return out.loss, out.reconstruction_loss

        return jax.value_and_grad(f, has_aux=True)(variables["params"])

    (loss_a, rec_a), grad_a = loss_and_grad(variables, True)
    (loss_b, rec_b), grad_b = loss_and_grad(variables, False)
    np.testing.assert_allclose(rec_a, rec_b, rtol=2e-6)
    np.testing.assert_allclose(loss_a, loss_b, rtol=2e-6)
    for a, b in zip(
        jax.tree_util.tree_leaves(grad_a), jax.tree_util.tree_leaves(grad_b), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
