"""Tests of ``jaxvi.likelihoods`` against scipy, numpyro and scvi-tools.

Ground truth is scipy in float64; numpyro and scvi-tools' own torch functions are
cross-checks in float32. Every evaluation of a likelihood goes through ``jax.jit``.
float64 is enabled only inside the tests that take the ``x64`` fixture (see conftest.py).
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from jax.test_util import check_grads
from scipy import special, stats

from jaxvi.likelihoods import (
    EPS,
    Likelihood,
    PxParams,
    available_likelihoods,
    get_likelihood,
    nb_log_prob,
    normal_log_prob,
    poisson_log_prob,
    register_likelihood,
    zinb_log_prob,
)

LIKELIHOODS = ["zinb", "nb", "poisson", "normal"]
COUNT_LIKELIHOODS = ["zinb", "nb", "poisson"]
# Which of (mu, theta, zi_logits) each likelihood reads.
USED_ARGNUMS = {"zinb": (0, 1, 2), "nb": (0, 1), "poisson": (0,), "normal": (0, 1)}


def _jit_log_prob(name):
    lik = get_likelihood(name)
    return jax.jit(lambda x, mu, theta, pi: lik.log_prob(x, PxParams(mu, theta, pi)))


def _cases(name, seed=0, shape=(64, 50), mu_range=(1e-2, 1e3), theta_range=(1e-2, 1e3)):
    """Random float64 (x, mu, theta, zi_logits); counts have about 30% extra zeros."""
    rng = np.random.default_rng(seed)
    mu = np.exp(rng.uniform(*np.log(mu_range), shape))
    theta = np.exp(rng.uniform(*np.log(theta_range), shape))
    pi = rng.normal(0.0, 3.0, shape)
    if name == "normal":
        mu = rng.normal(0.0, 10.0, shape)
        x = mu + theta * rng.normal(size=shape) * rng.uniform(0.0, 3.0, shape)
    else:
        x = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float64)
        x[rng.random(shape) < 0.3] = 0.0
    return x, mu, theta, pi


def _scipy_log_prob(name, x, mu, theta, pi):
    """float64 reference log-likelihoods (the ZINB mixture built by hand)."""
    if name == "normal":
        return stats.norm.logpdf(x, mu, theta)
    if name == "poisson":
        return stats.poisson.logpmf(x, mu)
    log_nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    if name == "nb":
        return log_nb
    # log(sigmoid(pi) + (1 - sigmoid(pi)) NB(0)) at 0, log(1 - sigmoid(pi)) + log NB(x) else.
    log_gate, log_keep = special.log_expit(pi), special.log_expit(-pi)
    return np.where(x == 0, np.logaddexp(log_gate, log_keep + log_nb), log_keep + log_nb)


def _assert_close(actual, desired, *, rtol, atol):
    """``|actual - desired| <= atol + rtol |desired|`` elementwise; ``atol`` may be an array."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    err = np.abs(actual - desired)
    bound = atol + rtol * np.abs(desired)
    bad = ~(err <= bound)
    worst = np.unravel_index(np.argmax(np.where(np.isnan(err), np.inf, err / bound)), err.shape)
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} elements off; worst at {worst}: "
        f"actual {actual[worst]!r}, desired {desired[worst]!r}, "
        f"bound {np.broadcast_to(bound, err.shape)[worst]:.3g}"
    )


def _f32_atol(name, x, mu, theta, pi, floor=1e-4):
    """Absolute float32 tolerance: ``floor`` plus 8 ulps of the sum of the terms' sizes.

    The formulas add terms much larger than their result (at x = 3606, gammaln(x + theta) and
    gammaln(x + 1) are ~2.6e4 while the log-likelihood is ~-1), and each term is rounded to
    float32 (unit 2**-24 ~ 6e-8). So the error is a few ulps of the largest *term*, ~2e-3
    there, not of the result. scvi-tools' torch code has the same float32 behaviour.
    Measured: errors reach at most 0.4 of this bound against scipy, numpyro and scvi-tools.
    """
    x, mu, theta, pi = (np.asarray(a, np.float64) for a in (x, mu, theta, pi))
    if name == "normal":
        size = np.square(x - mu) / (2 * np.square(theta)) + np.abs(np.log(theta)) + 1.0
    elif name == "poisson":
        size = np.abs(special.xlogy(x, mu)) + mu + special.gammaln(x + 1)
    else:
        size = (
            np.abs(theta * np.log(theta / (theta + mu)))
            + np.abs(x * np.log(mu / (theta + mu)))
            + np.abs(special.gammaln(x + theta))
            + np.abs(special.gammaln(theta))
            + special.gammaln(x + 1)
            + np.abs(pi)
        )
    return floor + 8 * 2.0**-24 * size


