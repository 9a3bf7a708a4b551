"""Numerical parity of jaxvi's SCANVAE with scvi-tools 1.4.2's PyTorch ``SCANVAE``.

Each case builds a small partly labelled AnnData and an ``scvi.model.SCANVI`` on it (directly
or through ``SCANVI.from_scvi_model``), gives its batch norms non-trivial statistics, copies
the weights with :func:`jaxvi.io.scanvi_bridge.scanvae_state_dict_to_variables` and compares, on a
minibatch of every cell (and a labelled sub-batch):

* classifier probabilities (``classify``), ``q(z | x)``, ``q(z2 | z1, y)`` and
  ``p(z1 | z2, y)`` for every label;
* the loss terms (reconstruction loss, KL, classification loss) and the total loss, in
  evaluation mode at posterior means, and from the same sampled ``z1`` / ``z2``;
* in training mode (dropout 0): the batch statistics, the loss, and every running statistic
  after the step, jaxvi on a padded minibatch against scvi-tools on the real cells.

The file is skipped only where scvi-tools (and torch) are not installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from jaxvi.data import Minibatch
from jaxvi.io.bridge import config_from_scvi, state_dict_to_variables
from jaxvi.io.scanvi_bridge import (
    scanvae_config_from_scvi,
    scanvae_expected_state_dict_shapes,
    scanvae_state_dict_to_variables,
    scanvae_variables_to_state_dict,
)
from jaxvi.module import (
    SCANVAE,
    HierarchyOutputs,
    SCANVAEConfig,
    classification_metrics,
    init_scanvae_variables,
    negative_log_likelihood,
    normal_kl,
    scanvae_elbo,
    scanvae_loss,
    scanvae_model_def,
    with_vae_weights,
)

scvi = pytest.importorskip("scvi")
torch = pytest.importorskip("torch")
anndata = pytest.importorskip("anndata")
torchmetrics = pytest.importorskip("torchmetrics")

RTOL = 1e-5
N_CELLS = 64
N_GENES = 30
UNKNOWN = "Unknown"
RATIO = 50.0
KL_WEIGHT = 0.7  # not 1, so that a KL term weighted differently would show
# Small programs compiled once each: XLA's cheapest backend optimisation compiles them 3x
# faster (the numbers are still compared with scvi-tools at 1e-5).
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def assert_close(actual, reference, name: str) -> None:
    """``assert_allclose`` with rtol 1e-5 and an atol of 1e-5 * max|reference|."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    actual, reference = np.broadcast_arrays(actual, reference)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    np.testing.assert_allclose(actual, reference, rtol=RTOL, atol=RTOL * scale, err_msg=name)


def make_adata(*, n_labels=3, n_batch=1, cat_levels=(), n_cont=0, seed=0):
    """NB counts; ``labels`` with ``n_labels`` classes and about 40% ``Unknown`` cells."""
    rng = np.random.default_rng(seed)
    mu = rng.gamma(2.0, 2.0, size=N_GENES) * rng.lognormal(0.0, 0.4, size=(N_CELLS, 1))
    counts = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float32)
    counts[counts.sum(1) == 0, 0] = 1.0
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(N_CELLS)])
    labels = np.array([f"type{i % n_labels}" for i in rng.permutation(N_CELLS)], dtype=object)
    labels[rng.random(N_CELLS) < 0.4] = UNKNOWN
    obs["labels"] = pd.Categorical(labels)
    obs["batch"] = pd.Categorical([f"b{i % n_batch}" for i in rng.permutation(N_CELLS)])
    for k, levels in enumerate(cat_levels):
        obs[f"cat{k}"] = pd.Categorical([f"c{i % levels}" for i in rng.permutation(N_CELLS)])
    for k in range(n_cont):
        obs[f"cont{k}"] = rng.normal(size=N_CELLS).astype(np.float32)
    adata = anndata.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"g{j}" for j in range(30)]))
    setup = {
        "labels_key": "labels",
        "batch_key": "batch" if n_batch > 1 else None,
        "categorical_covariate_keys": [f"cat{k}" for k in range(len(cat_levels))] or None,
        "continuous_covariate_keys": [f"cont{k}" for k in range(n_cont)] or None,
    }
    return adata, setup


def perturb(module, seed: int) -> None:
    """Non-trivial batch-norm affine parameters and running statistics (every batch norm in
    ``module``) and a wider px_r (if ``module`` has one)."""
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


