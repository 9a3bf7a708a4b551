"""The scVI variational autoencoder (scvi-tools' ``VAE``) as a functional Flax module.

``VAE`` holds no state: parameters, batch-norm statistics and the per-batch library prior
(``"params"``, ``"batch_stats"`` and ``"buffers"`` collections) are passed in, randomness comes
from explicit keys, and ``training`` is a call argument. :func:`vae_loss` is the ELBO of one
minibatch as a pure function of those inputs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxvi.data import Minibatch
from jaxvi.likelihoods import FREE_GATE_SCALE, PxParams, get_likelihood
from jaxvi.module._base import KL_LOCAL, RECONSTRUCTION, LossOutput, ModelDef
from jaxvi.nn import DecoderSCVI, Encoder, get_var_activation

__all__ = [
    "GenerativeOutputs",
    "InferenceOutputs",
    "ELBOTerms",
    "VAE",
    "VAEConfig",
    "init_variables",
    "masked_mean",
    "negative_log_likelihood",
    "normal_kl",
    "trainable_mask",
    "vae_loss",
    "vae_model_def",
]

DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
NORM_OPTIONS = ("none", "encoder", "decoder", "both")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Architecture of the scVI VAE; the names and defaults are scvi-tools' ``VAE``'s.

    ``n_batch`` and ``n_labels`` count categories (at least 1); ``n_cats_per_cov`` lists the
    category count of each extra categorical covariate.
    """

    n_input: int
    n_batch: int = 1
    n_labels: int = 1
    n_hidden: int = 128
    n_latent: int = 10
    n_layers: int = 1
    n_continuous_cov: int = 0
    n_cats_per_cov: tuple[int, ...] = ()
    dropout_rate: float = 0.1
    dispersion: str = "gene"
    log_variational: bool = True
    gene_likelihood: str = "zinb"
    latent_distribution: str = "normal"
    encode_covariates: bool = False
    deeply_inject_covariates: bool = True
    batch_representation: str = "one-hot"
    batch_embedding_dim: int = 5
    use_batch_norm: str = "both"
    use_layer_norm: str = "none"
    use_size_factor_key: bool = False
    use_observed_lib_size: bool = True
    var_activation: str = "exp"

    def __post_init__(self):
        """Validate the options with messages naming the allowed values."""
        _check_choice("dispersion", self.dispersion, DISPERSIONS)
        _check_choice("latent_distribution", self.latent_distribution, ("normal", "ln"))
        _check_choice("use_batch_norm", self.use_batch_norm, NORM_OPTIONS)
        _check_choice("use_layer_norm", self.use_layer_norm, NORM_OPTIONS)
        _check_choice("batch_representation", self.batch_representation, ("one-hot", "embedding"))
        get_likelihood(self.gene_likelihood)
        get_var_activation(self.var_activation)
        for name in ("n_input", "n_hidden", "n_latent", "n_layers", "n_batch", "n_labels"):
            if int(getattr(self, name)) < 1:
                raise ValueError(
                    f"`{name}` must be a positive integer, got {getattr(self, name)}."
                )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"`dropout_rate` must be in [0, 1), got {self.dropout_rate}.")
        if self.use_size_factor_key and not self.use_observed_lib_size:
            # scvi-tools forces the observed library when size factors are registered.
            object.__setattr__(self, "use_observed_lib_size", True)

    @property
    def cat_list(self) -> tuple[int, ...]:
        """Category counts of the covariates one-hot encoded into the networks."""
        if self.batch_representation == "embedding":
            return tuple(self.n_cats_per_cov)
        return (self.n_batch, *self.n_cats_per_cov)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


class InferenceOutputs(NamedTuple):
    """Output of :meth:`VAE.inference`; a leading ``(n_samples,)`` axis when n_samples > 1.

    ``qz_m``/``qz_v`` are ``(cells, n_latent)``, ``z`` is ``([S,] cells, n_latent)``,
    ``library`` the log library ``([S,] cells, 1)``, ``ql_m``/``ql_v`` ``(cells, 1)`` or None.
    """

    z: jax.Array
    qz_m: jax.Array
    qz_v: jax.Array
    library: jax.Array
    ql_m: jax.Array | None
    ql_v: jax.Array | None


