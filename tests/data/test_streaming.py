"""Training from a backed AnnData (:mod:`jaxvi.data`)."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from scipy import special

from jaxvi import SCVI, data, settings
from jaxvi.data import _streaming as streaming
from jaxvi.data.registry import get_registry as reglib_get


def write_h5ad(path, n_cells=700, n_genes=30, sparse=True, seed=0):
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 3, n_cells)
    mu = rng.gamma(2.0, 2.0, size=(3, n_genes))[group] * rng.lognormal(0, 0.3, (n_cells, 1))
    x = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float32)
    x[:, 0] += 1
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["a", "b"], n_cells))},
        index=[f"c{i}" for i in range(n_cells)],
    )
    adata = anndata.AnnData(sp.csr_matrix(x) if sparse else x, obs=obs)
    adata.var_names = [f"g{j}" for j in range(n_genes)]
    adata.write_h5ad(path)
    return adata


@pytest.fixture
def small_stream(monkeypatch):
    monkeypatch.setattr(settings, "stream_chunk_cells", 64)
    # two blocks in flight of 4 chunks: 2 * 256 cells * 30 genes * 4 bytes
    monkeypatch.setattr(settings, "stream_max_host_bytes", 2 * 256 * 30 * 4)


@pytest.mark.parametrize("sparse", [True, False])
def test_streamed_training(tmp_path, monkeypatch, small_stream, sparse):
    """Each epoch reads every training cell exactly once, in blocks of at most 256 cells
    (host memory bounded by the setting), compiles the epoch twice (full and last block), and
    trains a model whose held-out ELBO is close to in-memory training's."""
    path = tmp_path / "cells.h5ad"
    mem = write_h5ad(path, sparse=sparse)
    backed = anndata.read_h5ad(path, backed="r")
    SCVI.setup_anndata(backed, batch_key="batch")
    reads = []
    real_read = streaming._Reader.read

    def spy(self, rows, max_gap=4096, **kwargs):
        reads.append(np.asarray(rows))
        return real_read(self, rows, max_gap, **kwargs)

    monkeypatch.setattr(streaming._Reader, "read", spy)
    model = SCVI(backed, n_hidden=32, n_latent=4)
    kwargs = {"max_epochs": 6, "batch_size": 64, "enable_progress_bar": False}
    model.train(**kwargs, check_val_every_n_epoch=1)
    assert model._epoch_fn._cache_size() == 2
    train_idx, val_idx = model.train_indices, model.validation_indices
    per_epoch_train = [r for r in reads if np.isin(r, train_idx).all()]
    assert max(len(r) for r in reads) <= 256
    first = np.concatenate(per_epoch_train[:3])  # 630 training cells: 256 + 256 + 118
    assert len(per_epoch_train) == 6 * 3
    np.testing.assert_array_equal(np.sort(first), np.sort(train_idx))
    assert not np.array_equal(per_epoch_train[0], per_epoch_train[3])  # reshuffled
    val_reads = [r for r in reads if np.isin(r, val_idx).all()]
    np.testing.assert_array_equal(np.sort(np.concatenate(val_reads[:1])), np.sort(val_idx))
    hist = model.history["elbo_validation"].to_numpy().ravel()
    assert hist[-1] < hist[0]

    if not sparse:
        return
    SCVI.setup_anndata(mem, batch_key="batch")
    ref = SCVI(mem, n_hidden=32, n_latent=4)
    ref.train(**kwargs, check_val_every_n_epoch=1)
    np.testing.assert_array_equal(ref.validation_indices, val_idx)
    ours = np.mean([model.get_elbo(mem, indices=val_idx) for _ in range(5)])
    theirs = np.mean([ref.get_elbo(mem, indices=val_idx) for _ in range(5)])
    assert abs(ours - theirs) / abs(theirs) < 0.02


