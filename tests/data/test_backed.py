"""A backed AnnData is never read whole: ``setup_anndata``, ``SCVI(...)`` (the latent library
prior) and importance weights read its counts in bounded pieces, with the results of the
same data in memory.

Every read of the h5ad's count arrays goes through ``h5py.Dataset.__getitem__``; the tests
record those reads and fail on any larger than the bound (and on any full load through
``registry._get_counts``).
"""

from __future__ import annotations

import warnings

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jaxvi import SCVI, settings
from jaxvi.data import _streaming as streaming
from jaxvi.data import registry as registry
from jaxvi.posterior import _importance as importance

N_GENES = 12
COUNT_ARRAYS = {"/X", "/X/data", "/X/indices"}


def make_adata(n_cells=200, layout="csr", seed=0, covariates=False):
    rng = np.random.default_rng(seed)
    mu = rng.gamma(2.0, 2.0, size=(3, N_GENES))[rng.integers(0, 3, n_cells)]
    x = rng.negative_binomial(2.0, 2.0 / (2.0 + mu * rng.lognormal(0, 0.4, (n_cells, 1))))
    x = x.astype(np.float32)
    x[:, 0] += 1
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["a", "b", "c"], n_cells))},
        index=[f"c{i}" for i in range(n_cells)],
    )
    if covariates:
        obs["donor"] = pd.Categorical(rng.choice(["d1", "d2"], n_cells))
        obs["pct"] = rng.uniform(0, 1, n_cells)
    stored = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[layout](x)
    adata = anndata.AnnData(stored, obs=obs)
    adata.var_names = [f"g{j}" for j in range(N_GENES)]
    return adata


def backed(adata, path):
    adata.write_h5ad(path)
    return anndata.read_h5ad(path, backed="r")


@pytest.fixture
def reads(monkeypatch):
    """Sizes (stored values) of every read of the count arrays of any HDF5 file, and no full
    load through the registry."""
    seen = []
    real_getitem = h5py.Dataset.__getitem__

    def spy(self, key, *args, **kwargs):
        out = real_getitem(self, key, *args, **kwargs)
        if self.name in COUNT_ARRAYS:
            seen.append((self.name, int(np.size(out))))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", spy)
    real_counts = registry._get_counts

    def no_full_read(adata, layer):
        assert not adata.isbacked, "all counts of the backed AnnData were loaded"
        return real_counts(adata, layer)

    monkeypatch.setattr(registry, "_get_counts", no_full_read)
    return seen


@pytest.mark.parametrize("layout", ["csr", "csc", "dense"])
def test_setup_and_library_prior_read_bounded_pieces(tmp_path, monkeypatch, reads, layout):
    """setup_anndata and SCVI(use_observed_lib_size=False) on a backed h5ad read no more than
    the bound per read (40 stored values here), read each stored value once per pass, and
    give the registry and library prior of the same data in memory (CSC with the same
    warning)."""
    mem = make_adata(layout=layout)
    disk = backed(mem, tmp_path / "cells.h5ad")
    monkeypatch.setattr(settings, "stream_max_host_bytes", 40 * 32)  # 40 values per piece
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SCVI.setup_anndata(disk, batch_key="batch")
    assert any("formatted as CSR" in str(w.message) for w in caught) == (layout == "csc")
    stored = mem.n_obs * N_GENES if layout == "dense" else mem.X.nnz
    values = "/X" if layout == "dense" else "/X/data"
    assert sum(n for name, n in reads if name == values) == stored  # one pass, every value
    bound = 40 if layout != "dense" else (40 // N_GENES) * N_GENES
    assert max(n for _, n in reads) <= bound
    n_setup_reads = len(reads)
    assert n_setup_reads >= stored // 40

    with warnings.catch_warnings(record=True) as caught_mem:
        warnings.simplefilter("always")
        SCVI.setup_anndata(mem, batch_key="batch")
    assert [str(w.message) for w in caught_mem] == [str(w.message) for w in caught]
    assert disk.uns["_jaxvi"] == mem.uns["_jaxvi"]
    np.testing.assert_array_equal(disk.obs["_scvi_batch"], mem.obs["_scvi_batch"])

    on_disk = SCVI(disk, n_hidden=8, n_latent=2, use_observed_lib_size=False)
    assert sum(n for name, n in reads[n_setup_reads:] if name == values) == stored
    assert max(n for _, n in reads) <= bound
    in_memory = SCVI(mem, n_hidden=8, n_latent=2, use_observed_lib_size=False)
    for name in ("library_log_means", "library_log_vars"):
        got = np.asarray(on_disk.variables["buffers"][name])
        want = np.asarray(in_memory.variables["buffers"][name])
        assert got.shape == (1, 3)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=name)
    # the prior is that of the cells' totals, per batch
    log_lib = np.log(np.asarray(mem.X.sum(1)).ravel())
    codes = mem.obs["_scvi_batch"].to_numpy()
    for name, stat in (("library_log_means", np.mean), ("library_log_vars", np.var)):
        np.testing.assert_allclose(
            np.asarray(on_disk.variables["buffers"][name])[0],
            [stat(log_lib[codes == b]) for b in range(3)],
            rtol=1e-5,
            err_msg=name,
        )


