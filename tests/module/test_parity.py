"""Numerical parity of jaxvi's VAE with scvi-tools' PyTorch ``VAE`` on shared weights.

Each case builds a small AnnData, an ``scvi.model.SCVI`` on it and the matching jaxvi
:class:`~jaxvi.module.VAEConfig`; randomises the torch module's batch-norm statistics and
affine parameters (so that eval-mode batch norm is not the identity); copies the weights with
:func:`jaxvi.io.bridge.state_dict_to_variables`; and compares, on one minibatch of all cells:

* the encoder: ``q(z | x)`` mean and variance (and ``q(l | x)`` for a latent library);
* the decoder, fed the *same* ``z`` (torch's posterior mean) and library: ``px_scale``,
  ``px_rate``, ``theta = exp(px_r)`` and the zero-inflation logits;
* the loss terms per cell at the posterior mean: reconstruction loss, KL(z), KL(l), and the
  minibatch loss.

The file is skipped only where scvi-tools (and torch) are not installed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from jaxvi.data import Minibatch
from jaxvi.io.bridge import (
    config_from_scvi,
    expected_state_dict_shapes,
    state_dict_to_variables,
    variables_to_state_dict,
)
from jaxvi.module import VAE, VAEConfig, init_variables, vae_loss

scvi = pytest.importorskip("scvi")
torch = pytest.importorskip("torch")
anndata = pytest.importorskip("anndata")

RTOL = 1e-5
N_CELLS = 96
N_GENES = 48


def assert_close(actual, reference, name: str) -> float:
    """``assert_allclose`` with rtol 1e-5 and an atol of 1e-5 * max|reference|.

    Returns ``max|actual - reference| / max|reference|``, for diagnostics.
    """
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    actual, reference = np.broadcast_arrays(actual, reference)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    np.testing.assert_allclose(actual, reference, rtol=RTOL, atol=RTOL * scale, err_msg=name)
    return float(np.max(np.abs(actual - reference)) / scale) if scale > 0 else 0.0


def make_adata(
    *,
    n_batch: int = 1,
    n_labels: int = 1,
    cat_levels: tuple[int, ...] = (),
    n_cont: int = 0,
    size_factor: bool = False,
    seed: int = 0,
):
    """Negative-binomial counts with obs columns ``batch``, ``labels``, ``cat{k}``,
    ``cont{k}`` and ``size_factor``; every category is present and no cell is empty."""
    rng = np.random.default_rng(seed)
    gene_mean = rng.gamma(2.0, 2.0, size=N_GENES)
    cell_scale = rng.lognormal(0.0, 0.4, size=(N_CELLS, 1))
    mu = gene_mean * cell_scale
    theta = 2.0
    counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1.0
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(N_CELLS)])
    obs["batch"] = pd.Categorical([f"b{i % n_batch}" for i in rng.permutation(N_CELLS)])
    obs["labels"] = pd.Categorical([f"l{i % n_labels}" for i in rng.permutation(N_CELLS)])
    for k, levels in enumerate(cat_levels):
        obs[f"cat{k}"] = pd.Categorical([f"c{i % levels}" for i in rng.permutation(N_CELLS)])
    for k in range(n_cont):
        obs[f"cont{k}"] = rng.normal(size=N_CELLS).astype(np.float32)
    obs["size_factor"] = rng.uniform(0.5, 2.0, size=N_CELLS).astype(np.float32)
    var = pd.DataFrame(index=[f"gene{j}" for j in range(N_GENES)])
    adata = anndata.AnnData(counts, obs=obs, var=var)
    setup = {
        "batch_key": "batch" if n_batch > 1 else None,
        "labels_key": "labels" if n_labels > 1 else None,
        "categorical_covariate_keys": [f"cat{k}" for k in range(len(cat_levels))] or None,
        "continuous_covariate_keys": [f"cont{k}" for k in range(n_cont)] or None,
        "size_factor_key": "size_factor" if size_factor else None,
    }
    return adata, setup


# (id, data options, SCVI / VAEConfig options)
CASES = [
    ("default", {}, {}),
    ("nb_2batches", {"n_batch": 2}, {"gene_likelihood": "nb", "n_hidden": 32, "n_latent": 6}),
    (
        "gene_batch_covariates_2layers",
        {"n_batch": 2, "cat_levels": (3,), "n_cont": 1},
        {"dispersion": "gene-batch", "n_layers": 2, "n_hidden": 32},
    ),
    (
        "latent_library",
        {"n_batch": 2},
        {"use_observed_lib_size": False, "n_hidden": 32},
    ),
    ("ln_latent", {}, {"latent_distribution": "ln", "n_hidden": 32}),
    (
        "batch_embedding",
        {"n_batch": 3, "cat_levels": (2,)},
        {"batch_representation": "embedding", "n_hidden": 32},
    ),
    ("gene_label", {"n_labels": 3}, {"dispersion": "gene-label", "n_hidden": 32}),
    ("gene_cell", {"n_batch": 2}, {"dispersion": "gene-cell", "n_hidden": 32}),
    ("poisson", {"n_batch": 2}, {"gene_likelihood": "poisson", "n_hidden": 32}),
    (
        "layer_norm_no_batch_norm",
        {"n_batch": 2},
        {"use_layer_norm": "both", "use_batch_norm": "none", "n_hidden": 32, "n_layers": 2},
    ),
    (
        "encode_covariates",
        {"n_batch": 2, "cat_levels": (3,), "n_cont": 2},
        {"encode_covariates": True, "n_hidden": 32, "n_layers": 2},
    ),
    (
        "embedding_encode_covariates_latent_library",
        {"n_batch": 3, "cat_levels": (3,), "n_cont": 1},
        {
            "batch_representation": "embedding",
            "encode_covariates": True,
            "use_observed_lib_size": False,
            "dispersion": "gene-batch",
            "n_hidden": 32,
        },
    ),
    (
        "shallow_injection_encoder_norms",
        {"n_batch": 2, "cat_levels": (2,)},
        {
            "deeply_inject_covariates": False,
            "use_batch_norm": "encoder",
            "use_layer_norm": "decoder",
            "n_layers": 3,
            "n_hidden": 24,
        },
    ),
    ("size_factor", {"n_batch": 2, "size_factor": True}, {"n_hidden": 32}),
]


def build(data_opts: dict, options: dict, *, seed: int = 0):
    """The torch SCVI, its (perturbed) module, the jaxvi config, variables and minibatch."""
    adata, setup = make_adata(seed=seed, **data_opts)
    scvi.model.SCVI.setup_anndata(adata, **setup)
    torch.manual_seed(seed)
    model = scvi.model.SCVI(adata, **options)
    module = model.module
    config = VAEConfig(
        n_input=N_GENES,
        n_batch=data_opts.get("n_batch", 1),
        n_labels=data_opts.get("n_labels", 1),
        n_cats_per_cov=tuple(data_opts.get("cat_levels", ())),
        n_continuous_cov=data_opts.get("n_cont", 0),
        use_size_factor_key=data_opts.get("size_factor", False),
        **options,
    )
    assert config_from_scvi(model) == config
    assert config_from_scvi(module) == config  # from the module alone
    perturb(module, seed)
    variables = state_dict_to_variables(module.state_dict(), config)
    loader = model._make_data_loader(adata=adata, batch_size=N_CELLS, shuffle=False)
    tensors = next(iter(loader))
    return model, module, config, variables, tensors, jax_batch(tensors)


def perturb(module, seed: int) -> None:
    """Give batch norm non-trivial affine parameters and running statistics, and px_r a
    wider spread, so that the copied weights are exercised in full."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm1d):
                n = layer.num_features
                layer.weight.copy_(1.0 + 0.3 * torch.randn(n, generator=gen))
                layer.bias.copy_(0.3 * torch.randn(n, generator=gen))
                layer.running_mean.copy_(0.5 * torch.randn(n, generator=gen))
                layer.running_var.copy_(0.3 + 2.0 * torch.rand(n, generator=gen))
        if hasattr(module, "px_r"):
            module.px_r.copy_(0.8 * torch.randn(module.px_r.shape, generator=gen))


