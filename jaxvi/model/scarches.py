"""scArches query mapping: extend a trained reference scVI to new batches (Lotfollahi et al. 2022).

:meth:`jaxvi.model.BaseModel.load_query_data` registers a query AnnData under the
reference's setup, appending its new categories after the reference's; builds a model for the
larger category counts; copies every reference weight into it, giving only the one-hot input
rows of the new categories (and the new columns of per-batch parameters) fresh initial values;
and records which entries training may change. The rules are scvi-tools 1.4.2's
(``ArchesMixin.load_query_data`` and ``_set_params_online_update``), stated on scvi-tools'
state-dict names:

- trainable tensors: the ``Linear`` layers of every ``FCLayers`` stack, all of ``l_encoder``,
  the decoder's batch-norm affine parameters (unless ``freeze_batchnorm_decoder``) and the
  encoder's (only with ``freeze_batchnorm_encoder=False``); everything else (``px_r``, the
  mean/variance heads, ``px_scale/r/dropout_decoder``, the batch embedding) is frozen;
- within a trainable ``Linear`` of ``z_encoder`` or the decoder (``l_encoder`` excepted): only
  the one-hot covariate inputs of layers that receive them; biases and other weights are
  frozen, except in the first layer of the encoder with ``freeze_expression=False`` or of the
  decoder with ``freeze_decoder_first_layer=False``, which train entirely;
- ``unfrozen=True`` trains every parameter.

scvi-tools 1.4.2 trains a query model with its network in evaluation mode: ``load_query_data``
calls ``module.eval()`` and Lightning (>= 2.2) keeps the modes of submodules during ``fit``.
So batch norm normalises with the reference's running statistics, which never change, and
dropout is off; the batch-norm ``momentum=0`` and ``freeze_dropout`` settings of
``_set_params_online_update`` have no effect. jaxvi's query models train the same way
(``QueryTraining(network_training=False)``, read by ``train``).

One deliberate difference: scvi-tools freezes entries by zeroing their gradients, so its
coupled weight decay (1e-6 by default) still moves them slightly; jaxvi zeroes their gradient
*and* their update, so frozen entries stay bit-identical to the reference with any optimizer.

New categories of a covariate are inserted after that covariate's reference categories. For
the batch alone this is scvi-tools' layout (the batch one-hot is the last block); with extra
categorical covariates scvi-tools appends every new column at the very end of the weight,
which shifts the covariate columns, while jaxvi keeps each block aligned.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxvi import io
from jaxvi.data import registry as reglib
from jaxvi.io import scvi_tools
from jaxvi.io.bridge import leaf_paths, set_path, torch_key
from jaxvi.model._parts import ModelParts, QueryTraining
from jaxvi.module import VAEConfig

__all__ = [
    "MIN_VAR_NAME_RATIO",
    "FreezeOptions",
    "extend_variables",
    "freeze_masks",
    "prepare_query_anndata",
    "query_parts",
    "query_registry",
    "reference_var_names",
    "subset_query_genes",
]

MIN_VAR_NAME_RATIO = 0.8


# ----------------------------------------------------------------------------- reference
def reference_var_names(reference) -> list[str]:
    """The genes of a reference: given as a list, or read from a saved jaxvi or scvi-tools
    model directory (only its metadata)."""
    if not isinstance(reference, str | os.PathLike):
        return [str(g) for g in reference]
    path = str(reference)
    if os.path.exists(os.path.join(path, io.MODEL_JSON)):
        meta, _ = io.read_model_dir(path)
        return list(meta["registry"]["var_names"])
    if scvi_tools.is_scvi_tools_dir(path):
        return scvi_tools.read_scvi_tools_files(path)["var_names"]
    raise FileNotFoundError(f"No saved jaxvi or scvi-tools model in {path}.")


def subset_query_genes(adata, var_names) -> None:
    """Subset and reorder ``adata``'s genes in place to ``var_names`` (all must be present).

    Raises
    ------
    ValueError
        Naming reference genes the query lacks.
    """
    genes = pd.Index(var_names)
    absent = genes.difference(adata.var_names)
    if len(absent):
        raise ValueError(
            f"The query lacks {len(absent)} reference genes (e.g. {list(absent[:5])}); "
            "pad them with `prepare_query_anndata(adata, reference)` first."
        )
    adata._inplace_subset_var(genes)


# ----------------------------------------------------------------------------- genes
def prepare_query_anndata(
    adata, reference_model, return_reference_var_names: bool = False, inplace: bool = True
):
    """Give a query AnnData exactly the reference's genes, in the reference's order.

    Reference genes missing from the query are added as all-zero columns (in ``X`` and in
    every layer); genes the reference does not have are dropped.

    Parameters
    ----------
    adata
        Query AnnData ``(cells, genes)``.
    reference_model
        The reference's gene names, or the directory of a saved jaxvi or scvi-tools model.
    return_reference_var_names
        Only return the reference's gene names (a ``pandas.Index``).
    inplace
        Modify ``adata`` (returns None) rather than return a new AnnData.

    Returns
    -------
    None, a new AnnData ``(cells, reference genes)`` (``inplace=False``), or the gene names.

    Raises
    ------
    ValueError
        If the query shares no gene with the reference. Warns below 80 % shared genes.
    """
    import anndata
    import scipy.sparse as sp

    ref_names = pd.Index(reference_var_names(reference_model))
    if return_reference_var_names:
        return ref_names
    shared = adata.var_names.intersection(ref_names)
    if len(shared) == 0:
        raise ValueError(
            "No reference gene found in the query data; compare with "
            "`prepare_query_anndata(..., return_reference_var_names=True)`."
        )
    ratio = len(shared) / len(ref_names)
    if ratio < MIN_VAR_NAME_RATIO:
        warnings.warn(
            f"Query data contains less than {MIN_VAR_NAME_RATIO:.0%} of reference var names "
            f"({ratio:.1%}). This may result in poor performance.",
            UserWarning,
            stacklevel=2,
        )
    missing = ref_names.difference(adata.var_names)
    out = adata
    if len(missing):
        zeros = sp.csr_matrix((adata.n_obs, len(missing)), dtype=np.float32)
        pad = anndata.AnnData(X=zeros.copy(), layers={name: zeros.copy() for name in adata.layers})
        pad.var_names = missing
        pad.obs_names = adata.obs_names
        out = anndata.concat([adata, pad], axis=1, join="outer", index_unique=None, merge="unique")
    if not ref_names.equals(out.var_names):
        out = out[:, ref_names].copy()
    if not inplace:
        return out.copy() if out is adata else out
    if out is not adata:
        adata._init_as_actual(out)
    return None


# ----------------------------------------------------------------------------- registry
def _extend(categories: list[str], adata, key: str | None) -> list[str]:
    if key is None:
        return list(categories)
    if key not in adata.obs:
        raise ValueError(f"The query has no obs column '{key}' (the reference's setup uses it).")
    values = adata.obs[key]
    if values.isna().any():
        raise ValueError(f"adata.obs['{key}'] has missing values.")
    new = sorted(set(values.astype(str)) - set(categories))
    return list(categories) + new


def query_registry(reference_registry: dict, adata) -> dict:
    """The registry of a query: the reference's, with new categories appended (sorted).

    Parameters
    ----------
    reference_registry
        The reference model's registry.
    adata
        Query AnnData with the reference's genes in order (see :func:`prepare_query_anndata`).

    Returns
    -------
    The registry (also written to ``adata.uns["_jaxvi"]``; codes to ``obs["_scvi_batch"]`` /
    ``obs["_scvi_labels"]``).
    """
    args = reference_registry["setup_args"]
    ref_genes = list(reference_registry["var_names"])
    genes = [str(g) for g in adata.var_names]
    if genes != ref_genes:
        raise ValueError(
            f"The query's {len(genes)} genes differ from the reference's {len(ref_genes)} "
            "(same names, same order needed): run `SCVI.prepare_query_anndata(adata, "
            "reference)` or pass `inplace_subset_query_vars=True`."
        )
    reglib.setup_anndata(adata, **args)  # validates counts and columns
    cov_keys = args["categorical_covariate_keys"] or []
    ref_covs = reference_registry["categorical_covariate_categories"]
    reg = {
        "model_name": "SCVI",
        "setup_args": dict(args),
        "var_names": ref_genes,
        "batch_categories": _extend(
            reference_registry["batch_categories"], adata, args["batch_key"]
        ),
        "labels_categories": _extend(
            reference_registry["labels_categories"], adata, args["labels_key"]
        ),
        "categorical_covariate_categories": {k: _extend(ref_covs[k], adata, k) for k in cov_keys},
    }
    reg["summary_stats"] = {
        "n_cells": int(adata.n_obs),
        "n_vars": len(ref_genes),
        "n_batch": len(reg["batch_categories"]),
        "n_labels": len(reg["labels_categories"]),
        "n_extra_categorical_covs": len(cov_keys),
        "n_extra_continuous_covs": len(args["continuous_covariate_keys"] or []),
    }
    adata.uns[reglib.UNS_KEY] = reg
    arrays = reglib.registry_arrays(adata, reg)
    adata.obs["_scvi_batch"] = arrays["batch_index"]
    adata.obs["_scvi_labels"] = arrays["labels"]
    return reg


# ----------------------------------------------------------------------------- surgery
def _widths(cat_list) -> list[int]:
    return [n if n > 1 else 0 for n in cat_list]


def _extend_rows(ref: np.ndarray, fresh: np.ndarray, ref_w: list[int], new_w: list[int]):
    """Kernel ``(in, out)``: reference rows, each one-hot block followed by its fresh rows."""
    base = ref.shape[0] - sum(ref_w)
    parts = [ref[:base]]
    r, f = base, fresh.shape[0] - sum(new_w)
    for wr, wn in zip(ref_w, new_w, strict=True):
        parts.append(ref[r : r + wr])
        parts.append(fresh[f + wr : f + wn])
        r, f = r + wr, f + wn
    return np.concatenate(parts, axis=0)


def _append_trailing(ref: np.ndarray, fresh: np.ndarray) -> np.ndarray:
    """scvi-tools' rule: along the larger axis, append the trailing slice of ``fresh``."""
    grown = [ax for ax in range(ref.ndim) if fresh.shape[ax] != ref.shape[ax]]
    if len(grown) != 1 or fresh.shape[grown[0]] < ref.shape[grown[0]]:
        raise ValueError(f"cannot extend a parameter of shape {ref.shape} to {fresh.shape}.")
    axis = grown[0]
    tail = np.take(fresh, np.arange(ref.shape[axis], fresh.shape[axis]), axis=axis)
    return np.concatenate([ref, tail], axis=axis)


