"""Convert weights between scvi-tools' PyTorch ``VAE`` and jaxvi's Flax ``VAE``.

scvi-tools stores a trained scVI as ``module.state_dict()``: a flat mapping from dotted names
such as ``"z_encoder.encoder.fc_layers.Layer 0.0.weight"`` to tensors. jaxvi keeps the same
numbers in a nested variables dict ``{"params", "batch_stats"[, "buffers"]}``. The two layouts
correspond one to one (``<net>`` is ``z_encoder/encoder``, ``l_encoder/encoder`` or
``decoder/px_decoder``; ``<head>`` is ``z_encoder/mean_encoder``, ``z_encoder/var_encoder``,
the same two of ``l_encoder``, or ``decoder/px_{scale,r,dropout}_decoder``):

- ``<net>.fc_layers.Layer {i}.0.weight`` ``(out, in)`` and ``.bias``:
  ``params/<net>/layer{i}_dense/kernel`` ``(in, out)`` and ``bias``;
- ``<net>.fc_layers.Layer {i}.1.weight`` / ``.bias``: ``params/<net>/layer{i}_bn/scale`` /
  ``bias``;
- ``<net>.fc_layers.Layer {i}.1.running_mean`` / ``.running_var``:
  ``batch_stats/<net>/layer{i}_bn/mean`` / ``var``;
- ``<net>.fc_layers.Layer {i}.1.num_batches_tracked``: not stored (batch norm uses a fixed
  momentum, so the counter is unused); written back as ``0``;
- ``<head>.weight`` ``(out, in)`` and ``.bias`` (``decoder.px_scale_decoder.0.*`` for the
  scale head): ``params/<head>/kernel`` ``(in, out)`` and ``bias``;
- ``px_r``: ``params/px_r``, same shape (``(G,)``, ``(G, n_batch)`` or ``(G, n_labels)``);
- ``_embeddings_dict.batch.weight`` ``(n_batch, dim)``: ``params/batch_embedding/embedding``;
- ``library_log_means`` / ``library_log_vars`` ``(1, n_batch)``: ``buffers/...``, same names.

Linear weights are transposed; everything else is copied as is. The converters work on NumPy
arrays and never import torch: a state dict of tensors is accepted (each value is read through
``.detach().cpu().numpy()``) and :func:`variables_to_state_dict` returns NumPy arrays, which
``torch.from_numpy`` turns into what ``load_state_dict`` takes.

scANVI's ``SCANVAE`` state dicts (the VAE's keys plus the classifier, ``encoder_z2_z1``,
``decoder_z1_z2`` and ``y_prior``) go through the ``scanvae_*`` functions of
:mod:`jaxvi.io.scanvi_bridge`, which convert the VAE part with the functions here.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxvi.module import VAEConfig, init_variables

__all__ = [
    "config_from_scvi",
    "expected_state_dict_shapes",
    "load_into_scvi_tools",
    "state_dict_to_variables",
    "variables_to_state_dict",
]

# A saved ``model.pt`` carries this extra (empty for SCVI) entry next to the tensors.
_PYRO_KEY = "pyro_param_store"

_FC_NETS = {
    ("z_encoder", "encoder"): "z_encoder.encoder.fc_layers",
    ("l_encoder", "encoder"): "l_encoder.encoder.fc_layers",
    ("decoder", "px_decoder"): "decoder.px_decoder.fc_layers",
}
_HEADS = {
    ("z_encoder", "mean_encoder"): "z_encoder.mean_encoder",
    ("z_encoder", "var_encoder"): "z_encoder.var_encoder",
    ("l_encoder", "mean_encoder"): "l_encoder.mean_encoder",
    ("l_encoder", "var_encoder"): "l_encoder.var_encoder",
    ("decoder", "px_scale_decoder"): "decoder.px_scale_decoder.0",
    ("decoder", "px_r_decoder"): "decoder.px_r_decoder",
    ("decoder", "px_dropout_decoder"): "decoder.px_dropout_decoder",
}
_DENSE_LEAF = {"kernel": "weight", "bias": "bias"}
_BN_PARAM_LEAF = {"scale": "weight", "bias": "bias"}
_BN_STAT_LEAF = {"mean": "running_mean", "var": "running_var"}
_LAYER = re.compile(r"^layer(\d+)_(dense|bn)$")


def torch_key(path: tuple[str, ...]) -> tuple[str, bool]:
    """scvi-tools name of the jaxvi leaf at ``path`` and whether its value is transposed.

    Parameters
    ----------
    path
        ``(collection, *module names, leaf name)``, e.g.
        ``("params", "z_encoder", "encoder", "layer0_dense", "kernel")``.

    Returns
    -------
    ``(key, transpose)``.

    Raises
    ------
    ValueError
        If the leaf has no scvi-tools counterpart.
    """
    collection, *names = path
    if collection == "params" and names == ["px_r"]:
        return "px_r", False
    if collection == "params" and names == ["batch_embedding", "embedding"]:
        return "_embeddings_dict.batch.weight", False
    if collection == "buffers" and len(names) == 1:
        return names[0], False
    if len(names) == 4 and tuple(names[:2]) in _FC_NETS:
        prefix = _FC_NETS[tuple(names[:2])]
        match = _LAYER.match(names[2])
        if match is not None:
            layer, kind = int(match.group(1)), match.group(2)
            leaf = names[3]
            if kind == "dense" and collection == "params" and leaf in _DENSE_LEAF:
                return f"{prefix}.Layer {layer}.0.{_DENSE_LEAF[leaf]}", leaf == "kernel"
            if kind == "bn" and collection == "params" and leaf in _BN_PARAM_LEAF:
                return f"{prefix}.Layer {layer}.1.{_BN_PARAM_LEAF[leaf]}", False
            if kind == "bn" and collection == "batch_stats" and leaf in _BN_STAT_LEAF:
                return f"{prefix}.Layer {layer}.1.{_BN_STAT_LEAF[leaf]}", False
    if (
        collection == "params"
        and len(names) == 3
        and tuple(names[:2]) in _HEADS
        and names[2] in _DENSE_LEAF
    ):
        return f"{_HEADS[tuple(names[:2])]}.{_DENSE_LEAF[names[2]]}", names[2] == "kernel"
    raise ValueError(f"jaxvi variable {'/'.join(path)} has no scvi-tools counterpart.")


def leaf_paths(tree: Mapping, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """``(path, leaf)`` pairs of a nested mapping, depth first, in insertion order."""
    out = []
    for name, value in tree.items():
        path = (*prefix, str(name))
        if isinstance(value, Mapping):
            out.extend(leaf_paths(value, path))
        else:
            out.append((path, value))
    return out


@functools.lru_cache(maxsize=32)
def _expected_layout(config: VAEConfig) -> dict[str, tuple[tuple[str, ...], bool, tuple]]:
    """Map each scvi-tools key to ``(jaxvi path, transpose, jaxvi shape)`` for ``config``.

    The shapes are those of :func:`jaxvi.module.init_variables`, obtained abstractly with
    :func:`jax.eval_shape` (no parameters are materialised). Cached per config; callers
    must not modify the result.
    """
    shapes = jax.eval_shape(lambda key: init_variables(config, key), jax.random.key(0))
    layout = {}
    for path, leaf in leaf_paths(shapes):
        key, transpose = torch_key(path)
        layout[key] = (path, transpose, tuple(leaf.shape))
    return layout


def _bn_counter_keys(layout: Mapping[str, Any]) -> list[str]:
    """The ``num_batches_tracked`` key of every batch-norm layer in ``layout``."""
    suffix = ".running_mean"
    return [k[: -len(suffix)] + ".num_batches_tracked" for k in layout if k.endswith(suffix)]


def expected_state_dict_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the scvi-tools ``VAE.state_dict()`` matching ``config``.

    Parameters
    ----------
    config
        Architecture of the model.

    Returns
    -------
    ``{key: shape}`` in PyTorch's layout (Linear weights ``(out, in)``), including the
    ``num_batches_tracked`` counters (shape ``()``).
    """
    layout = _expected_layout(config)
    out = {k: (s[::-1] if t else s) for k, (_, t, s) in layout.items()}
    out.update(dict.fromkeys(_bn_counter_keys(layout), ()))
    return out


