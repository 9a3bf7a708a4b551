"""Checkpoint / resume, interruption by signals, and the non-finite guard."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import anndata as ad
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
import pytest

from jaxvi import SCVI
from jaxvi.data import to_device
from jaxvi.module import VAEConfig, init_variables, vae_model_def
from jaxvi.train import (
    NonFiniteError,
    PlanConfig,
    TrainingInterrupted,
    fit,
    init_train_state,
)
from jaxvi.train import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _adata(n=90, g=30, seed=0):
    rng = np.random.default_rng(seed)
    a = ad.AnnData(rng.negative_binomial(3, 0.3, size=(n, g)).astype(np.float32))
    a.obs["batch"] = pd.Categorical(np.where(np.arange(n) % 3 == 0, "x", "y"))
    SCVI.setup_anndata(a, batch_key="batch")
    return a


def _model(adata):
    return SCVI(adata, n_hidden=16, n_latent=4)


# Validation every epoch, an LR plateau that fires (the learning rate in the optimizer state
# changes) and early stopping counters: all must survive a checkpoint.
TRAIN = {
    "batch_size": 32,
    "check_val_every_n_epoch": 1,
    "early_stopping": True,
    "early_stopping_patience": 50,
    "plan_kwargs": {"reduce_lr_on_plateau": True, "lr_patience": 0, "lr_threshold": 1e9},
    "enable_progress_bar": False,
}


def _assert_same_model(a: SCVI, b: SCVI):
    jax.tree_util.tree_map(np.testing.assert_array_equal, a.variables, b.variables)
    assert a.history.keys() == b.history.keys()
    for k in a.history:
        pd.testing.assert_frame_equal(a.history[k], b.history[k])
    np.testing.assert_array_equal(a.train_indices, b.train_indices)
    np.testing.assert_array_equal(a.validation_indices, b.validation_indices)


def test_resume_is_bit_identical_and_keeps_last_k(tmp_path):
    adata = _adata()
    full = _model(adata)
    full.train(max_epochs=5, checkpoint_dir=str(tmp_path / "full"), **TRAIN)
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(str(tmp_path / "full"))]
    assert names == ["epoch_000004", "epoch_000005"]  # every epoch, newest 2 kept
    first = _model(adata)
    first.train(max_epochs=3, checkpoint_dir=str(tmp_path / "part"), **TRAIN)
    resumed = _model(adata)  # a fresh process would build exactly this
    resumed.train(max_epochs=5, resume=str(tmp_path / "part"), **TRAIN)
    _assert_same_model(full, resumed)

    meta, _ = ckpt.read_checkpoint(str(tmp_path / "part"))
    assert meta["progress"]["epoch"] == 3
    assert meta["plan"]["reduce_lr_on_plateau"] is True
    # The plateau cut the learning rate after epochs 1 and 2: the optimizer state has it.
    template, _ = init_train_state(
        resumed.model_def, resumed.variables, PlanConfig(**TRAIN["plan_kwargs"])
    )
    restored = ckpt.restore_state(template, meta, ckpt.read_checkpoint(str(tmp_path / "part"))[1])
    np.testing.assert_allclose(
        float(restored.opt_state.hyperparams["learning_rate"]), 1e-3 * 0.6**2, rtol=1e-6
    )


def test_resume_refuses_other_settings_and_architectures(tmp_path):
    adata = _adata()
    m = _model(adata)
    m.train(max_epochs=1, checkpoint_dir=str(tmp_path), **TRAIN)
    with pytest.raises(ValueError, match="Cannot resume.*batch_size: 32 -> 16"):
        _model(adata).train(max_epochs=2, resume=str(tmp_path), **{**TRAIN, "batch_size": 16})
    with pytest.raises(ValueError, match="Cannot resume.*config.n_latent"):
        SCVI(adata, n_hidden=16, n_latent=5).train(max_epochs=2, resume=str(tmp_path), **TRAIN)
    with pytest.raises(FileNotFoundError, match="No jaxvi checkpoint"):
        _model(adata).train(max_epochs=2, resume=str(tmp_path / "nothing"), **TRAIN)
    # A checkpoint whose optimizer layout does not match the plan is refused by name.
    meta, arrays = ckpt.read_checkpoint(str(tmp_path))
    template, _ = init_train_state(m.model_def, m.variables, PlanConfig(optimizer="AdamW"))
    with pytest.raises(ValueError, match="optimizer state does not match"):
        ckpt.restore_state(template, meta, arrays)


# ------------------------------------------------------------------------- interruption
CONFIG = VAEConfig(n_input=30, n_batch=2, n_hidden=16, n_latent=4)


def _arrays(n=90, g=30, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "X": rng.negative_binomial(3, 0.3, size=(n, g)).astype(np.float32),
        "batch_index": (np.arange(n) % 2).astype(np.int32),
        "labels": np.zeros(n, np.int32),
        "cat_covs": None,
        "cont_covs": None,
        "size_factor": None,
    }


def _fit(plan, arrays=None, max_epochs=3, batch_size=18, **kw):
    variables = init_variables(CONFIG, jax.random.key(0))
    state = init_train_state(vae_model_def(CONFIG), variables, plan)[0]
    return fit(
        vae_model_def(CONFIG),
        state,
        to_device(arrays or _arrays()),
        train_idx=np.arange(90),
        val_idx=np.arange(0),
        plan=plan,
        max_epochs=max_epochs,
        batch_size=batch_size,
        progress_bar=False,
        **kw,
    )


def test_sigint_stops_after_the_running_epoch_with_its_state():
    def send_at_epoch_2(state, progress):
        if progress.epoch == 2:
            os.kill(os.getpid(), signal.SIGINT)

    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted, match="SIGINT after epoch 1") as info:
        _fit(PlanConfig(), max_epochs=10, on_epoch_end=send_at_epoch_2)
    assert signal.getsignal(signal.SIGINT) is previous  # handler restored
    err = info.value
    assert err.progress.epoch == 2
    assert list(err.history["train_loss"].index) == [0, 1]
    ref_state, ref_hist, _ = _fit(PlanConfig(), max_epochs=2)
    jax.tree_util.tree_map(np.testing.assert_array_equal, err.state.params, ref_state.params)
    pd.testing.assert_frame_equal(err.history["train_loss"], ref_hist["train_loss"])


CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, pandas as pd, anndata as ad
    from jaxvi import SCVI
    from jaxvi.train import TrainingInterrupted
    out = sys.argv[1]
    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.negative_binomial(3, 0.3, size=(90, 30)).astype(np.float32))
    SCVI.setup_anndata(a)
    m = SCVI(a, n_hidden=16, n_latent=4)
    try:
        m.train(max_epochs=100000, batch_size=32, enable_progress_bar=False,
                checkpoint_dir=out + "/ckpt", checkpoint_every_n_epochs=1)
        status = "finished"
    except TrainingInterrupted as e:
        status = f"interrupted:{e.signum}:{e.progress.epoch}"
    m.save(out + "/model")
    print(json.dumps({"status": status, "epochs": len(m.history["train_loss"])}))
    """
)


