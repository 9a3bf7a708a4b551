"""Minified AnnData: the latent posterior kept in place of the counts (scvi-tools' layout).

A minified AnnData holds q(z | x) in ``obsm["scvi_latent_qzm"]`` / ``["scvi_latent_qzv"]``,
the total counts in ``obs["observed_lib_size"]`` and its type in
``uns["_scvi_adata_minify_type"]``; with ``"latent_posterior_parameters"`` the counts are
all-zero sparse matrices. Models then skip the encoder.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from jaxvi.data import LIB_KEY, MINIFY_UNS_KEY, QZM_KEY, QZV_KEY
from jaxvi.data import registry as reglib

__all__ = [
    "LIB_KEY",
    "MINIFY_TYPES",
    "MINIFY_UNS_KEY",
    "QZM_KEY",
    "QZV_KEY",
    "minified_copy",
    "minified_type",
]

MINIFY_TYPES = ("latent_posterior_parameters", "latent_posterior_parameters_with_counts")


def minified_type(adata) -> str | None:
    """The minification type of ``adata``, or None (also for no AnnData)."""
    return None if adata is None else adata.uns.get(MINIFY_UNS_KEY)


def minified_copy(
    adata,
    registry: dict,
    n_latent: int,
    observed_library: bool,
    minified_data_type: str,
    use_latent_qzm_key: str,
    use_latent_qzv_key: str,
):
    """A minified copy of ``adata`` (see the module docstring).

    Raises
    ------
    NotImplementedError
        For an unknown ``minified_data_type``.
    ValueError
        When the posterior is not stored under the given keys or has the wrong shape, or
        for a model with a latent library (``observed_library=False``).
    """
    if minified_data_type not in MINIFY_TYPES:
        raise NotImplementedError(f"Minification method {minified_data_type} is not supported.")
    if not observed_library:
        raise ValueError(
            "Minification is not supported for models that do not use observed library size."
        )
    if adata is None:
        raise ValueError("This model has no AnnData to minify.")
    for key in (use_latent_qzm_key, use_latent_qzv_key):
        if key not in adata.obsm:
            raise ValueError(
                f"adata.obsm['{key}'] not found: store the latent posterior first, e.g. "
                "`qzm, qzv = model.get_latent_representation(return_dist=True)`."
            )
    x = reglib.registry_arrays(adata, registry)["X"]
    mini = adata.copy()
    if minified_data_type == "latent_posterior_parameters":
        layer = registry["setup_args"]["layer"]
        if layer is None:
            mini.X = sp.csr_matrix(x.shape, dtype=np.float32)
        for name in list(mini.layers):
            mini.layers[name] = sp.csr_matrix(x.shape, dtype=np.float32)
    for src, dst in ((use_latent_qzm_key, QZM_KEY), (use_latent_qzv_key, QZV_KEY)):
        value = np.asarray(adata.obsm[src], np.float32)
        if value.shape != (adata.n_obs, n_latent):
            raise ValueError(
                f"adata.obsm['{src}'] has shape {value.shape}, expected "
                f"({adata.n_obs}, {n_latent})."
            )
        mini.obsm[dst] = value
    mini.obs[LIB_KEY] = np.asarray(x.sum(axis=1), np.float32).ravel()
    mini.uns[MINIFY_UNS_KEY] = minified_data_type
    return mini