def jax_batch(tensors, mask=None) -> Minibatch:
    """jaxvi's minibatch from scvi-tools' tensors dict."""
    keys = scvi.REGISTRY_KEYS

    def column(key, dtype):
        value = tensors.get(key)
        return None if value is None else jnp.asarray(value.numpy().astype(dtype))

    return Minibatch(
        x=column(keys.X_KEY, np.float32),
        batch_index=column(keys.BATCH_KEY, np.int32)[:, 0],
        labels=column(keys.LABELS_KEY, np.int32)[:, 0],
        cat_covs=column(keys.CAT_COVS_KEY, np.int32),
        cont_covs=column(keys.CONT_COVS_KEY, np.float32),
        mask=mask,
    )


# name: (data options, SCVI/SCANVI options, how the module is built). Together: labelled and
# unlabelled minibatches (every case), nb and zinb, batches + categorical and continuous
# covariates, a linear classifier, a latent library with encoded covariates, a custom label
# prior, an "ln" latent with layer norm and a probability (not logit) classifier, and a
# module made by SCANVI.from_scvi_model.
CASES = {
    "zinb_default": ({}, {"n_hidden": 16, "n_latent": 4}, {}),
    "nb_batches_covariates_2layers_prior": (
        {"n_batch": 2, "cat_levels": (3,), "n_cont": 2, "n_labels": 4},
        {"gene_likelihood": "nb", "n_hidden": 16, "n_latent": 5, "n_layers": 2},
        {"y_prior": (0.1, 0.2, 0.3, 0.4)},
    ),
    "linear_classifier_latent_library_encode_covariates": (
        {"n_batch": 3, "cat_levels": (2,), "n_cont": 1},
        {
            "linear_classifier": True,
            "use_observed_lib_size": False,
            "encode_covariates": True,
            "dispersion": "gene-batch",
            "n_hidden": 16,
            "n_latent": 4,
        },
        {},
    ),
    "from_scvi_model_ln_layer_norm_probs": (
        {"n_batch": 2, "cat_levels": (2,), "n_labels": 2},
        {
            "gene_likelihood": "nb",
            "latent_distribution": "ln",
            "use_layer_norm": "both",
            "use_batch_norm": "decoder",
            "n_hidden": 16,
            "n_latent": 4,
        },
        {"from_scvi": {"classifier_parameters": {"logits": False, "n_hidden": 8}}},
    ),
}


@dataclasses.dataclass
class Case:
    model: object
    module: object
    config: SCANVAEConfig
    variables: dict
    tensors: dict  # every cell
    labelled: dict  # the labelled cells
    batch: Minibatch  # every cell, with the labelled sub-batch
    scvi_model: object = None


def build(data_opts: dict, options: dict, *, seed=0, from_scvi=None, y_prior=None) -> Case:
    """A SCANVI (directly, or from an SCVI with ``from_scvi`` as its scANVI kwargs) with
    perturbed statistics, its config, jaxvi variables and the minibatches."""
    adata, setup = make_adata(seed=seed, **data_opts)
    torch.manual_seed(seed)
    scvi_model = None
    if from_scvi is not None:
        scvi.model.SCVI.setup_anndata(adata, **setup)
        scvi_model = scvi.model.SCVI(adata, **options)
        perturb(scvi_model.module, seed)
        scvi_model.is_trained_ = True  # the weights, not their quality, matter here
        model = scvi.model.SCANVI.from_scvi_model(scvi_model, UNKNOWN, **from_scvi)
        nets = (model.module.classifier, model.module.encoder_z2_z1, model.module.decoder_z1_z2)
        for k, net in enumerate(nets):
            perturb(net, seed + 2 + k)
    else:
        scvi.model.SCANVI.setup_anndata(adata, unlabeled_category=UNKNOWN, **setup)
        model = scvi.model.SCANVI(adata, **options)
        perturb(model.module, seed)
    module = model.module
    if y_prior is not None:
        with torch.no_grad():
            module.y_prior.copy_(torch.tensor([y_prior], dtype=torch.float32))
    config = scanvae_config_from_scvi(model)
    variables = scanvae_state_dict_to_variables(module.state_dict(), config)
    loader = model._make_data_loader(adata=adata, batch_size=N_CELLS, shuffle=False)
    tensors = next(iter(loader))
    lab_idx = np.flatnonzero(adata.obs["labels"].to_numpy() != UNKNOWN)
    loader = model._make_data_loader(adata=adata, indices=lab_idx, batch_size=N_CELLS)
    labelled = next(iter(loader))
    batch = jax_batch(tensors)._replace(labelled=jax_batch(labelled))
    return Case(model, module, config, variables, tensors, labelled, batch, scvi_model)


