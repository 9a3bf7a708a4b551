"""scArches for scANVI: a query model from a trained reference :class:`jaxvi.SCANVI`.

scVI's query mapping (:mod:`jaxvi.model.scarches`: the registry with new batch categories
appended, the weight surgery, the freeze masks, training in evaluation mode) plus scvi-tools
1.4.2's scANVI rules (``ArchesMixin.load_query_data`` with ``LabelsWithUnlabeledObsField``
and ``_set_params_online_update``):

- labels are never extended: a query label the reference does not know is an error; a
  query without the labels column gets it filled with the unlabelled category (a warning);
- the classifier is frozen entirely (``freeze_classifier=True``) or trains entirely;
- ``encoder_z2_z1`` / ``decoder_z1_z2`` keep their linear layers and heads; their batch-norm
  affine parameters train as the encoder's / decoder's do (``freeze_batchnorm_encoder``,
  default frozen; ``freeze_batchnorm_decoder``, default trained);
- the classifier keeps the reference's classes (``n_labels``); scvi-tools recounts them from
  the query's labels and pads the classifier when the count differs, which jaxvi does not.
"""

from __future__ import annotations

import copy
import warnings

import jax
import numpy as np

from jaxvi.data import registry as reglib
from jaxvi.io.bridge import leaf_paths, set_path
from jaxvi.model._parts import ModelParts, QueryTraining
from jaxvi.model._scanvi_parts import UNLABELED_KEY, label_values
from jaxvi.model.scarches import (
    FreezeOptions,
    extend_variables,
    freeze_masks,
    query_registry,
    subset_query_genes,
)

__all__ = ["scanvi_freeze_masks", "scanvi_query_parts", "scanvi_query_registry"]

_SCANVI_NETS = ("classifier", "encoder_z2_z1", "decoder_z1_z2")


def scanvi_query_registry(reference_registry: dict, adata) -> dict:
    """The registry of a scANVI query: the reference's with new batch / covariate categories
    appended (:func:`jaxvi.model.scarches.query_registry`) and the reference's labels.

    Raises
    ------
    ValueError
        A query label the reference never saw, or missing labels (NaN).
    """
    args = reference_registry["setup_args"]
    key, unlabeled = args["labels_key"], args[UNLABELED_KEY]
    if key not in adata.obs:
        warnings.warn(
            f"Missing labels key {key}. Filling in with unlabeled category {unlabeled}.",
            UserWarning,
            stacklevel=3,
        )
        adata.obs[key] = unlabeled
    values = adata.obs[key]
    if values.isna().any():
        raise ValueError(f"adata.obs['{key}'] has {int(values.isna().sum())} missing values.")
    known = set(reference_registry["labels_categories"])
    unseen = sorted(set(values.astype(str)) - known)
    if unseen:
        raise ValueError(
            f"The query has labels the reference never saw: {unseen[:5]}; scANVI cannot add "
            f"classes. Relabel them as the unlabelled category {unlabeled!r}."
        )
    plain = copy.deepcopy(reference_registry)
    plain["setup_args"].pop(UNLABELED_KEY)
    registry = query_registry(plain, adata)
    mapping = list(reference_registry["labels_categories"])
    if str(unlabeled) in set(label_values(adata, registry)):  # scvi-tools' remap on transfer
        i = mapping.index(str(unlabeled))
        mapping[i], mapping[-1] = mapping[-1], mapping[i]
    registry["model_name"] = "SCANVI"
    registry["setup_args"][UNLABELED_KEY] = unlabeled
    registry["labels_categories"] = mapping
    registry["summary_stats"]["n_labels"] = len(mapping)
    adata.uns[reglib.UNS_KEY] = registry
    adata.obs["_scvi_labels"] = reglib.registry_arrays(adata, registry, counts=False)["labels"]
    return registry


def scanvi_freeze_masks(
    config, variables: dict, options: FreezeOptions, freeze_classifier: bool = True
) -> dict | None:
    """Which parameter entries of a SCANVAE query training may change (module docstring).

    Returns
    -------
    A pytree of bool arrays like ``variables["params"]``, or None with ``options.unfrozen``.
    """
    if options.unfrozen:
        return None
    params = jax.device_get(variables["params"])
    vae_params = {k: v for k, v in params.items() if k not in _SCANVI_NETS}
    masks = freeze_masks(config.vae_config(), {"params": vae_params}, options)
    for path, leaf in leaf_paths({k: v for k, v in params.items() if k in _SCANVI_NETS}):
        net = path[0]
        batch_norm = len(path) == 4 and path[2].endswith("_bn")
        if net == "classifier":
            trainable = not freeze_classifier
        elif batch_norm and net == "encoder_z2_z1":
            trainable = not options.freeze_batchnorm_encoder
        elif batch_norm and net == "decoder_z1_z2":
            trainable = not options.freeze_batchnorm_decoder
        else:
            trainable = False
        set_path(masks, path, np.full(np.shape(leaf), trainable, bool))
    return masks


def scanvi_query_parts(
    cls,
    adata,
    reference_model,
    freeze: FreezeOptions,
    freeze_classifier: bool,
    subset_genes: bool,
    transfer_batch: bool,
) -> ModelParts:
    """The :class:`~jaxvi.model.ModelParts` of a scANVI query model of class ``cls`` (see
    :meth:`jaxvi.SCANVI.load_query_data`).

    Raises
    ------
    ValueError
        Unknown labels, new batch categories with ``transfer_batch=False``, other genes.
    """
    if subset_genes:
        subset_query_genes(adata, reference_model.registry_["var_names"])
    registry = scanvi_query_registry(reference_model.registry_, adata)
    if not transfer_batch and len(registry["batch_categories"]) > len(
        reference_model.registry_["batch_categories"]
    ):
        raise ValueError(
            "This model does not allow for query having batch categories missing from "
            "the reference."
        )
    fresh = cls._new_parts(
        adata, registry, dict(reference_model.init_params_), reference_model.config.n_labels
    )
    variables = extend_variables(
        reference_model.variables, reference_model.config, fresh.variables, fresh.config
    )
    training = QueryTraining(
        update_mask=scanvi_freeze_masks(fresh.config, variables, freeze, freeze_classifier),
        network_training=False,  # scvi-tools trains a query model in eval mode
    )
    return fresh._replace(variables=variables, query_training=training)