@pytest.mark.parametrize("sparse", [True, False])
def test_read_rows(tmp_path, sparse):
    """The HDF5 fast path (backed, CSR or dense, X or a layer) and the AnnData-view path
    (in memory) read the same rows, with gaps read through or skipped."""
    path = tmp_path / "cells.h5ad"
    mem = write_h5ad(path, n_cells=50, sparse=sparse)
    mem.layers["counts"] = mem.X.copy()
    mem.write_h5ad(path)
    rows = np.array([1, 2, 3, 10, 11, 40])
    dense = mem.X[rows].toarray() if sparse else mem.X[rows]
    for layer in (None, "counts"):
        backed = anndata.read_h5ad(path, backed="r")
        SCVI.setup_anndata(backed, batch_key="batch", layer=layer)
        reader = streaming._Reader(backed, reglib_get(backed))
        assert reader.obs is not None  # the fast path
        local = mem.copy()
        SCVI.setup_anndata(local, batch_key="batch", layer=layer)
        slow = streaming._Reader(local, reglib_get(local))
        assert slow.obs is None
        for max_gap in (0, 100):
            for r in (reader, slow):
                out = r.read(rows, max_gap)
                np.testing.assert_array_equal(out["X"], dense)
                np.testing.assert_array_equal(
                    out["batch_index"], local.obs["_scvi_batch"].to_numpy()[rows]
                )
            # what training streams: a CSR file's rows stay CSR, with log x! from the non-zeros
            out = reader.read(rows, max_gap, dense=False)
            assert sp.issparse(out["X"]) == sparse
            np.testing.assert_array_equal(out["X"].toarray() if sparse else out["X"], dense)
            assert ("log_x_factorial" in out) == sparse
            if sparse:
                ref = special.gammaln(np.asarray(dense, np.float64) + 1).sum(1)
                np.testing.assert_allclose(out["log_x_factorial"], ref, rtol=1e-6)
        backed.file.close()


def test_streaming_needs_a_block(tmp_path):
    path = tmp_path / "cells.h5ad"
    write_h5ad(path, n_cells=50)
    backed = anndata.read_h5ad(path, backed="r")
    SCVI.setup_anndata(backed, batch_key="batch")
    with pytest.raises(ValueError, match="chunk_cells"):
        data.StreamingSource(backed, reglib_get(backed), chunk_cells=0)


def test_bounded_runs():
    """Runs cover the rows in order, and the rows read in between total at most the rows
    asked for; adjacent rows always share a run."""
    rng = np.random.default_rng(0)
    for n in (1, 2, 50, 400):
        rows = np.sort(rng.choice(5000, n, replace=False))
        runs = data.bounded_runs(rows)
        np.testing.assert_array_equal(np.concatenate(runs), rows)
        spans = sum(int(r[-1] - r[0] + 1) for r in runs)
        assert spans <= 2 * n
    runs = data.bounded_runs(np.array([3, 4, 5, 6, 1000, 1001]))
    assert [list(r) for r in runs] == [[3, 4, 5, 6], [1000, 1001]]


