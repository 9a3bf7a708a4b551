"""scvi-tools model directories in and out (:mod:`jaxvi.io.scvi_tools`, :mod:`jaxvi.io.torchfile`).

Without scvi-tools: the torch-free ``torch.save`` reader refuses hostile pickles without
running them (and refuses malformed tensors and frames); a jaxvi model exported in
scvi-tools' format and read back is identical, also in a process where ``import torch``
fails; registry conversion round trips. With scvi-tools 1.4.2 (skipped otherwise): a
directory saved by ``scvi.model.SCVI.save`` loads into jaxvi with the same registry, init
parameters, history, indices and outputs (1e-5 relative), also without torch; a jaxvi model
exported with ``save(format="scvi-tools")`` loads in ``scvi.model.SCVI.load`` with the same
outputs, history and indices.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pandas as pd
import pytest

from jaxvi import SCVI
from jaxvi.io import torchfile as torchfile
from jaxvi.io.scvi_tools import registry_from_scvi, registry_to_scvi
from jaxvi.io.torchfile import UnsafePickleError

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-5


def make_adata(n_cells: int = 120, n_genes: int = 20, seed: int = 0):
    """NB counts; obs ``batch`` (2), ``labels`` (3), ``cov`` (3 levels), ``cont``; layer."""
    import anndata

    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, n_cells)
    mu = rng.gamma(2.0, 2.0, size=(3, n_genes))[group] * rng.lognormal(0.0, 0.4, (n_cells, 1))
    x = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float32)
    x[:, 0] += 1.0
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([f"b{i % 2}" for i in range(n_cells)]),
            "labels": pd.Categorical([f"t{g}" for g in group]),
            "cov": pd.Categorical(rng.choice(["u", "v", "w"], n_cells)),
            "cont": rng.normal(size=n_cells),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    return anndata.AnnData(x, obs=obs, var=var, layers={"counts": x.copy()})


SETUP_FULL = {
    "batch_key": "batch",
    "labels_key": "labels",
    "categorical_covariate_keys": ["cov"],
    "continuous_covariate_keys": ["cont"],
}
CASES = {
    "covariates": (SETUP_FULL, {"n_layers": 2, "dispersion": "gene-batch"}),
    "latent_library": (
        {"layer": "counts"},
        {"use_observed_lib_size": False, "latent_distribution": "ln", "gene_likelihood": "nb"},
    ),
}


def jaxvi_outputs(model: SCVI, adata) -> dict[str, np.ndarray]:
    """q(z | x) and the decoder's outputs at the posterior mean (z and library)."""
    _, idx, source, _ = model._query_inputs(adata, None, None)
    batch = source.minibatch(idx)

    def fwd(m):
        inf = m.inference(batch, key=None)
        return inf, m.generative(inf.z, inf.library, batch)

    inf, gen = model.module.apply(model.variables, method=fwd)
    out = {
        "qz_m": inf.qz_m,
        "qz_v": inf.qz_v,
        "px_scale": gen.px_scale,
        "px_rate": gen.px_rate,
        "theta": np.broadcast_to(np.exp(np.asarray(gen.px_r)), gen.px_rate.shape),
    }
    if gen.px_dropout is not None:
        out["px_dropout"] = gen.px_dropout
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def scvi_outputs(model, adata) -> dict[str, np.ndarray]:
    """The same quantities from a scvi-tools model (module in evaluation mode)."""
    import torch

    module = model.module
    module.eval()
    loader = model._make_data_loader(adata=adata, batch_size=adata.n_obs, shuffle=False)
    tensors = next(iter(loader))
    with torch.no_grad():
        inf = module.inference(**module._get_inference_input(tensors))
        z = module.z_encoder.z_transformation(inf["qz"].loc)
        library = inf["library"] if module.use_observed_lib_size else inf["ql"].loc
        gen = module.generative(
            **module._get_generative_input(tensors, {**inf, "z": z, "library": library})
        )
    px = gen["px"]
    out = {
        "qz_m": inf["qz"].loc,
        "qz_v": inf["qz"].scale ** 2,
        "px_scale": px.scale,
        "px_rate": px.mu,
        "theta": px.theta.expand(px.mu.shape),
    }
    if hasattr(px, "zi_logits"):
        out["px_dropout"] = px.zi_logits
    return {k: v.numpy().astype(np.float64) for k, v in out.items()}