def extend_variables(
    ref_variables: dict, ref_config: VAEConfig, fresh_variables: dict, config: VAEConfig
) -> dict:
    """Reference weights in the query's shapes; new-category entries from ``fresh_variables``.

    Parameters
    ----------
    ref_variables, ref_config
        The reference model's variables and architecture.
    fresh_variables, config
        Freshly initialised variables of the query architecture (more categories).

    Returns
    -------
    Variables of ``config``'s shapes: every reference value at its place; the one-hot input
    rows of each new category, new per-batch / per-label columns of ``px_r``, new embedding
    rows and new library-prior entries from ``fresh_variables``.
    """
    ref = dict(leaf_paths(jax.device_get(ref_variables)))
    out: dict = {}
    ref_cats, new_cats = _widths(ref_config.cat_list), _widths(config.cat_list)
    for path, fresh in leaf_paths(jax.device_get(fresh_variables)):
        fresh = np.asarray(fresh)
        old = np.asarray(ref[path])
        if old.shape == fresh.shape:
            value = old
        elif path[-1] == "kernel" and old.shape[1:] == fresh.shape[1:]:
            # an injected layer: the input axis grows by the new one-hot columns
            enc = path[1] in ("z_encoder", "l_encoder")
            rw = ref_cats if (not enc or ref_config.encode_covariates) else []
            nw = new_cats if (not enc or config.encode_covariates) else []
            if fresh.shape[0] - old.shape[0] != sum(nw) - sum(rw):
                raise ValueError(f"cannot align {'/'.join(path)}: {old.shape} -> {fresh.shape}.")
            value = _extend_rows(old, fresh, rw, nw)
        else:
            value = _append_trailing(old, fresh)
        set_path(out, path, jnp.asarray(value, fresh.dtype))
    return out


