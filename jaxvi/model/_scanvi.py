"""scANVI (Xu et al. 2021): the semi-supervised model class with scvi-tools' ``SCANVI`` API.

It declares its registry (labels with an unlabelled category), constructor arguments, module
(:class:`~jaxvi.module.SCANVAE`) and :class:`~jaxvi.module.ModelDef`, the semi-supervised
``train`` (labelled sub-minibatches, ``classification_ratio``), ``predict`` and
``from_scvi_model``; everything it shares with scVI is in :class:`~jaxvi.model.BaseModel`.
"""

from __future__ import annotations

import os
import warnings
from typing import final

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxvi import posterior
from jaxvi._settings import settings
from jaxvi.data import registry as reglib
from jaxvi.io import torchfile
from jaxvi.io.scanvi_bridge import (
    scanvae_state_dict_to_variables,
    scanvae_variables_to_state_dict,
)
from jaxvi.model import scarches
from jaxvi.model._base import BaseModel
from jaxvi.model._minify import MINIFY_UNS_KEY
from jaxvi.model._parts import ModelParts
from jaxvi.model._scanvi_arches import scanvi_query_parts
from jaxvi.model._scanvi_parts import (
    UNLABELED_KEY,
    label_values,
    labelled_groups,
    model_n_labels,
    scanvi_config,
    scanvi_params_from_scvi_tools,
    scanvi_registry,
    semi_supervised_split,
)
from jaxvi.model._scvi import SCVI, VAE_KWARGS, library_size_prior
from jaxvi.module import (
    SCANVAE,
    ModelDef,
    SCANVAEConfig,
    init_scanvae_variables,
    scanvae_model_def,
    with_vae_weights,
)
from jaxvi.nn import var_activation_name
from jaxvi.train import get_max_epochs_heuristic

__all__ = ["SCANVI", "SCANVI_KWARGS"]

# SCANVI's ``**model_kwargs``: scVI's VAE options and SCANVAE's own.
SCANVI_KWARGS = VAE_KWARGS | {"latent_distribution", "classifier_parameters", "y_prior"}


