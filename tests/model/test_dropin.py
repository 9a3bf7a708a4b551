"""scvi-tools 1.4.2 code run with ``jaxvi.SCVI`` in place of ``scvi.model.SCVI`` (issue 16).

One test per call that used to break: each asserts the reference's return type, shape or
error type (what was checked against scvi-tools 1.4.2 is said in the test).
"""

import csv
import math
import os
import sys
import tomllib
import types
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from jaxvi import SCVI
from jaxvi.model import callbacks as cbs

EPOCHS = dict(max_epochs=2, batch_size=32, enable_progress_bar=False)


@pytest.fixture(scope="module")
def numeric(make_adata):
    """A model whose batch column holds floats (0.0 / 1.0) and with a covariate."""
    adata = make_adata(n=96, g=20)
    adata.obs["bnum"] = (np.arange(adata.n_obs) % 2).astype(float)
    SCVI.setup_anndata(
        adata, batch_key="bnum", labels_key="cell_type", categorical_covariate_keys=["donor"]
    )
    model = SCVI(adata, n_hidden=16, n_latent=4)
    model.train(check_val_every_n_epoch=1, **EPOCHS)
    return model


# ------------------------------------------------------------------------ save / load
def test_save_and_load_with_prefix(numeric, tmp_path):
    numeric.save(str(tmp_path), prefix="SCVI_", save_anndata=True)
    numeric.save(str(tmp_path), prefix="other_")
    assert {"SCVI_model.json", "SCVI_model.npz", "SCVI_adata.h5ad", "other_model.json"} <= set(
        os.listdir(tmp_path)
    )
    loaded = SCVI.load(str(tmp_path), prefix="SCVI_")
    assert loaded.adata is not None  # the prefixed AnnData
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), numeric.get_latent_representation()
    )
    with pytest.raises(ValueError, match="overwrite"):
        numeric.save(str(tmp_path), prefix="SCVI_")
    with pytest.raises(FileNotFoundError):
        SCVI.load(str(tmp_path), prefix="missing_")
    # scvi-tools' layout with a prefix reads back too
    numeric.save(str(tmp_path / "pt"), prefix="P_", format="scvi-tools")
    assert os.listdir(tmp_path / "pt") == ["P_model.pt"]
    back = SCVI.load(str(tmp_path / "pt"), adata=numeric.adata, prefix="P_")
    np.testing.assert_allclose(
        back.get_latent_representation(), numeric.get_latent_representation(), atol=1e-6
    )


# -------------------------------------------------------------------- return types
def test_elbo_marginal_ll_and_reconstruction_are_0d(numeric):
    # scvi-tools 1.4.2: get_elbo -> 0-d tensor, get_marginal_ll -> numpy.float64,
    # get_reconstruction_error -> {"reconstruction_loss": 0-d tensor}; callers use .ndim,
    # .item() and float(); per cell: (cells,) arrays.
    values = [
        numeric.get_elbo(),
        numeric.get_marginal_ll(n_mc_samples=3),
        numeric.get_reconstruction_error()["reconstruction_loss"],
    ]
    for v in values:
        assert v.ndim == 0
        assert v.shape == ()
        assert isinstance(v.item(), float)
        assert isinstance(v, float)
        assert np.isfinite(v)
    assert values[0] < 0 < values[2]
    n = numeric.adata.n_obs
    assert numeric.get_elbo(return_mean=False).shape == (n,)
    assert numeric.get_marginal_ll(n_mc_samples=3, return_mean=False).shape == (n,)
    per_cell = numeric.get_reconstruction_error(return_mean=False)["reconstruction_loss"]
    assert per_cell.shape == (n,)


# ------------------------------------------------------------------------ training
def test_early_stopping_warmup_epochs(make_adata):
    adata = make_adata(n=96, g=20)
    SCVI.setup_anndata(adata)
    runs = {}
    for warmup in (0, 2):
        model = SCVI(adata, n_hidden=8, n_latent=2)
        # patience 1 with a huge min_delta: stops at the second check unless warmed up
        model.train(
            max_epochs=6,
            batch_size=32,
            enable_progress_bar=False,
            early_stopping=True,
            early_stopping_patience=1,
            early_stopping_min_delta=1e9,
            early_stopping_warmup_epochs=warmup,
        )
        runs[warmup] = len(model.history["elbo_validation"])
    # warm-up 0: the first check sets the best, the second stops; 2 checks ignored first
    assert runs == {0: 2, 2: 4}