def test_sigterm_to_a_training_process_keeps_a_usable_saveable_model(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    # The first checkpoint (after epoch 1) shows that training runs.
    deadline = time.time() + 120
    marker = tmp_path / "ckpt"
    while time.time() < deadline and not marker.exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    status, signum, epochs = result["status"].split(":")
    assert status == "interrupted"
    assert int(signum) == signal.SIGTERM
    assert int(epochs) == result["epochs"] >= 1
    assert "Received SIGTERM" in err
    # The interruption wrote a checkpoint of the same epoch, and the saved model loads.
    meta, arrays = ckpt.read_checkpoint(str(tmp_path / "ckpt"))
    assert meta["progress"]["epoch"] == result["epochs"]
    model = SCVI.load(str(tmp_path / "model"))
    assert len(model.history["train_loss"]) == result["epochs"]
    np.testing.assert_array_equal(
        model.variables["params"]["decoder"]["px_scale_decoder"]["kernel"],
        arrays["params/decoder/px_scale_decoder/kernel"],
    )


# -------------------------------------------------------------------- non-finite guard
def _poisoned_optimizer(at_count):
    """Adam whose update number ``at_count`` (0-based) is multiplied by inf."""

    def creator(lr):
        def factor(count):
            return jnp.where(count == at_count, jnp.inf, 1.0)

        return optax.chain(optax.adam(lr, eps=0.01), optax.scale_by_schedule(factor))

    return creator


def test_guard_stops_at_the_first_bad_step_keeping_last_finite_params():
    # 90 cells in batches of 18: 5 steps per epoch, so update 5 is epoch 1, step 0.
    bad = PlanConfig(optimizer="Custom", optimizer_creator=_poisoned_optimizer(5))
    with pytest.raises(NonFiniteError, match=r"optimizer update.*epoch 1, step 0 of 5") as info:
        _fit(bad, max_epochs=3)
    err = info.value
    assert (err.epoch, err.step, err.global_step, err.kind) == (1, 0, 5, "optimizer update")
    clean = PlanConfig(optimizer="Custom", optimizer_creator=_poisoned_optimizer(-1))
    ref, ref_hist, _ = _fit(clean, max_epochs=1)
    jax.tree_util.tree_map(np.testing.assert_array_equal, err.state.params, ref.params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, err.state.batch_stats, ref.batch_stats)
    assert int(err.state.step) == 5
    pd.testing.assert_frame_equal(err.history["train_loss"], ref_hist["train_loss"])


def test_guard_names_a_nan_loss_and_the_model_stays_usable(tmp_path):
    arrays = _arrays()
    arrays["X"][7, 3] = np.nan  # bypasses setup_anndata's check, as a broken pipeline might
    with pytest.raises(NonFiniteError, match=r"the loss became non-finite .* at epoch 0, step"):
        _fit(PlanConfig(), arrays=arrays)

    adata = _adata()
    model = _model(adata)
    plan = {"optimizer": "Custom", "optimizer_creator": _poisoned_optimizer(4)}
    with pytest.raises(NonFiniteError, match="epoch 1, step 1 of 3") as info:
        model.train(max_epochs=3, batch_size=32, plan_kwargs=plan, enable_progress_bar=False)
    assert info.value.global_step == 4
    leaves = jax.tree_util.tree_leaves(model.variables)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
    assert list(model.history["train_loss"].index) == [0]
    assert np.all(np.isfinite(model.get_latent_representation()))
    model.save(str(tmp_path / "m"))
    assert SCVI.load(str(tmp_path / "m"), adata=adata).history["train_loss"].shape == (1, 1)