def _to_numpy(value) -> np.ndarray:
    """An array-like, or a (possibly GPU, grad-tracking) torch tensor, as a NumPy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    node = tree
    for name in path[:-1]:
        node = node.setdefault(name, {})
    node[path[-1]] = value


def state_dict_to_variables(state_dict: Mapping[str, Any], config: VAEConfig) -> dict:
    """Turn a scvi-tools ``VAE.state_dict()`` into jaxvi variables.

    Parameters
    ----------
    state_dict
        ``{key: array}`` as returned by ``model.module.state_dict()`` (torch tensors or
        array-likes), or the ``"model_state_dict"`` entry of a saved ``model.pt`` (its empty
        ``"pyro_param_store"`` entry is ignored). Linear weights are ``(out, in)``.
    config
        The architecture the weights belong to; see :func:`config_from_scvi`.

    Returns
    -------
    ``{"params": ..., "batch_stats": ...[, "buffers": ...]}`` with float32 NumPy leaves of
    exactly the structure and shapes of :func:`jaxvi.module.init_variables` for ``config``
    (Dense kernels ``(in, out)``).

    Raises
    ------
    ValueError
        If a key the architecture needs is missing, a value has the wrong shape (the message
        names the key and both shapes), or a key is unknown to the architecture.
    """
    layout = _expected_layout(config)
    counters = set(_bn_counter_keys(layout))
    unknown = [k for k in state_dict if k not in layout and k not in counters and k != _PYRO_KEY]
    if unknown:
        raise ValueError(
            f"state_dict has keys that a VAE of this config does not have: {sorted(unknown)}. "
            "Check that the config matches the scvi-tools model (dispersion, covariates, "
            "batch_representation, use_observed_lib_size)."
        )
    if state_dict.get(_PYRO_KEY):
        raise ValueError(f"A non-empty {_PYRO_KEY!r} cannot be converted.")
    missing = [k for k in layout if k not in state_dict]
    if missing:
        raise ValueError(f"state_dict is missing keys required by the config: {missing}.")
    variables: dict = {"params": {}, "batch_stats": {}}
    for key, (path, transpose, shape) in layout.items():
        value = _to_numpy(state_dict[key])
        if transpose:
            value = value.T
        if value.shape != shape:
            torch_shape = shape[::-1] if transpose else shape
            got = value.shape[::-1] if transpose else value.shape
            raise ValueError(
                f"state_dict[{key!r}] has shape {got}, but the config expects {torch_shape} "
                f"(jaxvi {'/'.join(path)} of shape {shape})."
            )
        set_path(variables, path, np.array(value, dtype=np.float32))
    return variables


def variables_to_state_dict(variables: Mapping, config: VAEConfig) -> dict[str, np.ndarray]:
    """Turn jaxvi variables into a scvi-tools ``VAE.state_dict()``; inverse of
    :func:`state_dict_to_variables`.

    Parameters
    ----------
    variables
        ``{"params", "batch_stats"[, "buffers"]}`` of a VAE of ``config`` (JAX or NumPy
        leaves; Dense kernels ``(in, out)``).
    config
        The architecture of ``variables``.

    Returns
    -------
    ``{key: np.ndarray}`` with float32 values in PyTorch's layout (Linear weights
    ``(out, in)``), plus an int64 scalar ``0`` for every ``num_batches_tracked`` counter, so
    that ``module.load_state_dict({k: torch.from_numpy(v) ...}, strict=True)`` accepts it.

    Raises
    ------
    ValueError
        If a variable is missing, unknown to the architecture, or mis-shaped.
    """
    layout = _expected_layout(config)
    by_path = {path: (key, transpose, shape) for key, (path, transpose, shape) in layout.items()}
    given = dict(leaf_paths(variables))
    unknown = [p for p in given if p not in by_path]
    if unknown:
        raise ValueError(
            "variables has leaves that a VAE of this config does not have: "
            f"{['/'.join(p) for p in unknown]}."
        )
    missing = ["/".join(p) for p in by_path if p not in given]
    if missing:
        raise ValueError(f"variables is missing leaves required by the config: {missing}.")
    out: dict[str, np.ndarray] = {}
    for path, (key, transpose, shape) in by_path.items():
        value = np.asarray(given[path], dtype=np.float32)
        if value.shape != shape:
            raise ValueError(
                f"variable {'/'.join(path)} has shape {value.shape}, but the config expects "
                f"{shape} (scvi-tools {key!r})."
            )
        out[key] = np.array(value.T if transpose else value, dtype=np.float32, order="C")
    for key in _bn_counter_keys(layout):
        out[key] = np.array(0, dtype=np.int64)
    return out


def _find_modules(net, cls_name: str) -> list:
    return [m for m in net.modules() if type(m).__name__ == cls_name]


def config_from_scvi(model) -> VAEConfig:
    """The :class:`~jaxvi.module.VAEConfig` of a scvi-tools ``SCVI`` model or ``VAE`` module.

    Parameters
    ----------
    model
        A ``scvi.model.SCVI`` (its registry supplies the category count of each extra
        categorical covariate) or its ``.module``, a ``scvi.module.VAE``. For a bare module
        a categorical covariate with a single category is recorded as having 0 categories,
        which changes no shape.

    Returns
    -------
    The config whose :func:`~jaxvi.module.init_variables` matches the module's state dict.

    Raises
    ------
    ValueError
        If the module uses options jaxvi does not reproduce (a custom ``var_activation``,
        another ``var_eps``, a different activation or bias-free layers).
    """
    module = getattr(model, "module", model)
    n_cats_per_cov = None
    manager = getattr(model, "adata_manager", None)
    if manager is not None:
        from scvi import REGISTRY_KEYS

        if REGISTRY_KEYS.CAT_COVS_KEY in manager.data_registry:
            state = manager.get_state_registry(REGISTRY_KEYS.CAT_COVS_KEY)
            n_cats_per_cov = tuple(int(n) for n in state.n_cats_per_key)
        else:
            n_cats_per_cov = ()

    z_enc, decoder = module.z_encoder, module.decoder
    var_act = getattr(z_enc.var_activation, "__name__", None)
    if var_act != "exp" or float(z_enc.var_eps) != 1e-4:
        raise ValueError("Only var_activation=exp and var_eps=1e-4 (scVI defaults) are supported.")
    fc = decoder.px_decoder
    if any(lin.bias is None for lin in _find_modules(module, "Linear")):
        raise ValueError("Linear layers without bias are not supported.")
    for net in (z_enc.encoder, module.l_encoder.encoder, fc):
        for block in net.fc_layers:
            if type(block[3]).__name__ != "ReLU":
                raise ValueError(f"Only ReLU activations are supported, got {block[3]!r}.")

    batch_rep = getattr(module, "batch_representation", "one-hot")
    emb_dim = 5
    if batch_rep == "embedding":
        emb_dim = int(module.get_embedding("batch").embedding_dim)
    if n_cats_per_cov is None:  # bare module: read the decoder's covariate list
        cat_list = list(fc.n_cat_list)
        n_cats_per_cov = tuple(cat_list if batch_rep == "embedding" else cat_list[1:])
    n_cov_cat = sum(n for n in n_cats_per_cov if n > 1)
    if batch_rep == "one-hot" and module.n_batch > 1:
        n_cov_cat += module.n_batch
    first = fc.fc_layers[0][0]
    n_continuous_cov = first.in_features - module.n_latent - n_cov_cat
    if batch_rep == "embedding":
        n_continuous_cov -= emb_dim

    def has(net, name):
        return bool(_find_modules(net, name))

    def norm_option(name):
        enc, dec = has(z_enc.encoder, name), has(fc, name)
        return {(True, True): "both", (True, False): "encoder", (False, True): "decoder"}.get(
            (enc, dec), "none"
        )

    dropouts = _find_modules(z_enc.encoder, "Dropout")
    return VAEConfig(
        n_input=int(module.n_input),
        n_batch=max(int(module.n_batch), 1),
        n_labels=max(int(module.n_labels), 1),
        n_hidden=int(module.n_hidden),
        n_latent=int(module.n_latent),
        n_layers=int(module.n_layers),
        n_continuous_cov=int(n_continuous_cov),
        n_cats_per_cov=n_cats_per_cov,
        dropout_rate=float(dropouts[0].p) if dropouts else 0.0,
        dispersion=module.dispersion,
        log_variational=bool(module.log_variational),
        gene_likelihood=module.gene_likelihood,
        latent_distribution=module.latent_distribution,
        encode_covariates=bool(module.encode_covariates),
        deeply_inject_covariates=bool(fc.inject_covariates),
        batch_representation=batch_rep,
        batch_embedding_dim=emb_dim,
        use_batch_norm=norm_option("BatchNorm1d"),
        use_layer_norm=norm_option("LayerNorm"),
        use_size_factor_key=bool(module.use_size_factor_key),
        use_observed_lib_size=bool(module.use_observed_lib_size),
    )


def load_into_scvi_tools(scvi_model, model) -> None:
    """Copy the weights of the jaxvi ``model`` into ``scvi_model`` in memory.

    ``scvi_model`` is an ``scvi.model.SCVI`` (or its ``VAE`` module) of the same architecture;
    its module gets :func:`variables_to_state_dict` through ``load_state_dict`` (strict), so
    both then compute the same numbers. Needs torch.
    """
    import torch

    module = getattr(scvi_model, "module", scvi_model)
    state = variables_to_state_dict(model.variables, model.config)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