@final
class SCANVI(BaseModel):
    """single-cell ANnotation using Variational Inference (Xu et al. 2021), scvi-tools'
    ``SCANVI`` in JAX: scVI with a classifier on the latent space, trained on partly
    labelled cells.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        A registry (from a saved model) to use instead of ``adata``'s.
    n_hidden, n_latent, n_layers, dropout_rate
        As scvi-tools' ``SCANVI``: 128, 10, 1, 0.1.
    dispersion, gene_likelihood, use_observed_lib_size
        ``"gene"`` (or ``"gene-batch"``, ``"gene-cell"``; ``"gene-label"`` fails in
        scvi-tools 1.4.2 and is refused), ``"zinb"``, True.
    linear_classifier
        A single linear layer ``z -> logits`` instead of an MLP.
    **model_kwargs
        ``classifier_parameters`` (``{"n_hidden", "n_layers", "dropout_rate", "logits"}``),
        ``y_prior`` (``(n_labels,)`` prior class probabilities, uniform by default),
        ``latent_distribution`` and scVI's ``VAE`` options (see :class:`jaxvi.SCVI`).
        ``labels_groups`` / ``use_labels_groups`` are not supported.

    Attributes
    ----------
    n_labels
        Classes of the classifier (the unlabelled category excluded).
    unlabeled_category_
        The unlabelled category given to :meth:`setup_anndata`.
    was_pretrained
        Made by :meth:`from_scvi_model` (the default epoch count is then shorter).
    """

    _model_name = "SCANVI"
    _non_kwargs = (
        "n_hidden",
        "n_latent",
        "n_layers",
        "dropout_rate",
        "dispersion",
        "gene_likelihood",
        "use_observed_lib_size",
        "linear_classifier",
    )
    _model_kwargs = SCANVI_KWARGS

    def __init__(
        self,
        adata=None,
        registry: dict | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "zinb",
        use_observed_lib_size: bool = True,
        linear_classifier: bool = False,
        **model_kwargs,
    ):
        if model_kwargs.get("use_labels_groups") or model_kwargs.get("labels_groups") is not None:
            raise ValueError("scANVI label groups (`labels_groups`) are not supported by jaxvi.")
        model_kwargs = {
            k: v
            for k, v in model_kwargs.items()
            if k not in ("use_labels_groups", "labels_groups")
        }
        unknown = sorted(set(model_kwargs) - self._model_kwargs)
        if unknown:
            raise TypeError(
                f"SCANVI got unexpected keyword arguments {unknown}; "
                f"allowed extra arguments: {sorted(self._model_kwargs)}."
            )
        if adata is None and registry is None:
            raise ValueError(
                "SCANVI needs an AnnData set up with `SCANVI.setup_anndata(adata, labels_key, "
                "unlabeled_category, ...)`."
            )
        registry = registry if registry is not None else reglib.get_registry(adata)
        if "var_activation" in model_kwargs:
            model_kwargs["var_activation"] = var_activation_name(model_kwargs["var_activation"])
        if model_kwargs.get("y_prior") is not None:  # JSON-friendly: a list of floats
            prior = np.asarray(jax.device_get(model_kwargs["y_prior"]), np.float64).ravel()
            model_kwargs["y_prior"] = [float(p) for p in prior]
        init_params = {
            "n_hidden": n_hidden,
            "n_latent": n_latent,
            "n_layers": n_layers,
            "dropout_rate": dropout_rate,
            "dispersion": dispersion,
            "gene_likelihood": gene_likelihood,
            "use_observed_lib_size": use_observed_lib_size,
            "linear_classifier": linear_classifier,
            **model_kwargs,
        }
        self._init_from_parts(self._new_parts(adata, registry, init_params))

    @classmethod
    def _new_parts(
        cls, adata, registry: dict, init_params: dict, n_labels: int | None = None
    ) -> ModelParts:
        """The parts of a fresh model: the config (``n_labels`` by scvi-tools' rule from
        ``adata``'s labels unless given) and freshly initialised variables."""
        _check_scanvi_registry(registry)
        if n_labels is None:
            labels = None if adata is None else label_values(adata, registry)
            n_labels = model_n_labels(registry, labels)
        if n_labels < 1:
            raise ValueError(
                "The labels column has no category besides the unlabelled one: scANVI needs "
                "at least one class (cells may all be unlabelled if the column is categorical "
                "with the classes among its categories)."
            )
        config = cls._make_config(registry, init_params, n_labels)
        means = variances = None
        if not config.use_observed_lib_size:
            if adata is None:
                raise ValueError("use_observed_lib_size=False needs `adata` for the prior.")
            arrays = reglib.registry_arrays(adata, registry, counts=False)
            totals = reglib.cell_totals(adata, registry["setup_args"]["layer"])
            means, variances = library_size_prior(totals, arrays["batch_index"], config.n_batch)
        key = jax.random.key(settings.seed)
        variables = init_scanvae_variables(config, key, means, variances)
        return ModelParts(registry, init_params, variables, adata, config=config)

    def _init_from_parts(self, parts: ModelParts) -> None:
        """:meth:`BaseModel._init_from_parts`, then scvi-tools' ``SCANVI`` label attributes
        (``labels_``: the column as given; its two histories are declared and left None)."""
        super()._init_from_parts(parts)
        self.was_pretrained = False
        self.unlabeled_category_ = self.registry_["setup_args"][UNLABELED_KEY]
        self.original_label_key = self.registry_["setup_args"]["labels_key"]
        self.n_labels = int(self.config.n_labels)
        self._label_mapping = np.asarray(self.registry_["labels_categories"], dtype=object)
        self._code_to_label = dict(enumerate(self._label_mapping))
        obs, key = ({} if self.adata is None else self.adata.obs), self.original_label_key
        self.labels_ = obs[key].to_numpy().ravel() if key in obs else None
        self.unsupervised_history_ = self.semisupervised_history_ = None

    # ------------------------------------------------------------- declarations
    @classmethod
    def _make_config(
        cls, registry: dict, init_params: dict, n_labels: int | None = None
    ) -> SCANVAEConfig:
        return scanvi_config(registry, init_params, n_labels)

    @classmethod
    def _config_from_json(cls, config: dict) -> SCANVAEConfig:
        prior = config.get("y_prior")
        return SCANVAEConfig(
            **{
                **config,
                "n_cats_per_cov": tuple(config["n_cats_per_cov"]),
                "y_prior": None if prior is None else tuple(prior),
            }
        )

    @classmethod
    def _make_module(cls, config: SCANVAEConfig) -> SCANVAE:
        return SCANVAE(config)

    @classmethod
    def _make_model_def(cls, config: SCANVAEConfig) -> ModelDef:
        return scanvae_model_def(config)

    @classmethod
    def _from_state_dict(cls, state_dict: dict, config: SCANVAEConfig) -> dict:
        return scanvae_state_dict_to_variables(state_dict, config)

    def _to_state_dict(self, variables: dict) -> dict:
        return scanvae_variables_to_state_dict(variables, self.config)

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata,
        labels_key: str,
        unlabeled_category,
        layer: str | None = None,
        batch_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        **kwargs,
    ) -> None:
        """Register ``adata``'s counts, covariates and labels for scANVI.

        ``unlabeled_category`` marks the cells without a label; it need not occur in the
        column (then every cell is labelled; a ``UserWarning`` says so). Label codes follow
        scvi-tools: the unlabelled category takes the last code by swapping places with the
        last category (:func:`jaxvi.model._scanvi_parts.scanvi_registry`). Raises
        ``KeyError`` for a missing column and ``ValueError`` for missing labels (NaN).
        ``use_minified`` (scvi-tools' option) is accepted and ignored.
        """
        kwargs.pop("use_minified", None)
        if kwargs:
            raise TypeError(f"setup_anndata got unexpected keyword arguments {sorted(kwargs)}.")
        scanvi_registry(
            adata,
            labels_key,
            unlabeled_category,
            layer=layer,
            batch_key=batch_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )

    @classmethod
    def from_scvi_model(
        cls,
        scvi_model: SCVI,
        unlabeled_category,
        labels_key: str | None = None,
        adata=None,
        registry: dict | None = None,
        **scanvi_kwargs,
    ) -> SCANVI:
        """A scANVI model initialised with the weights of a trained :class:`jaxvi.SCVI`.

        As scvi-tools: ``adata`` (default the scVI model's) is set up for scANVI with the
        scVI model's setup arguments (``labels_key`` only when the scVI model had none),
        the model is built with the scVI model's arguments (``scanvi_kwargs`` naming one of
        them are ignored with a warning) and every weight of the scVI part is copied
        (:func:`jaxvi.module.with_vae_weights`); the classifier and the hierarchy start
        fresh. Training then defaults to ``min(10, max(2, round(heuristic / 3)))`` epochs.

        Raises
        ------
        ValueError
            Without a ``labels_key`` anywhere, or for a minified scVI model or AnnData.
        """
        del registry  # scvi-tools' custom-datamodule path
        if not isinstance(scvi_model, SCVI):
            raise TypeError(f"scvi_model must be a jaxvi SCVI, got {type(scvi_model).__name__}.")
        if not scvi_model.is_trained_:
            warnings.warn(
                "Passed in scvi model hasn't been trained yet.", UserWarning, stacklevel=2
            )
        init_params = dict(scvi_model.init_params_)
        for k in list(scanvi_kwargs):
            if k in init_params:
                warnings.warn(
                    f"Ignoring param '{k}' as it was already passed in to pretrained SCVI model "
                    f"with value {init_params[k]}.",
                    UserWarning,
                    stacklevel=2,
                )
                del scanvi_kwargs[k]
        if scvi_model.minified_data_type == "latent_posterior_parameters":
            raise ValueError(
                "We cannot use the given scVI model to initialize scANVI because it has "
                "minified adata. Keep counts when minifying model using "
                "minified_data_type='latent_posterior_parameters_with_counts'."
            )
        if adata is None:
            adata = scvi_model.adata
        else:
            if adata.uns.get(MINIFY_UNS_KEY) is not None:
                raise ValueError("Please provide a non-minified `adata` to initialize scANVI.")
            reglib.registry_arrays(adata, scvi_model.registry_, counts=False)
        if adata is None:
            raise ValueError("from_scvi_model needs an AnnData: the scVI model has none.")
        setup_args = dict(scvi_model.registry_["setup_args"])
        if labels_key is None and setup_args["labels_key"] is None:
            raise ValueError(
                "A `labels_key` is necessary as the scVI model was initialized without one."
            )
        if setup_args["labels_key"] is None:
            setup_args["labels_key"] = labels_key
        setup_args.pop(UNLABELED_KEY, None)
        cls.setup_anndata(adata, unlabeled_category=unlabeled_category, **setup_args)
        model = cls(adata, **init_params, **scanvi_kwargs)
        copied = with_vae_weights(model.variables, jax.device_get(scvi_model.variables))
        model.variables = jax.tree_util.tree_map(jnp.asarray, copied)
        model.was_pretrained = True
        return model

    @property
    def summary_string(self) -> str:
        """One-paragraph description of the model, as scvi-tools prints it."""
        p = self.init_params_
        s = (
            "ScanVI Model with the following params: \n"
            f"unlabeled_category: {self.unlabeled_category_}, n_hidden: {p['n_hidden']}, "
            f"n_latent: {p['n_latent']}, n_layers: {p['n_layers']}, "
            f"dropout_rate: {p['dropout_rate']}, dispersion: {p['dispersion']}, "
            f"gene_likelihood: {p['gene_likelihood']}"
        )
        return s + f"\nTraining status: {'Trained' if self.is_trained_ else 'Not Trained'}"

    # ---------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        n_samples_per_label: int | None = None,
        check_val_every_n_epoch: int | None = None,
        train_size: float | None = 0.9,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        batch_size: int = 128,
        accelerator: str = "auto",
        devices="auto",
        adversarial_classifier: bool | None = None,
        datasplitter_kwargs: dict | None = None,
        plan_config: dict | None = None,
        plan_kwargs: dict | None = None,
        load_sparse_tensor: bool | None = None,
        early_stopping: bool = False,
        enable_progress_bar: bool = True,
        seed: int | None = None,
        streaming: bool | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every_n_epochs: int = 1,
        checkpoint_keep: int = 2,
        resume: str | None = None,
        callbacks: list | None = None,
        logger=None,
        **trainer_kwargs,
    ) -> None:
        """Train with scvi-tools' semi-supervised plan (``SemiSupervisedTrainingPlan``).

        Every step pairs a minibatch of the training cells (the ELBO, labels enumerated)
        with a minibatch of the labelled training cells (the classifier's cross-entropy,
        times ``classification_ratio``); see ``docs/user_guide/scanvi.md``. Arguments not
        listed here are :meth:`jaxvi.SCVI.train`'s. The history adds
        ``train_classification_loss``, ``train_accuracy``, ``train_f1_score``,
        ``train_calibration_error`` (and ``validation_...`` with validation), as scvi-tools
        logs them, and has no ``kl_weight`` (scvi-tools' scANVI plan does not log it).

        Parameters
        ----------
        max_epochs
            Default ``min(round(20000 / n_cells * 400), 400)``; after :meth:`from_scvi_model`
            ``min(10, max(2, round(that / 3)))``.
        n_samples_per_label
            At most this many labelled cells per class in the labelled minibatches, drawn
            anew every epoch (None: all).
        train_size, validation_size, shuffle_set_split
            Labelled and unlabelled cells are split separately with these (scvi-tools'
            ``SemiSupervisedDataSplitter``); ``train_size`` defaults to 0.9 as there.
        plan_kwargs, plan_config
            scVI's plan options and ``classification_ratio`` (50).
        adversarial_classifier
            TOTALANVI's option; must be None or False.
        """
        if adversarial_classifier:
            raise ValueError("adversarial_classifier is TOTALANVI's option, not scANVI's.")
        if self.adata is None:
            raise ValueError("This model has no AnnData to train on (loaded without data).")
        options = {
            k: v
            for k, v in locals().items()
            if k not in ("self", "accelerator", "n_samples_per_label", "adversarial_classifier")
        }
        options.update(options.pop("trainer_kwargs"))
        if max_epochs is None:
            max_epochs = get_max_epochs_heuristic(self.adata.n_obs)
            if self.was_pretrained:
                max_epochs = int(min(10, max(2, round(max_epochs / 3.0))))
        options["max_epochs"] = max_epochs
        config, kwargs = dict(plan_config or {}), dict(plan_kwargs or {})
        ratios = (
            config.pop("classification_ratio", None),
            kwargs.pop("classification_ratio", None),
        )
        ratio = next((r for r in ratios[::-1] if r is not None), 50.0)
        options["plan_config"], options["plan_kwargs"] = config, kwargs
        labels = label_values(self.adata, self.registry_)
        labelled = labels != str(self.unlabeled_category_)
        unlabeled = self.unlabeled_category_

        def split_fn(n_obs, train_size, validation_size, **kwargs):
            del n_obs
            return semi_supervised_split(labelled, train_size, validation_size, **kwargs)

        def paired_fn(train_idx, val_idx):
            return labelled_groups(labels, unlabeled, train_idx, val_idx, n_samples_per_label)

        self._train(
            accelerator,
            options,
            engine_model=scanvae_model_def(self.config, float(ratio)),
            split_fn=split_fn,
            paired_fn=paired_fn,
        )

    def _set_trained(self, outcome) -> None:
        history = {k: v for k, v in outcome.history.items() if k != "kl_weight"}
        super()._set_trained(outcome._replace(history=history))

    # ---------------------------------------------------------------- queries
    def predict(
        self,
        adata=None,
        indices=None,
        soft: bool = False,
        batch_size: int | None = None,
        use_posterior_mean: bool = True,
        ig_interpretability: bool = False,
        ig_args: dict | None = None,
    ):
        """Predicted labels of cells (scvi-tools' ``predict``).

        Parameters
        ----------
        adata, indices, batch_size
            The cells (default: the model's AnnData, all cells) and the chunk size.
        soft
            Return the class probabilities instead of the most probable label.
        use_posterior_mean
            Classify the posterior mean of ``q(z | x)``; False: one draw per cell.
        ig_interpretability, ig_args
            scvi-tools' attributions (captum, PyTorch): accepted; True is not implemented.

        Returns
        -------
        ``(cells,)`` ndarray of label names, or with ``soft`` a DataFrame
        ``(cells, n_labels)`` of probabilities, indexed by ``obs_names``, one column per
        class (the registry's categories without the unlabelled one).

        Raises
        ------
        RuntimeError
            If the model has not been trained (its classifier is random).
        NotImplementedError
            For ``ig_interpretability=True``.
        """
        if ig_interpretability:  # (ig_args only matter then)
            raise NotImplementedError(
                "predict(ig_interpretability=True): integrated-gradients attributions are not "
                "implemented in jaxvi (scvi-tools computes them with captum, a PyTorch library)."
            )
        if not self.is_trained_:
            raise RuntimeError(
                "This SCANVI model has not been trained: its classifier is random. Call "
                "`train()` first."
            )
        adata, query = self._query(adata, indices, batch_size)
        probs = posterior.predict_probabilities(query, use_posterior_mean)
        names = self._label_mapping[: self.n_labels]
        if soft:
            index = adata.obs_names[query.indices]
            return pd.DataFrame(probs, columns=pd.Index(list(names)), index=index)
        return np.array([names[c] for c in np.argmax(probs, axis=1)])

    # scVI's query of denoised expression, unchanged (it needs only the VAE part).
    get_normalized_expression = SCVI.get_normalized_expression

    # ------------------------------------------------------ scvi-tools model.pt
    @classmethod
    def _scvi_tools_config(cls, read: dict) -> tuple[dict, SCANVAEConfig]:
        """The arguments in jaxvi's form and the saved ``y_prior``'s class count
        (:func:`~jaxvi.model._scanvi_parts.scanvi_params_from_scvi_tools`)."""
        init_params, n_labels = scanvi_params_from_scvi_tools(read)
        return init_params, cls._make_config(read["registry"], init_params, n_labels)

    def _scvi_tools_export(self, init_params: dict) -> dict:
        """The arguments as scvi-tools' SCANVI saves them (``y_prior`` a ``(1, n_labels)``
        tensor, ``datamodule`` None, ``**model_kwargs``) and its own saved attributes
        (``unlabeled_category_``; no ``labels_``: scvi-tools reads the labels from the
        AnnData it loads with)."""
        params = dict(init_params)
        if params.get("y_prior") is not None:
            params["y_prior"] = torchfile.Tensor(np.asarray([params["y_prior"]], np.float32))
        params["datamodule"] = None
        extra = {"unlabeled_category_": self.unlabeled_category_}
        extra.update(dict.fromkeys(("unsupervised_history_", "semisupervised_history_")))
        return {
            "init_params": params,
            "non_kwargs": (*self._non_kwargs, "datamodule"),
            "kwargs_name": "model_kwargs",
            "extra_attrs": extra,
        }

    @classmethod
    def load_query_data(
        cls,
        adata,
        reference_model,
        inplace_subset_query_vars: bool = False,
        accelerator: str = "auto",
        device="auto",
        unfrozen: bool = False,
        freeze_dropout: bool = False,
        freeze_expression: bool = True,
        freeze_decoder_first_layer: bool = True,
        freeze_batchnorm_encoder: bool = True,
        freeze_batchnorm_decoder: bool = False,
        freeze_classifier: bool = True,
        transfer_batch: bool = True,
    ) -> SCANVI:
        """A query model initialised from a reference scANVI (scArches), ready to
        :meth:`train` and :meth:`predict` (label transfer).

        ``reference_model`` is a trained :class:`SCANVI` or the directory of a saved one
        (jaxvi's or scvi-tools' format). The query gets the reference's labels (an unknown
        label is a ``ValueError``; a missing labels column is filled with the unlabelled
        category) and new batch categories. Freezing follows scvi-tools
        (:mod:`jaxvi.model.scarches` and :mod:`jaxvi.model._scanvi_arches`): with
        ``freeze_classifier`` the classifier does not change; the ``z2`` networks keep their
        weights. The model trains with its network in evaluation mode, as scvi-tools' query
        models.
        """
        del accelerator, device, freeze_dropout  # as scVI's load_query_data
        if isinstance(reference_model, str | os.PathLike):
            reference_model = cls.load(str(reference_model), adata=None)
        elif not isinstance(reference_model, cls):
            raise TypeError(
                "reference_model must be a jaxvi SCANVI or the path of a saved one, got "
                f"{type(reference_model).__name__}."
            )
        freeze = scarches.FreezeOptions(
            unfrozen=unfrozen,
            freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer,
            freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder,
        )
        parts = scanvi_query_parts(
            cls,
            adata,
            reference_model,
            freeze,
            freeze_classifier,
            inplace_subset_query_vars,
            transfer_batch,
        )
        return cls._from_parts(parts)


def _check_scanvi_registry(registry: dict) -> None:
    if registry.get("model_name") != "SCANVI" or UNLABELED_KEY not in registry["setup_args"]:
        raise ValueError(
            "This AnnData was not set up for scANVI: call `jaxvi.SCANVI.setup_anndata(adata, "
            "labels_key=..., unlabeled_category=...)` first."
        )
