"""The state-dict bridge for scANVI: scvi-tools' ``SCANVAE`` tensors to jaxvi variables and back.

It extends :mod:`jaxvi.io.bridge` (the scVI ``VAE`` part, shared) with the classifier and the
``z1 -> z2`` hierarchy. Arrays only; torch is never imported.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxvi.io.bridge import (
    _BN_PARAM_LEAF,
    _BN_STAT_LEAF,
    _DENSE_LEAF,
    _LAYER,
    _bn_counter_keys,
    _find_modules,
    _to_numpy,
    config_from_scvi,
    expected_state_dict_shapes,
    leaf_paths,
    set_path,
    state_dict_to_variables,
    variables_to_state_dict,
)
from jaxvi.module import SCANVAEConfig, VAEConfig, init_scanvae_variables

__all__ = [
    "load_scanvae_into_scvi_tools",
    "scanvae_config_from_scvi",
    "scanvae_expected_state_dict_shapes",
    "scanvae_state_dict_to_variables",
    "scanvae_torch_key",
    "scanvae_variables_to_state_dict",
]


# ---------------------------------------------------------------------------------------------
# scANVI: scvi-tools' SCANVAE = VAE + classifier, encoder_z2_z1, decoder_z1_z2 and y_prior.
#
# The VAE part of a SCANVAE state dict is converted by the functions above (with
# ``config.vae_config()``); the extra networks map as follows (``<fc>`` stands for the
# ``layer{i}_dense`` / ``layer{i}_bn`` leaves, named as for the VAE's nets):
#
# - ``classifier.classifier.0.fc_layers.<fc>``: ``classifier/hidden/<fc>`` (an MLP classifier);
# - ``classifier.classifier.{1|0}.weight`` / ``.bias`` (0 for a linear classifier):
#   ``params/classifier/output/kernel`` / ``bias``;
# - ``encoder_z2_z1.encoder.fc_layers.<fc>``: ``encoder_z2_z1/encoder/<fc>``, and its
#   ``mean_encoder`` / ``var_encoder`` heads under the same names;
# - ``decoder_z1_z2.decoder.fc_layers.<fc>``: ``decoder_z1_z2/decoder/<fc>``, and its
#   ``mean_decoder`` / ``var_decoder`` heads under the same names;
# - ``y_prior`` ``(1, n_labels)`` (a frozen parameter in PyTorch): ``buffers/y_prior``.
# ---------------------------------------------------------------------------------------------

_SCANVI_NETS = ("classifier", "encoder_z2_z1", "decoder_z1_z2")
_SCANVI_FC = {
    ("classifier", "hidden"): "classifier.classifier.0.fc_layers",
    ("encoder_z2_z1", "encoder"): "encoder_z2_z1.encoder.fc_layers",
    ("decoder_z1_z2", "decoder"): "decoder_z1_z2.decoder.fc_layers",
}
_SCANVI_HEADS = {
    ("encoder_z2_z1", "mean_encoder"): "encoder_z2_z1.mean_encoder",
    ("encoder_z2_z1", "var_encoder"): "encoder_z2_z1.var_encoder",
    ("decoder_z1_z2", "mean_decoder"): "decoder_z1_z2.mean_decoder",
    ("decoder_z1_z2", "var_decoder"): "decoder_z1_z2.var_decoder",
}


def _is_scanvi_path(path: tuple[str, ...]) -> bool:
    """Whether a jaxvi leaf path belongs to scANVI's additions rather than to the VAE."""
    return path[1] in _SCANVI_NETS or path == ("buffers", "y_prior")


def _is_scanvi_key(key: str) -> bool:
    """Whether a scvi-tools state-dict key belongs to scANVI's additions."""
    return key == "y_prior" or key.split(".", 1)[0] in _SCANVI_NETS