def jax_batch(tensors) -> Minibatch:
    """jaxvi's minibatch from scvi-tools' tensors dict."""
    keys = scvi.REGISTRY_KEYS

    def column(key, dtype):
        value = tensors.get(key)
        return None if value is None else jnp.asarray(value.numpy().astype(dtype))

    batch_index = column(keys.BATCH_KEY, np.int32)[:, 0]
    labels = column(keys.LABELS_KEY, np.int32)[:, 0]
    size_factor = column(keys.SIZE_FACTOR_KEY, np.float32)
    return Minibatch(
        x=column(keys.X_KEY, np.float32),
        batch_index=batch_index,
        labels=labels,
        cat_covs=column(keys.CAT_COVS_KEY, np.int32),
        cont_covs=column(keys.CONT_COVS_KEY, np.float32),
        size_factor=None if size_factor is None else size_factor[:, 0],
    )


def torch_forward(module, tensors):
    """Torch inference, generative at the posterior mean, and loss; eval mode."""
    module.eval()
    with torch.no_grad():
        inf = module.inference(**module._get_inference_input(tensors))
        z = module.z_encoder.z_transformation(inf["qz"].loc)
        library = inf["library"] if module.use_observed_lib_size else inf["ql"].loc
        inf_mean = {**inf, "z": z, "library": library}
        gen = module.generative(**module._get_generative_input(tensors, inf_mean))
        losses = module.loss(tensors, inf_mean, gen)
    return inf_mean, gen, losses