def assert_outputs_close(actual: dict, reference: dict) -> None:
    assert set(actual) == set(reference)
    for name, ref in reference.items():
        scale = float(np.max(np.abs(ref)))
        np.testing.assert_allclose(actual[name], ref, rtol=RTOL, atol=RTOL * scale, err_msg=name)


def assert_history_equal(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k].index), np.asarray(b[k].index))
        np.testing.assert_allclose(
            a[k].iloc[:, 0].to_numpy(float), b[k].iloc[:, 0].to_numpy(float), rtol=0, atol=0
        )


def run_without_torch(code: str, tmp_path) -> str:
    """Run ``code`` in a fresh interpreter where ``import torch`` fails."""
    script = "import sys\nsys.modules['torch'] = None\n" + code
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def trained_jaxvi(setup: dict, options: dict, epochs: int = 3) -> SCVI:
    adata = make_adata()
    SCVI.setup_anndata(adata, **setup)
    model = SCVI(adata, n_hidden=16, n_latent=4, **options)
    model.train(max_epochs=epochs, check_val_every_n_epoch=1, enable_progress_bar=False)
    return model


# ----------------------------------------------------------------------- without scvi-tools
class Evil:
    """Unpickling this runs ``os.system`` -- which the reader must never do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_pt(path: Path, pickle_bytes: bytes, storages: dict[str, bytes] | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/data.pkl", pickle_bytes)
        zf.writestr("model/byteorder", "little")
        for key, raw in (storages or {}).items():
            zf.writestr(f"model/data/{key}", raw)
        zf.writestr("model/version", "3\n")


@pytest.mark.parametrize("where", ["top", "nested"])
def test_hostile_pickle_is_refused_and_never_run(tmp_path, where):
    marker = tmp_path / "pwned"
    evil = Evil(f"touch {marker}")
    obj = evil if where == "top" else {"attr_dict": {"history_": {"x": [1, evil]}}}
    write_pt(tmp_path / "m" / "model.pt", pickle.dumps(obj, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system") as err:
        SCVI.load(str(tmp_path / "m"))
    assert "refused" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", "builtins.eval"),
        (b"\x80\x02cnumpy\nload\nX\x01\x00\x00\x00f\x85R.", "numpy.load"),
        # BUILD on one of jaxvi's own functions (would overwrite its attributes)
        (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}X\x01\x00\x00\x00aK\x01sb.", "state"),
        # NEWOBJ on an allowed function
        (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n)\x81.", "creating"),
    ],
)
def test_disallowed_names_and_opcodes_are_refused(tmp_path, payload, match):
    write_pt(tmp_path / "model.pt", payload)
    with pytest.raises(UnsafePickleError, match=match):
        torchfile.load(str(tmp_path / "model.pt"))


def test_malformed_tensors_and_frames_are_refused(tmp_path):
    out_of_bounds = torchfile.Tensor(np.zeros((2, 3), np.float32))
    path = tmp_path / "ok.pt"
    torchfile.save({"w": out_of_bounds}, str(path))
    # Rewrite the storage with fewer bytes than the tensor's view needs.
    with zipfile.ZipFile(path) as zf:
        pkl = zf.read("model/data.pkl")
    write_pt(tmp_path / "short.pt", pkl, {"0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(UnsafePickleError, match="fewer elements|past its storage"):
        torchfile.load(str(tmp_path / "short.pt"))
    # A DataFrame of strings is not a history table.
    frame = pd.DataFrame({"a": ["x", "y"]})
    write_pt(tmp_path / "frame.pt", pickle.dumps({"h": frame}, protocol=2))
    with pytest.raises(UnsafePickleError, match="non-numeric"):
        torchfile.load(str(tmp_path / "frame.pt"))
    # Only plain values inside object arrays.
    holder = np.empty(1, dtype=object)
    holder[0] = frame
    write_pt(tmp_path / "objarr.pt", pickle.dumps({"a": holder}, protocol=2))
    with pytest.raises(UnsafePickleError, match="refused"):
        torchfile.load(str(tmp_path / "objarr.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a zip-format torch file"):
        torchfile.load(str(tmp_path / "junk.pt"))


def test_torchfile_round_trip_and_tables(tmp_path):
    arrays = {
        "f": np.arange(12, dtype=np.float32).reshape(3, 4),
        "i": np.array(7, np.int64),
        "b": np.array([True, False]),
    }
    frame = pd.DataFrame({"elbo": [3.5, 2.25]}, index=pd.Index([0, 1], name="epoch"))
    obj = {
        "t": {k: torchfile.Tensor(v) for k, v in arrays.items()},
        "names": np.array(["g1", "g2"], dtype=object),
        "h": {"elbo": frame},
        "n": None,
        "x": [1, 2.5, "s", (True, b"raw")],
    }
    torchfile.save(obj, str(tmp_path / "a.pt"))
    back = torchfile.load(str(tmp_path / "a.pt"))
    for k, v in arrays.items():
        assert back["t"][k].dtype == v.dtype
        np.testing.assert_array_equal(back["t"][k], v)
    assert back["names"].tolist() == ["g1", "g2"]
    pd.testing.assert_frame_equal(back["h"]["elbo"], frame)
    assert back["n"] is None
    assert back["x"] == [1, 2.5, "s", (True, b"raw")]


@pytest.mark.parametrize(
    "setup",
    [
        {},
        SETUP_FULL,
        {"layer": "counts", "batch_key": "batch", "size_factor_key": "sf"},
    ],
)
def test_registry_round_trip(setup):
    adata = make_adata(30)
    adata.obs["sf"] = 1.0 + np.arange(30) / 30
    SCVI.setup_anndata(adata, **setup)
    reg = adata.uns["_jaxvi"]
    scvi_reg = registry_to_scvi(reg)
    assert scvi_reg["model_name"] == "SCVI"
    assert scvi_reg["scvi_version"] == "1.4.2"
    assert registry_from_scvi(scvi_reg, reg["var_names"]) == reg


def test_reader_refuses_other_models():
    adata = make_adata(30)
    SCVI.setup_anndata(adata)
    reg = registry_to_scvi(adata.uns["_jaxvi"])
    with pytest.raises(ValueError, match="TOTALVI"):
        registry_from_scvi({**reg, "model_name": "TOTALVI"}, adata.uns["_jaxvi"]["var_names"])
    # a SCANVI registry needs its unlabelled category (tests/io/test_scanvi_io.py)
    with pytest.raises(ValueError, match="saved SCANVI registry"):
        registry_from_scvi({**reg, "model_name": "SCANVI"}, adata.uns["_jaxvi"]["var_names"])
    # a minified model's fields are read (issue 16); another model's are refused
    fields = {**reg["field_registries"], "protein_expression": {}}
    with pytest.raises(ValueError, match="protein_expression"):
        registry_from_scvi({**reg, "field_registries": fields}, adata.uns["_jaxvi"]["var_names"])
    genes = adata.uns["_jaxvi"]["var_names"]
    minified = {**reg["field_registries"], "latent_qzm": {}, "observed_lib_size": {}}
    back = registry_from_scvi({**reg, "field_registries": minified}, genes)
    assert back == registry_from_scvi(reg, genes)


@pytest.fixture(scope="module", params=list(CASES))
def jaxvi_trained(request):
    setup, options = CASES[request.param]
    return trained_jaxvi(setup, options), setup, options


@pytest.mark.parametrize("jaxvi_trained", ["covariates"], indirect=True)
def test_export_and_read_back_without_torch(jaxvi_trained, tmp_path):
    model = jaxvi_trained[0]
    model.save(str(tmp_path / "native"), save_anndata=True)
    expected = model.get_latent_representation()
    code = f"""