def scanvae_torch_key(path: tuple[str, ...], linear_classifier: bool) -> tuple[str, bool]:
    """scvi-tools name of a leaf of scANVI's additions and whether its value is transposed.

    Parameters
    ----------
    path
        ``(collection, *module names, leaf name)``, e.g.
        ``("params", "classifier", "output", "kernel")``.
    linear_classifier
        Whether the classifier is one linear layer (its output layer is then
        ``classifier.classifier.0`` instead of ``.1``).

    Returns
    -------
    ``(key, transpose)``.

    Raises
    ------
    ValueError
        If the leaf has no scvi-tools counterpart.
    """
    collection, *names = path
    if collection == "buffers" and names == ["y_prior"]:
        return "y_prior", False
    if len(names) == 4 and tuple(names[:2]) in _SCANVI_FC:
        match = _LAYER.match(names[2])
        kind = match.group(2) if match else None
        leaf_map = {
            ("dense", "params"): (0, _DENSE_LEAF),
            ("bn", "params"): (1, _BN_PARAM_LEAF),
            ("bn", "batch_stats"): (1, _BN_STAT_LEAF),
        }.get((kind, collection))
        if leaf_map is not None and names[3] in leaf_map[1]:
            block, leaves = leaf_map
            prefix = _SCANVI_FC[tuple(names[:2])]
            key = f"{prefix}.Layer {int(match.group(1))}.{block}.{leaves[names[3]]}"
            return key, kind == "dense" and names[3] == "kernel"
    if collection == "params" and len(names) == 3 and names[2] in _DENSE_LEAF:
        if tuple(names[:2]) == ("classifier", "output"):
            prefix = f"classifier.classifier.{0 if linear_classifier else 1}"
        else:
            prefix = _SCANVI_HEADS.get(tuple(names[:2]))
        if prefix is not None:
            return f"{prefix}.{_DENSE_LEAF[names[2]]}", names[2] == "kernel"
    raise ValueError(f"jaxvi variable {'/'.join(path)} has no scvi-tools counterpart.")


@functools.lru_cache(maxsize=32)
def _scanvi_layout(config: SCANVAEConfig) -> dict[str, tuple[tuple[str, ...], bool, tuple]]:
    """``{scvi-tools key: (jaxvi path, transpose, jaxvi shape)}`` of scANVI's additions."""
    shapes = jax.eval_shape(lambda key: init_scanvae_variables(config, key), jax.random.key(0))
    linear = config.classifier_hidden <= 0 or config.classifier_layers <= 0
    layout = {}
    for path, leaf in leaf_paths(shapes):
        if _is_scanvi_path(path):
            key, transpose = scanvae_torch_key(path, linear)
            layout[key] = (path, transpose, tuple(leaf.shape))
    return layout


def _check_scanvae_config(config) -> None:
    if not isinstance(config, SCANVAEConfig):
        raise TypeError(f"Expected a SCANVAEConfig, got {type(config).__name__}.")