def test_external_indexing_with_two_arrays(make_adata):
    adata = make_adata(n=96, g=20)
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8, n_latent=2)
    perm = np.random.default_rng(0).permutation(adata.n_obs)
    train, valid = perm[:80], perm[80:]
    model.train(datasplitter_kwargs={"external_indexing": [train, valid]}, **EPOCHS)
    np.testing.assert_array_equal(model.train_indices, train)
    np.testing.assert_array_equal(model.validation_indices, valid)
    assert isinstance(model.test_indices, np.ndarray)
    assert model.test_indices.size == 0
    # scvi-tools' checks: cells in no set raise the Warning class, overlaps ValueError
    with pytest.raises(Warning, match="missing indices"):
        model.train(datasplitter_kwargs={"external_indexing": [train]}, **EPOCHS)
    with pytest.raises(ValueError, match="overlapping"):
        model.train(datasplitter_kwargs={"external_indexing": [perm, perm[:5]]}, **EPOCHS)
    with pytest.raises(ValueError, match="list"):
        model.train(datasplitter_kwargs={"external_indexing": (train, valid)}, **EPOCHS)


def test_plan_kwargs_on_step_on_epoch(make_adata):
    adata = make_adata(n=96, g=20)
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8, n_latent=2)
    model.train(plan_kwargs={"on_step": True, "on_epoch": True}, **EPOCHS)
    # scvi-tools 1.4.2 names the per-epoch entries <name>_epoch in this case
    for name in ("train_loss_epoch", "elbo_train_epoch", "reconstruction_loss_train_epoch"):
        assert model.history[name].shape == (2, 1)
        assert model.history[name].columns.tolist() == [name]
    assert "train_loss" not in model.history
    assert model.history["kl_weight"].shape == (2, 1)  # scvi-tools logs it unsuffixed
    assert np.isfinite(model.history["elbo_train_epoch"].to_numpy()).all()
    with pytest.raises(ValueError, match="on_epoch=False"):
        model.train(plan_kwargs={"on_step": True, "on_epoch": False}, **EPOCHS)


def test_var_activation_callable_or_name(tmp_path, make_adata):
    adata = make_adata(n=64, g=20)
    SCVI.setup_anndata(adata)
    by_fn = SCVI(adata, n_hidden=8, n_latent=2, var_activation=jax.nn.softplus)
    by_name = SCVI(adata, n_hidden=8, n_latent=2, var_activation="softplus")
    default = SCVI(adata, n_hidden=8, n_latent=2)
    assert by_fn.config.var_activation == by_name.config.var_activation == "softplus"
    assert default.config.var_activation == "exp"
    _, v_soft = by_fn.get_latent_representation(return_dist=True)
    _, v_exp = default.get_latent_representation(return_dist=True)
    assert not np.allclose(v_soft, v_exp)  # same weights, another activation
    # a custom JAX callable, saved by name and reloaded in the same process
    model = SCVI(adata, n_hidden=8, n_latent=2, var_activation=lambda x: jnp.exp(x) * 2)
    _, v2 = model.get_latent_representation(return_dist=True)
    np.testing.assert_allclose(v2 - 1e-4, 2 * (v_exp - 1e-4), rtol=1e-5)
    model.save(str(tmp_path / "m"))
    np.testing.assert_array_equal(
        SCVI.load(str(tmp_path / "m"), adata).get_latent_representation(return_dist=True)[1], v2
    )
    with pytest.raises(ValueError, match="Unknown var_activation"):
        SCVI(adata, var_activation="tanh-ish")
    with pytest.raises(ValueError, match="torch"):
        by_name.save(str(tmp_path / "t"), format="scvi-tools")


