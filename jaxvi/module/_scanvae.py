"""scANVI's semi-supervised VAE (scvi-tools 1.4.2's ``SCANVAE``) as a functional Flax module.

:class:`SCANVAE` is scVI's :class:`~jaxvi.module.VAE` (same encoders, decoder, dispersion and
library prior, same parameter names) plus three networks: a classifier on ``z1`` (scVI's
``z``), an encoder ``q(z2 | z1, y)`` and a decoder ``p(z1 | z2, y)``, the last two conditioned
on a one-hot label. :func:`scanvae_loss` is the loss of one semi-supervised step as a pure
function: the ELBO of a minibatch with ``y`` enumerated for every cell, plus (when the
minibatch carries a ``labelled`` sub-batch) ``classification_ratio`` times the cross-entropy
of the classifier on the labelled cells. See ``docs/user_guide/scanvi.md`` for the details
of the reference this reproduces.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvi.data import Minibatch
from jaxvi.module._base import KL_LOCAL, RECONSTRUCTION, LossOutput, ModelDef
from jaxvi.module._vae import (
    VAE,
    VAEConfig,
    init_variables,
    masked_mean,
    negative_log_likelihood,
    normal_kl,
    trainable_mask,
)
from jaxvi.nn import Classifier, Decoder, Encoder

__all__ = [
    "CLASSIFICATION",
    "HierarchyOutputs",
    "SCANVAE",
    "SCANVAEConfig",
    "SCANVAETerms",
    "categorical_kl",
    "classification_metrics",
    "init_scanvae_variables",
    "normal_log_prob",
    "scanvae_elbo",
    "scanvae_loss",
    "scanvae_model_def",
    "with_vae_weights",
]

# scvi-tools' METRIC_KEYS: the loss term and the three metrics its training plan logs.
CLASSIFICATION = "classification_loss"
ACCURACY, F1_SCORE, CALIBRATION_ERROR = "accuracy", "f1_score", "calibration_error"
# torchmetrics' default number of bins of ``multiclass_calibration_error``.
CALIBRATION_BINS = 15


@dataclasses.dataclass(frozen=True)
class SCANVAEConfig(VAEConfig):
    """Architecture of scANVI's ``SCANVAE``: every :class:`~jaxvi.module.VAEConfig` field
    (scvi-tools' defaults) plus the classifier and the label prior.

    ``n_labels`` counts the real classes (the unlabelled category excluded); label codes are
    ``0 .. n_labels - 1`` and unlabelled cells carry the code ``n_labels``.

    Attributes
    ----------
    linear_classifier
        A single linear layer ``z -> logits`` instead of an MLP.
    classifier_n_hidden, classifier_n_layers, classifier_dropout_rate
        ``classifier_parameters`` of scvi-tools, each None for its default: ``n_hidden``,
        ``n_layers`` (both 0 with ``linear_classifier``) and ``dropout_rate``. The classifier
        is linear whenever its width or depth is 0.
    classifier_logits
        The classifier outputs logits (scvi-tools' default) rather than probabilities.
    y_prior
        Prior class probabilities ``(n_labels,)``, or None for uniform. Normalised to sum 1
        (as ``torch.distributions.Categorical`` does).
    """

    linear_classifier: bool = False
    classifier_n_hidden: int | None = None
    classifier_n_layers: int | None = None
    classifier_dropout_rate: float | None = None
    classifier_logits: bool = True
    y_prior: tuple[float, ...] | None = None

    def __post_init__(self):
        """Validate the options; ``y_prior`` is stored as a tuple of floats."""
        super().__post_init__()
        if self.dispersion == "gene-label":
            # scvi-tools 1.4.2's SCANVAE builds px_r with 0 label columns (it does not pass
            # n_labels to VAE), so such a model fails on its first step there.
            raise ValueError(
                "`dispersion='gene-label'` is not supported by scANVI (scvi-tools 1.4.2 "
                "cannot train it either); use 'gene', 'gene-batch' or 'gene-cell'."
            )
        for name in ("classifier_n_hidden", "classifier_n_layers"):
            value = getattr(self, name)
            if value is not None and int(value) < 0:
                raise ValueError(f"`{name}` must be >= 0 or None, got {value}.")
        rate = self.classifier_dropout_rate
        if rate is not None and not 0.0 <= rate < 1.0:
            raise ValueError(f"`classifier_dropout_rate` must be in [0, 1), got {rate}.")
        if self.y_prior is not None:
            prior = np.asarray(self.y_prior, dtype=np.float64).reshape(-1)
            if prior.shape != (self.n_labels,):
                raise ValueError(
                    f"`y_prior` must have n_labels={self.n_labels} entries, got {prior.size}."
                )
            if not (np.all(np.isfinite(prior)) and np.all(prior >= 0) and prior.sum() > 0):
                raise ValueError(
                    f"`y_prior` must be finite, non-negative and not all 0, got {prior}."
                )
            # float32 values, as the buffer holds them: a prior read back from torch is equal.
            object.__setattr__(self, "y_prior", tuple(float(p) for p in prior.astype(np.float32)))

    @property
    def classifier_hidden(self) -> int:
        """Width of the classifier's hidden layers (0: linear classifier)."""
        if self.classifier_n_hidden is not None:
            return int(self.classifier_n_hidden)
        return 0 if self.linear_classifier else self.n_hidden

    @property
    def classifier_layers(self) -> int:
        """Number of the classifier's hidden layers (0: linear classifier)."""
        if self.classifier_n_layers is not None:
            return int(self.classifier_n_layers)
        return 0 if self.linear_classifier else self.n_layers

    @property
    def classifier_dropout(self) -> float:
        """Dropout rate of the classifier's hidden layers."""
        rate = self.classifier_dropout_rate
        return self.dropout_rate if rate is None else float(rate)

    def vae_config(self) -> VAEConfig:
        """The scVI part alone: what ``SCANVI.from_scvi_model`` copies weights from."""
        return VAEConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(VAEConfig)})