class GenerativeOutputs(NamedTuple):
    """Output of :meth:`VAE.generative`, each ``([S,] cells, genes)``.

    ``px_r`` is the log inverse dispersion (``theta = exp(px_r)``), broadcastable to the
    others (``(genes,)`` for ``dispersion="gene"``); ``px_dropout`` are zero-inflation logits
    (None when the likelihood does not use them), ``(genes,)`` for a likelihood with one gate
    per gene.
    """

    px_scale: jax.Array
    px_r: jax.Array
    px_rate: jax.Array
    px_dropout: jax.Array | None

    def px_params(self) -> PxParams:
        """The likelihood parameters ``(mu, theta, zi_logits)``."""
        return PxParams(self.px_rate, jnp.exp(self.px_r), self.px_dropout)


class ELBOTerms(NamedTuple):
    """Per-minibatch loss and per-cell terms (``(cells,)`` each)."""

    loss: jax.Array
    reconstruction_loss: jax.Array
    kl_z: jax.Array
    kl_l: jax.Array


class VAE(nn.Module):
    """scVI's VAE. Call :meth:`inference` then :meth:`generative` through ``apply``."""

    config: VAEConfig

    def setup(self):
        """Build the encoders, decoder, dispersion parameter and library prior buffers."""
        c = self.config
        enc_bn = c.use_batch_norm in ("encoder", "both")
        dec_bn = c.use_batch_norm in ("decoder", "both")
        enc_ln = c.use_layer_norm in ("encoder", "both")
        dec_ln = c.use_layer_norm in ("decoder", "both")
        enc_cats = c.cat_list if c.encode_covariates else ()
        common = {
            "n_cat_list": enc_cats,
            "n_hidden": c.n_hidden,
            "dropout_rate": c.dropout_rate,
            "use_batch_norm": enc_bn,
            "use_layer_norm": enc_ln,
            "inject_covariates": c.deeply_inject_covariates,
            "var_activation": c.var_activation,
        }
        self.z_encoder = Encoder(c.n_latent, n_layers=c.n_layers, **common)
        self.l_encoder = Encoder(1, n_layers=1, **common)
        self.decoder = DecoderSCVI(
            c.n_input,
            n_cat_list=c.cat_list,
            n_layers=c.n_layers,
            n_hidden=c.n_hidden,
            use_batch_norm=dec_bn,
            use_layer_norm=dec_ln,
            inject_covariates=c.deeply_inject_covariates,
            scale_activation="softplus" if c.use_size_factor_key else "softmax",
        )
        if c.batch_representation == "embedding":
            self.batch_embedding = nn.Embed(
                c.n_batch, c.batch_embedding_dim, embedding_init=nn.initializers.normal(1.0)
            )
        normal = nn.initializers.normal(1.0)
        if c.dispersion == "gene":
            self.px_r = self.param("px_r", normal, (c.n_input,))
        elif c.dispersion == "gene-batch":
            self.px_r = self.param("px_r", normal, (c.n_input, c.n_batch))
        elif c.dispersion == "gene-label":
            self.px_r = self.param("px_r", normal, (c.n_input, c.n_labels))
        lik = get_likelihood(c.gene_likelihood)
        if lik.uses_zi_logits and lik.zi_logits_shape != "cell-gene":
            # A free gate logit per gene (/ batch / label), for likelihoods that ask for one;
            # stored divided by FREE_GATE_SCALE (a learning-rate multiplier).
            gate_shape = {"gene": (c.n_input,), "gene-batch": (c.n_input, c.n_batch)}.get(
                lik.zi_logits_shape, (c.n_input, c.n_labels)
            )
            self.px_dropout = self.param("px_dropout", nn.initializers.zeros, gate_shape)
        if not c.use_observed_lib_size:
            self.library_log_means = self.variable(
                "buffers", "library_log_means", jnp.zeros, (1, c.n_batch), jnp.float32
            )
            self.library_log_vars = self.variable(
                "buffers", "library_log_vars", jnp.ones, (1, c.n_batch), jnp.float32
            )

    def __call__(self, batch: Minibatch, *, key: jax.Array, training: bool = False):
        """Run inference and generative once (used to initialise every parameter)."""
        inf = self.inference(batch, key=key, training=training)
        return self.generative(inf.z, inf.library, batch, training=training)

    def _batch_rep(self, batch_index: jax.Array) -> jax.Array:
        return self.batch_embedding(batch_index)

    def inference(
        self,
        batch: Minibatch,
        *,
        key: jax.Array | None,
        training: bool = False,
        n_samples: int = 1,
    ) -> InferenceOutputs:
        """Encode a minibatch into q(z | x) (and q(l | x)) and sample ``z``.

        ``key`` draws the reparameterised sample; with ``key=None`` ``z`` is the posterior
        mean (transformed for ``"ln"``), which is what scvi-tools' deterministic outputs use.
        """
        c = self.config
        if batch.qz_m is not None and not self.is_initializing():
            return self._cached_inference(batch, key, n_samples)
        if c.use_observed_lib_size:
            library = jnp.log(jnp.sum(batch.x, axis=-1, keepdims=True))
        enc_in, cats = self.encoder_input(batch)
        qz_m, qz_v = self.z_encoder(enc_in, cats, training=training, mask=batch.mask)
        ql_m = ql_v = None
        k_z = k_l = None
        if key is not None:
            k_z, k_l = jax.random.split(key)
        if not c.use_observed_lib_size or self.is_initializing():
            ql_m, ql_v = self.l_encoder(enc_in, cats, training=training, mask=batch.mask)
            if not c.use_observed_lib_size:
                library = _draw(k_l, ql_m, ql_v, n_samples)
            else:
                ql_m = ql_v = None
        elif n_samples > 1:
            library = jnp.broadcast_to(library, (n_samples, *library.shape))
        untran_z = _draw(k_z, qz_m, qz_v, n_samples)
        z = nn.softmax(untran_z, axis=-1) if c.latent_distribution == "ln" else untran_z
        return InferenceOutputs(z, qz_m, qz_v, library, ql_m, ql_v)

    def encoder_input(self, batch: Minibatch) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """The encoders' input ``(cells, n_in)`` and categorical codes (each ``(cells,)``).

        ``log1p`` counts (with ``log_variational``), followed by the continuous covariates
        and the batch embedding when covariates are encoded.
        """
        c = self.config
        enc_in = jnp.log1p(batch.x) if c.log_variational else batch.x
        cats: tuple = ()
        if c.encode_covariates:
            if batch.cont_covs is not None:
                enc_in = jnp.concatenate([enc_in, batch.cont_covs], axis=-1)
            cov_cats = _split_cats(batch.cat_covs)
            if c.batch_representation == "embedding":
                enc_in = jnp.concatenate([enc_in, self._batch_rep(batch.batch_index)], axis=-1)
                cats = cov_cats
            else:
                cats = (batch.batch_index, *cov_cats)
        return enc_in, cats

    def _cached_inference(self, batch: Minibatch, key, n_samples: int) -> InferenceOutputs:
        """Inference of a minified AnnData: q(z | x) and the library are read, not computed."""
        library = jnp.log(batch.observed_lib_size)[:, None]
        if n_samples > 1:
            library = jnp.broadcast_to(library, (n_samples, *library.shape))
        k_z = None if key is None else jax.random.split(key)[0]
        untran_z = _draw(k_z, batch.qz_m, batch.qz_v, n_samples)
        ln = self.config.latent_distribution == "ln"
        z = nn.softmax(untran_z, axis=-1) if ln else untran_z
        return InferenceOutputs(z, batch.qz_m, batch.qz_v, library, None, None)

    def generative(
        self,
        z: jax.Array,
        library: jax.Array,
        batch: Minibatch,
        *,
        training: bool = False,
        transform_batch: int | jax.Array | None = None,
    ) -> GenerativeOutputs:
        """Decode ``z`` (``([S,] cells, n_latent)``) and the log library into px parameters.

        ``transform_batch`` replaces every cell's batch code, in the decoder and in the
        ``"gene-batch"`` dispersion lookup alike (as scvi-tools does).
        """
        c = self.config
        lik = get_likelihood(c.gene_likelihood)
        batch_index = batch.batch_index
        if transform_batch is not None:
            batch_index = jnp.full_like(batch_index, transform_batch)
        dec_in = z
        lead = z.shape[:-1]
        if batch.cont_covs is not None and c.n_continuous_cov > 0:
            dec_in = jnp.concatenate(
                [dec_in, jnp.broadcast_to(batch.cont_covs, (*lead, c.n_continuous_cov))], -1
            )
        cov_cats = _split_cats(batch.cat_covs)
        if c.batch_representation == "embedding":
            rep = self._batch_rep(batch_index)
            dec_in = jnp.concatenate([dec_in, jnp.broadcast_to(rep, (*lead, rep.shape[-1]))], -1)
            cats = cov_cats
        else:
            cats = (batch_index, *cov_cats)
        if c.use_size_factor_key:
            size_factor = jnp.log(batch.size_factor)[:, None]
        else:
            size_factor = library
        px_scale, px_r_cell, px_rate, px_dropout = self.decoder(
            dec_in,
            size_factor,
            cats,
            training=training,
            mask=batch.mask,
            need_px_r=c.dispersion == "gene-cell",
            need_px_dropout=lik.uses_gate_head,
        )
        if c.dispersion == "gene":
            px_r = self.px_r
        elif c.dispersion == "gene-batch":
            px_r = self.px_r.T[batch_index]
        elif c.dispersion == "gene-label":
            px_r = self.px_r.T[batch.labels]
        else:
            px_r = px_r_cell
        if not lik.uses_zi_logits:
            px_dropout = None
        elif lik.zi_logits_shape == "gene":
            px_dropout = FREE_GATE_SCALE * self.px_dropout
        elif lik.zi_logits_shape == "gene-batch":
            px_dropout = FREE_GATE_SCALE * self.px_dropout.T[batch_index]
        elif lik.zi_logits_shape == "gene-label":
            px_dropout = FREE_GATE_SCALE * self.px_dropout.T[batch.labels]
        return GenerativeOutputs(px_scale, px_r, px_rate, px_dropout)

    def library_prior(self, batch_index: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Per-cell prior mean and variance of the log library, each ``(cells, 1)``."""
        means = self.library_log_means.value[0][batch_index][:, None]
        variances = self.library_log_vars.value[0][batch_index][:, None]
        return means, variances


def _split_cats(cat_covs: jax.Array | None) -> tuple[jax.Array, ...]:
    if cat_covs is None:
        return ()
    return tuple(cat_covs[:, k] for k in range(cat_covs.shape[1]))


def _draw(key, mean, var, n_samples):
    if key is None:
        return mean if n_samples == 1 else jnp.broadcast_to(mean, (n_samples, *mean.shape))
    shape = mean.shape if n_samples == 1 else (n_samples, *mean.shape)
    return mean + jnp.sqrt(var) * jax.random.normal(key, shape, mean.dtype)


def trainable_mask(config: VAEConfig, params: dict) -> dict:
    """Which parameters the ELBO of ``config`` uses (a pytree of bools like ``params``).

    The unused ones (``l_encoder`` with the observed library, ``px_r_decoder`` unless
    ``dispersion="gene-cell"``, ``px_dropout_decoder`` without zero inflation, the dispersion
    when the likelihood has none) exist only so that the parameter tree matches scvi-tools'
    state dict; PyTorch never updates them, and neither does jaxvi.
    """
    lik = get_likelihood(config.gene_likelihood)
    unused = []
    if config.use_observed_lib_size:
        unused.append(("l_encoder",))
    if config.dispersion != "gene-cell" or not lik.uses_theta:
        unused.append(("decoder", "px_r_decoder"))
    if not lik.uses_gate_head:
        unused.append(("decoder", "px_dropout_decoder"))
    if not lik.uses_theta:
        unused.append(("px_r",))

    def used(path, _):
        names = tuple(getattr(p, "key", str(p)) for p in path)
        return not any(names[: len(u)] == u for u in unused)

    return jax.tree_util.tree_map_with_path(used, params)


def normal_kl(m_q, v_q, m_p, v_p) -> jax.Array:
    """Elementwise KL(N(m_q, v_q) || N(m_p, v_p)) with variances, PyTorch's closed form."""
    var_ratio = v_q / v_p
    return 0.5 * (var_ratio + jnp.square(m_q - m_p) / v_p - 1.0 - jnp.log(var_ratio))


def init_variables(
    config: VAEConfig,
    key: jax.Array,
    library_log_means=None,
    library_log_vars=None,
    *,
    module_cls: type[VAE] = VAE,
) -> dict:
    """Initialise ``{"params", "batch_stats"[, "buffers"]}`` for a VAE of ``config``.

    ``library_log_means``/``library_log_vars`` (``(1, n_batch)``) fill the library prior
    when ``use_observed_lib_size=False``. ``module_cls`` is a subclass of :class:`VAE` that
    extends it (scANVI's ``SCANVAE``) and whose ``__call__`` creates its extra parameters.
    """
    variables = dict(_init(config, key, module_cls))
    variables.setdefault("batch_stats", {})
    if "buffers" in variables:
        buffers = dict(variables["buffers"])
        if library_log_means is not None:
            buffers["library_log_means"] = jnp.asarray(library_log_means, jnp.float32)
            buffers["library_log_vars"] = jnp.asarray(library_log_vars, jnp.float32)
        variables["buffers"] = buffers
    return variables


@functools.partial(jax.jit, static_argnums=(0, 2))
def _init(config: VAEConfig, key: jax.Array, module_cls: type[VAE]) -> dict:
    """Flax initialisation on a dummy two-cell batch, compiled (eager init is slow)."""
    n = 2
    batch = Minibatch(
        x=jnp.ones((n, config.n_input), jnp.float32),
        batch_index=jnp.zeros((n,), jnp.int32),
        labels=jnp.zeros((n,), jnp.int32),
        cat_covs=jnp.zeros((n, len(config.n_cats_per_cov)), jnp.int32)
        if config.n_cats_per_cov
        else None,
        cont_covs=jnp.zeros((n, config.n_continuous_cov), jnp.float32)
        if config.n_continuous_cov
        else None,
        size_factor=jnp.ones((n,), jnp.float32) if config.use_size_factor_key else None,
    )
    k_params, k_z = jax.random.split(key)
    return module_cls(config).init({"params": k_params}, batch, key=k_z, training=False)


def negative_log_likelihood(
    config: VAEConfig, batch: Minibatch, gen: GenerativeOutputs
) -> jax.Array:
    """``-log p(x | z)`` summed over genes, ``(cells,)``.

    Uses the likelihood's ``log_prob_no_factorial`` plus ``batch.log_x_factorial`` when both
    exist (no ``lgamma`` per step).
    """
    lik = get_likelihood(config.gene_likelihood)
    if batch.log_x_factorial is not None and lik.log_prob_no_factorial is not None:
        log_px = lik.log_prob_no_factorial(batch.x, gen.px_params())
        return batch.log_x_factorial - jnp.sum(log_px, axis=-1)
    return -jnp.sum(lik.log_prob(batch.x, gen.px_params()), axis=-1)


def masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Mean of ``values`` ``(cells,)`` over the real cells (``mask == 1``; all when None)."""
    if mask is None:
        return jnp.mean(values)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def vae_loss(
    module: VAE,
    variables: dict,
    batch: Minibatch,
    *,
    key: jax.Array | None,
    training: bool,
    kl_weight: float | jax.Array = 1.0,
):
    """ELBO loss of one minibatch, as scvi-tools' ``VAE.loss``.

    ``loss = mean over real cells of (rec + kl_weight * kl_z + kl_l)`` where ``rec`` is the
    negative log-likelihood summed over genes. Padding cells (``batch.mask == 0``) are
    excluded from the mean and from batch-norm statistics.

    Returns
    -------
    ``(ELBOTerms, new_batch_stats)``; per-cell terms have shape ``(cells,)``.
    """
    config = module.config
    if key is not None:
        k_inf, k_drop = jax.random.split(key)
        rngs = {"dropout": k_drop}
    else:
        k_inf, rngs = None, {}

    def forward(m: VAE):
        inf = m.inference(batch, key=k_inf, training=training)
        gen = m.generative(inf.z, inf.library, batch, training=training)
        if config.use_observed_lib_size:
            kl_l = jnp.zeros(inf.qz_m.shape[:1], inf.qz_m.dtype)
        else:
            p_m, p_v = m.library_prior(batch.batch_index)
            kl_l = jnp.sum(normal_kl(inf.ql_m, inf.ql_v, p_m, p_v), axis=-1)
        return inf, gen, kl_l

    (inf, gen, kl_l), updates = nn.apply(forward, module, mutable=["batch_stats"])(
        variables, rngs=rngs
    )
    kl_z = jnp.sum(normal_kl(inf.qz_m, inf.qz_v, 0.0, 1.0), axis=-1)
    rec = negative_log_likelihood(config, batch, gen)
    loss = masked_mean(rec + kl_weight * kl_z + kl_l, batch.mask)
    new_stats = updates.get("batch_stats", variables.get("batch_stats", {}))
    return ELBOTerms(loss, rec, kl_z, kl_l), new_stats


@functools.cache
def vae_model_def(config: VAEConfig) -> ModelDef:
    """scVI's VAE of ``config`` as a :class:`~jaxvi.module.ModelDef` for the engine.

    The loss is :func:`vae_loss`; its terms are ``reconstruction_loss`` and ``kl_local``
    (``kl_z + kl_l``), from which the engine reports scvi-tools' ELBO metrics. Cached per
    config, so repeated ``train()`` calls share one value (and its compiled programs).
    """
    module = VAE(config)

    def loss(key, variables, batch, *, training, kl_weight=1.0):
        out, stats = vae_loss(
            module, variables, batch, key=key, training=training, kl_weight=kl_weight
        )
        terms = {RECONSTRUCTION: out.reconstruction_loss, KL_LOCAL: out.kl_z + out.kl_l}
        return LossOutput(out.loss, terms), stats

    return ModelDef(
        name="VAE",
        init=functools.partial(init_variables, config),
        loss=loss,
        trainable=functools.partial(trainable_mask, config),
    )