# ---------------------------------------------------------------------------------------------
# 1. float64 agreement with scipy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_matches_scipy_float64(x64, name):
    x, mu, theta, pi = _cases(name)
    ours = np.asarray(_jit_log_prob(name)(x, mu, theta, pi))
    assert ours.dtype == np.float64
    ref = _scipy_log_prob(name, x, mu, theta, pi)
    if name in ("nb", "zinb"):
        # scvi-tools' eps = 1e-8 inside the logs moves the result by (to first order)
        # eps * (1 - theta/(theta+mu)) + x * eps * (1/mu - 1/(theta+mu)) <= eps * (1 + x/mu):
        # ~1e-8 relative in the normal range, but 1e-4 absolute at x=100, mu=0.01.
        # That shift is part of the parity with scvi-tools, so the tolerance is that bound
        # (times 2) plus float64 round-off. Measured: max |err| = 6e-7, |err| / bound <= 0.5.
        atol = 2 * EPS * (1.0 + x / mu) + 1e-12 * (1.0 + np.abs(ref))
        np.testing.assert_array_less(np.abs(ours - ref), atol)
        # The formula's rtol is ~1e-6 when mu is not tiny.
        normal_range = mu > 0.1
        np.testing.assert_allclose(ours[normal_range], ref[normal_range], rtol=1e-6, atol=1e-8)
    else:
        # No eps in these formulas: round-off only (measured <= 4e-13 relative).
        np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_nb_without_eps_is_exact_float64(x64):
    """With eps=0 the NB formula itself matches scipy to float64 round-off."""
    x, mu, theta, _ = _cases("nb", seed=1)
    f = jax.jit(lambda x, mu, theta: nb_log_prob(x, mu, theta, eps=0.0))
    ref = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    # gammaln(x + theta) - gammaln(x + 1) cancel terms up to ~1e4 here: measured 4e-11 abs.
    np.testing.assert_allclose(np.asarray(f(x, mu, theta)), ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# 2. float32 agreement with numpyro
# ---------------------------------------------------------------------------------------------


def _numpyro_log_prob(name, x, mu, theta, pi):
    if name == "zinb":
        d = dist.ZeroInflatedNegativeBinomial2(mu, theta, gate_logits=pi)
    elif name == "nb":
        d = dist.NegativeBinomial2(mu, theta)
    elif name == "poisson":
        d = dist.Poisson(mu)
    else:
        d = dist.Normal(mu, theta)
    return d.log_prob(x)


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_matches_numpyro_float32(name):
    x, mu, theta, pi = (a.astype(np.float32) for a in _cases(name, seed=2, theta_range=(0.1, 1e2)))
    ours = _jit_log_prob(name)(x, mu, theta, pi)
    ref = jax.jit(lambda *a: _numpyro_log_prob(name, *a))(x, mu, theta, pi)
    assert ours.dtype == ref.dtype == jnp.float32
    # numpyro's NB goes through betaln (~1e-6 accurate even in float64); see _f32_atol.
    atol = _f32_atol(name, x, mu, theta, pi)
    _assert_close(ours, ref, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_float32_close_to_scipy(name):
    """float32 results against the float64 ground truth (no cross-check library between)."""
    x, mu, theta, pi = _cases(name, seed=3, theta_range=(0.1, 1e2))
    x, mu, theta, pi = (a.astype(np.float32) for a in (x, mu, theta, pi))
    ours = _jit_log_prob(name)(x, mu, theta, pi)
    ref = _scipy_log_prob(name, *(a.astype(np.float64) for a in (x, mu, theta, pi)))
    atol = _f32_atol(name, x, mu, theta, pi)
    _assert_close(ours, ref, rtol=1e-4, atol=atol)


# ---------------------------------------------------------------------------------------------
# 3. Parity with scvi-tools' torch functions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["zinb", "nb"])
def test_matches_scvi_tools_torch(name):
    pytest.importorskip("scvi")
    torch = pytest.importorskip("torch")
    from scvi.distributions._negative_binomial import log_nb_positive, log_zinb_positive

    x, mu, theta, pi = (a.astype(np.float32) for a in _cases(name, seed=4, theta_range=(0.1, 1e2)))
    t = [torch.from_numpy(a) for a in (x, mu, theta, pi)]
    if name == "zinb":
        ref = log_zinb_positive(*t).numpy()  # default eps=1e-8, as ours
    else:
        ref = log_nb_positive(*t[:3]).numpy()
    ours = np.asarray(_jit_log_prob(name)(x, mu, theta, pi))
    assert ref.dtype == ours.dtype == np.float32
    # Same formula, same float32 inputs: differences are lgamma/log rounding only, i.e. a few
    # ulps of the largest term (see _f32_atol); ~1e-6 relative where the terms are O(result).
    _assert_close(ours, ref, rtol=1e-5, atol=_f32_atol(name, x, mu, theta, pi, floor=1e-5))


def test_scvi_tools_1d_theta_broadcast():
    """scvi-tools reshapes a 1-D theta to (1, genes); plain broadcasting gives the same."""
    pytest.importorskip("scvi")
    torch = pytest.importorskip("torch")
    from scvi.distributions._negative_binomial import log_zinb_positive

    x, mu, _, pi = (a.astype(np.float32) for a in _cases("zinb", seed=5, shape=(8, 6)))
    theta = np.linspace(0.3, 30.0, 6, dtype=np.float32)
    ref = log_zinb_positive(*(torch.from_numpy(a) for a in (x, mu, theta, pi))).numpy()
    ours = np.asarray(jax.jit(zinb_log_prob)(x, mu, theta, pi))
    _assert_close(ours, ref, rtol=1e-5, atol=_f32_atol("zinb", x, mu, theta, pi, floor=1e-5))


# ---------------------------------------------------------------------------------------------
# 4. Second-order gradients (float64, reverse mode against finite differences)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_second_order_gradients(x64, name):
    x = jnp.array([0.0, 0.0, 1.0, 3.0, 7.0, 20.0])
    full = (
        jnp.array([0.3, 4.0, 1.5, 2.0, 15.0, 8.0]),  # mu
        jnp.array([0.7, 2.0, 5.0, 40.0, 1.2, 3.0]),  # theta
        jnp.array([-1.5, 2.0, 0.2, -0.5, 1.0, -3.0]),  # zi_logits
    )
    argnums = USED_ARGNUMS[name]
    log_prob = get_likelihood(name).log_prob

    def f(*diff_args):
        args = list(full)
        for i, a in zip(argnums, diff_args, strict=True):
            args[i] = a
        return log_prob(x, PxParams(*args))

    check_grads(jax.jit(f), tuple(full[i] for i in argnums), order=2, modes=("rev",))


# ---------------------------------------------------------------------------------------------
# 5. Numerical safety in float32 at extreme parameters
# ---------------------------------------------------------------------------------------------

_EXTREME_GRID = np.array(
    list(
        itertools.product(
            [0.0, 1.0, 3.0, 1e4],  # x
            [1e-10, 1e-4, 1.0, 1e4, 1e6],  # mu
            [1e-4, 1e-2, 1.0, 1e4, 1e8],  # theta (the scale for "normal")
            [-50.0, -5.0, 0.0, 5.0, 50.0],  # zi_logits
        )
    ),
    dtype=np.float32,
).T


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_finite_values_and_gradients_float32(name):
    x, mu, theta, pi = (jnp.asarray(a) for a in _EXTREME_GRID)
    log_prob = get_likelihood(name).log_prob

    def f(mu, theta, pi):
        return log_prob(x, PxParams(mu, theta, pi))

    value = jax.jit(f)(mu, theta, pi)
    grads = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(mu, theta, pi)
    assert value.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(value))), np.asarray(_EXTREME_GRID.T[~np.isfinite(value)])
    for arg, g in zip(("mu", "theta", "zi_logits"), grads, strict=True):
        assert g.dtype == jnp.float32
        assert bool(jnp.all(jnp.isfinite(g))), (arg, _EXTREME_GRID.T[~np.isfinite(g)])