def compare_case(data_opts: dict, options: dict) -> dict[str, float]:
    """Run one parity case; return the largest relative error of each compared quantity."""
    _, module, config, variables, tensors, batch = build(data_opts, options)
    inf_t, gen_t, loss_t = torch_forward(module, tensors)
    vae = VAE(config)
    errors = {}

    inf_j = vae.apply(variables, batch, key=None, training=False, method=VAE.inference)
    qz = inf_t["qz"]
    errors["qz_m"] = assert_close(inf_j.qz_m, qz.loc, "qz_m")
    errors["qz_v"] = assert_close(inf_j.qz_v, qz.scale**2, "qz_v")
    errors["z"] = assert_close(inf_j.z, inf_t["z"], "z")
    errors["library"] = assert_close(inf_j.library, inf_t["library"], "library")
    if not config.use_observed_lib_size:
        ql = inf_t["ql"]
        errors["ql_m"] = assert_close(inf_j.ql_m, ql.loc, "ql_m")
        errors["ql_v"] = assert_close(inf_j.ql_v, ql.scale**2, "ql_v")

    # The decoders see the very same z and library.
    z = jnp.asarray(inf_t["z"].numpy())
    library = jnp.asarray(inf_t["library"].numpy())
    gen_j = vae.apply(variables, z, library, batch, training=False, method=VAE.generative)
    px = gen_t["px"]
    shape = (N_CELLS, N_GENES)
    if config.gene_likelihood == "poisson":
        errors["px_rate"] = assert_close(gen_j.px_rate, px.rate, "px_rate")
    else:
        errors["px_rate"] = assert_close(gen_j.px_rate, px.mu, "px_rate")
        theta_j = np.broadcast_to(np.exp(np.asarray(gen_j.px_r)), shape)
        errors["theta"] = assert_close(theta_j, px.theta.expand(shape), "theta")
    errors["px_scale"] = assert_close(gen_j.px_scale, px.scale, "px_scale")
    if config.gene_likelihood == "zinb":
        errors["px_dropout"] = assert_close(gen_j.px_dropout, px.zi_logits, "px_dropout")
    else:
        assert gen_j.px_dropout is None

    if config.n_batch > 1:  # decode every cell as if it came from batch 1
        with torch.no_grad():
            gen_in = module._get_generative_input(tensors, inf_t)
            px_tb = module.generative(**gen_in, transform_batch=1)["px"]
        gen_tb = vae.apply(variables, z, library, batch, transform_batch=1, method=VAE.generative)
        errors["px_scale_transform_batch"] = assert_close(
            gen_tb.px_scale, px_tb.scale, "px_scale (transform_batch=1)"
        )
        if config.gene_likelihood != "poisson":
            theta_tb = np.broadcast_to(np.exp(np.asarray(gen_tb.px_r)), shape)
            errors["theta_transform_batch"] = assert_close(
                theta_tb, px_tb.theta.expand(shape), "theta (transform_batch=1)"
            )

    # The loss, end to end at the posterior mean.
    out, _ = vae_loss(vae, variables, batch, key=None, training=False)
    rec_t = loss_t.dict_sum(loss_t.reconstruction_loss)
    errors["reconstruction_loss"] = assert_close(out.reconstruction_loss, rec_t, "rec")
    errors["kl_z"] = assert_close(out.kl_z, loss_t.kl_local["kl_divergence_z"], "kl_z")
    errors["kl_l"] = assert_close(out.kl_l, loss_t.kl_local["kl_divergence_l"], "kl_l")
    errors["loss"] = assert_close(out.loss, loss_t.loss, "loss")
    return errors


