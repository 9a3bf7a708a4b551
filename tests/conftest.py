"""Shared pytest fixtures. Kept minimal: no global JAX configuration is changed here, except
that jaxvi's persistent compilation cache goes to a temporary directory of the session (also
for the subprocesses tests start; unless JAXVI_CACHE_DIR names one), never to the user's
cache, and that XLA's CPU backend compiles with its cheap optimisation level (below)."""

import atexit
import os
import shutil
import tempfile

# Most of the suite's time is XLA compiling small programs that then run for a few steps, so
# the tests ask the CPU backend not to optimise: a short train() compiles in about 40% less
# time, at the price of slower loops (jax.random.gamma runs ~3.5x slower). Set before JAX
# creates its backend, so also seen by the subprocesses and notebook kernels tests start (those
# dominated by run time restore XLA_FLAGS_AS_GIVEN); JAXVI_TEST_XLA_OPT=1 keeps XLA's defaults.
# (Kept in the environment: pytest-xdist's workers load this file again, after the change.)
XLA_FLAGS_AS_GIVEN = os.environ.setdefault(
    "JAXVI_TEST_XLA_FLAGS_AS_GIVEN", os.environ.get("XLA_FLAGS", "")
)
FAST_COMPILE_FLAGS = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)
if os.environ.get("JAXVI_TEST_XLA_OPT") != "1":
    _given = XLA_FLAGS_AS_GIVEN.split()
    _names = {f.split("=")[0] for f in _given}
    _extra = [f for f in FAST_COMPILE_FLAGS if f.split("=")[0] not in _names]
    os.environ["XLA_FLAGS"] = " ".join(_given + _extra)

import jax  # noqa: E402
import pytest  # noqa: E402

# A directory given in JAXVI_CACHE_DIR is used as it is (e.g. CI keeping a warm cache).
if "JAXVI_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jaxvi-test-xla-")
    os.environ["JAXVI_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def xla_flags_as_given():
    """``XLA_FLAGS`` as the suite was started with, without the compile-time flags above:
    for subprocesses whose time goes into running programs rather than compiling them."""
    return XLA_FLAGS_AS_GIVEN


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


# The fast subset (``pytest -m "not slow"``, about a quarter of the suite's time) leaves out
# what trains real models for long, compares against scvi-tools on trained weights, starts
# subprocesses with their own JAX, or executes notebooks and the docs build. CI runs all.
SLOW_FILES = (
    "tests/test_notebook.py",
    "tests/test_docs.py",
    "tests/test_benchmarks.py",
    "tests/parallel/test_sharding.py",
    "tests/parallel/test_distributed.py",
    "tests/data/test_streaming.py",
    "tests/data/test_backed.py",
    "tests/train/test_trajectory.py",
    "tests/train/test_compilation.py",
    "tests/module/test_scanvi_parity.py",
    "tests/model/test_scanvi.py",
    "tests/model/test_scarches.py",
    "tests/model/test_dropin.py",
    "tests/hub/test_card.py",
    "tests/analysis/test_de.py",
    "tests/io/test_fuzz_readers.py",
    "tests/io/test_hostile_model_dir.py",
)
SLOW_TESTS = (
    "test_demo_main_job_writes_outputs",
    "test_options_train_and_round_trip",
    "test_marginal_ll_matches_scvi",
    "test_likelihood_parameters_match_scvi",
    "test_latent_library_size_matches_scvi",
    "test_elbo_matches_scvi",
    "test_per_gene_gate_is_recovered_by_training",
    "test_custom_object_trains_saves_and_loads_by_name",
    "test_guide_example_runs",
    "test_training_is_deterministic_and_seed_dependent",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the fast subset (-m 'not slow')")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if path in SLOW_FILES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