# ----------------------------------------------------------------------------- freezing
def _layer_of(key: str) -> int:
    return int(key.split("fc_layers.Layer ")[1].split(".")[0])


class FreezeOptions(NamedTuple):
    """scArches' freeze options (``load_query_data``'s arguments of the same names)."""

    unfrozen: bool = False
    freeze_expression: bool = True
    freeze_decoder_first_layer: bool = True
    freeze_batchnorm_encoder: bool = True
    freeze_batchnorm_decoder: bool = False


def freeze_masks(config: VAEConfig, variables: dict, options: FreezeOptions) -> dict | None:
    """Which parameter entries query training may change, by scvi-tools' rules (module docstring).

    Parameters
    ----------
    config
        The query architecture.
    variables
        The query's variables (only the structure and shapes are used).
    options
        The freeze options (see the module docstring).

    Returns
    -------
    A pytree of bool arrays like ``variables["params"]``: True where training may change the
    entry; None with ``options.unfrozen`` (everything trains).
    """
    if options.unfrozen:
        return None
    freeze_expression = options.freeze_expression
    freeze_decoder_first_layer = options.freeze_decoder_first_layer
    freeze_batchnorm_encoder = options.freeze_batchnorm_encoder
    freeze_batchnorm_decoder = options.freeze_batchnorm_decoder
    update: dict = {}
    for path, leaf in leaf_paths(jax.device_get(variables["params"])):
        key, _ = torch_key(("params", *path))
        net = key.split(".fc_layers")[0] if "fc_layers" in key else ""
        requires_grad = (
            ("fc_layers" in key and ".0." in key)
            or key.startswith("l_encoder.")
            or (
                "fc_layers" in key
                and ".1." in key
                and "encoder" in key
                and not freeze_batchnorm_encoder
            )
            or (
                "fc_layers" in key
                and ".1." in key
                and "decoder" in key
                and not freeze_batchnorm_decoder
            )
        )
        mask = np.full(np.shape(leaf), requires_grad, bool)
        hooked = net in ("z_encoder.encoder", "decoder.px_decoder") and ".0." in key
        if requires_grad and hooked:
            layer = _layer_of(key)
            first_free = (not freeze_expression and "encoder" in net) or (
                not freeze_decoder_first_layer and "px_decoder" in net
            )
            if not (layer == 0 and first_free):
                mask[...] = False
                if net == "z_encoder.encoder" and not config.encode_covariates:
                    n_cat = 0
                else:
                    n_cat = sum(_widths(config.cat_list))
                injected = layer == 0 or config.deeply_inject_covariates
                if key.endswith(".weight") and injected and n_cat:
                    mask[-n_cat:] = True  # kernel (in, out): the last rows are the one-hots
        set_path(update, path, mask)
    return update


