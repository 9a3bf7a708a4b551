"""``jaxvi.likelihoods.lgamma_digamma`` against scipy (float64 and float32), always jitted."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from jaxvi.likelihoods import lgamma_digamma

Z = np.concatenate([np.logspace(-4, 7, 4000), np.arange(1.0, 300.0) + 0.37, [0.5, 1.0, 2.0]])


def _rel_err(got, ref):
    return np.max(np.abs(np.asarray(got, np.float64) - ref) / np.maximum(1.0, np.abs(ref)))


def test_float64_matches_scipy(x64):
    lg, dg = jax.jit(lgamma_digamma)(jnp.asarray(Z, jnp.float64))
    assert lg.dtype == dg.dtype == jnp.float64
    assert _rel_err(lg, special.gammaln(Z)) < 1e-12
    assert _rel_err(dg, special.digamma(Z)) < 1e-12


def test_float32_as_accurate_as_xla():
    z32 = jnp.asarray(Z, jnp.float32)
    z = np.asarray(z32, np.float64)  # the float32 inputs, exactly
    lg, dg = jax.jit(lgamma_digamma)(z32)
    xla_lg = jax.jit(jax.scipy.special.gammaln)(z32)
    xla_dg = jax.jit(jax.scipy.special.digamma)(z32)
    ref_lg, ref_dg = special.gammaln(z), special.digamma(z)
    assert _rel_err(lg, ref_lg) < 5e-6
    assert _rel_err(dg, ref_dg) < 2e-6
    assert _rel_err(lg, ref_lg) < 2 * _rel_err(xla_lg, ref_lg)
    assert _rel_err(dg, ref_dg) < 2 * _rel_err(xla_dg, ref_dg)


def test_huge_arguments_stay_finite():
    lg, dg = jax.jit(lgamma_digamma)(jnp.array([1e20, 1e30], jnp.float32))
    assert np.all(np.isfinite(np.asarray(dg)))
    np.testing.assert_allclose(dg, np.log([1e20, 1e30]), rtol=1e-6)
    assert np.all(np.isfinite(np.asarray(lg)))
    assert np.all(np.asarray(lg) > 0)