import numpy as np, jaxvi
m = jaxvi.SCVI.load({str(tmp_path / "native")!r})
m.save("exported", format="scvi-tools", save_anndata=True)
back = jaxvi.SCVI.load("exported")
assert "torch" not in [k for k, v in sys.modules.items() if v is not None]
np.save("latent.npy", back.get_latent_representation())
print(back.history["elbo_train"].iloc[-1, 0], back.train_indices[:3].tolist())
"""
    out = run_without_torch(code, tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "latent.npy"), expected)
    last, idx = out.strip().split(" ", 1)
    assert float(last) == model.history["elbo_train"].iloc[-1, 0]
    assert idx == str([int(i) for i in model.train_indices[:3]])
    back = SCVI.load(str(tmp_path / "exported"))
    for a, b in zip(
        jax.tree_util.tree_leaves(back.variables),
        jax.tree_util.tree_leaves(model.variables),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.registry_ == model.registry_
    assert back.init_params_ == model.init_params_
    assert_history_equal(back.history, model.history)
    np.testing.assert_array_equal(back.validation_indices, model.validation_indices)


def test_export_errors(tmp_path):
    adata = make_adata(30)
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8, n_latent=2)
    model.save(str(tmp_path), format="scvi-tools")
    with pytest.raises(ValueError, match="overwrite"):
        model.save(str(tmp_path), format="scvi-tools")
    with pytest.raises(ValueError, match="format"):
        model.save(str(tmp_path / "x"), format="torch")


# ----------------------------------------------------------------------- with scvi-tools
@pytest.fixture(scope="module", params=list(CASES))
def scvi_saved(request, tmp_path_factory):
    """A scvi-tools 1.4.2 SCVI trained 3 epochs and saved with its AnnData."""
    scvi = pytest.importorskip("scvi")
    import torch

    setup, options = CASES[request.param]
    adata = make_adata()
    scvi.model.SCVI.setup_anndata(adata, **setup)
    torch.manual_seed(0)
    model = scvi.model.SCVI(adata, n_hidden=16, n_latent=4, **options)
    model.train(max_epochs=3, check_val_every_n_epoch=1, enable_progress_bar=False)
    path = tmp_path_factory.mktemp(request.param) / "scvi_model"
    model.save(str(path), save_anndata=True)
    return model, str(path), setup, options


def test_scvi_tools_directory_loads_with_same_outputs(scvi_saved):
    ref, path, setup, options = scvi_saved
    model = SCVI.load(path)  # format detected: model.pt, no model.json
    assert model.adata is not None
    assert model.is_trained
    assert model.registry_["setup_args"] == {
        **dict.fromkeys(ref.adata_manager.registry["setup_args"]),
        **setup,
    }
    assert model.registry_["var_names"] == list(ref.adata.var_names)
    for field, key in (("batch", "batch_categories"), ("labels", "labels_categories")):
        mapping = ref.adata_manager.get_state_registry(field).categorical_mapping
        assert model.registry_[key] == [str(c) for c in mapping]
    stats = ref.summary_stats
    assert model.summary_stats["n_batch"] == stats["n_batch"]
    assert model.summary_stats["n_labels"] == stats["n_labels"]
    assert {k: model.init_params_[k] for k in options} == options
    assert_history_equal(model.history, ref.history)
    np.testing.assert_array_equal(model.train_indices, ref.train_indices)
    np.testing.assert_array_equal(model.validation_indices, ref.validation_indices)
    assert_outputs_close(jaxvi_outputs(model, model.adata), scvi_outputs(ref, ref.adata))
    # Also through the public API: q(z | x).
    for a, b in zip(
        model.get_latent_representation(return_dist=True),
        ref.get_latent_representation(return_dist=True),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=RTOL * float(np.abs(b).max()))


@pytest.mark.parametrize("scvi_saved", ["covariates"], indirect=True)
def test_scvi_tools_directory_loads_without_torch(scvi_saved, tmp_path):
    ref, path, _, _ = scvi_saved
    code = f"""
