"""Shared pytest fixtures. Kept minimal: no global JAX configuration is changed here, except
that jaxvi's persistent compilation cache goes to a temporary directory of the session (also
for the subprocesses tests start; unless JAXVI_CACHE_DIR names one), never to the user's
cache."""

import atexit
import os
import shutil
import tempfile

import jax
import pytest

# A directory given in JAXVI_CACHE_DIR is used as it is (e.g. CI keeping a warm cache).
if "JAXVI_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jaxvi-test-xla-")
    os.environ["JAXVI_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


@pytest.fixture
def key():
    """A fixed PRNG key, so that every random test is deterministic."""
    return jax.random.key(0)


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test only, then restore the previous setting."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def scratch_registry():
    """Likelihoods registered (or replaced) during one test are undone afterwards."""
    from jaxvi import likelihoods

    names = likelihoods.available_likelihoods()
    before = {name: likelihoods.get_likelihood(name) for name in names}
    yield
    for name in likelihoods.available_likelihoods():
        if name not in before:
            likelihoods.unregister_likelihood(name)
    for lik in before.values():
        likelihoods.register_likelihood(lik, overwrite=True)
