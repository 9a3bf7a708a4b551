"""Data larger than memory: loader and training throughput when streaming from disk.

Builds (once) a synthetic on-disk store of ``--cells`` cells x ``--genes`` genes, CSR in an
h5ad file written chunk by chunk (default 2M x 2k, ~5% non-zero, ~1.6 GB), opens it backed,
and measures in this process:

* **loader**: :func:`jaxvi.data.read_rows` over shuffled blocks (contiguous chunks of
  ``stream_chunk_cells`` cells, densified), cells/s, with the peak RSS of the process;
* **training**: ``SCVI.train`` streaming over the first ``--train-cells`` cells of the store
  (a backed view would read everything; instead the split's ``external_indexing`` restricts
  training to those cells), cells/s of the steady epochs, and the peak RSS.

The dense counts of the full store would take ``cells * genes * 4`` bytes (16 GB by default);
the host memory used by streaming is bounded by ``jaxvi.settings.stream_max_host_bytes``.

With ``--setup-only`` it measures instead the peak RSS and time of ``setup_anndata`` and of
``SCVI(adata)`` with the observed and with a latent library size (whose prior is a pass over
the counts) on the backed store, and saves them as ``stream_setup_*.json``.

Usage::

    python benchmarks/stream_loader.py [--cells 2000000] [--genes 2000] [--path /tmp/x.h5ad]
    python benchmarks/stream_loader.py --setup-only
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def build_store(path: Path, n_cells: int, n_genes: int, density: float, seed: int) -> dict:
    """Write the synthetic CSR store chunk by chunk; returns what was written."""
    import anndata
    import h5py
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from anndata.io import sparse_dataset, write_elem

    rng = np.random.default_rng(seed)
    chunk = 10_000
    t0 = C.now()
    nnz = 0
    # object-dtype names: under pandas 3 the default string dtype is one anndata only writes
    # when allow_write_nullable_strings is set
    obs = pd.DataFrame(
        {"batch": pd.Categorical(rng.choice(["a", "b"], n_cells).astype(object))},
        index=pd.Index([f"c{i}" for i in range(n_cells)], dtype=object),
    )
    var = pd.DataFrame(index=pd.Index([f"g{j}" for j in range(n_genes)], dtype=object))
    weight = rng.lognormal(0.0, 1.0, n_genes)
    p_gene = np.clip(density * weight / weight.mean(), 0.0, 1.0).astype(np.float32)
    for start in range(0, n_cells, chunk):
        n = min(chunk, n_cells - start)
        mask = rng.random((n, n_genes), dtype=np.float32) < p_gene
        x = sp.csr_matrix(mask, dtype=np.float32)
        x.data = rng.geometric(0.4, x.nnz).astype(np.float32)
        nnz += x.nnz
        if start == 0:
            first = anndata.AnnData(x, obs=obs.iloc[:n], var=var)
            first.write_h5ad(path)
        else:
            with h5py.File(path, "a") as f:
                sparse_dataset(f["X"]).append(x)
    with h5py.File(path, "a") as f:  # the full obs, written once at the end
        del f["obs"]
        write_elem(f, "obs", obs)
    return {"nnz": nnz, "write_s": C.now() - t0, "bytes": path.stat().st_size}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=2_000_000)
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--path", type=Path, default=Path("/tmp/jaxvi_stream_store.h5ad"))
    p.add_argument("--loader-cells", type=int, default=500_000, help="cells read by the loader")
    p.add_argument("--train-cells", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--setup-only", action="store_true", help="peak RSS of setup and SCVI()")
    p.add_argument("--tag", default=None, help="suffix of the --setup-only result file")
    args = p.parse_args(argv)

    import anndata
    import jax
    import numpy as np

    import jaxvi
    from jaxvi import data as streaming
    from jaxvi.data.registry import get_registry

    store = {}
    if not args.path.exists():
        print(f"writing {args.cells} x {args.genes} store to {args.path} ...", flush=True)
        store = build_store(args.path, args.cells, args.genes, args.density, args.seed)
        print(store, flush=True)
    adata = anndata.read_h5ad(args.path, backed="r")
    if (adata.n_obs, adata.n_vars) != (args.cells, args.genes):
        raise SystemExit(f"{args.path} holds {adata.shape}; remove it or pass its shape.")
    if args.setup_only:
        return setup_only(args, adata, store)
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch")
    registry = get_registry(adata)
    rss0 = C.current_rss_mb()

    # Loader alone: the blocks of one shuffled epoch over the first --loader-cells cells.
    data = streaming.StreamingSource(
        adata,
        registry,
        chunk_cells=jaxvi.settings.stream_chunk_cells,
        max_host_bytes=jaxvi.settings.stream_max_host_bytes,
    )
    t0 = C.now()
    n_read = 0
    for block in data.blocks(np.arange(args.loader_cells), jax.random.key(0), shuffle=True):
        jax.block_until_ready(block.data)
        n_read += len(block.cells)
    loader_s = C.now() - t0
    loader = {
        "cells": n_read,
        "seconds": loader_s,
        "cells_per_s": n_read / loader_s,
        "block_cells": data.block_cells,
        "chunk_cells": data.chunk_cells,
        "peak_rss_mb": C.peak_rss_mb(),
    }
    print("loader", loader, flush=True)

    # Training, streamed, over the first --train-cells cells.
    n = args.train_cells
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(n)
    n_val = n // 10
    split = [np.sort(perm[n_val:]), np.sort(perm[:n_val]), np.arange(0)]
    model = jaxvi.SCVI(adata)
    t0 = C.now()
    model.train(
        max_epochs=args.epochs,
        batch_size=args.batch_size,
        enable_progress_bar=False,
        datasplitter_kwargs={"external_indexing": split},
        seed=args.seed,
    )
    train_s = C.now() - t0
    training = {
        "train_cells": len(split[0]),
        "epochs": args.epochs,
        "seconds_total": train_s,
        "cells_per_s_incl_compile": len(split[0]) * args.epochs / train_s,
        "elbo_train_last": float(model.history["elbo_train"].to_numpy()[-1, 0]),
        "peak_rss_mb": C.peak_rss_mb(),
    }
    # a second call is warm: no compilation
    t0 = C.now()
    model.train(
        max_epochs=1,
        batch_size=args.batch_size,
        enable_progress_bar=False,
        datasplitter_kwargs={"external_indexing": split},
        seed=args.seed,
    )
    warm = C.now() - t0
    training["cells_per_s_one_epoch"] = len(split[0]) / warm
    training["peak_rss_mb"] = C.peak_rss_mb()
    print("training", training, flush=True)
    dense_gb = args.cells * args.genes * 4 / 2**30
    payload = {
        **C.run_header("stream_loader"),
        "settings": {**vars(args), "path": str(args.path)},
        "store": {**store, "cells": args.cells, "genes": args.genes, "dense_gb": dense_gb},
        "rss_after_open_mb": rss0,
        "stream_max_host_bytes": jaxvi.settings.stream_max_host_bytes,
        "loader": loader,
        "training": training,
    }
    out = C.write_json(C.result_path("stream_loader"), payload)
    print(
        f"| loader cells/s | training cells/s (1 epoch, warm) | peak RSS MB | dense store GB |\n"
        f"|---:|---:|---:|---:|\n| {loader['cells_per_s']:.0f} | "
        f"{training['cells_per_s_one_epoch']:.0f} | {training['peak_rss_mb']:.0f} | "
        f"{dense_gb:.1f} |"
    )
    print("saved", out)
    return payload


def setup_only(args, adata, store: dict) -> dict:
    """Peak RSS (MiB, of the process so far) and seconds after each setup step."""
    import jaxvi

    steps = {"read_h5ad": {"peak_rss_mb": C.peak_rss_mb()}}
    for name, step in (
        ("setup_anndata", lambda: jaxvi.SCVI.setup_anndata(adata, batch_key="batch")),
        ("SCVI()", lambda: jaxvi.SCVI(adata)),
        (
            "SCVI(use_observed_lib_size=False)",
            lambda: jaxvi.SCVI(adata, use_observed_lib_size=False),
        ),
    ):
        t0 = C.now()
        step()
        steps[name] = {"seconds": C.now() - t0, "peak_rss_mb": C.peak_rss_mb()}
        print(name, steps[name], flush=True)
    payload = {
        **C.run_header("stream_setup"),
        "jaxvi_module": jaxvi.__file__,
        "settings": {**vars(args), "path": str(args.path)},
        "store": {**store, "cells": args.cells, "genes": args.genes},
        "stream_max_host_bytes": jaxvi.settings.stream_max_host_bytes,
        "steps": steps,
    }
    out = C.write_json(C.result_path("stream_setup", args.tag), payload)
    print("saved", out)
    return payload


if __name__ == "__main__":
    main()