class HierarchyOutputs(NamedTuple):
    """The ``z1 -> z2 -> z1`` hierarchy for every label, each ``(n_labels, cells, n_latent)``.

    Row ``y`` holds the cells with label ``y``: ``q(z2 | z1, y)`` (mean and variance), the
    ``z2`` drawn from it (its mean without a key) and ``p(z1 | z2, y)`` (mean and variance).
    """

    qz2_m: jax.Array
    qz2_v: jax.Array
    z2: jax.Array
    pz1_m: jax.Array
    pz1_v: jax.Array


class SCANVAETerms(NamedTuple):
    """The loss of one semi-supervised step and its parts.

    Attributes
    ----------
    loss
        ``()`` the objective: ELBO mean over real cells plus ``classification_ratio`` times
        ``classification_loss``.
    reconstruction_loss
        ``(cells,)`` ``-log p(x | z1) + log q(z1 | x) + E_q(y) [-log p(z1 | z2, y)]``.
    kl_local
        ``(cells,)`` ``E_q(y) [KL(q(z2) || N(0, I))] + KL(q(y) || p(y)) [+ KL(l)]``.
    classification_loss
        ``()`` cross-entropy on the labelled sub-batch, or None without one.
    logits, true_labels
        The classifier output ``(labelled cells, n_labels)`` and the true codes
        ``(labelled cells,)`` of the labelled sub-batch, or None.
    """

    loss: jax.Array
    reconstruction_loss: jax.Array
    kl_local: jax.Array
    classification_loss: jax.Array | None
    logits: jax.Array | None
    true_labels: jax.Array | None