# ------------------------------------------------------------------ batch embedding
def test_get_batch_representation(make_adata):
    adata = make_adata(n=64, g=20)
    SCVI.setup_anndata(adata, batch_key="batch")
    emb = SCVI(
        adata,
        n_hidden=8,
        n_latent=2,
        batch_representation="embedding",
        batch_embedding_kwargs={"embedding_dim": 3},
    )
    rep = emb.get_batch_representation()
    assert rep.shape == (64, 3)
    assert rep.dtype == np.float32
    table = np.asarray(emb.variables["params"]["batch_embedding"]["embedding"])
    codes = (adata.obs["batch"] == "b").to_numpy().astype(int)
    np.testing.assert_array_equal(rep, table[codes])
    np.testing.assert_array_equal(emb.get_batch_representation(indices=[1, 0]), table[[1, 0]])
    onehot = SCVI(adata, n_hidden=8, n_latent=2).get_batch_representation()
    np.testing.assert_array_equal(onehot, np.eye(2, dtype=np.float32)[codes])


# ---------------------------------------------------------------- anndata manager
def test_view_anndata_setup_and_adata_manager(numeric, capsys, make_adata):
    numeric.view_anndata_setup()
    out = capsys.readouterr().out
    assert "batch_key: 'bnum'" in out
    assert "0.0 -> 0" in out
    assert "d3 -> 2" in out
    SCVI.view_anndata_setup(numeric.adata, hide_state_registries=True)  # on the class
    out = capsys.readouterr().out
    assert "n_batch: 2" in out
    assert "State Registry" not in out
    manager = numeric.adata_manager
    assert set(manager.registry) >= {"setup_args", "field_registries", "scvi_version"}
    assert manager.data_registry.batch.attr_key == "_scvi_batch"
    assert manager.summary_stats.n_batch == 2
    assert manager.summary_stats["n_vars"] == 20
    batch = manager.get_from_registry("batch")
    assert batch.shape == (96, 1)
    np.testing.assert_array_equal(batch.ravel(), np.arange(96) % 2)
    covs = manager.get_from_registry("extra_categorical_covs")
    assert isinstance(covs, pd.DataFrame)
    assert covs.columns.tolist() == ["donor"]
    assert manager.get_from_registry("X") is numeric.adata.X
    assert list(manager.get_state_registry("batch").categorical_mapping) == ["0.0", "1.0"]
    with pytest.raises(TypeError, match="read-only"):
        manager.summary_stats["n_batch"] = 3
    manager.view_registry()
    assert "Data Registry" in capsys.readouterr().out
    assert numeric.get_anndata_manager(numeric.adata).summary_stats.n_cells == 96
    fresh = make_adata(n=10, g=20)
    assert numeric.get_anndata_manager(fresh) is None
    with pytest.raises(ValueError, match="setup_anndata"):
        numeric.get_anndata_manager(fresh, required=True)


def test_transform_batch_as_the_user_wrote_it(numeric, tighten_posterior):
    # scvi-tools matches the category values: 1 and 1.0 both name batch 1.0
    ref = numeric.get_normalized_expression(transform_batch="1.0", return_numpy=True)
    for value in (1, 1.0, np.float64(1.0)):
        numeric._n_calls = 0
        ref_again = numeric.get_normalized_expression(transform_batch="1.0", return_numpy=True)
        numeric._n_calls = 0
        out = numeric.get_normalized_expression(transform_batch=value, return_numpy=True)
        np.testing.assert_array_equal(out, ref_again)
    assert ref.shape == (96, 20)
    both = numeric.get_normalized_expression(transform_batch=[0, 1])
    assert both.shape == (96, 20)
    # A list averages the cell decoded in each batch. Each batch draws its own z, as in
    # scvi-tools, so the check needs a near-deterministic posterior (std 0.01): then [0, 1]
    # is the mean of the two single-batch results up to that noise (measured 0.6%; the
    # batches differ by up to 29%).
    tight = SCVI(numeric.adata, n_hidden=16, n_latent=4)
    tight.variables = numeric.variables
    tighten_posterior(tight)
    single = {v: tight.get_normalized_expression(transform_batch=v) for v in (0, 1)}
    both = tight.get_normalized_expression(transform_batch=[0, 1])
    pd.testing.assert_index_equal(both.columns, single[0].columns)
    a, b = single[0].to_numpy(), single[1].to_numpy()
    assert np.abs(a / b - 1).max() > 0.05  # the two batches decode differently
    np.testing.assert_allclose(both.to_numpy(), (a + b) / 2, rtol=0.02)
    with pytest.raises(ValueError, match="not a batch category"):
        numeric.get_normalized_expression(transform_batch=2)