@pytest.mark.parametrize("problem", ["nan", "negative", "non-integer", "negative+nan"])
def test_bad_counts_found_in_any_piece(tmp_path, monkeypatch, reads, problem):
    """A bad value in the last piece of a backed file gives the error or warning the same
    data gives in memory (NaN before negative, whatever the order of the pieces)."""
    mem = make_adata(n_cells=60, layout="dense")
    x = mem.X
    if "negative" in problem:
        x[3, 2] = -1.0
    if "nan" in problem:
        x[-1, 5] = np.nan
    if problem == "non-integer":
        x[-1, 5] = 0.5
    disk = backed(mem, tmp_path / "bad.h5ad")
    monkeypatch.setattr(settings, "stream_max_host_bytes", 3 * N_GENES * 32)  # 3 rows a piece
    outcomes = []
    for adata in (disk, mem):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                SCVI.setup_anndata(adata, batch_key="batch")
                found = [str(w.message) for w in caught if "non-integer" in str(w.message)]
                outcomes.append(("ok", found))
            except ValueError as e:
                outcomes.append(("error", str(e)))
    assert outcomes[0] == outcomes[1]
    expected = {
        "nan": "NaN or infinite",
        "negative": "negative values",
        "negative+nan": "NaN or infinite",
        "non-integer": "non-integer values",
    }[problem]
    assert expected in str(outcomes[0][1])
    assert max(n for _, n in reads) <= 3 * N_GENES


def test_count_pieces_cover_every_value(monkeypatch):
    """count_pieces yields each stored value once, with its cell; cell_totals gives the row
    sums and column_sums the weighted column sums, whatever the bound (CSR rows with more
    values than the bound and empty cells, last one included; CSC; dense)."""
    mem = make_adata(n_cells=50)
    dense = mem.X.toarray()
    dense[[7, 8, 49]] = 0.0  # empty cells
    dense[3, 1] = 0.25  # summed as float32
    for layout in (sp.csr_matrix, sp.csc_matrix, np.asarray):
        a = anndata.AnnData(layout(dense))
        for bound in (1, 5, 10_000):
            monkeypatch.setattr(settings, "stream_max_host_bytes", bound * 32)
            total = np.zeros(a.n_obs)
            for values, rows in registry.count_pieces(a):
                assert values.size <= max(bound, N_GENES)
                if values.ndim == 2:
                    total[rows] += values.sum(1)
                else:
                    np.add.at(total, rows, values)
            np.testing.assert_array_equal(total, dense.sum(1))
            np.testing.assert_array_equal(registry.cell_totals(a), dense.sum(1))
            w = np.random.default_rng(bound).uniform(size=(3, a.n_obs))
            sums, nonzero = registry.column_sums(a, None, w)
            np.testing.assert_allclose(sums, w @ dense, rtol=1e-12)
            np.testing.assert_allclose(nonzero, w @ (dense != 0), rtol=1e-12)


@pytest.fixture(scope="module")
def trained():
    mem = make_adata(n_cells=240, covariates=True, seed=3)
    SCVI.setup_anndata(
        mem,
        batch_key="batch",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["pct"],
    )
    model = SCVI(mem, n_hidden=16, n_latent=3)
    model.train(max_epochs=2, batch_size=64, enable_progress_bar=False)
    return model