@functools.cache
def case(name: str) -> Case:
    """The case ``name`` of :data:`CASES`, built once per session (tests only read it)."""
    data_opts, options, build_opts = CASES[name]
    return build(data_opts, options, **build_opts)


@contextlib.contextmanager
def fixed_z2(module, z2=None):
    """Make torch's ``encoder_z2_z1`` return ``z2`` (its mean when None) as its sample."""
    original = module.encoder_z2_z1.forward

    def forward(x, *cats):
        dist, _ = original(x, *cats)
        return dist, dist.loc if z2 is None else z2

    module.encoder_z2_z1.forward = forward
    try:
        yield
    finally:
        del module.encoder_z2_z1.forward


def torch_step(module, tensors, labelled, *, z1=None, z2=None):
    """scvi-tools' inference, generative and loss with ``z1`` (posterior mean when None) and
    ``z2`` (see :func:`fixed_z2`)."""
    with torch.no_grad(), fixed_z2(module, z2):
        inf = module.inference(**module._get_inference_input(tensors))
        if z1 is None:
            z1 = module.z_encoder.z_transformation(inf["qz"].loc)
        library = inf["library"] if module.use_observed_lib_size else inf["ql"].loc
        inf = {**inf, "z": z1, "library": library}
        gen = module.generative(**module._get_generative_input(tensors, inf))
        out = module.loss(
            tensors,
            inf,
            gen,
            kl_weight=KL_WEIGHT,
            labelled_tensors=labelled,
            classification_ratio=RATIO if labelled is not None else None,
        )
    return inf, out


def torch_hierarchy(module, z1, z2=None):
    """``q(z2 | z1, y)`` and ``p(z1 | z2, y)`` of scvi-tools, as ``(n_labels, cells, L)``."""
    n_labels = module.n_labels
    with torch.no_grad():
        ys, z1s = scvi.module._utils.broadcast_labels(z1, n_broadcast=n_labels)
        qz2, _ = module.encoder_z2_z1(z1s, ys)
        pz1_m, pz1_v = module.decoder_z1_z2(qz2.loc if z2 is None else z2, ys)

    def rows(t):
        return t.numpy().reshape(n_labels, -1, t.shape[-1])

    return rows(qz2.loc), rows(qz2.scale**2), rows(pz1_m), rows(pz1_v)


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def jax_case(config: SCANVAEConfig, variables: dict, batch: Minibatch, z1, z2):
    """jaxvi's side of a case in evaluation mode, one compiled program (compiling operations
    one by one costs more than the test): classifier output, inference, the hierarchy at the
    posterior mean, the loss with the labelled sub-batch, and the ELBO terms at the given
    ``z1`` ``(cells, L)`` and ``z2`` ``(n_labels, cells, L)``."""
    module = SCANVAE(config)
    full = batch._replace(labelled=None)
    loss, _ = scanvae_loss(
        module,
        variables,
        batch,
        key=None,
        training=False,
        kl_weight=KL_WEIGHT,
        classification_ratio=RATIO,
    )

    def forward(m: SCANVAE):
        inf = m.inference(full, key=None)
        hier = m.label_hierarchy(inf.z, key=None)
        gen = m.generative(z1, inf.library, full)
        qz2_m, qz2_v = m.z2_posterior(z1)
        pz1_m, pz1_v = m.z1_prior(z2)
        at_z = HierarchyOutputs(qz2_m, qz2_v, z2, pz1_m, pz1_v)
        kl_l = jnp.zeros(z1.shape[:1])
        if not config.use_observed_lib_size:
            p_m, p_v = m.library_prior(full.batch_index)
            kl_l = jnp.sum(normal_kl(inf.ql_m, inf.ql_v, p_m, p_v), -1)
        return m.classify(full), inf, hier, gen, at_z, m.classifier(z1, training=False), kl_l

    classified, inf, hier, gen, at_z, out, kl_l = nn.apply(forward, module)(variables)
    probs = jax.nn.softmax(out, -1) if config.classifier_logits else out
    nll_x = negative_log_likelihood(config, full, gen)
    y_prior = variables["buffers"]["y_prior"]
    sampled = scanvae_elbo(z1, inf.qz_m, inf.qz_v, at_z, probs, y_prior, nll_x, kl_l)
    return classified, inf, hier, loss, at_z, sampled


