"""``train(precision=...)``: Lightning's precision names select JAX's matmul precision."""

from __future__ import annotations

import jax
import pytest

from jaxvi import SCVI
from jaxvi import data as datasets
from jaxvi.model import _training as model_module


@pytest.mark.parametrize(
    ("precision", "expected"),
    [
        (None, None),
        ("32-true", "float32"),
        ("bf16-mixed", "BF16_BF16_F32"),
        ("bf16", "BF16_BF16_F32"),
    ],
)
def test_precision_reaches_training(monkeypatch, precision, expected):
    seen = []
    real_fit = model_module.fit

    def spy(*args, **kwargs):
        seen.append(jax.config.jax_default_matmul_precision)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(model_module, "fit", spy)
    adata = datasets.pbmc_small()
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=16, n_latent=3)
    kwargs = {} if precision is None else {"precision": precision}
    model.train(max_epochs=1, enable_progress_bar=False, **kwargs)
    assert seen == [expected]
    assert jax.config.jax_default_matmul_precision is None  # restored afterwards


def test_unknown_precision():
    adata = datasets.pbmc_small()
    SCVI.setup_anndata(adata)
    with pytest.raises(ValueError, match="precision='64-true' is not supported"):
        SCVI(adata).train(max_epochs=1, precision="64-true")
    with pytest.raises(ValueError, match="not supported"):
        SCVI(adata).train(max_epochs=1, precision="16-mixed")  # float16 without loss scaling
