"""Write the seed corpus of ``fuzz_readers.py`` (small valid and hostile files).

``corpus/torchfile``: a scvi-tools-format ``model.pt`` of a tiny jaxvi model (written without
torch), a file with every record scvi-tools' files hold, and the hostile files of
``tests/io/conftest.py`` (issue 17). ``corpus/modeldir``: a tiny saved jaxvi model in the
``modeldir`` input layout. Run from the repository root: ``python benchmarks/fuzz/make_corpus.py``.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import sys
import tempfile

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT]  # this checkout's jaxvi

# the hostile-file builders live in the reader tests' conftest (loaded by path)
_spec = importlib.util.spec_from_file_location(
    "hostile_pickles", os.path.join(ROOT, "tests", "io", "conftest.py")
)
hp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hp)


def main() -> None:
    import anndata as ad

    from jaxvi import SCVI
    from jaxvi import io as jio
    from jaxvi.io import torchfile

    tdir = os.path.join(HERE, "corpus", "torchfile")
    mdir = os.path.join(HERE, "corpus", "modeldir")
    os.makedirs(tdir, exist_ok=True)
    os.makedirs(mdir, exist_ok=True)

    rng = np.random.default_rng(0)
    a = ad.AnnData(rng.poisson(2.0, size=(12, 4)).astype(np.float32))
    a.obs["b"] = pd.Categorical(["x", "y"] * 6)
    SCVI.setup_anndata(a, batch_key="b")
    model = SCVI(a, n_hidden=2, n_latent=2)
    model.train_indices_ = np.arange(10)
    with tempfile.TemporaryDirectory() as d:
        model.save(os.path.join(d, "pt"), format="scvi-tools")
        with open(os.path.join(d, "pt", "model.pt"), "rb") as f:
            seeds = {"scvi_format_model.pt": f.read()}
        model.save(os.path.join(d, "jaxvi"))
        parts = [
            open(os.path.join(d, "jaxvi", n), "rb").read() for n in (jio.MODEL_JSON, jio.MODEL_NPZ)
        ]
    with open(os.path.join(mdir, "tiny_model.bin"), "wb") as f:
        f.write(struct.pack("<I", len(parts[0])) + parts[0] + parts[1])

    records = {
        "t": torchfile.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "names": np.array(["g1", "g2"], dtype=object),
        "idx": np.arange(3, dtype=np.int64),
        "scalar": np.float64(2.5),
        "frame": pd.DataFrame({"elbo": [1.0, 2.0]}),
    }
    with tempfile.TemporaryDirectory() as d:
        torchfile.save(records, os.path.join(d, "r.pt"))
        seeds["records.pt"] = open(os.path.join(d, "r.pt"), "rb").read()
    for name in (
        "forged_object_array",
        "forged_object_scalar",
        "forged_subarray",
        "uninitialised_array",
    ):
        seeds[f"{name}.pt"] = hp.torch_zip(getattr(hp, name)())
    seeds["use_after_free.pt"] = hp.torch_zip(hp.use_after_free(n=64))
    seeds["billion_laughs.pt"] = hp.torch_zip(hp.billion_laughs())
    pkl, storages = hp.stride_zero_tensor(numel=1 << 20)
    seeds["stride_zero.pt"] = hp.torch_zip(pkl, storages)
    for name, data in seeds.items():
        with open(os.path.join(tdir, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