def test_importance_weights_on_backed_data(tmp_path, monkeypatch, trained, reads):
    """Importance weights, importance-resampled expression and differential expression with
    importance weights on a backed h5ad read only the
    cells they need (the anchors, plus the draws' own cells for expression), never more than
    the bound per device call (anchors in groups of 16 here), and equal the in-memory results
    (same keys); anchors in three groups give the weights of one group."""
    mem = trained.adata
    disk = backed(mem, tmp_path / "cells.h5ad")
    monkeypatch.setattr(settings, "stream_max_host_bytes", 40 * 32)  # DE's passes: 40 values
    rows_read = []
    real_read = streaming._Reader.read

    def spy(self, rows, max_gap=4096, **kwargs):
        rows_read.append(np.asarray(rows))
        return real_read(self, rows, max_gap, **kwargs)

    monkeypatch.setattr(streaming._Reader, "read", spy)
    groups = []
    real_anchor_counts = importance._anchor_counts

    def anchor_spy(source, rows):
        groups.append(len(rows))
        return real_anchor_counts(source, rows)

    monkeypatch.setattr(importance, "_anchor_counts", anchor_spy)
    cells = np.arange(0, 240, 2)
    zs = np.random.default_rng(0).normal(size=(2, len(cells), 3)).astype(np.float32)
    kwargs = {"max_cells": 40, "n_mc_samples": 6, "n_mc_samples_per_pass": 3, "batch_size": 32}
    calls = trained._n_calls

    def weights(adata):
        trained._n_calls = calls  # the same anchors and keys
        return trained.get_importance_weights(adata, cells, zs, **kwargs)

    monkeypatch.setattr(settings, "inference_bytes_per_call", 16 * N_GENES * 4)
    on_disk = weights(disk)
    assert groups == [16, 16, 16]  # 40 anchors: three groups, the last with 8 real ones
    read = np.unique(np.concatenate(rows_read))
    assert len(read) <= 41  # the anchors (and cell 0, padding of a minibatch)
    assert max(len(r) for r in rows_read) <= 32
    np.testing.assert_allclose(on_disk, weights(mem), rtol=1e-5, atol=1e-9)
    assert on_disk.max() > 2 / len(on_disk)  # not trivially uniform

    # All anchors in one group give the same weights. (The anchors' Monte-Carlo log p(x)
    # is held fixed: its keys depend on how its cells are split into device calls.)
    real_marginal_ll = importance.get_marginal_ll
    fixed = {}

    def marginal_ll(*args, **kw):
        fixed.setdefault("log_px", real_marginal_ll(*args, **kw))
        return fixed["log_px"]

    monkeypatch.setattr(importance, "get_marginal_ll", marginal_ll)
    groups.clear()
    grouped = weights(mem)
    monkeypatch.setattr(settings, "inference_bytes_per_call", 256 * 2**20)
    one_group = weights(mem)
    assert groups == [16, 16, 16, 64]
    np.testing.assert_allclose(grouped, one_group, rtol=1e-5, atol=1e-9)
    monkeypatch.setattr(importance, "get_marginal_ll", real_marginal_ll)

    # importance-resampled expression: reads the draws' cells and the anchors only
    monkeypatch.setattr(settings, "inference_bytes_per_call", 16 * N_GENES * 4)
    rows_read.clear()
    few = np.arange(10, 30)

    def expression(adata):
        trained._n_calls = calls
        return trained.get_normalized_expression(
            adata,
            indices=few,
            n_samples_overall=50,
            weights="importance",
            return_numpy=True,
            max_cells=8,
            n_mc_samples=6,
            n_mc_samples_per_pass=3,
            batch_size=16,
        )

    expr_disk = expression(disk)
    assert set(np.concatenate(rows_read)) <= set(few) | {0}
    np.testing.assert_allclose(expr_disk, expression(mem), rtol=1e-5, atol=1e-7)

    # differential expression with importance weights (anchors from each group); its raw
    # count statistics come from bounded passes over the file
    def de(adata):
        trained._n_calls = calls
        return trained.differential_expression(
            adata,
            groupby="batch",
            group1="a",
            weights="importance",
            n_samples_overall=40,
            mode="change",
            batch_size=16,
            silent=True,
            importance_weighting_kwargs={
                "n_mc_samples": 6,
                "n_mc_samples_per_pass": 3,
                "max_cells": 8,
            },
        )

    de_disk, de_mem = de(disk), de(mem)
    numeric = de_disk.select_dtypes("number").columns
    assert {"raw_mean1", "non_zeros_proportion2", "raw_normalized_mean1"} <= set(numeric)
    np.testing.assert_allclose(
        de_disk[numeric].to_numpy(), de_mem.loc[de_disk.index, numeric].to_numpy(), rtol=1e-5
    )
    assert {name for name, _ in reads} <= COUNT_ARRAYS
    # a read covers at most twice the rows asked for (streaming.bounded_runs)
    assert max(n for _, n in reads) <= 2 * 32 * N_GENES