import json, numpy as np, jaxvi
m = jaxvi.SCVI.from_scvi_tools({path!r})
np.save("qz.npy", m.get_latent_representation(return_dist=True)[0])
print(json.dumps(m.registry_["batch_categories"]))
"""
    out = run_without_torch(code, tmp_path)
    qz = ref.get_latent_representation(return_dist=True)[0]
    np.testing.assert_allclose(
        np.load(tmp_path / "qz.npy"), qz, rtol=RTOL, atol=RTOL * float(np.abs(qz).max())
    )
    assert json.loads(out) == SCVI.load(path).registry_["batch_categories"]


def test_export_loads_in_scvi_tools_with_same_outputs(jaxvi_trained, tmp_path):
    scvi = pytest.importorskip("scvi")
    model, setup, options = jaxvi_trained
    model.save(str(tmp_path / "exp"), format="scvi-tools", save_anndata=True)
    for adata in (None, make_adata()):  # the saved AnnData, and a fresh one set up by scvi
        ref = scvi.model.SCVI.load(str(tmp_path / "exp"), adata=adata)
        assert ref.is_trained
        assert_outputs_close(scvi_outputs(ref, ref.adata), jaxvi_outputs(model, model.adata))
    assert_history_equal(ref.history, model.history)
    np.testing.assert_array_equal(ref.train_indices, model.train_indices)
    np.testing.assert_array_equal(ref.validation_indices, model.validation_indices)
    assert ref.summary_stats["n_batch"] == model.summary_stats["n_batch"]