@pytest.mark.parametrize(
    ("data_opts", "options"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_eval_parity(data_opts, options):
    compare_case(data_opts, options)


def test_training_mode_batch_norm():
    """Batch statistics in the forward pass and the running-statistics update (PyTorch's
    momentum 0.01 and unbiased running variance) match scvi-tools in training mode."""
    data_opts = {"n_batch": 2, "cat_levels": (3,), "n_cont": 1}
    options = {"dropout_rate": 0.0, "n_layers": 2, "n_hidden": 32, "use_observed_lib_size": False}
    _, module, config, variables, tensors, batch = build(data_opts, options, seed=3)
    module.train()
    with torch.no_grad():
        inf = module.inference(**module._get_inference_input(tensors))
        z = inf["qz"].loc
        inf_mean = {**inf, "z": z, "library": inf["ql"].loc}
        gen = module.generative(**module._get_generative_input(tensors, inf_mean))
    torch_state = {k: v.numpy() for k, v in module.state_dict().items()}

    vae = VAE(config)
    inf_j, updates = vae.apply(
        variables,
        batch,
        key=None,
        training=True,
        method=VAE.inference,
        mutable=["batch_stats"],
    )
    variables = {**variables, "batch_stats": updates["batch_stats"]}
    assert_close(inf_j.qz_m, inf["qz"].loc, "qz_m (batch statistics)")
    assert_close(inf_j.qz_v, inf["qz"].scale ** 2, "qz_v (batch statistics)")
    assert_close(inf_j.ql_m, inf["ql"].loc, "ql_m (batch statistics)")
    gen_j, updates = vae.apply(
        variables,
        jnp.asarray(z.numpy()),
        jnp.asarray(inf["ql"].loc.numpy()),
        batch,
        training=True,
        method=VAE.generative,
        mutable=["batch_stats"],
    )
    variables = {**variables, "batch_stats": updates["batch_stats"]}
    assert_close(gen_j.px_scale, gen["px"].scale, "px_scale (batch statistics)")

    converted = variables_to_state_dict(variables, config)
    for key, value in torch_state.items():
        if key.endswith(("running_mean", "running_var")):
            assert_close(converted[key], value, key)
        elif not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(converted[key], value, err_msg=key)


def test_masked_padding_matches_real_cells():
    """Padding cells with mask 0 change neither the training-mode batch statistics nor the
    loss: jaxvi on (real + padding) equals scvi-tools on the real cells alone."""
    data_opts = {"n_batch": 2}
    options = {"dropout_rate": 0.0, "n_hidden": 32}
    _, module, config, variables, tensors, batch = build(data_opts, options, seed=5)
    module.train()
    with torch.no_grad():
        inf = module.inference(**module._get_inference_input(tensors))
        inf_mean = {**inf, "z": inf["qz"].loc}
        gen = module.generative(**module._get_generative_input(tensors, inf_mean))
        rec_t = -gen["px"].log_prob(tensors[scvi.REGISTRY_KEYS.X_KEY]).sum(-1)
        kl_t = torch.distributions.kl_divergence(inf["qz"], gen["pz"]).sum(-1)
        loss_t = torch.mean(rec_t + kl_t)
    torch_state = {k: v.numpy() for k, v in module.state_dict().items()}

    n_pad = 7
    rng = np.random.default_rng(0)
    pad_x = rng.poisson(30.0, size=(n_pad, N_GENES)).astype(np.float32) + 1.0
    padded = Minibatch(
        x=jnp.concatenate([batch.x, jnp.asarray(pad_x)]),
        batch_index=jnp.concatenate([batch.batch_index, jnp.ones(n_pad, jnp.int32)]),
        labels=jnp.concatenate([batch.labels, jnp.zeros(n_pad, jnp.int32)]),
        mask=jnp.concatenate([jnp.ones(N_CELLS), jnp.zeros(n_pad)]).astype(jnp.float32),
    )
    out, new_stats = vae_loss(VAE(config), variables, padded, key=None, training=True)
    assert_close(out.reconstruction_loss[:N_CELLS], rec_t, "rec (masked)")
    assert_close(out.kl_z[:N_CELLS], kl_t, "kl_z (masked)")
    assert_close(out.loss, loss_t, "loss (masked)")
    converted = variables_to_state_dict({**variables, "batch_stats": new_stats}, config)
    for key in torch_state:
        if key.endswith(("running_mean", "running_var")):
            assert_close(converted[key], torch_state[key], key)


# Embedding, covariates, latent library and gene-batch dispersion: every kind of key.
ROUND_TRIP_CASE = next(c for c in CASES if c[0] == "embedding_encode_covariates_latent_library")


def test_state_dict_round_trip():
    """state dict -> variables -> state dict is exact and torch loads it strictly."""
    _, module, config, variables, _, _ = build(*ROUND_TRIP_CASE[1:])
    state = module.state_dict()
    back = variables_to_state_dict(variables, config)
    assert set(back) == set(state)
    assert set(back) == set(expected_state_dict_shapes(config))
    for key, value in state.items():
        value = value.numpy()
        assert back[key].dtype == value.dtype, key
        assert back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)

    # variables -> state dict -> variables is exact too, and a fresh jaxvi model loads in torch.
    again = state_dict_to_variables(back, config)
    assert _flat(again).keys() == _flat(variables).keys()
    for path, value in _flat(variables).items():
        np.testing.assert_array_equal(_flat(again)[path], value, err_msg=path)
    fresh = init_variables(config, jax.random.key(1))
    exported = variables_to_state_dict(fresh, config)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)