def torch_samples(module, tensors, seed: int = 0):
    """A sampled ``z1`` ``(cells, L)`` and ``z2`` ``(n_labels * cells, L)`` from scvi-tools."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        qz = module.inference(**module._get_inference_input(tensors))["qz"]
        eps = torch.randn(qz.loc.shape, generator=gen)
        z1 = module.z_encoder.z_transformation(qz.loc + qz.scale * eps)
        ys, z1s = scvi.module._utils.broadcast_labels(z1, n_broadcast=module.n_labels)
        qz2, _ = module.encoder_z2_z1(z1s, ys)
        z2 = qz2.loc + qz2.scale * torch.randn(qz2.loc.shape, generator=gen)
    return z1, z2


@pytest.mark.parametrize("name", list(CASES))
def test_eval_parity(name):
    """Every quantity listed in the file docstring, evaluation mode."""
    c = case(name)
    module, config = c.module, c.config
    module.eval()
    z1_t, z2_t = torch_samples(module, c.tensors)
    z2_rows = z2_t.numpy().reshape(module.n_labels, N_CELLS, -1)
    classified, inf_j, hier, out, at_z, sampled = jax_case(
        config, c.variables, c.batch, jnp.asarray(z1_t.numpy()), jnp.asarray(z2_rows)
    )

    # Classifier probabilities of every cell (scvi-tools' predict(soft=True)).
    keys = scvi.REGISTRY_KEYS
    with torch.no_grad():
        out_t = module.classify(
            c.tensors[keys.X_KEY],
            batch_index=c.tensors[keys.BATCH_KEY],
            cont_covs=c.tensors.get(keys.CONT_COVS_KEY),
            cat_covs=c.tensors.get(keys.CAT_COVS_KEY),
        )
        probs_t = torch.softmax(out_t, -1) if module.classifier.logits else out_t
    probs_j = jax.nn.softmax(classified, -1) if config.classifier_logits else classified
    assert_close(probs_j, probs_t, "classifier probabilities")
    assert_close(jnp.sum(probs_j, -1), 1.0, "probabilities sum to 1")

    # q(z | x), then the hierarchy of every label at the posterior mean.
    inf_t, loss_t = torch_step(module, c.tensors, c.labelled)
    assert_close(inf_j.qz_m, inf_t["qz"].loc, "qz_m")
    assert_close(inf_j.qz_v, inf_t["qz"].scale ** 2, "qz_v")
    assert_close(inf_j.z, inf_t["z"], "z")
    qz2_m, qz2_v, pz1_m, pz1_v = torch_hierarchy(module, inf_t["z"])
    assert_close(hier.qz2_m, qz2_m, "qz2_m")
    assert_close(hier.qz2_v, qz2_v, "qz2_v")
    assert_close(hier.pz1_m, pz1_m, "pz1_m")
    assert_close(hier.pz1_v, pz1_v, "pz1_v")

    # Every loss term and the loss of a minibatch with its labelled sub-batch (without one:
    # test_model_def_terms).
    rec_t = loss_t.dict_sum(loss_t.reconstruction_loss)
    assert_close(out.reconstruction_loss, rec_t, "reconstruction_loss")
    assert_close(out.kl_local, loss_t.dict_sum(loss_t.kl_local), "kl_local")
    assert_close(out.classification_loss, loss_t.classification_loss, "classification_loss")
    assert_close(out.logits, loss_t.logits, "labelled logits")
    np.testing.assert_array_equal(out.true_labels, loss_t.true_labels.numpy()[:, 0])
    assert_close(out.loss, loss_t.loss, "loss")

    # The ELBO terms at the same sampled z1 and z2 (log q(z1 | x) away from its mode).
    _, loss_t = torch_step(module, c.tensors, None, z1=z1_t, z2=z2_t)
    _, _, pz1_m, pz1_v = torch_hierarchy(module, z1_t, z2_t)
    assert_close(at_z.pz1_m, pz1_m, "pz1_m (sampled z2)")
    assert_close(at_z.pz1_v, pz1_v, "pz1_v (sampled z2)")
    assert_close(sampled[0], loss_t.dict_sum(loss_t.reconstruction_loss), "rec (sampled)")
    assert_close(sampled[1], loss_t.dict_sum(loss_t.kl_local), "kl_local (sampled)")


def test_config_read_from_scvi_tools():
    """The config read from a SCANVI (or its module) equals the one written from its options."""
    c = case("nb_batches_covariates_2layers_prior")
    expected = SCANVAEConfig(
        n_input=N_GENES,
        n_batch=2,
        n_labels=4,
        n_cats_per_cov=(3,),
        n_continuous_cov=2,
        gene_likelihood="nb",
        n_hidden=16,
        n_latent=5,
        n_layers=2,
        y_prior=(0.1, 0.2, 0.3, 0.4),
    )
    assert c.config == expected
    assert scanvae_config_from_scvi(c.module) == expected
    linear = case("linear_classifier_latent_library_encode_covariates").config
    assert linear.linear_classifier
    assert (linear.classifier_hidden, linear.classifier_layers) == (0, 0)
    probs = case("from_scvi_model_ln_layer_norm_probs").config
    assert not probs.classifier_logits
    assert (probs.classifier_hidden, probs.classifier_layers) == (8, 1)


def test_from_scvi_model_copies_the_vae():
    """``SCANVI.from_scvi_model`` copies the whole scVI state (weights, batch-norm statistics,
    buffers) into the VAE part; :func:`with_vae_weights` does the same to jaxvi variables."""
    c = case("from_scvi_model_ln_layer_norm_probs")
    scvi_config = config_from_scvi(c.scvi_model)
    # SCVI counts the unlabelled category as a label; nothing else differs.
    vae_config = dataclasses.replace(c.config.vae_config(), n_labels=scvi_config.n_labels)
    assert vae_config == scvi_config
    scvi_vars = state_dict_to_variables(c.scvi_model.module.state_dict(), scvi_config)
    scanvi_only = ("classifier", "encoder_z2_z1", "decoder_z1_z2", "y_prior")
    zeros = jax.tree_util.tree_map(np.zeros_like, c.variables)
    start = {
        coll: {k: (v if k in scanvi_only else zeros[coll][k]) for k, v in tree.items()}
        for coll, tree in c.variables.items()
    }
    merged = flat(with_vae_weights(start, scvi_vars))
    expected = flat(c.variables)
    assert merged.keys() == expected.keys()
    for path, value in expected.items():
        np.testing.assert_array_equal(merged[path], value, err_msg=path)
    bad = {**scvi_vars, "params": {**scvi_vars["params"], "px_r": np.zeros(3, np.float32)}}
    with pytest.raises(ValueError, match="params/px_r"):
        with_vae_weights(start, bad)


def flat(tree, prefix=""):
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{name}/"))
        else:
            out[f"{prefix}{name}"] = np.asarray(value)
    return out


def test_training_mode_padded_step():
    """Training mode (dropout 0): batch statistics in every network, the loss, and the
    running statistics after the step (z_encoder and classifier updated twice, by the full
    and the labelled minibatch) match scvi-tools; jaxvi's minibatch and labelled sub-batch
    are padded with masked cells, scvi-tools sees the real cells only."""
    options = {"dropout_rate": 0.0, "n_hidden": 16, "n_latent": 4, "n_layers": 2}
    options["use_observed_lib_size"] = False
    c = build({"n_batch": 2, "cat_levels": (2,), "n_cont": 1}, options, seed=3)
    module = c.module
    module.train()
    _, loss_t = torch_step(module, c.tensors, c.labelled)
    torch_state = {k: v.numpy() for k, v in module.state_dict().items()}

    n_lab = int(c.batch.labelled.x.shape[0])
    padded = pad(c.batch, 5, seed=0)._replace(labelled=pad(c.batch.labelled, 3, seed=1))
    step = jax.jit(
        functools.partial(
            scanvae_loss,
            SCANVAE(c.config),
            key=None,
            training=True,
            kl_weight=KL_WEIGHT,
            classification_ratio=RATIO,
        ),
        compiler_options=FAST_COMPILE,
    )
    out, stats = step(c.variables, padded)
    rec_t = loss_t.dict_sum(loss_t.reconstruction_loss)
    assert_close(out.reconstruction_loss[:N_CELLS], rec_t, "rec (training)")
    assert_close(out.kl_local[:N_CELLS], loss_t.dict_sum(loss_t.kl_local), "kl (training)")
    assert_close(out.classification_loss, loss_t.classification_loss, "ce (training)")
    assert_close(out.logits[:n_lab], loss_t.logits, "logits (training)")
    assert_close(out.loss, loss_t.loss, "loss (training)")
    converted = scanvae_variables_to_state_dict({**c.variables, "batch_stats": stats}, c.config)
    n_checked = 0
    for key, value in torch_state.items():
        if key.endswith(("running_mean", "running_var")):
            assert_close(converted[key], value, key)
            n_checked += 1
    # Batch-norm layers: z_encoder, decoder, encoder_z2_z1, decoder_z1_z2 and classifier 2
    # each, l_encoder 1.
    assert n_checked == 2 * 11


def pad(batch: Minibatch, n_pad: int, seed: int) -> Minibatch:
    """``batch`` followed by ``n_pad`` random cells with mask 0."""
    rng = np.random.default_rng(seed)
    n = batch.x.shape[0]

    def extend(a, fill):
        if a is None:
            return None
        return jnp.concatenate([a, jnp.asarray(fill(a), a.dtype)])

    return Minibatch(
        x=extend(batch.x, lambda a: rng.poisson(20.0, (n_pad, a.shape[1])) + 1.0),
        batch_index=extend(batch.batch_index, lambda a: np.ones(n_pad)),
        labels=extend(batch.labels, lambda a: np.zeros(n_pad)),
        cat_covs=extend(batch.cat_covs, lambda a: np.ones((n_pad, a.shape[1]))),
        cont_covs=extend(batch.cont_covs, lambda a: rng.normal(size=(n_pad, a.shape[1])) * 5),
        mask=jnp.concatenate([jnp.ones(n), jnp.zeros(n_pad)]).astype(jnp.float32),
    )


@pytest.mark.parametrize("probabilities", [False, True], ids=["logits", "probabilities"])
def test_classification_metrics_match_torchmetrics(probabilities):
    """Accuracy, F1 and calibration error as scvi-tools' plan computes them (torchmetrics),
    padding cells excluded."""
    from torchmetrics.functional import classification as tmf

    rng = np.random.default_rng(7)
    n, n_labels = 200, 5
    logits = rng.normal(scale=2.0, size=(n, n_labels)).astype(np.float32)
    if probabilities:  # all in [0, 1]: torchmetrics takes them as probabilities
        logits = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, n_labels, n)
    labels[:80] = logits[:80].argmax(1)  # some right, some wrong
    lt, yt = torch.from_numpy(logits), torch.from_numpy(labels)
    expected = {
        "accuracy": tmf.multiclass_accuracy(lt.argmax(-1), yt, n_labels, average="micro"),
        "f1_score": tmf.multiclass_f1_score(lt.argmax(-1), yt, n_labels, average="micro"),
        "calibration_error": tmf.multiclass_calibration_error(lt, yt, n_labels),
    }
    metrics = jax.jit(classification_metrics, compiler_options=FAST_COMPILE)
    got = metrics(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
    for name, value in expected.items():
        assert_close(got[name], value.numpy(), name)
    assert float(expected["calibration_error"]) > 0.01  # a non-trivial value was compared
    # Padding rows (mask 0) change nothing, whatever they hold.
    junk = rng.normal(scale=50.0, size=(9, n_labels)).astype(np.float32)
    padded = metrics(
        jnp.asarray(np.concatenate([logits, junk])),
        jnp.asarray(np.concatenate([labels, np.zeros(9, int)]), jnp.int32),
        jnp.asarray(np.r_[np.ones(n), np.zeros(9)], jnp.float32),
    )
    for name in expected:
        assert_close(padded[name], got[name], f"{name} (padded)")


def test_model_def_terms():
    """The engine's view: per-cell ELBO terms and minibatch scalars for the classification,
    scvi-tools' loss with a labelled sub-batch and without one (then no classification
    term), and which parameters are trained."""
    c = case("zinb_default")
    c.module.eval()
    model_def = scanvae_model_def(c.config, RATIO)
    assert model_def is scanvae_model_def(c.config, RATIO)  # cached
    unlabelled = c.batch._replace(labelled=None)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(variables):
        kwargs = {"training": False, "kl_weight": KL_WEIGHT}
        out, _ = model_def.loss(None, variables, c.batch, **kwargs)
        out_u, _ = model_def.loss(None, variables, unlabelled, **kwargs)
        return out, out_u

    out, out_u = run(c.variables)
    assert set(out.terms) == {
        "reconstruction_loss",
        "kl_local",
        "classification_loss",
        "accuracy",
        "f1_score",
        "calibration_error",
    }
    assert out.terms["reconstruction_loss"].shape == (N_CELLS,)
    assert out.terms["kl_local"].shape == (N_CELLS,)
    for name in ("classification_loss", "accuracy", "f1_score", "calibration_error"):
        assert out.terms[name].shape == ()
    _, loss_t = torch_step(c.module, c.tensors, c.labelled)
    assert_close(out.loss, loss_t.loss, "model_def loss")
    assert_close(out.terms["classification_loss"], loss_t.classification_loss, "ce")
    accuracy = np.mean(loss_t.logits.numpy().argmax(1) == loss_t.true_labels.numpy()[:, 0])
    assert_close(out.terms["accuracy"], accuracy, "accuracy")

    _, loss_u = torch_step(c.module, c.tensors, None)
    assert loss_u.classification_loss is None
    assert set(out_u.terms) == {"reconstruction_loss", "kl_local"}
    rec_u = loss_u.dict_sum(loss_u.reconstruction_loss)
    assert_close(out_u.terms["reconstruction_loss"], rec_u, "rec (unlabelled)")
    assert_close(out_u.terms["kl_local"], loss_u.dict_sum(loss_u.kl_local), "kl (unlabelled)")
    assert_close(out_u.loss, loss_u.loss, "loss (unlabelled)")
    assert float(out.loss - out_u.loss) > 1.0  # the classification term counts

    trainable = model_def.trainable(c.variables["params"])
    for net in ("classifier", "encoder_z2_z1", "decoder_z1_z2", "z_encoder"):
        assert all(jax.tree_util.tree_leaves(trainable[net])), net
    # As for scVI: the library encoder (observed library) and the per-cell dispersion head
    # get no gradient in PyTorch, so they are not trained.
    assert not any(jax.tree_util.tree_leaves(trainable["l_encoder"]))
    assert not any(jax.tree_util.tree_leaves(trainable["decoder"]["px_r_decoder"]))


def test_state_dict_round_trip():
    """state dict -> variables -> state dict is exact and torch loads it strictly; a fresh
    jaxvi SCANVAE loads into the scvi-tools module too."""
    for name in list(CASES)[1:]:
        c = case(name)
        state = c.module.state_dict()
        back = scanvae_variables_to_state_dict(c.variables, c.config)
        assert set(back) == set(state) == set(scanvae_expected_state_dict_shapes(c.config))
        for key, value in state.items():
            assert back[key].dtype == value.numpy().dtype, key
            np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
        c.module.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})
    # What init_scanvae_variables builds loads too (its structure, without compiling it).
    shapes = jax.eval_shape(lambda key: init_scanvae_variables(c.config, key), jax.random.key(1))
    fresh = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), shapes)
    exported = scanvae_variables_to_state_dict(fresh, c.config)
    c.module.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()})
    c.module.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})  # restore


def test_bad_state_dicts_and_configs_raise():
    c = case("zinb_default")
    state = dict(c.module.state_dict())
    key = "classifier.classifier.1.weight"
    bad = {**state, key: torch.zeros(3, 7)}
    with pytest.raises(
        ValueError, match=r"classifier\.classifier\.1\.weight.*\(3, 7\).*\(3, 16\)"
    ):
        scanvae_state_dict_to_variables(bad, c.config)
    missing = {k: v for k, v in state.items() if k != "encoder_z2_z1.mean_encoder.bias"}
    with pytest.raises(ValueError, match="encoder_z2_z1.mean_encoder.bias"):
        scanvae_state_dict_to_variables(missing, c.config)
    linear = dataclasses.replace(c.config, linear_classifier=True)
    with pytest.raises(ValueError, match="classifier.classifier.0.fc_layers"):
        scanvae_state_dict_to_variables(state, linear)
    with pytest.raises(ValueError, match="gene-label"):
        SCANVAEConfig(n_input=5, n_labels=3, dispersion="gene-label")
    with pytest.raises(ValueError, match="y_prior"):
        SCANVAEConfig(n_input=5, n_labels=3, y_prior=(0.5, 0.5))
    with pytest.raises(ValueError, match="y_prior"):
        SCANVAEConfig(n_input=5, n_labels=2, y_prior=(-0.5, 1.5))
    with pytest.raises(TypeError, match="SCANVAEConfig"):
        scanvae_model_def(c.config.vae_config())
