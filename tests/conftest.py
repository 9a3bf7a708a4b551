"""Shared pytest fixtures. Kept minimal: no global JAX configuration is changed here, except
that jaxvi's persistent compilation cache goes to a temporary directory of the session (also
for the subprocesses tests start; unless JAXVI_CACHE_DIR names one), never to the user's
cache, and that XLA's CPU backend compiles with its cheap optimisation level (below)."""

import atexit
import json
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
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
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


@pytest.fixture(scope="session")
def copy_dir():
    """``copy_dir(src, dst) -> str``: a copy at ``dst`` of a flat directory of files (a saved
    model, a checkpoint), for a test to damage."""

    def copy(src, dst) -> str:
        os.makedirs(dst)
        for name in os.listdir(src):
            shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        return str(dst)

    return copy


@pytest.fixture(scope="session")
def edit_json():
    """``edit_json(path, fn, reseal=True)``: the JSON file ``path`` of a saved model or a
    checkpoint edited as an adversary would: ``fn(meta)`` changes it in place, then its
    checksum is recomputed, unless ``reseal`` is False (a careless edit)."""

    from jaxvi import io as jio  # not at the top: nothing here imports jaxvi before a test

    def edit(path, fn, reseal: bool = True) -> None:
        with open(path) as f:
            meta = json.load(f)
        fn(meta)
        if reseal:
            meta[jio.DIGEST_KEY] = jio.meta_digest(meta)
        with open(path, "w") as f:
            json.dump(meta, f)

    return edit


def _set_params(model, path: tuple[str, ...], fn) -> None:
    """Replace the parameter at ``path`` by ``fn(value)``."""
    params = jax.tree_util.tree_map(lambda a: a, model.variables["params"])
    node = params
    for name in path[:-1]:
        node = node[name]
    node[path[-1]] = jnp.asarray(fn(np.asarray(node[path[-1]])), jnp.float32)
    model.variables = {**model.variables, "params": params}


def _tighten_posterior(model) -> None:
    """q(z | x) and q(l | x) at their floor variance 1e-4 (``exp(-30) + 1e-4``), so that
    draws differ from the posterior mean by ~0.01 and the decoded parameters by much less
    than the Monte-Carlo error of the tests that use it."""
    for enc in ("z_encoder", "l_encoder"):
        _set_params(model, (enc, "var_encoder", "kernel"), np.zeros_like)
        _set_params(model, (enc, "var_encoder", "bias"), lambda b: np.full_like(b, -30.0))


@pytest.fixture(scope="session")
def set_params():
    """:func:`_set_params`, shared by the tests."""
    return _set_params


@pytest.fixture(scope="session")
def tighten_posterior():
    """:func:`_tighten_posterior`, shared by the tests."""
    return _tighten_posterior


@pytest.fixture(scope="module")
def scvi_ref():
    """The ``scvi`` package (skips without it), with torch on one intra-op thread for the
    module: with two, torch's thread pool can stall for minutes when the machine is busy
    (JAX's threads, or another process on a 2-core box)."""
    scvi = pytest.importorskip("scvi")
    torch = pytest.importorskip("torch")
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield scvi
    torch.set_num_threads(n_threads)


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


# The fast subset (``pytest -m "not slow"``, about a tenth of the suite's time) leaves out
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
    "test_options_train_and_round_trip",
    "test_marginal_ll_matches_scvi",
    "test_likelihood_parameters_match_scvi",
    "test_latent_library_size_matches_scvi",
    "test_elbo_matches_scvi",
    "test_per_gene_gate_is_recovered_by_training",
    "test_custom_object_trains_saves_and_loads_by_name",
    "test_guide_example_runs",
    "test_training_is_deterministic_and_seed_dependent",
    # Over 5 s of CPU each in a full run (pytest --durations=0, 2026-12-04), so that the fast
    # subset answers in about 2 minutes on 2 cores; their files keep quicker tests of the same
    # code in it.
    "test_sampling_moments_match",
    "test_maximum_likelihood_recovers_parameters",
    "test_second_order_gradients_float64",
    "test_second_order_gradients",
    "test_finite_samples_float32",
    "test_posterior_predictive_moments",
    "test_denoised_draws_are_gamma_with_mean_size_factor_times_scale",
    "test_likelihood_parameters_keys_and_shapes",
    "test_posterior_predictive_types_and_shapes",
    "test_posterior_predictive_layout_matches_scvi",
    "test_marginal_ll_exact_when_q_is_the_prior_and_decoder_ignores_z",
    "test_sigterm_to_a_training_process_keeps_a_usable_saveable_model",
    "test_guard_names_a_nan_loss_and_the_model_stays_usable",
    "test_guard_stops_at_the_first_bad_step_keeping_last_finite_params",
    "test_resume_is_bit_identical_and_keeps_last_k",
    "test_ppc_from_jaxvi_models",
    "test_metrics_equal_scvi_tools_on_the_same_samples",
    "test_epoch_compiles_once_and_metrics_are_finite",
    "test_precomputed_log_factorial_gives_the_same_loss_and_gradients",
    "test_masked_padding_equals_real_cells_only",
    "test_unused_parameters_are_never_updated",
    "test_drop_last_uses_full_batches_only",
    "test_posterior_methods_are_wired",
    "test_history_has_reference_keys",
    "test_registered_likelihood_plugs_into_the_model",
    "test_export_and_read_back_without_torch",
    "test_export_loads_in_scvi_tools_with_same_outputs",
    "test_scvi_tools_directory_loads_without_torch",
    "test_weights_favour_draws_that_explain_the_anchors",
    "test_uniform_when_q_is_the_prior_and_decoder_ignores_z",
    "test_importance_expression_and_de_run",
    "test_degenerate_data_trains_to_finite_results",
    "test_one_gene_trains",
    "test_forged_dtypes_and_freed_views_are_refused_without_crashing",
    "test_eval_parity",
    "test_precision_reaches_training",
    "test_scvi_tools_scanvi_read_and_written_without_torch",
    "test_a_second_model_trains_reports_its_terms_and_is_queried",
    "test_hub_round_trip_of_a_scanvi",
    "test_edited_checkpoint_is_refused_naming_the_field",
    "test_estimate_matches_the_compiled_epoch",
    "test_minified_model_gives_the_same_outputs",
    "test_every_query_refuses_bad_counts",
    "test_queries_move_bounded_pieces_to_the_device",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the fast subset (-m 'not slow')")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if path in SLOW_FILES or item.originalname in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
