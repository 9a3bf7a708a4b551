"""The bad-input table of the README: every case gets a clear error, a warning matching
scvi-tools 1.4.2, or finite results — never a crash deep in JAX or a silent NaN."""

import warnings

import anndata as ad
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxvi import SCVI
from jaxvi.data import to_device
from jaxvi.data.registry import registry_arrays
from jaxvi.module import VAE, VAEConfig, init_variables, vae_loss

TRAIN = {"batch_size": 16, "enable_progress_bar": False}


def _adata(n=40, g=12, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    a = ad.AnnData(rng.negative_binomial(3, 0.3, size=(n, g)).astype(dtype))
    a.obs["batch"] = pd.Categorical(np.where(np.arange(n) % 2, "a", "b"))
    return a


def _finite(*arrays):
    return all(np.all(np.isfinite(np.asarray(a, np.float64))) for a in arrays)


# ------------------------------------------------------------ dtypes, formats, values
SHAPE = (12, 6)
CONFIG = VAEConfig(n_input=SHAPE[1], n_hidden=8, n_latent=3)
VARIABLES = init_variables(CONFIG, jax.random.key(0))


@jax.jit
def _loss_and_grads(variables, data):
    def f(params):
        batch = data_gather(data)
        out, _ = vae_loss(
            VAE(CONFIG), {**variables, "params": params}, batch, key=jax.random.key(1),
            training=True,
        )  # fmt: skip
        return out.loss

    return jax.value_and_grad(f)(variables["params"])


def data_gather(data):
    from jaxvi.data import gather

    return gather(data, jnp.arange(SHAPE[0]), jnp.ones(SHAPE[0]))


DTYPES = {
    "int32": (np.int32, 10**7),
    "int64": (np.int64, 10**7),
    "uint8": (np.uint8, 255),
    "uint16": (np.uint16, 65535),
    "uint32": (np.uint32, 10**7),
    "float16": (np.float16, 2048),  # integers are exact in float16 up to 2048
    "float32": (np.float32, 10**7),
    "float64": (np.float64, 10**7),
}


@st.composite
def count_matrices(draw):
    name = draw(st.sampled_from(sorted(DTYPES)))
    dtype, top = DTYPES[name]
    big = st.integers(0, top)
    small = st.integers(0, 30)
    values = draw(
        hnp.arrays(np.int64, SHAPE, elements=st.one_of(small, small, small, big, st.just(0)))
    )
    zero_rows = draw(st.lists(st.integers(0, SHAPE[0] - 1), max_size=3))
    zero_cols = draw(st.lists(st.integers(0, SHAPE[1] - 1), max_size=2))
    values[zero_rows] = 0  # cells with no counts: observed log-library -inf
    values[:, zero_cols] = 0  # genes never observed
    # scipy.sparse has no float16 matrices, so float16 comes dense.
    fmt = "dense" if name == "float16" else draw(st.sampled_from(["dense", "csr", "csc"]))
    return values.astype(dtype), fmt


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(count_matrices())
def test_any_count_dtype_and_format_gives_finite_loss_and_gradients(case):
    """Integer, unsigned and float16/32/64 counts; dense, CSR, CSC; zero cells, zero genes,
    counts up to 1e7: registered as float32 exactly, and the training loss and every
    gradient are finite."""
    values, fmt = case
    x = values if fmt == "dense" else getattr(sp, f"{fmt}_matrix")(values)
    adata = ad.AnnData(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SCVI.setup_anndata(adata)
    assert any("formatted as CSR" in str(w.message) for w in caught) == (fmt == "csc")
    arrays = registry_arrays(adata, adata.uns["_jaxvi"])
    got = arrays["X"].toarray() if sp.issparse(arrays["X"]) else arrays["X"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values.astype(np.float32))
    loss, grads = _loss_and_grads(VARIABLES, to_device(arrays))
    assert np.isfinite(float(loss))
    assert all(_finite(g) for g in jax.tree_util.tree_leaves(grads))


def test_coo_is_refused_with_the_fix():
    """AnnData itself refuses COO (as under scvi-tools); jaxvi's reader refuses it too, for
    containers that do hold one."""
    from types import SimpleNamespace

    from jaxvi.data.registry import _get_counts

    coo = sp.coo_matrix(_adata().X)
    with pytest.raises(ValueError, match="Only CSR and CSC"):
        ad.AnnData(coo)
    with pytest.raises(ValueError, match=r"sparse COO matrix. Only CSR and CSC.*tocsr"):
        _get_counts(SimpleNamespace(X=coo, layers={}), None)


# ----------------------------------------------------------------- AnnData containers
def test_view_refused_at_setup_but_fine_for_queries():
    a = _adata()
    with pytest.raises(ValueError, match=r"view.*adata = adata.copy\(\)"):
        SCVI.setup_anndata(a[:20])
    SCVI.setup_anndata(a)
    model = SCVI(a, n_hidden=8, n_latent=3)
    full = model.get_latent_representation()
    np.testing.assert_array_equal(model.get_latent_representation(a[5:15]), full[5:15])


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_backed_anndata(tmp_path, fmt):
    a = _adata()
    if fmt == "csr":
        a.X = sp.csr_matrix(a.X)
    a.write_h5ad(tmp_path / "a.h5ad")
    backed = ad.read_h5ad(tmp_path / "a.h5ad", backed="r")
    SCVI.setup_anndata(backed, batch_key="batch")
    model = SCVI(backed, n_hidden=8, n_latent=3)
    in_memory = _adata()
    SCVI.setup_anndata(in_memory, batch_key="batch")
    np.testing.assert_array_equal(
        model.get_latent_representation(),
        SCVI(in_memory, n_hidden=8, n_latent=3).get_latent_representation(),
    )


# ------------------------------------------------------------------- degenerate data
def test_degenerate_data_trains_to_finite_results():
    """Cells with zero counts, all-zero genes, a count of 1e7, a batch of one cell and
    duplicate obs names, together: the reference's warnings, then finite training and
    outputs."""
    a = _adata(n=60)
    a.X[:4] = 0
    a.X[:, :3] = 0
    a.X[10, 5] = 1e7
    a.obs["batch"] = pd.Categorical(["solo"] + ["many"] * 59)
    a.obs_names = [f"c{i % 30}" for i in range(60)]
    with pytest.warns(UserWarning, match="not unique") as caught:
        SCVI.setup_anndata(a, batch_key="batch")
    messages = " | ".join(str(w.message) for w in caught)
    assert "obs_names are not unique" in messages
    assert "Category 1 in adata.obs['_scvi_batch'] has fewer than 3 cells" in messages
    model = SCVI(a, n_hidden=8, n_latent=3)
    model.train(max_epochs=3, check_val_every_n_epoch=1, **TRAIN)
    for frame in model.history.values():
        assert _finite(frame.to_numpy())
    assert _finite(model.get_latent_representation())
    expr = model.get_normalized_expression(return_numpy=True)
    assert _finite(expr)
    np.testing.assert_allclose(expr.sum(1), 1.0, rtol=1e-4)
    assert np.isfinite(model.get_elbo())
    lib = model.get_latent_library_size(give_mean=False)
    np.testing.assert_array_equal(lib[:4], 0.0)  # exp(log 0): the observed library
    assert _finite(model.get_marginal_ll(n_mc_samples=4, return_mean=False))


def test_latent_library_prior_with_empty_cells_and_single_cell_batches():
    a = _adata()
    a.X[:3] = 0
    SCVI.setup_anndata(a, batch_key="batch")
    with pytest.warns(UserWarning, match="some empty cells"):
        SCVI(a, n_hidden=8, n_latent=3, use_observed_lib_size=False)
    b = _adata()
    b.obs["batch"] = pd.Categorical(["solo"] + ["many"] * 39)
    with pytest.warns(UserWarning, match="fewer than 3 cells"):
        SCVI.setup_anndata(b, batch_key="batch")
    with pytest.raises(ValueError, match="Batch code 1 has 1 cell.*variance 0"):
        SCVI(b, n_hidden=8, n_latent=3, use_observed_lib_size=False)


def test_one_cell():
    a = _adata(n=1)
    with pytest.warns(UserWarning, match="fewer than 3 cells"):
        SCVI.setup_anndata(a)
    model = SCVI(a, n_hidden=8, n_latent=3)
    with pytest.raises(ValueError, match="No cells left to train on: 1 cell"):
        model.train(max_epochs=1, **TRAIN)
    with (
        pytest.warns(UserWarning, match="small size of 1"),
        pytest.raises(ValueError, match="single cell.*batch norm"),
    ):
        model.train(max_epochs=1, train_size=1.0, **TRAIN)
    assert _finite(model.get_latent_representation())  # queries work on one cell


def test_one_gene_trains():
    a = _adata(g=1)
    SCVI.setup_anndata(a)
    model = SCVI(a, n_hidden=8, n_latent=3)
    model.train(max_epochs=2, **TRAIN)
    assert _finite(model.history["train_loss"].to_numpy(), model.get_latent_representation())
    np.testing.assert_allclose(model.get_normalized_expression(return_numpy=True), 1.0)


# ----------------------------------------------------------------------- obs and var
def test_nan_in_categorical_column():
    a = _adata()
    a.obs["batch"] = a.obs["batch"].astype(object)
    a.obs.iloc[3, 0] = np.nan
    with pytest.raises(ValueError, match=r"adata.obs\['batch'\] has 1 missing values"):
        SCVI.setup_anndata(a, batch_key="batch")


def test_duplicate_var_names_warn_and_cannot_be_reordered():
    a = _adata()
    a.var_names = ["g0", "g0"] + [f"g{i}" for i in range(2, 12)]
    with pytest.warns(UserWarning, match="var_names are not unique"):
        SCVI.setup_anndata(a)
    model = SCVI(a, n_hidden=8, n_latent=3)
    q = a[:, ::-1].copy()
    with pytest.raises(ValueError, match="do not match.*names not unique"):
        model.get_latent_representation(q)


def test_missing_layer():
    with pytest.raises(ValueError, match=r"Layer 'counts' not found in adata.layers"):
        SCVI.setup_anndata(_adata(), layer="counts")


def test_query_with_unseen_batch_categories():
    a = _adata()
    SCVI.setup_anndata(a, batch_key="batch")
    model = SCVI(a, n_hidden=8, n_latent=3)
    q = _adata(seed=1)
    q.obs["batch"] = pd.Categorical(["zz"] * q.n_obs)
    with pytest.raises(ValueError, match=r"categories the model was not set up with: \['zz'\]"):
        model.get_latent_representation(q)


def test_genes_in_another_order_at_load_and_query(tmp_path):
    a = _adata()
    SCVI.setup_anndata(a, batch_key="batch")
    model = SCVI(a, n_hidden=8, n_latent=3)
    expected = model.get_latent_representation()
    model.save(str(tmp_path / "m"))
    shuffled = a[:, a.var_names[np.random.default_rng(0).permutation(a.n_vars)]].copy()
    with pytest.warns(UserWarning, match="another order; the columns are reordered"):
        loaded = SCVI.load(str(tmp_path / "m"), adata=shuffled)
    with pytest.warns(UserWarning, match="another order"):
        got = loaded.get_latent_representation()
    np.testing.assert_array_equal(got, expected)
    with pytest.warns(UserWarning, match="another order"):
        np.testing.assert_array_equal(model.get_latent_representation(shuffled), expected)
    fewer = a[:, 1:].copy()
    with pytest.raises(ValueError, match="do not match the 12 genes"):
        SCVI.load(str(tmp_path / "m"), adata=fewer)