def test_setting_adata_validates(numeric):
    model = SCVI(numeric.adata, n_hidden=8, n_latent=2)
    other = numeric.adata.copy()
    model.adata = other
    assert model.adata is other
    missing = numeric.adata.copy()
    del missing.obs["bnum"]
    # scvi-tools 1.4.2 raises KeyError('bnum not found in adata.obs.')
    with pytest.raises(KeyError, match="bnum"):
        model.adata = missing
    with pytest.raises(ValueError, match="bnum"):
        model.adata = missing
    with pytest.raises(ValueError, match="None"):
        model.adata = None
    assert model.adata is other


def test_load_query_data_missing_covariate_is_key_and_value_error(numeric, make_adata):
    query = make_adata(n=40, g=20, seed=1)
    query.obs["bnum"] = 2.0
    del query.obs["donor"]
    for err in (KeyError, ValueError):
        with pytest.raises(err) as info:
            SCVI.load_query_data(query.copy(), numeric)
        assert "'donor' not found in adata.obs" in str(info.value)
    assert not str(info.value).startswith('"')  # KeyError's quotes are not added


# ---------------------------------------------------------------- callbacks, loggers
def test_callbacks_see_the_model_and_can_stop(tmp_path, make_adata):
    adata = make_adata(n=64, g=20)
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8, n_latent=2)
    seen = []

    class Recorder(cbs.Callback):
        def on_train_start(self, model):
            seen.append("start")

        def on_epoch_end(self, model, epoch, metrics):
            seen.append((epoch, metrics["train_loss"], model.get_elbo()))
            return epoch == 2  # stop after the third epoch

        def on_train_end(self, model):
            seen.append("end")

    logger = cbs.CSVLogger(str(tmp_path))
    model.train(
        max_epochs=10,
        batch_size=32,
        enable_progress_bar=False,
        check_val_every_n_epoch=1,
        callbacks=[Recorder()],
        logger=logger,
    )
    assert seen[0] == "start"
    assert seen[-1] == "end"
    assert len(seen) == 5
    assert [s[0] for s in seen[1:-1]] == [0, 1, 2]
    np.testing.assert_allclose(
        [s[1] for s in seen[1:-1]], model.history["train_loss"].to_numpy().ravel()
    )
    assert seen[-2][2] == pytest.approx(model.get_elbo(), rel=0.2)  # the epoch's weights
    with open(logger.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]  # 60 training cells: 2 steps
    np.testing.assert_allclose(
        [float(r["elbo_validation"]) for r in rows],
        model.history["elbo_validation"].to_numpy().ravel(),
    )
    assert os.path.exists(os.path.join(logger.log_dir, "hparams.yaml"))
    with pytest.raises(TypeError, match="not a jaxvi callback"):
        model.train(callbacks=[object()], **EPOCHS)


def test_lightning_and_tensorboard_loggers(tmp_path, make_adata):
    adata = make_adata(n=64, g=20)
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8, n_latent=2)
    loggers = []
    lightning = pytest.importorskip("lightning.pytorch.loggers")
    loggers.append(lightning.CSVLogger(str(tmp_path / "pl")))  # a Lightning logger as is
    have_tb = True
    try:
        loggers.append(cbs.TensorBoardLogger(str(tmp_path / "tb")))
    except ImportError:
        have_tb = False
    model.train(logger=loggers, **EPOCHS)
    frame = pd.read_csv(os.path.join(loggers[0].log_dir, "metrics.csv"))
    np.testing.assert_allclose(frame["train_loss"], model.history["train_loss"].to_numpy().ravel())
    if have_tb:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(loggers[1].log_dir)
        acc.Reload()
        values = [e.value for e in acc.Scalars("train_loss")]
        np.testing.assert_allclose(values, model.history["train_loss"].to_numpy().ravel())


class _RecordingLogger:
    """A logger that lists the calls it received."""

    def __init__(self):
        self.calls = []

    def log_hyperparams(self, params):
        self.calls.append("log_hyperparams")

    def log_metrics(self, metrics, step):
        self.calls.append("log_metrics")

    def finalize(self, status):
        self.calls.append("finalize")


class _Broken(cbs.Callback):
    def on_epoch_end(self, model, epoch, metrics):
        raise ValueError("a bug in a callback")


def _tiny_model(make_adata):
    adata = make_adata(n=64, g=20)
    SCVI.setup_anndata(adata)
    return SCVI(adata, n_hidden=8, n_latent=2)