def scanvae_expected_state_dict_shapes(config: SCANVAEConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the scvi-tools ``SCANVAE.state_dict()`` matching ``config``.

    Parameters
    ----------
    config
        Architecture of the model.

    Returns
    -------
    ``{key: shape}`` in PyTorch's layout, ``num_batches_tracked`` counters included.
    """
    _check_scanvae_config(config)
    layout = _scanvi_layout(config)
    out = expected_state_dict_shapes(config.vae_config())
    out.update({k: (s[::-1] if t else s) for k, (_, t, s) in layout.items()})
    out.update(dict.fromkeys(_bn_counter_keys(layout), ()))
    return out


def scanvae_state_dict_to_variables(state_dict: Mapping[str, Any], config: SCANVAEConfig) -> dict:
    """Turn a scvi-tools ``SCANVAE.state_dict()`` into jaxvi variables.

    Parameters
    ----------
    state_dict
        ``{key: array}`` from ``scanvi_model.module.state_dict()`` (tensors or array-likes),
        or the ``"model_state_dict"`` entry of a saved SCANVI ``model.pt``.
    config
        The architecture; see :func:`scanvae_config_from_scvi`.

    Returns
    -------
    ``{"params", "batch_stats", "buffers"}`` with float32 NumPy leaves, of exactly the
    structure and shapes of :func:`jaxvi.module.init_scanvae_variables` for ``config``.

    Raises
    ------
    ValueError
        If a key is missing, unknown or mis-shaped (the message names it).
    """
    _check_scanvae_config(config)
    vae_part = {k: v for k, v in state_dict.items() if not _is_scanvi_key(k)}
    variables = state_dict_to_variables(vae_part, config.vae_config())
    layout = _scanvi_layout(config)
    counters = set(_bn_counter_keys(layout))
    extra = [k for k in state_dict if _is_scanvi_key(k)]
    unknown = [k for k in extra if k not in layout and k not in counters]
    if unknown:
        raise ValueError(
            f"state_dict has keys that a SCANVAE of this config does not have: {unknown}. "
            "Check the classifier options (linear_classifier, classifier_n_hidden/n_layers)."
        )
    missing = [k for k in layout if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict is missing keys required by the config: {missing}.")
    for key, (path, transpose, shape) in layout.items():
        value = _to_numpy(state_dict[key])
        value = value.T if transpose else value
        if value.shape != shape:
            got = value.shape[::-1] if transpose else value.shape
            want = shape[::-1] if transpose else shape
            raise ValueError(
                f"state_dict[{key!r}] has shape {got}, but the config expects {want} "
                f"(jaxvi {'/'.join(path)} of shape {shape})."
            )
        set_path(variables, path, np.array(value, dtype=np.float32))
    return variables


def scanvae_variables_to_state_dict(
    variables: Mapping, config: SCANVAEConfig
) -> dict[str, np.ndarray]:
    """Turn jaxvi SCANVAE variables into a scvi-tools ``SCANVAE.state_dict()``; inverse of
    :func:`scanvae_state_dict_to_variables`.

    Returns
    -------
    ``{key: np.ndarray}`` (float32, Linear weights ``(out, in)``, int64 ``0`` counters) that
    ``module.load_state_dict(..., strict=True)`` accepts.

    Raises
    ------
    ValueError
        If a variable is missing, unknown or mis-shaped.
    """
    _check_scanvae_config(config)
    vae_part: dict = {}
    extra: dict[tuple[str, ...], Any] = {}
    for path, value in leaf_paths(variables):
        if len(path) > 1 and _is_scanvi_path(path):
            extra[path] = value
        else:
            set_path(vae_part, path, value)
    out = variables_to_state_dict(vae_part, config.vae_config())
    layout = _scanvi_layout(config)
    by_path = {path: (key, transpose, shape) for key, (path, transpose, shape) in layout.items()}
    unknown = ["/".join(p) for p in extra if p not in by_path]
    if unknown:
        raise ValueError(f"variables has leaves that a SCANVAE of this config lacks: {unknown}.")
    missing = ["/".join(p) for p in by_path if p not in extra]
    if missing:
        raise ValueError(f"variables is missing leaves required by the config: {missing}.")
    for path, (key, transpose, shape) in by_path.items():
        value = np.asarray(extra[path], dtype=np.float32)
        if value.shape != shape:
            raise ValueError(
                f"variable {'/'.join(path)} has shape {value.shape}, but the config expects "
                f"{shape} (scvi-tools {key!r})."
            )
        out[key] = np.array(value.T if transpose else value, dtype=np.float32, order="C")
    for key in _bn_counter_keys(layout):
        out[key] = np.array(0, dtype=np.int64)
    return out


def scanvae_config_from_scvi(model) -> SCANVAEConfig:
    """The :class:`~jaxvi.module.SCANVAEConfig` of a scvi-tools ``SCANVI`` or its ``SCANVAE``.

    The VAE part is read as :func:`config_from_scvi` reads it; the classifier's form (linear
    or MLP, width, depth, dropout, logits) and a non-uniform ``y_prior`` from the module.

    Raises
    ------
    ValueError
        If the module uses label groups (``use_labels_groups``) or another unsupported option.
    """
    module = getattr(model, "module", model)
    if getattr(module, "use_labels_groups", False):
        raise ValueError("scANVI label groups (`use_labels_groups=True`) are not supported.")
    vae = config_from_scvi(model)
    layers = list(module.classifier.classifier)
    fc = layers[0] if type(layers[0]).__name__ == "FCLayers" else None
    options: dict[str, Any] = {"classifier_logits": bool(module.classifier.logits)}
    if fc is None:
        options["linear_classifier"] = True
    else:
        first = fc.fc_layers[0][0]
        n_hidden, n_layers = int(first.out_features), len(fc.fc_layers)
        dropouts = _find_modules(fc, "Dropout")
        dropout = float(dropouts[0].p) if dropouts else 0.0
        options["classifier_n_hidden"] = None if n_hidden == vae.n_hidden else n_hidden
        options["classifier_n_layers"] = None if n_layers == vae.n_layers else n_layers
        options["classifier_dropout_rate"] = None if dropout == vae.dropout_rate else dropout
    prior = _to_numpy(module.y_prior).reshape(-1).astype(np.float32)
    uniform = np.full(prior.shape, 1.0 / prior.size, dtype=np.float32)
    fields = {f.name: getattr(vae, f.name) for f in dataclasses.fields(VAEConfig)}
    fields["n_labels"] = int(module.n_labels)
    return SCANVAEConfig(
        **fields,
        y_prior=None if np.array_equal(prior, uniform) else tuple(float(p) for p in prior),
        **options,
    )


def load_scanvae_into_scvi_tools(scvi_model, variables: Mapping, config: SCANVAEConfig) -> None:
    """Copy jaxvi SCANVAE ``variables`` into a scvi-tools ``SCANVI`` (or its module) in memory,
    through ``load_state_dict`` (strict). Needs torch."""
    import torch

    module = getattr(scvi_model, "module", scvi_model)
    state = scanvae_variables_to_state_dict(variables, config)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
