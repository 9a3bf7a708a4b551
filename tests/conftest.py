"""Shared pytest fixtures. Kept minimal: no global JAX configuration is changed here."""

import jax
import pytest


@pytest.fixture
def key():
    """A fixed PRNG key, so that every random test is deterministic."""
    return jax.random.key(0)


@pytest.fixture
def x64():
    """Enable float64 for the duration of one test only, then restore the previous setting."""
    with jax.enable_x64(True):
        yield