def test_lightning_callbacks_refused_before_anything_runs(make_adata):
    pl = pytest.importorskip("lightning.pytorch")
    ran = []

    class OnStart(pl.callbacks.Callback):
        def on_train_start(self, trainer, pl_module):
            ran.append("lightning")

    class JaxviStart(cbs.Callback):
        def on_train_start(self, model):
            ran.append("jaxvi")

    lightning_callbacks = [OnStart(), pl.callbacks.EarlyStopping(monitor="elbo_validation")]
    try:  # the pre-2.0 package name, still published
        import pytorch_lightning

        lightning_callbacks.append(pytorch_lightning.callbacks.EarlyStopping(monitor="elbo"))
    except ImportError:
        pass
    model = _tiny_model(make_adata)
    for cb in lightning_callbacks:
        logger = _RecordingLogger()
        with pytest.raises(TypeError) as info:
            # a jaxvi callback first: it must not start either
            model.train(callbacks=[JaxviStart(), cb], logger=logger, **EPOCHS)
        message = str(info.value)
        assert f"{type(cb).__module__}.{type(cb).__qualname__} is a Lightning callback" in message
        assert "cannot run in jaxvi" in message
        assert "docs/user_guide/compatibility.md" in message
        assert logger.calls == []
    assert ran == []
    assert not model.is_trained_
    assert model.history == {}


def _fake_mlflow(calls: list) -> types.ModuleType:
    """A stand-in ``mlflow`` whose fluent functions have the real signatures (MLflow 2 and 3)
    and record each call with the run it went to (None: no active run, where MLflow would
    start a new one); like MLflow it refuses to start a second active run."""
    state = {"active": None, "runs": 0}

    def set_tracking_uri(uri):
        calls.append(("set_tracking_uri", uri))

    def set_experiment(experiment_name=None, experiment_id=None):
        calls.append(("set_experiment", experiment_name))
        return SimpleNamespace(experiment_id="exp7", name=experiment_name)

    def start_run(
        run_id=None,
        experiment_id=None,
        run_name=None,
        nested=False,
        parent_run_id=None,
        tags=None,
        description=None,
        log_system_metrics=None,
    ):
        if state["active"] is not None:
            raise RuntimeError(f"Run with UUID {state['active']} is already active.")
        if run_id is None:
            state["runs"] += 1
            run_id = f"run{state['runs']}"
        state["active"] = run_id
        calls.append(("start_run", run_id, experiment_id, run_name))
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id=experiment_id))

    def log_params(params, synchronous=None, run_id=None):
        calls.append(("log_params", state["active"], dict(params)))

    def log_metrics(metrics, step=None, synchronous=None, run_id=None, timestamp=None):
        assert all(isinstance(v, float) for v in metrics.values())
        calls.append(("log_metrics", state["active"], dict(metrics), step))

    def end_run(status="FINISHED"):
        calls.append(("end_run", state["active"], status))
        state["active"] = None

    fake = types.ModuleType("mlflow")
    for fn in (set_tracking_uri, set_experiment, start_run, log_params, log_metrics, end_run):
        setattr(fake, fn.__name__, fn)
    return fake


def _check_epochs(logged, model):
    """``logged``: ``(metrics, step)`` per epoch of the last ``train`` call, to match the last
    rows of the model's history (each call's epochs and steps start at 0)."""
    steps_per_epoch = math.ceil(len(model.train_indices_) / EPOCHS["batch_size"])
    assert [step for _, step in logged] == [(e + 1) * steps_per_epoch for e in range(len(logged))]
    first = len(model.history["train_loss"]) - len(logged)
    for epoch, (metrics, _) in enumerate(logged):
        row = {k: frame.iloc[first + epoch, 0] for k, frame in model.history.items()}
        assert metrics == pytest.approx({"epoch": epoch, **row})  # 0.0 == 0 (MLflow's floats)