@pytest.mark.parametrize("name", COUNT_LIKELIHOODS)
def test_zero_mean_float32(name):
    """mu == 0 exactly (library * softmax can underflow): finite where the count is possible."""
    x = jnp.array([0.0, 0.0, 0.0, 3.0, 3.0])
    mu = jnp.zeros(5)
    theta = jnp.array([1.0, 1e-4, 1e8, 1.0, 1e8])
    pi = jnp.array([0.0, 50.0, -50.0, -50.0, 0.0])
    if name == "poisson":  # P(x > 0 | rate 0) = 0: -inf is the right answer there.
        x, mu, theta, pi = x[:3], mu[:3], theta[:3], pi[:3]
    log_prob = get_likelihood(name).log_prob

    def f(mu, theta, pi):
        return log_prob(x, PxParams(mu, theta, pi))

    value = jax.jit(f)(mu, theta, pi)
    grads = jax.jit(jax.grad(lambda *a: f(*a).sum(), argnums=(0, 1, 2)))(mu, theta, pi)
    assert bool(jnp.all(jnp.isfinite(value)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    if name == "poisson":
        np.testing.assert_allclose(np.asarray(grads[0]), -1.0)  # d/dmu (-mu)


N_DRAWS = 4000
_SAMPLE_MU = [0.5, 3.0, 20.0, 100.0, 7.0]
_SAMPLE_THETA = [0.5, 2.0, 10.0, 1.0, 50.0]
_SAMPLE_PI = [-2.0, 0.0, 1.0, -1.0, -4.0]
# Compiling a sampler (jax.random.gamma / poisson loops) costs seconds per shape, so every
# sampling test uses this one shape and the compiled code is shared through jit's cache.
SAMPLE_SHAPE = (N_DRAWS, len(_SAMPLE_MU))


def _sample_params():
    return PxParams(
        *(
            jnp.broadcast_to(jnp.asarray(v, jnp.float32), SAMPLE_SHAPE)
            for v in (_SAMPLE_MU, _SAMPLE_THETA, _SAMPLE_PI)
        )
    )


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_finite_samples_float32(name, key):
    combos = np.array(
        list(
            itertools.product(
                [1e-10, 1e-4, 1.0, 1e4, 1e6, 1e9, 1e12],  # mu, beyond the 1e8 rate clamp too
                [1e-4, 1e-2, 1.0, 1e4, 1e8],  # theta
                [-50.0, 0.0, 50.0],  # zi_logits
            )
        ),
        dtype=np.float32,
    )
    mu, theta, pi = (np.resize(c, SAMPLE_SHAPE) for c in combos.T)
    s = jax.jit(get_likelihood(name).sample)(key, PxParams(mu, theta, pi))
    assert s.shape == SAMPLE_SHAPE
    assert bool(jnp.all(jnp.isfinite(s)))
    if name != "normal":
        assert bool(jnp.all(s >= 0))


# ---------------------------------------------------------------------------------------------
# 6. Sampling moments and normalisation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_sample_moments(name, key):
    lik = get_likelihood(name)
    params = _sample_params()
    s = jax.jit(lik.sample)(key, params)
    assert s.shape == params.mu.shape
    assert s.dtype == jnp.float32
    s = np.asarray(s, np.float64)
    if name in COUNT_LIKELIHOODS:
        assert np.all(s >= 0)
        np.testing.assert_array_equal(s, np.round(s))
    mean = np.asarray(jax.jit(lik.mean)(params))[0]
    var = np.asarray(jax.jit(lik.variance)(params))[0]
    # Bounds of 5 standard errors; the key is fixed, so the test is deterministic.
    emp_mean, emp_var = s.mean(0), s.var(0, ddof=1)
    np.testing.assert_array_less(np.abs(emp_mean - mean), 5 * np.sqrt(var / N_DRAWS))
    m4 = np.mean((s - emp_mean) ** 4, axis=0)  # SE(var) ~ sqrt((m4 - var^2) / n)
    np.testing.assert_array_less(np.abs(emp_var - var), 5 * np.sqrt((m4 - emp_var**2) / N_DRAWS))


def test_zinb_zero_fraction(key):
    params = _sample_params()
    s = np.asarray(jax.jit(get_likelihood("zinb").sample)(key, params))
    mu, theta, pi = (np.asarray(v, np.float64) for v in (_SAMPLE_MU, _SAMPLE_THETA, _SAMPLE_PI))
    gate = special.expit(pi)
    p0 = gate + (1 - gate) * (theta / (theta + mu)) ** theta
    frac = (s == 0).mean(0)
    np.testing.assert_array_less(np.abs(frac - p0), 5 * np.sqrt(p0 * (1 - p0) / N_DRAWS))


@pytest.mark.parametrize("name", COUNT_LIKELIHOODS)
@pytest.mark.parametrize(
    ("mu", "theta", "pi"),
    [(0.1, 0.5, -1.0), (5.0, 3.0, 0.5), (50.0, 0.5, 2.0), (200.0, 30.0, -3.0)],
)
def test_normalised(x64, name, mu, theta, pi):
    # Support truncated at 6000: the largest tail left out (NB mu=50, theta=0.5) is ~e^-55.
    k = jnp.arange(6000.0)
    log_p = _jit_log_prob(name)(k, jnp.float64(mu), jnp.float64(theta), jnp.float64(pi))
    # eps changes the total mass by ~eps * E[x] / mu = 1e-8.
    np.testing.assert_allclose(float(jnp.exp(log_p).sum()), 1.0, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# 7. Limits and the registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zinb_with_very_negative_logits_is_nb(dtype):
    # theta <= 10, mu <= 50 keeps NB(0) >= e^-18, so the gate's sigmoid(-50) ~ e^-50 adds at
    # most e^-32 to the zero case. In float32 the zinb formula adds and removes
    # softplus(50) = 50 (ulp 4e-6) on top of the terms' own rounding (see _f32_atol).
    with jax.enable_x64(dtype == "float64"):
        x, mu, theta, _ = (
            a.astype(dtype)
            for a in _cases("zinb", seed=6, mu_range=(1e-2, 50), theta_range=(0.1, 10))
        )
        pi = np.full_like(x, -50.0)
        zinb = jax.jit(zinb_log_prob)(x, mu, theta, pi)
        nb = jax.jit(nb_log_prob)(x, mu, theta)
        assert zinb.dtype == nb.dtype == jnp.dtype(dtype)
        if dtype == "float32":
            atol = _f32_atol("zinb", x, mu, theta, pi, floor=2e-5)
        else:
            atol = 1e-12
        _assert_close(zinb, nb, rtol=1e-6, atol=atol)


def test_nb_large_theta_is_poisson(x64):
    x = jnp.arange(31.0)[:, None]
    mu = jnp.array([0.5, 5.0, 20.0])
    nb = jax.jit(nb_log_prob)(x, mu, 1e7)
    pois = jax.jit(poisson_log_prob)(x, mu)
    # log NB - log Poisson = O(((x - mu)^2 + x) / theta) <= ~1e-4 here.
    np.testing.assert_allclose(np.asarray(nb), np.asarray(pois), rtol=0, atol=1e-4)


def test_normal_log_prob_function(x64):
    x, mu, scale = np.array([-1.0, 0.0, 2.5]), np.array([0.0, 1.0, 2.0]), np.array([0.5, 1, 3])
    ours = jax.jit(normal_log_prob)(x, mu, scale)
    np.testing.assert_allclose(np.asarray(ours), stats.norm.logpdf(x, mu, scale), rtol=1e-13)


def test_builtin_likelihoods_registered():
    assert set(LIKELIHOODS) <= set(available_likelihoods())
    flags = {
        n: (get_likelihood(n).uses_theta, get_likelihood(n).uses_zi_logits) for n in LIKELIHOODS
    }
    assert flags == {
        "zinb": (True, True),
        "nb": (True, False),
        "poisson": (False, False),
        "normal": (True, False),
    }
    assert all(get_likelihood(n).name == n for n in LIKELIHOODS)


@pytest.mark.parametrize("bad", ["bogus", "", None, ["zinb"]])
def test_unknown_likelihood_raises(bad):
    with pytest.raises(ValueError, match="gene_likelihood") as err:
        get_likelihood(bad)
    for name in LIKELIHOODS:
        assert repr(name) in str(err.value)


def _geometric(name="geometric"):
    """NB with theta = 1, i.e. a geometric distribution on {0, 1, ...} with mean mu."""

    def ones(p):
        return jnp.ones_like(p.mu)

    nb = get_likelihood("nb")
    return Likelihood(
        name,
        log_prob=lambda x, p: nb_log_prob(x, p.mu, ones(p)),
        sample=lambda key, p: nb.sample(key, p._replace(theta=ones(p))),
        mean=lambda p: p.mu,
        variance=lambda p: p.mu + jnp.square(p.mu),
        uses_theta=False,
    )


def test_register_new_likelihood(scratch_registry, x64):
    geometric = _geometric()
    assert register_likelihood(geometric) is geometric
    assert "geometric" in available_likelihoods()
    assert get_likelihood("geometric") is geometric

    x, mu = np.arange(20.0), np.linspace(0.1, 30.0, 20)
    log_p = _jit_log_prob("geometric")(x, mu, None, None)
    ref = stats.geom.logpmf(x, 1.0 / (1.0 + mu), loc=-1)  # success prob 1 / (1 + mu)
    np.testing.assert_allclose(np.asarray(log_p), ref, rtol=1e-6, atol=1e-8)

    with pytest.raises(ValueError, match="already registered"):
        register_likelihood(_geometric())
    replacement = _geometric()
    assert register_likelihood(replacement, overwrite=True) is replacement
    assert get_likelihood("geometric") is replacement
    assert available_likelihoods().count("geometric") == 1


def test_builtin_names_cannot_be_silently_replaced(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_likelihood(_geometric("zinb"))
    assert get_likelihood("zinb").uses_zi_logits


def test_registry_restored_after_scratch_tests():
    assert "geometric" not in available_likelihoods()
    assert get_likelihood("zinb").uses_zi_logits


# ---------------------------------------------------------------------------------------------
# 8. Shapes and dtypes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LIKELIHOODS)
@pytest.mark.parametrize("prepend_shape", [(), (3,), (2, 3)])
def test_gene_theta_broadcasts(name, prepend_shape, key):
    cells, genes = 4, 5
    shape = (*prepend_shape, cells, genes)
    x, mu, _, pi = (a.astype(np.float32) for a in _cases(name, seed=7, shape=shape))
    theta = np.linspace(0.5, 20.0, genes, dtype=np.float32)  # per-gene dispersion
    lik = get_likelihood(name)
    f = _jit_log_prob(name)
    out = f(x, mu, theta, pi)
    assert out.shape == shape
    full = f(x, mu, np.broadcast_to(theta, shape), pi)
    # Not bitwise: XLA may fuse the broadcast differently. The log-density is a sum of lgamma
    # terms of size ~50-250 that cancel to ~1, so float32 rounding of those terms bounds the
    # difference: ~1.5e-7 relative with XLA's default CPU optimisation, up to 3.1e-5 absolute
    # with the suite's cheap one (tests/conftest.py).
    np.testing.assert_allclose(np.asarray(out), np.asarray(full), rtol=1e-5, atol=5e-5)

    params = PxParams(jnp.asarray(mu), jnp.asarray(theta), jnp.asarray(pi))
    for fn in (lik.mean, lik.variance):
        assert jax.jit(fn)(params).shape == shape
    # Traced under jit but not compiled: compiling a sampler per shape costs seconds.
    sample = jax.eval_shape(jax.jit(lik.sample), key, params)
    assert sample.shape == shape
    assert sample.dtype == jnp.float32


@pytest.mark.parametrize("name", LIKELIHOODS)
def test_float32_inputs_stay_float32_with_x64(x64, name):
    """Python-float constants (eps, 1.0, log 2 pi) must not promote float32 to float64."""
    x, mu, theta, pi = (a.astype(np.float32) for a in _cases(name, seed=8, shape=(3, 4)))
    lik = get_likelihood(name)
    params = PxParams(jnp.asarray(mu), jnp.asarray(theta), jnp.asarray(pi))
    assert _jit_log_prob(name)(x, mu, theta, pi).dtype == jnp.float32
    assert jax.jit(lik.mean)(params).dtype == jnp.float32
    assert jax.jit(lik.variance)(params).dtype == jnp.float32
