"""A small trained SCVI shared by the compilation and device-readiness tests."""

import pytest

from jaxvi import SCVI
from jaxvi import data as datasets


@pytest.fixture(scope="session")
def small_model():
    """SCVI on the bundled 80-cell PBMC sample (16 hidden units, 3 latent), trained one
    epoch, so one-off eager programs are compiled before a test counts or guards anything."""
    adata = datasets.pbmc_small()
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=16, n_latent=3)
    model.train(max_epochs=1, enable_progress_bar=False)
    return model