def test_mlflow_logger_through_mlflow_api(monkeypatch, make_adata):
    calls = []
    monkeypatch.setitem(sys.modules, "mlflow", _fake_mlflow(calls))
    logger = cbs.MLFlowLogger("jaxvi-test", run_name="tiny", tracking_uri="file:///tmp/none")
    model = _tiny_model(make_adata)
    model.train(logger=logger, check_val_every_n_epoch=1, **EPOCHS)
    assert calls[:3] == [
        ("set_tracking_uri", "file:///tmp/none"),
        ("set_experiment", "jaxvi-test"),
        ("start_run", "run1", "exp7", "tiny"),
    ]
    hparams = {**model.init_params_, "max_epochs": 2, "batch_size": 32}
    assert calls[3] == ("log_params", "run1", {k: str(v) for k, v in hparams.items()})
    assert [c[:2] for c in calls[4:6]] == [("log_metrics", "run1")] * 2
    _check_epochs([(c[2], c[3]) for c in calls[4:6]], model)
    assert "elbo_validation" in calls[5][2]
    assert calls[6:] == [("end_run", "run1", "FINISHED")]

    # trained again: a new run of the same experiment and name (not one that log_metrics
    # would start unnamed), with the new max_epochs
    del calls[:]
    model.train(logger=logger, check_val_every_n_epoch=1, **{**EPOCHS, "max_epochs": 1})
    assert calls[0] == ("start_run", "run2", "exp7", "tiny")
    assert calls[1] == ("log_params", "run2", {**calls[1][2], "max_epochs": "1"})
    assert calls[2][:2] == ("log_metrics", "run2")
    _check_epochs([(calls[2][2], calls[2][3])], model)
    assert calls[3:] == [("end_run", "run2", "FINISHED")]

    # an error during training ends the run as failed (the fake, like MLflow, would refuse
    # to start the next logger's run while it is active)
    with pytest.raises(ValueError, match="a bug in a callback"):
        model.train(callbacks=[_Broken()], logger=logger, **EPOCHS)
    assert calls[-1] == ("end_run", "run3", "FAILED")
    assert cbs.MLFlowLogger().run.info.run_id == "run4"


def _fake_wandb(calls: list) -> types.ModuleType:
    """A stand-in ``wandb``: ``init`` takes the real keyword names (a subset), the run's
    ``config.update``, ``log`` and ``finish`` have the real signatures, and a finished run
    refuses ``log`` as wandb does."""

    class Config:
        def __init__(self, run_id):
            self.run_id = run_id

        def update(self, d, allow_val_change=False):
            calls.append(("config.update", self.run_id, dict(d), allow_val_change))

    class Run:
        def __init__(self, run_id):
            self.id = run_id
            self.config = Config(run_id)
            self.finished = False

        def log(self, data, step=None, commit=None):
            if self.finished:
                raise RuntimeError("wandb.log: the run has finished")
            assert all(isinstance(v, int | float) for v in data.values())
            calls.append(("log", self.id, dict(data), step))

        def finish(self, exit_code=None, quiet=None):
            calls.append(("finish", self.id, exit_code))
            self.finished = True

    def init(
        entity=None,
        project=None,
        dir=None,
        id=None,
        name=None,
        notes=None,
        tags=None,
        config=None,
        mode=None,
        resume=None,
    ):
        given = dict(
            entity=entity,
            project=project,
            dir=dir,
            id=id,
            name=name,
            notes=notes,
            tags=tags,
            config=config,
            mode=mode,
            resume=resume,
        )
        given = {k: v for k, v in given.items() if v is not None}
        calls.append(("init", given))
        runs.append(Run(id or f"w{len(runs) + 1}"))
        return runs[-1]

    runs = []

    fake = types.ModuleType("wandb")
    fake.init = init
    return fake


def test_wandb_logger_through_wandb_api(monkeypatch, make_adata):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    kwargs = {"project": "jaxvi-test", "config": {"dataset": "tiny"}, "mode": "offline"}
    logger = cbs.WandbLogger(**kwargs)
    model = _tiny_model(make_adata)
    model.train(logger=logger, check_val_every_n_epoch=1, **EPOCHS)
    assert calls[0] == ("init", kwargs)
    hparams = {**model.init_params_, "max_epochs": 2, "batch_size": 32}
    assert calls[1] == ("config.update", "w1", hparams, True)
    assert [c[:2] for c in calls[2:4]] == [("log", "w1")] * 2
    _check_epochs([(c[2], c[3]) for c in calls[2:4]], model)
    assert calls[4:] == [("finish", "w1", 0)]

    # trained again: the finished run refuses run.log, so a new one with the same arguments
    del calls[:]
    model.train(logger=logger, check_val_every_n_epoch=1, **{**EPOCHS, "max_epochs": 1})
    assert calls[0] == ("init", kwargs)
    assert calls[1] == ("config.update", "w2", {**hparams, "max_epochs": 1}, True)
    assert calls[2][:2] == ("log", "w2")
    _check_epochs([(calls[2][2], calls[2][3])], model)
    assert calls[3:] == [("finish", "w2", 0)]

    with pytest.raises(ValueError, match="a bug in a callback"):
        model.train(callbacks=[_Broken()], logger=logger, **EPOCHS)
    assert calls[-1] == ("finish", "w3", 1)