def _flat(tree, prefix=""):
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{name}/"))
        else:
            out[f"{prefix}{name}"] = np.asarray(value)
    return out


def _default_state():
    _, module, config, _, _, _ = build({}, {"n_hidden": 16, "n_latent": 4})
    return dict(module.state_dict()), config


def test_mis_shaped_key_raises():
    state, config = _default_state()
    key = "decoder.px_decoder.fc_layers.Layer 0.0.weight"
    state[key] = torch.zeros(16, 5)
    with pytest.raises(ValueError, match=r"Layer 0\.0\.weight.*\(16, 5\).*\(16, 4\)"):
        state_dict_to_variables(state, config)


def test_missing_and_unknown_keys_raise():
    state, config = _default_state()
    missing = dict(state)
    del missing["px_r"]
    with pytest.raises(ValueError, match="px_r"):
        state_dict_to_variables(missing, config)
    extra = {**state, "decoder.extra.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match="decoder.extra.weight"):
        state_dict_to_variables(extra, config)
    # A config that does not match the module (2 batches widen the decoder input).
    wrong = VAEConfig(n_input=N_GENES, n_batch=2, n_hidden=16, n_latent=4)
    with pytest.raises(ValueError, match="px_decoder"):
        state_dict_to_variables(state, wrong)


def test_variables_to_state_dict_validates():
    state, config = _default_state()
    variables = state_dict_to_variables(state, config)
    variables["params"]["px_r"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="px_r"):
        variables_to_state_dict(variables, config)
    del variables["params"]["px_r"]
    with pytest.raises(ValueError, match="px_r"):
        variables_to_state_dict(variables, config)