@pytest.mark.parametrize("sparse", [True, False])
def test_queries_on_a_backed_anndata(tmp_path, monkeypatch, sparse):
    """Queries on a backed h5ad never load its count matrix: each device call reads only
    its own cells from disk (at most 64 under the setting), and the results equal those on
    the same cells in memory (same keys), genes in another order included."""
    from jaxvi.data import registry as registry

    path = tmp_path / "cells.h5ad"
    mem = write_h5ad(path, n_cells=300, sparse=sparse)
    SCVI.setup_anndata(mem, batch_key="batch")
    model = SCVI(mem, n_hidden=16, n_latent=3)
    model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)
    backed = anndata.read_h5ad(path, backed="r")
    monkeypatch.setattr(settings, "inference_bytes_per_call", 64 * 30 * 4)  # 64 cells a call
    real_counts = registry._get_counts

    def no_full_read(adata, layer):
        assert not adata.isbacked, "all counts of the backed AnnData were loaded"
        return real_counts(adata, layer)

    monkeypatch.setattr(registry, "_get_counts", no_full_read)
    reads = []
    real_read = streaming._Reader.read

    def spy(self, rows, max_gap=4096, **kwargs):
        reads.append(len(rows))
        return real_read(self, rows, max_gap, **kwargs)

    monkeypatch.setattr(streaming._Reader, "read", spy)
    idx = np.arange(1, 300, 3)
    queries = {
        "latent": lambda a: model.get_latent_representation(a, indices=idx, batch_size=32),
        "expression": lambda a: model.get_normalized_expression(
            a, indices=idx, batch_size=32, transform_batch="b", return_numpy=True
        ),
        "elbo": lambda a: model.get_elbo(a, batch_size=32),
        "marginal_ll": lambda a: model.get_marginal_ll(
            a, indices=idx[:40], n_mc_samples=8, batch_size=32
        ),
    }
    for name, query in queries.items():
        reads.clear()
        calls = model._n_calls
        on_disk = query(backed)
        model._n_calls = calls  # the same keys for the in-memory run
        in_memory = query(mem)
        np.testing.assert_allclose(on_disk, in_memory, rtol=1e-5, atol=1e-6, err_msg=name)
        assert reads, name
        assert max(reads) <= 64, name
    assert sum(reads) == 41  # marginal_ll: the 40 cells asked for, and cell 0 as padding

    # A view of the backed AnnData: its own rows (loaded through the view), not the file's.
    monkeypatch.setattr(registry, "_get_counts", real_counts)
    np.testing.assert_allclose(
        model.get_latent_representation(backed[idx], batch_size=32),
        model.get_latent_representation(mem, indices=idx, batch_size=32),
        rtol=1e-5,
        atol=1e-6,
    )

    # Another gene order on disk: read and reordered to the model's genes.
    perm = np.random.default_rng(1).permutation(mem.n_vars)
    mem[:, perm].copy().write_h5ad(tmp_path / "shuffled.h5ad")
    shuffled = anndata.read_h5ad(tmp_path / "shuffled.h5ad", backed="r")
    with pytest.warns(UserWarning, match="another order"):
        latent = model.get_latent_representation(shuffled, batch_size=32)
    np.testing.assert_allclose(
        latent, model.get_latent_representation(mem, batch_size=32), rtol=1e-5, atol=1e-6
    )


def test_a_process_holding_only_padding_reads_no_rows(tmp_path, monkeypatch):
    """On a mesh, a process reads only its share of a block (here the rows [2, 4) of a
    5-cell block); a process whose devices hold only padding rows gets empty arrays of the
    right fields and widths, and reads nothing but one row to learn them."""
    from jaxvi.parallel import data_mesh

    path = tmp_path / "cells.h5ad"
    write_h5ad(path, n_cells=50)
    backed = anndata.read_h5ad(path, backed="r")
    SCVI.setup_anndata(backed, batch_key="batch")
    source = data.StreamingSource(backed, reglib_get(backed), chunk_cells=8, mesh=data_mesh())
    cells = np.array([3, 7, 8, 20, 31])
    reads = []
    real_read = streaming._Reader.read

    def spy(self, rows, max_gap=4096, **kwargs):
        reads.append(list(rows))
        return real_read(self, rows, max_gap, **kwargs)

    monkeypatch.setattr(streaming._Reader, "read", spy)
    monkeypatch.setattr(streaming, "local_cell_range", lambda n, mesh: (2, 4))
    np.testing.assert_array_equal(source.local_rows(cells), [8, 20])
    part = source._read(cells)
    assert part["X"].shape == (2, 30)
    monkeypatch.setattr(streaming, "local_cell_range", lambda n, mesh: (6, 8))
    assert len(source.local_rows(cells)) == 0
    empty = source._read(cells)
    assert empty["X"].shape == (0, 30)
    assert empty["batch_index"].shape == (0,)
    assert set(empty) == set(part)
    assert reads == [[8, 20], [3]]