@pytest.mark.parametrize(
    ("logger", "package"),
    [(cbs.MLFlowLogger, "mlflow"), (cbs.WandbLogger, "wandb")],
)
def test_logger_without_its_package_says_how_to_install_it(monkeypatch, logger, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` fail
    with pytest.raises(ImportError, match=rf"pip install {package} \(or the jaxvi\[{package}\]"):
        logger()


def test_logger_extras_name_each_loggers_package():
    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    extras = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]
    names = {}
    for extra, requirements in extras.items():
        names[extra] = {r.split(">")[0].split("=")[0].split("[")[0] for r in requirements}
    for package in ("tensorboard", "mlflow", "wandb"):
        assert package in names[package]  # the extra the ImportError messages name
        assert package in names["loggers"]
    assert not names["test"] & {"mlflow", "wandb"}  # heavy; the tests use stand-ins


# ------------------------------------------------------- a minified scvi-tools model
@pytest.fixture(scope="module")
def scvi_minified(tmp_path_factory, make_adata):
    """A scvi-tools 1.4.2 SCVI trained 2 epochs, minified and saved with its AnnData."""
    scvi = pytest.importorskip("scvi")
    import torch

    adata = make_adata(n=96, g=20)
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch", labels_key="cell_type")
    torch.manual_seed(0)
    model = scvi.model.SCVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=2, enable_progress_bar=False)
    full_path = tmp_path_factory.mktemp("full") / "m"
    model.save(str(full_path), save_anndata=True)
    qzm, qzv = model.get_latent_representation(return_dist=True)
    adata.obsm["X_latent_qzm"], adata.obsm["X_latent_qzv"] = qzm, qzv
    model.minify_adata()
    path = tmp_path_factory.mktemp("mini") / "m"
    model.save(str(path), save_anndata=True, prefix="ref_")
    return str(path), str(full_path), qzm


def test_minified_scvi_tools_model_answers_queries(scvi_minified, tmp_path):
    path, full_path, qzm = scvi_minified
    mini = SCVI.load(path, prefix="ref_")
    assert mini.minified_data_type == "latent_posterior_parameters"
    assert mini.adata.X.nnz == 0  # counts absent
    np.testing.assert_allclose(mini.get_latent_representation(), qzm, rtol=1e-6)
    full = SCVI.load(full_path)
    # the same posterior, the same key stream: the same decoded expression
    mini._n_calls = full._n_calls = 0
    a = full.get_normalized_expression(return_numpy=True)
    b = mini.get_normalized_expression(return_numpy=True)
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    n, g = mini.adata.shape
    assert mini.get_likelihood_parameters()["mean"].shape == (n, g)
    assert mini.posterior_predictive_sample().shape == (n, g)
    assert mini.get_feature_correlation_matrix(n_samples=2).shape == (g, g)
    de = mini.differential_expression(groupby="cell_type", silent=True, all_stats=False)
    assert {"bayes_factor", "scale1", "scale2"} <= set(de.columns)
    assert de.shape[0] == 3 * g  # each of the 3 cell types against the rest
    for call in (mini.get_elbo, mini.get_marginal_ll, mini.get_reconstruction_error):
        with pytest.raises(ValueError, match="does not support minified data"):
            call()
    assert mini.adata_manager.get_from_registry("latent_qzm").shape == (n, 4)
    mini.save(str(tmp_path / "again"), save_anndata=True)  # jaxvi's format keeps it minified
    assert SCVI.load(str(tmp_path / "again")).minified_data_type == "latent_posterior_parameters"
    with pytest.raises(ValueError, match="minified"):
        mini.save(str(tmp_path / "pt"), format="scvi-tools")