class SCANVAE(VAE):
    """scANVI's module: :class:`~jaxvi.module.VAE` plus ``classifier``, ``encoder_z2_z1`` and
    ``decoder_z1_z2`` (and the label prior in ``buffers/y_prior``). ``config`` is a
    :class:`SCANVAEConfig`.
    """

    def setup(self):
        """Build the VAE's networks, then the classifier, the hierarchy and the label prior."""
        super().setup()
        c = self.config
        if not isinstance(c, SCANVAEConfig):
            raise TypeError(f"SCANVAE needs a SCANVAEConfig, got {type(c).__name__}.")
        enc_bn = c.use_batch_norm in ("encoder", "both")
        dec_bn = c.use_batch_norm in ("decoder", "both")
        enc_ln = c.use_layer_norm in ("encoder", "both")
        dec_ln = c.use_layer_norm in ("decoder", "both")
        self.classifier = Classifier(
            c.n_labels,
            n_hidden=c.classifier_hidden,
            n_layers=c.classifier_layers,
            dropout_rate=c.classifier_dropout,
            logits=c.classifier_logits,
            use_batch_norm=enc_bn,
            use_layer_norm=enc_ln,
        )
        self.encoder_z2_z1 = Encoder(
            c.n_latent,
            n_cat_list=(c.n_labels,),
            n_layers=c.n_layers,
            n_hidden=c.n_hidden,
            dropout_rate=c.dropout_rate,
            use_batch_norm=enc_bn,
            use_layer_norm=enc_ln,
        )
        self.decoder_z1_z2 = Decoder(
            c.n_latent,
            n_cat_list=(c.n_labels,),
            n_layers=c.n_layers,
            n_hidden=c.n_hidden,
            use_batch_norm=dec_bn,
            use_layer_norm=dec_ln,
        )
        prior = c.y_prior if c.y_prior is not None else (1.0 / c.n_labels,) * c.n_labels
        self.y_prior = self.variable(
            "buffers", "y_prior", lambda: jnp.asarray([prior], jnp.float32)
        )

    def __call__(self, batch: Minibatch, *, key: jax.Array, training: bool = False):
        """Run every network once (used to initialise every parameter)."""
        inf = self.inference(batch, key=key, training=training)
        gen = self.generative(inf.z, inf.library, batch, training=training)
        self.classifier(inf.z, training=training, mask=batch.mask)
        self.label_hierarchy(inf.z, key=None, training=training, mask=batch.mask)
        return gen

    def classify(
        self, batch: Minibatch, *, key: jax.Array | None = None, training: bool = False
    ) -> jax.Array:
        """Classifier output ``(cells, n_labels)`` for a minibatch (scvi-tools' ``classify``).

        Logits with ``classifier_logits`` (the default), probabilities otherwise. With
        ``key=None`` the classifier sees the posterior mean of ``q(z | x)`` *before* the
        ``"ln"`` transform (scvi-tools' ``use_posterior_mean=True``); with a key, a transformed
        sample. Only ``z_encoder`` and the classifier run (no library encoder). A minified
        minibatch (``batch.qz_m`` set) uses its cached posterior.
        """
        if batch.qz_m is not None and not self.is_initializing():
            qz_m, qz_v = batch.qz_m, batch.qz_v
        else:
            enc_in, cats = self.encoder_input(batch)
            qz_m, qz_v = self.z_encoder(enc_in, cats, training=training, mask=batch.mask)
        z = qz_m
        if key is not None:
            z = qz_m + jnp.sqrt(qz_v) * jax.random.normal(key, qz_m.shape, qz_m.dtype)
            if self.config.latent_distribution == "ln":
                z = nn.softmax(z, axis=-1)
        return self.classifier(z, training=training, mask=batch.mask)

    def z2_posterior(
        self, z1: jax.Array, *, training: bool = False, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``q(z2 | z1, y)`` for every label: mean and variance, each
        ``(n_labels, cells, n_latent)`` (row ``y`` conditioned on label ``y``).

        ``z1`` is ``(cells, n_latent)``, scVI's ``z`` (one sample). Batch-norm statistics are
        taken over all ``n_labels * cells`` rows (padding cells, ``mask == 0``, excluded), as
        scvi-tools does on its repeated minibatch.
        """
        if z1.ndim != 2:
            raise ValueError(f"z1 must be (cells, n_latent), got shape {z1.shape}.")
        z1s = jnp.broadcast_to(z1, (self.config.n_labels, *z1.shape))
        return self.encoder_z2_z1(z1s, (self._label_rows(z1s),), training=training, mask=mask)

    def z1_prior(
        self, z2: jax.Array, *, training: bool = False, mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """``p(z1 | z2, y)``: mean and variance from ``z2`` ``(n_labels, cells, n_latent)``
        (row ``y`` conditioned on label ``y``), each of that shape."""
        return self.decoder_z1_z2(z2, (self._label_rows(z2),), training=training, mask=mask)

    def _label_rows(self, x: jax.Array) -> jax.Array:
        """Label codes ``(n_labels, cells)``: row ``y`` is all ``y``."""
        codes = jnp.arange(self.config.n_labels, dtype=jnp.int32)[:, None]
        return jnp.broadcast_to(codes, x.shape[:-1])

    def label_hierarchy(
        self,
        z1: jax.Array,
        *,
        key: jax.Array | None,
        training: bool = False,
        mask: jax.Array | None = None,
    ) -> HierarchyOutputs:
        """:meth:`z2_posterior`, a ``z2`` drawn from it with ``key`` (its mean with None), and
        :meth:`z1_prior` of that ``z2``."""
        qz2_m, qz2_v = self.z2_posterior(z1, training=training, mask=mask)
        z2 = qz2_m
        if key is not None:
            z2 = qz2_m + jnp.sqrt(qz2_v) * jax.random.normal(key, qz2_m.shape, qz2_m.dtype)
        pz1_m, pz1_v = self.z1_prior(z2, training=training, mask=mask)
        return HierarchyOutputs(qz2_m, qz2_v, z2, pz1_m, pz1_v)


def normal_log_prob(x: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
    """Elementwise ``log N(x; mean, var)``, written as ``torch.distributions.Normal`` does
    with ``scale = sqrt(var)``."""
    scale = jnp.sqrt(var)
    return (
        -jnp.square(x - mean) / (2.0 * jnp.square(scale))
        - jnp.log(scale)
        - 0.5 * np.log(2.0 * np.pi)
    )


def categorical_kl(probs: jax.Array, prior: jax.Array) -> jax.Array:
    """``KL(Cat(probs) || Cat(prior))`` over the last axis, as ``torch.distributions`` computes
    it: both normalised, log-probabilities clamped to ``[eps, 1 - eps]``, a 0 entry of
    ``probs`` contributing 0 and a 0 entry of ``prior`` infinity.

    Parameters
    ----------
    probs
        ``(..., n_labels)``.
    prior
        Broadcastable to ``probs``.
    """
    p = probs / jnp.sum(probs, axis=-1, keepdims=True)
    q = prior / jnp.sum(prior, axis=-1, keepdims=True)
    eps = jnp.finfo(p.dtype).eps
    t = p * (jnp.log(jnp.clip(p, eps, 1.0 - eps)) - jnp.log(jnp.clip(q, eps, 1.0 - eps)))
    t = jnp.where(q == 0, jnp.inf, t)
    t = jnp.where(p == 0, 0.0, t)
    return jnp.sum(t, axis=-1)


def classification_metrics(
    logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """The three metrics scvi-tools' semi-supervised plan logs for a labelled minibatch.

    torchmetrics' ``multiclass_accuracy`` and ``multiclass_f1_score`` (``average="micro"``,
    equal for single-label multiclass data) and ``multiclass_calibration_error`` (15 equal
    bins on ``[0, 1]``, L1 norm; like torchmetrics, ``logits`` are taken as probabilities when
    every value lies in ``[0, 1]`` and softmax-ed otherwise).

    Parameters
    ----------
    logits
        ``(cells, n_labels)`` classifier output.
    labels
        ``(cells,)`` true codes.
    mask
        ``(cells,)`` 1.0 for real cells, or None.

    Returns
    -------
    ``{"accuracy", "f1_score", "calibration_error"}``, each a ``()`` float32 array.
    """
    w = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    accuracy = jnp.sum(w * (jnp.argmax(logits, axis=-1) == labels)) / n
    in_unit = jnp.all(jnp.where(w[:, None] > 0, (logits >= 0) & (logits <= 1), True))
    probs = jnp.where(in_unit, logits, nn.softmax(logits, axis=-1))
    confidence = jnp.max(probs, axis=-1)
    correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
    # Boundaries as torch.linspace(0, 1, 16) in float32; bucketize(right=True) - 1.
    bounds = jnp.asarray(np.linspace(0.0, 1.0, CALIBRATION_BINS + 1), confidence.dtype)
    idx = jnp.searchsorted(bounds, confidence, side="right") - 1
    n_slots = CALIBRATION_BINS + 1
    count = jax.ops.segment_sum(w, idx, n_slots)
    safe = jnp.maximum(count, 1.0)
    conf_bin = jnp.where(count > 0, jax.ops.segment_sum(w * confidence, idx, n_slots) / safe, 0)
    acc_bin = jnp.where(count > 0, jax.ops.segment_sum(w * correct, idx, n_slots) / safe, 0)
    prop = count / jnp.maximum(jnp.sum(count), 1.0)
    calibration = jnp.sum(jnp.abs(acc_bin - conf_bin) * prop)
    return {ACCURACY: accuracy, F1_SCORE: accuracy, CALIBRATION_ERROR: calibration}


def scanvae_elbo(
    z1: jax.Array,
    qz_m: jax.Array,
    qz_v: jax.Array,
    hierarchy: HierarchyOutputs,
    probs: jax.Array,
    y_prior: jax.Array,
    nll_x: jax.Array,
    kl_l: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """scANVI's per-cell ELBO terms from the networks' outputs (the label enumerated).

    Parameters
    ----------
    z1, qz_m, qz_v
        ``(cells, n_latent)``: scVI's ``z`` and its posterior ``q(z1 | x)``.
    hierarchy
        :meth:`SCANVAE.label_hierarchy` of ``z1``.
    probs
        ``(cells, n_labels)`` ``q(y | z1)``.
    y_prior
        ``(1, n_labels)`` prior class probabilities.
    nll_x, kl_l
        ``(cells,)`` ``-log p(x | z1)`` and the library KL (zeros with the observed library).

    Returns
    -------
    ``(reconstruction_loss, kl_local)``, each ``(cells,)``: see :class:`SCANVAETerms`.
    """
    z1s = jnp.broadcast_to(z1, hierarchy.pz1_m.shape)
    nll_z1 = -jnp.sum(normal_log_prob(z1s, hierarchy.pz1_m, hierarchy.pz1_v), axis=-1)
    kl_z2 = jnp.sum(normal_kl(hierarchy.qz2_m, hierarchy.qz2_v, 0.0, 1.0), axis=-1)
    log_qz1 = jnp.sum(normal_log_prob(z1, qz_m, qz_v), axis=-1)
    rec = nll_x + log_qz1 + jnp.sum(probs * nll_z1.T, axis=-1)
    kl = jnp.sum(probs * kl_z2.T, axis=-1) + categorical_kl(probs, y_prior) + kl_l
    return rec, kl


def init_scanvae_variables(
    config: SCANVAEConfig,
    key: jax.Array,
    library_log_means=None,
    library_log_vars=None,
) -> dict:
    """Initialise ``{"params", "batch_stats", "buffers"}`` for a SCANVAE of ``config``.

    As :func:`~jaxvi.module.init_variables` (same laws, same library prior arguments), plus
    the classifier, the hierarchy and ``buffers/y_prior`` ``(1, n_labels)``.
    """
    return init_variables(config, key, library_log_means, library_log_vars, module_cls=SCANVAE)


def with_vae_weights(variables: dict, vae_variables: dict) -> dict:
    """``variables`` of a SCANVAE with its scVI part replaced by ``vae_variables``.

    What ``SCANVI.from_scvi_model`` does with ``load_state_dict(strict=False)``: every
    parameter, batch-norm statistic and buffer of the scVI model is copied; the classifier,
    the hierarchy and ``y_prior`` keep their values.

    Parameters
    ----------
    variables
        ``{"params", "batch_stats", "buffers"}`` of a SCANVAE (e.g. freshly initialised).
    vae_variables
        Variables of a :class:`~jaxvi.module.VAE` of the same architecture
        (:meth:`SCANVAEConfig.vae_config`, up to ``n_labels``).

    Raises
    ------
    ValueError
        If a scVI variable has no counterpart of the same shape in ``variables``.
    """
    out = {coll: dict(tree) for coll, tree in variables.items()}
    for coll, tree in vae_variables.items():
        for name, value in tree.items():
            target = out.get(coll, {}).get(name)
            same = target is not None and jax.tree_util.tree_structure(
                target
            ) == jax.tree_util.tree_structure(value)
            if same:
                shapes = jax.tree_util.tree_map(lambda a, b: a.shape == b.shape, target, value)
                same = all(jax.tree_util.tree_leaves(shapes))
            if not same:
                raise ValueError(
                    f"scVI variable {coll}/{name} does not match the SCANVAE's (missing, or "
                    "another structure or shape): the two architectures differ."
                )
            out[coll][name] = value
    return out


def scanvae_loss(
    module: SCANVAE,
    variables: dict,
    batch: Minibatch,
    *,
    key: jax.Array | None,
    training: bool,
    kl_weight: float | jax.Array = 1.0,
    classification_ratio: float = 50.0,
) -> tuple[SCANVAETerms, dict]:
    """Loss of one semi-supervised step, as scvi-tools 1.4.2's ``SCANVAE.loss``.

    Every cell of ``batch`` enters the ELBO with its label enumerated (its own label, if
    any, is not used there): with ``probs = q(y | z1)`` from the classifier,

    - ``reconstruction_loss = -log p(x | z1) + log q(z1 | x)
      + sum_y probs_y * (-log p(z1 | z2_y, y))``,
    - ``kl_local = sum_y probs_y * KL(q(z2 | z1, y) || N(0, I)) + KL(q(y) || p(y)) + KL(l)``,
    - ``loss = mean over real cells of (reconstruction_loss + kl_weight * kl_local)``
      (``kl_weight`` scales the library KL too, unlike scVI's loss).

    When ``batch.labelled`` is set, the classifier is applied to the posterior mean of
    ``q(z | x)`` of those cells (a second ``z_encoder`` pass, which in training mode updates
    its batch-norm statistics again, as in scvi-tools) and
    ``loss += classification_ratio * cross_entropy``.

    Parameters
    ----------
    key
        Draws ``z1``, ``z2`` and the dropout masks; None uses posterior means and no dropout.
    training
        Dropout and batch statistics in batch norm (padding cells excluded via the masks).

    Returns
    -------
    ``(SCANVAETerms, new_batch_stats)``.
    """
    config = module.config
    if key is not None:
        k_inf, k_z2, k_drop = jax.random.split(key, 3)
        rngs = {"dropout": k_drop}
    else:
        k_inf = k_z2 = None
        rngs = {}
    labelled = batch.labelled

    def forward(m: SCANVAE):
        inf = m.inference(batch, key=k_inf, training=training)
        gen = m.generative(inf.z, inf.library, batch, training=training)
        hier = m.label_hierarchy(inf.z, key=k_z2, training=training, mask=batch.mask)
        out = m.classifier(inf.z, training=training, mask=batch.mask)
        if config.use_observed_lib_size:
            kl_l = jnp.zeros(inf.qz_m.shape[:1], inf.qz_m.dtype)
        else:
            p_m, p_v = m.library_prior(batch.batch_index)
            kl_l = jnp.sum(normal_kl(inf.ql_m, inf.ql_v, p_m, p_v), axis=-1)
        logits = None if labelled is None else m.classify(labelled, training=training)
        return inf, gen, hier, out, kl_l, logits, m.y_prior.value

    (inf, gen, hier, out, kl_l, logits, y_prior), updates = nn.apply(
        forward, module, mutable=["batch_stats"]
    )(variables, rngs=rngs)
    probs = nn.softmax(out, axis=-1) if config.classifier_logits else out
    nll_x = negative_log_likelihood(config, batch, gen)
    rec, kl = scanvae_elbo(inf.z, inf.qz_m, inf.qz_v, hier, probs, y_prior, nll_x, kl_l)
    loss = masked_mean(rec + kl_weight * kl, batch.mask)
    ce = true_labels = None
    if labelled is not None:
        true_labels = labelled.labels
        if labelled.mask is not None:  # padding may carry the unlabelled code, out of range
            true_labels = jnp.where(labelled.mask > 0, true_labels, 0)
        log_p = jax.nn.log_softmax(logits, axis=-1)
        nll_y = -jnp.take_along_axis(log_p, true_labels[:, None], axis=-1)[:, 0]
        ce = masked_mean(nll_y, labelled.mask)
        loss = loss + ce * classification_ratio
    new_stats = updates.get("batch_stats", variables.get("batch_stats", {}))
    return SCANVAETerms(loss, rec, kl, ce, logits, true_labels), new_stats


@functools.cache
def scanvae_model_def(config: SCANVAEConfig, classification_ratio: float = 50.0) -> ModelDef:
    """scANVI's SCANVAE of ``config`` as a :class:`~jaxvi.module.ModelDef` for the engine.

    The loss is :func:`scanvae_loss`. Its terms: ``reconstruction_loss`` and ``kl_local``
    per cell (scvi-tools' ELBO metrics; no ``kl_global``) and, for a minibatch with a
    ``labelled`` sub-batch, the minibatch scalars ``classification_loss``, ``accuracy``,
    ``f1_score`` and ``calibration_error`` (:func:`classification_metrics`, not
    differentiated), which scvi-tools logs weighted by the size of the full minibatch and
    names ``train_<name>`` / ``validation_<name>`` (``prefixed_terms``).
    ``classification_ratio`` is the training plan's (default 50). Cached per arguments.
    """
    if not isinstance(config, SCANVAEConfig):
        raise TypeError(f"scanvae_model_def needs a SCANVAEConfig, got {type(config).__name__}.")
    module = SCANVAE(config)
    ratio = float(classification_ratio)

    def loss(key, variables, batch, *, training, kl_weight=1.0):
        out, stats = scanvae_loss(
            module,
            variables,
            batch,
            key=key,
            training=training,
            kl_weight=kl_weight,
            classification_ratio=ratio,
        )
        terms = {RECONSTRUCTION: out.reconstruction_loss, KL_LOCAL: out.kl_local}
        if out.classification_loss is not None:
            terms[CLASSIFICATION] = out.classification_loss
            metrics = classification_metrics(out.logits, out.true_labels, batch.labelled.mask)
            terms.update(jax.lax.stop_gradient(metrics))
        return LossOutput(out.loss, terms), stats

    return ModelDef(
        name="SCANVAE",
        init=functools.partial(init_scanvae_variables, config),
        loss=loss,
        trainable=functools.partial(trainable_mask, config),
        prefixed_terms=frozenset({CLASSIFICATION, ACCURACY, F1_SCORE, CALIBRATION_ERROR}),
    )