def query_parts(
    cls, adata, reference_model, freeze: FreezeOptions, subset_genes: bool, transfer_batch: bool
):
    """The :class:`~jaxvi.model.ModelParts` of a query model of class ``cls``: the query's
    registry, the reference's variables extended to the query's categories, and the freeze
    masks (see :meth:`jaxvi.model.BaseModel.load_query_data`).

    Raises
    ------
    KeyError
        A registered covariate column is missing from the query (also a ``ValueError``:
        :class:`jaxvi.data.registry.MissingColumnError`).
    ValueError
        New batch categories with ``transfer_batch=False``, or genes that differ.
    """
    if subset_genes:
        subset_query_genes(adata, reference_model.registry_["var_names"])
    registry = query_registry(reference_model.registry_, adata)
    if not transfer_batch and len(registry["batch_categories"]) > len(
        reference_model.registry_["batch_categories"]
    ):
        raise ValueError(
            "This model does not allow for query having batch categories missing from "
            "the reference."
        )
    fresh = cls(adata, **reference_model.init_params_)  # variables in the query's shapes
    variables = extend_variables(
        reference_model.variables, reference_model.config, fresh.variables, fresh.config
    )
    training = QueryTraining(
        update_mask=freeze_masks(fresh.config, variables, freeze),
        network_training=False,  # scvi-tools trains a query model in eval mode
    )
    return ModelParts(registry, fresh.init_params_, variables, adata, query_training=training)
