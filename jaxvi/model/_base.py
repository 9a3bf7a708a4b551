"""The abstract base of jaxvi's models: state, construction, training, saving, queries.

A model class (:class:`jaxvi.SCVI`, ...) is final and declares what differs: its
``setup_anndata`` fields, its constructor arguments, its module configuration, module and
:class:`~jaxvi.module.ModelDef`, and its state-dict bridge. Everything else lives here, one
level deep: the one constructor from plain parts (:class:`~jaxvi.model.ModelParts`, used by
``__init__``, :meth:`BaseModel.load`, :meth:`BaseModel.from_scvi_tools` and
:meth:`BaseModel.load_query_data`), ``train``, save and load, device placement, the queries
every model answers, minification and the scArches entry points.
"""

from __future__ import annotations

import abc
import dataclasses
import os

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from jaxvi import io, posterior
from jaxvi._settings import settings
from jaxvi._version import __version__
from jaxvi.analysis import de
from jaxvi.data import DataSource, make_source
from jaxvi.data import registry as reglib
from jaxvi.io import scvi_tools
from jaxvi.model import scarches
from jaxvi.model._minify import MINIFY_UNS_KEY, minified_copy
from jaxvi.model._parts import (
    ModelParts,
    QueryTraining,
    check_accelerator,
    check_variables,
    history_from_json,
    history_to_json,
)
from jaxvi.model._training import TrainOutcome, run_training
from jaxvi.module import KL_GLOBAL, KL_LOCAL, RECONSTRUCTION, ModelDef
from jaxvi.parallel import resolve_devices, to_host
from jaxvi.train import NonFiniteError, TrainingInterrupted

__all__ = ["BaseModel"]


class BaseModel(abc.ABC):
    """Abstract base of jaxvi's models (scvi-tools' ``BaseModelClass`` and mixins, flat).

    Subclasses set ``_model_name``, ``_non_kwargs`` (named constructor arguments, as
    scvi-tools saves them) and ``_model_kwargs`` (accepted ``**kwargs``), and implement the
    ``_make_*`` and state-dict hooks.
    """

    _model_name: str = ""
    _non_kwargs: tuple[str, ...] = ()
    _model_kwargs: frozenset[str] = frozenset()

    # ------------------------------------------------------- the one constructor
    @classmethod
    def _from_parts(cls, parts: ModelParts, adata_path: str | None = None):
        """A model of this class from plain parts, without running ``__init__``; the saved
        AnnData at ``adata_path`` is read when ``parts.adata`` is None."""
        if parts.adata is None and adata_path is not None:
            parts = parts._replace(adata=anndata.read_h5ad(adata_path))
        if parts.adata is not None:
            reglib.registry_arrays(parts.adata, parts.registry, counts=False)  # genes, categories
            # broken CSR/CSC structure would make a later densification write out of bounds
            reglib.check_counts_structure(parts.adata, parts.registry["setup_args"]["layer"])
            parts.adata.uns[reglib.UNS_KEY] = parts.registry
        model = cls.__new__(cls)
        model._init_from_parts(parts)
        return model

    def _init_from_parts(self, parts: ModelParts) -> None:
        """Set every attribute of the model from ``parts``: the one place a model is made."""
        self.registry_ = parts.registry
        self.adata = parts.adata
        self.init_params_ = dict(parts.init_params)
        self.config = parts.config or self._make_config(self.registry_, self.init_params_)
        self.module = self._make_module(self.config)
        self.model_def = self._make_model_def(self.config)
        check_variables(parts.variables, self.model_def)
        self.variables = jax.tree_util.tree_map(jnp.asarray, parts.variables)
        self.history_ = dict(parts.history)
        self.is_trained_ = bool(parts.is_trained)
        self.train_indices_, self.validation_indices_, self.test_indices_ = parts.indices
        self._query_training = parts.query_training
        self._n_calls = 0
        self._mesh = None  # JAX's default device until train(devices=) or to_device()

    # --------------------------------------------------------- what a model declares
    @classmethod
    @abc.abstractmethod
    def _make_config(cls, registry: dict, init_params: dict):
        """The module configuration for a registry and constructor arguments."""

    @classmethod
    @abc.abstractmethod
    def _config_from_json(cls, config: dict):
        """The module configuration from its saved JSON form."""

    @classmethod
    @abc.abstractmethod
    def _make_module(cls, config):
        """The Flax module of ``config`` (queries apply its methods)."""

    @classmethod
    @abc.abstractmethod
    def _make_model_def(cls, config) -> ModelDef:
        """The :class:`~jaxvi.module.ModelDef` the engine trains."""

    @classmethod
    @abc.abstractmethod
    def _from_state_dict(cls, state_dict: dict, config) -> dict:
        """Variables from a scvi-tools state dict (the bridge)."""

    @abc.abstractmethod
    def _to_state_dict(self, variables: dict) -> dict:
        """A scvi-tools state dict of ``variables``."""

    def _engine_model(self) -> ModelDef:
        """What :func:`jaxvi.train.fit` takes to train this model: its ModelDef."""
        return self.model_def

    # ------------------------------------------------------------- properties
    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics, one DataFrame per key, indexed by ``epoch``."""
        return self.history_

    @property
    def is_trained(self) -> bool:
        """Whether :meth:`train` has run."""
        return self.is_trained_

    @property
    def train_indices(self) -> np.ndarray | None:
        """Indices of the training cells of the last :meth:`train`."""
        return self.train_indices_

    @property
    def validation_indices(self) -> np.ndarray | None:
        """Indices of the validation cells of the last :meth:`train`."""
        return self.validation_indices_

    @property
    def test_indices(self) -> np.ndarray | None:
        """Indices of the test cells of the last :meth:`train`."""
        return self.test_indices_

    @property
    def minified_data_type(self) -> str | None:
        """``"latent_posterior_parameters[_with_counts]"`` after :meth:`minify_adata`, or None."""
        if self.adata is None:
            return None
        return self.adata.uns.get(MINIFY_UNS_KEY)

    @property
    def summary_stats(self) -> dict:
        """Counts of cells, genes, batches, labels and covariates at setup."""
        return dict(self.registry_["summary_stats"])

    def __repr__(self) -> str:
        return self.summary_string

    # ---------------------------------------------------------------- training
    def train(
        self,
        max_epochs: int | None = None,
        accelerator: str = "auto",
        devices="auto",
        train_size: float | None = None,
        validation_size: float | None = None,
        shuffle_set_split: bool = True,
        load_sparse_tensor: bool | None = None,
        batch_size: int = 128,
        early_stopping: bool = False,
        datasplitter_kwargs: dict | None = None,
        plan_config: dict | None = None,
        plan_kwargs: dict | None = None,
        check_val_every_n_epoch: int | None = None,
        enable_progress_bar: bool = True,
        seed: int | None = None,
        streaming: bool | None = None,
        checkpoint_dir: str | None = None,
        checkpoint_every_n_epochs: int = 1,
        checkpoint_keep: int = 2,
        resume: str | None = None,
        **trainer_kwargs,
    ) -> None:
        """Train the model with scvi-tools' recipe (see :func:`jaxvi.train.fit`).

        Parameters
        ----------
        max_epochs
            Epochs; default ``min(round(20000 / n_cells * 400), 400)``.
        accelerator
            ``"auto"``, or a backend that must be JAX's default (``"cpu"``, ``"gpu"``, ...).
        devices
            ``"auto"``: JAX's default device. An int ``n`` (``-1``: all), a list of devices or
            a ``jax.sharding.Mesh`` with a ``"cells"`` axis: data-parallel training over
            them (parameters replicated, cells sharded; :mod:`jaxvi.parallel`), across
            processes after :func:`jaxvi.parallel.initialize`. Queries afterwards use the
            same devices (see :meth:`to_device`).
        train_size, validation_size, shuffle_set_split
            The seeded train / validation / test split (0.9 / rest by default).
        load_sparse_tensor
            Keep sparse counts as CSR on the device and densify each minibatch there; by
            default only when dense counts would exceed 2 GiB.
        batch_size
            Minibatch size (128).
        early_stopping
            Stop when ``elbo_validation`` has not improved for 45 epochs.
        datasplitter_kwargs
            ``{"drop_last": bool}`` (drop the ragged last minibatch instead of masking it).
        plan_config, plan_kwargs
            Training-plan options with scvi-tools' names (``lr``, ``weight_decay``, ``eps``,
            ``optimizer``, ``n_epochs_kl_warmup``, ``n_steps_kl_warmup``,
            ``reduce_lr_on_plateau``, ...); ``plan_kwargs`` override ``plan_config``.
        check_val_every_n_epoch
            Compute validation metrics every this many epochs (never by default).
        enable_progress_bar
            Show a progress bar with the running loss.
        seed
            Seed of the split, the minibatch order and the sampling; ``settings.seed`` if None.
        streaming
            Read the cells from disk in shuffled blocks during training instead of loading
            them all (:mod:`jaxvi.data`; host memory bounded by
            ``settings.stream_max_host_bytes``). Default: when the AnnData is backed.
            Combines with ``devices=``: each block is then sharded over the mesh.
        checkpoint_dir, checkpoint_every_n_epochs, checkpoint_keep
            Write a checkpoint (parameters, optimizer and batch-norm state, epoch, history,
            split, settings) to ``checkpoint_dir/epoch_<N>`` every this many epochs, keeping the
            newest ``checkpoint_keep`` (see :mod:`jaxvi.train.checkpoint`); also on interruption.
        resume
            A checkpoint (or a ``checkpoint_dir``: its newest) to continue from. The run goes
            on to ``max_epochs`` in total, bit-identical to an uninterrupted one; the split,
            seed and earlier history come from the checkpoint, and other settings must match.
        **trainer_kwargs
            ``early_stopping_monitor``, ``early_stopping_patience`` (45),
            ``early_stopping_min_delta`` (0), ``early_stopping_mode`` ("min"),
            ``gradient_clip_val``, ``precision`` (Lightning's names: ``"32-true"`` exact
            float32 matmuls, ``"bf16-mixed"`` bfloat16 matmul inputs with float32
            accumulation, ``"tf32"``; default JAX's, which is TF32 on recent NVIDIA GPUs).

        Raises
        ------
        jaxvi.train.TrainingInterrupted
            After the running epoch when SIGINT (Ctrl-C) or SIGTERM arrived; the model then
            holds that epoch's parameters and history (and a checkpoint is written when
            ``checkpoint_dir`` is set).
        jaxvi.train.NonFiniteError
            When a loss, gradient or update became NaN/inf; the message names the epoch and
            step, and the model keeps the last finite parameters.
        """
        if self.adata is None:
            raise ValueError("This model has no AnnData to train on (loaded without data).")
        if self.minified_data_type is not None:
            raise ValueError("A model with minified data cannot be trained.")
        check_accelerator(accelerator)
        options = {k: v for k, v in locals().items() if k not in ("self", "accelerator")}
        options.update(options.pop("trainer_kwargs"))
        try:
            outcome = run_training(
                self._engine_model(),
                variables=self.variables,
                adata=self.adata,
                registry=self.registry_,
                config_json=dataclasses.asdict(self.config),
                history=self.history_,
                query_training=self._query_training,
                **options,
            )
        except (TrainingInterrupted, NonFiniteError) as err:
            self._set_trained(err.outcome)
            raise
        self._epoch_fn = outcome.epoch_fn
        self._set_trained(outcome)

    def _set_trained(self, outcome: TrainOutcome) -> None:
        state = outcome.state
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if state.buffers:
            variables["buffers"] = state.buffers
        self._mesh = outcome.mesh
        if self._mesh is not None:  # host copies: usable with any device placement
            variables = jax.tree_util.tree_map(to_host, variables)
        self.variables = variables
        self.history_ = outcome.history
        self.is_trained_ = True
        self.train_indices_, self.validation_indices_, self.test_indices_ = (
            np.asarray(a) for a in outcome.indices
        )

    # ---------------------------------------------------------------- queries
    def get_latent_representation(
        self,
        adata=None,
        indices=None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
    ):
        """Latent coordinates of each cell.

        Returns
        -------
        ``(cells, n_latent)`` float32: the posterior mean (for ``"ln"`` the Monte-Carlo mean of
        ``softmax(z)`` over ``mc_samples`` draws), one sample with ``give_mean=False``, or
        ``(qz_mean, qz_var)`` with ``return_dist=True``.
        """
        _, query = self._query(adata, indices, batch_size)
        mode = "dist" if return_dist else ("mean" if give_mean else "sample")
        program = posterior.latent_program(self.module, mode, int(mc_samples))
        out = posterior.run_query(program, query)
        if return_dist:
            return tuple(np.asarray(a, np.float32) for a in out)
        return np.asarray(out, np.float32)

    def get_importance_weights(
        self,
        adata=None,
        indices=None,
        zs=None,
        transform_batch=None,
        max_cells: int = 1024,
        truncation: bool = False,
        n_mc_samples: int = 500,
        n_mc_samples_per_pass: int = 250,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Normalised importance weights of latent draws ``zs`` of the cells ``indices``.

        ``zs`` is ``(cells, n_latent)`` or ``(n_samples, cells, n_latent)`` (pre-softmax for
        ``"ln"``); the likelihoods of the draws are recomputed from the model. See
        :func:`jaxvi.posterior.get_importance_weights`.

        Returns
        -------
        float64 ``(n_draws,)`` summing to one.
        """
        return self._importance_weights(
            adata,
            indices,
            zs,
            transform_batch,
            batch_size,
            None,
            max_cells=max_cells,
            truncation=truncation,
            n_mc_samples=n_mc_samples,
            n_mc_samples_per_pass=n_mc_samples_per_pass,
        )

    def _importance_weights(
        self, adata, indices, zs, transform_batch, batch_size, rows, **kwargs
    ) -> np.ndarray:
        """:func:`jaxvi.posterior.get_importance_weights` of draws ``zs`` of ``indices``
        (``rows``: the cell of each draw, when repeated), for :meth:`get_importance_weights`
        and importance-resampled expression."""
        if self.minified_data_type is not None:
            raise ValueError(
                "Importance weights need the counts of the anchor cells; this model's AnnData "
                "is minified."
            )
        codes = self._batch_codes(transform_batch)
        if len(codes) > 1:
            raise NotImplementedError(
                "Importance weights cannot be computed when expression levels are averaged "
                "across batches."
            )
        _, query = self._query(adata, indices, batch_size)
        return posterior.get_importance_weights(query, zs, int(codes[0]), rows=rows, **kwargs)

    def differential_expression(
        self,
        adata=None,
        groupby: str | None = None,
        group1=None,
        group2: str | None = None,
        idx1=None,
        idx2=None,
        mode: str = "vanilla",
        delta: float | None = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1=None,
        batchid2=None,
        fdr_target: float = 0.05,
        silent: bool = False,
        weights: str | None = "uniform",
        filter_outlier_cells: bool = False,
        importance_weighting_kwargs: dict | None = None,
        **kwargs,
    ) -> pd.DataFrame:
        """Bayesian differential expression between groups of cells (scvi-tools' semantics).

        See :func:`jaxvi.analysis.de.differential_expression` for every argument. Returns a
        DataFrame indexed by gene: ``proba_m1, proba_m2, bayes_factor, scale1, scale2``
        (vanilla) or
        ``proba_de, proba_not_de, bayes_factor, scale1, scale2, pseudocounts, delta,
        lfc_mean, ...`` (change), raw statistics, ``is_de_fdr_<target>`` (change) and the
        ``comparison`` / ``group1`` / ``group2`` columns, one block per comparison.
        """
        return de.differential_expression(
            self,
            adata=adata,
            groupby=groupby,
            group1=group1,
            group2=group2,
            idx1=idx1,
            idx2=idx2,
            mode=mode,
            delta=delta,
            batch_size=batch_size,
            all_stats=all_stats,
            batch_correction=batch_correction,
            batchid1=batchid1,
            batchid2=batchid2,
            fdr_target=fdr_target,
            silent=silent,
            weights=weights,
            filter_outlier_cells=filter_outlier_cells,
            importance_weighting_kwargs=importance_weighting_kwargs,
            **kwargs,
        )

    def get_likelihood_parameters(
        self,
        adata=None,
        indices=None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Parameters of p(x | z) with z ~ q(z | x): ``"mean"`` (``px_rate``), ``"dropout"``
        (zero-inflation probability, zinb), ``"dispersions"`` (theta; the scale for normal).

        Arrays are ``(cells, genes)``, ``(n_samples, cells, genes)`` with ``n_samples > 1``
        unless ``give_mean``. Works for every likelihood (the reference fails for poisson and
        normal). See :func:`jaxvi.posterior.get_likelihood_parameters`.
        """
        _, query = self._query(adata, indices, batch_size)
        return posterior.get_likelihood_parameters(query, n_samples, give_mean)

    def posterior_predictive_sample(
        self,
        adata=None,
        indices=None,
        transform_batch=None,
        n_samples: int = 1,
        gene_list=None,
        batch_size: int | None = None,
    ):
        """Counts drawn from p(x | z), z ~ q(z | x): ``sparse.GCXS`` float32 of shape
        ``(cells, genes)``, or ``(cells, genes, n_samples)`` when ``n_samples > 1``."""
        _, query = self._query(adata, indices, batch_size)
        genes = posterior.gene_indices(self.registry_["var_names"], gene_list)
        codes = self._batch_codes(transform_batch)
        return posterior.posterior_predictive_sample(query, codes, genes, n_samples)

    def get_marginal_ll(
        self,
        adata=None,
        indices=None,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
        n_mc_samples_per_pass: int = 1,
    ):
        """Importance-weighted estimate of log p(x) with ``n_mc_samples`` draws of q.

        Returns
        -------
        float (the mean of per-minibatch means, as scvi-tools), or ``(cells,)`` values.
        """
        self._refuse_if_minified("get_marginal_ll")
        _, query = self._query(adata, indices, batch_size)
        return posterior.get_marginal_ll(query, n_mc_samples, return_mean, n_mc_samples_per_pass)

    def get_latent_library_size(
        self,
        adata=None,
        indices=None,
        give_mean: bool = True,
        batch_size: int | None = None,
    ) -> np.ndarray:
        """Library size ``(cells, 1)``: the LogNormal mean of q(l | x) with ``give_mean``
        (latent library models only), else ``exp(library)`` (observed totals or a draw)."""
        self._refuse_if_minified("get_latent_library_size")
        _, query = self._query(adata, indices, batch_size)
        return posterior.get_latent_library_size(query, give_mean)

    def get_feature_correlation_matrix(
        self,
        adata=None,
        indices=None,
        n_samples: int = 10,
        batch_size: int = 64,
        rna_size_factor: int = 1000,
        transform_batch=None,
        correlation_type: str = "spearman",
    ) -> pd.DataFrame:
        """Gene-gene correlation ``(genes, genes)`` of denoised expression samples."""
        adata, query = self._query(adata, indices, batch_size)
        codes = self._batch_codes(transform_batch)
        return posterior.get_feature_correlation_matrix(
            query, adata.var_names, codes, n_samples, rna_size_factor, correlation_type
        )

    def get_elbo(
        self, adata=None, indices=None, batch_size: int | None = None, return_mean: bool = True
    ):
        """Evidence lower bound (higher is better) with one z sample per cell, KL weight 1.

        Returns
        -------
        float, the mean over cells, or ``(cells,)`` per-cell values with ``return_mean=False``.
        """
        self._refuse_if_minified("get_elbo")
        terms = self._elbo_terms(adata, indices, batch_size)
        elbo = -sum(terms[name] for name in (RECONSTRUCTION, KL_LOCAL, KL_GLOBAL) if name in terms)
        return float(np.mean(elbo)) if return_mean else elbo

    def get_reconstruction_error(
        self, adata=None, indices=None, batch_size: int | None = None, return_mean: bool = True
    ) -> dict:
        """Reconstruction negative log-likelihood (positive; lower is better).

        Returns
        -------
        ``{"reconstruction_loss": float}`` (mean over cells) or ``(cells,)`` values.
        """
        self._refuse_if_minified("get_reconstruction_error")
        rec = self._elbo_terms(adata, indices, batch_size)[RECONSTRUCTION]
        return {"reconstruction_loss": float(np.mean(rec)) if return_mean else rec}

    # ----------------------------------------------------------- minification
    def minify_adata(
        self,
        minified_data_type: str = "latent_posterior_parameters",
        use_latent_qzm_key: str = "X_latent_qzm",
        use_latent_qzv_key: str = "X_latent_qzv",
    ) -> None:
        """Replace ``self.adata`` by a copy that keeps q(z | x) instead of the counts.

        The posterior mean and variance must first be stored in
        ``adata.obsm[use_latent_qzm_key]`` / ``[use_latent_qzv_key]`` (e.g. from
        ``get_latent_representation(return_dist=True)``). The copy holds them in
        ``obsm["scvi_latent_qzm"]`` / ``["scvi_latent_qzv"]``, the total counts in
        ``obs["observed_lib_size"]``, and all-zero sparse counts unless
        ``minified_data_type="latent_posterior_parameters_with_counts"``. Afterwards the encoder
        is skipped; ``get_elbo``, ``get_reconstruction_error``, ``get_marginal_ll`` and
        ``get_latent_library_size`` refuse plain minified data, as in scvi-tools.
        """
        self.adata = minified_copy(
            self.adata,
            self.registry_,
            self.config.n_latent,
            self.config.use_observed_lib_size,
            minified_data_type,
            use_latent_qzm_key,
            use_latent_qzv_key,
        )

    def _refuse_if_minified(self, name: str) -> None:
        if self.minified_data_type == "latent_posterior_parameters":
            raise ValueError(
                f"The {type(self).__name__}.{name} function currently does not support "
                "minified data."
            )

    # --------------------------------------------------------------- save/load
    def save(
        self,
        dir_path: str,
        prefix: str | None = None,
        overwrite: bool = False,
        save_anndata: bool = False,
        format: str = "jaxvi",
    ) -> None:
        """Save to ``dir_path``: ``model.json`` (settings, registry, history), ``model.npz``.

        Nothing executes code on load. ``save_anndata`` also writes ``adata.h5ad``.
        ``format="scvi-tools"`` writes scvi-tools' ``model.pt`` instead
        (:func:`jaxvi.io.scvi_tools.write_scvi_tools`), which scvi-tools' ``load`` reads.
        """
        if format not in ("jaxvi", "scvi-tools"):
            raise ValueError(f"format must be 'jaxvi' or 'scvi-tools', got {format!r}.")
        if save_anndata and self.adata is None:
            raise ValueError("save_anndata=True but the model has no AnnData.")
        adata = self.adata if save_anndata else None
        indices = (self.train_indices_, self.validation_indices_, self.test_indices_)
        variables = jax.device_get(self.variables)
        if format == "scvi-tools":
            return scvi_tools.write_scvi_tools(
                dir_path,
                state_dict=self._to_state_dict(variables),
                registry=self.registry_,
                init_params=self.init_params_,
                non_kwargs=self._non_kwargs,
                history=self.history_,
                is_trained=self.is_trained_,
                indices=indices,
                adata=adata,
                prefix=prefix,
                overwrite=overwrite,
            )
        if prefix is not None:
            raise NotImplementedError("`prefix` is not supported; use a separate directory.")
        meta = {
            "model_name": self._model_name,
            "jaxvi_version": __version__,
            "init_params": self.init_params_,
            "config": dataclasses.asdict(self.config),
            "registry": self.registry_,
            "is_trained": self.is_trained_,
            "history": history_to_json(self.history_),
            "indices": {
                name: None if arr is None else [int(i) for i in arr]
                for name, arr in zip(("train", "validation", "test"), indices, strict=True)
            },
        }
        io.write_model_dir(
            dir_path, meta, io.flatten_tree(variables), overwrite=overwrite, adata=adata
        )

    @classmethod
    def load(cls, dir_path: str, adata=None):
        """Load a model saved by :meth:`save`; ``adata`` (same genes) or the saved one.

        Without ``adata`` and without a saved ``adata.h5ad`` the model loads with no data;
        pass ``adata`` to its query methods. A scvi-tools directory (``model.pt``, no
        ``model.json``) is read with :meth:`from_scvi_tools`.
        """
        if not os.path.exists(os.path.join(dir_path, io.MODEL_JSON)) and (
            scvi_tools.is_scvi_tools_dir(dir_path)
        ):
            return cls.from_scvi_tools(dir_path, adata=adata)
        # model.json, model.npz and adata.h5ad from one version, schema-checked (jaxvi.schema)
        meta, arrays, saved_adata = io.read_saved_model(dir_path, read_adata=adata is None)
        if meta.get("model_name") != cls._model_name:
            raise ValueError(
                f"{dir_path} holds a {meta.get('model_name')!r} model, not {cls._model_name}."
            )
        idx = meta["indices"]
        parts = ModelParts(
            registry=meta["registry"],
            init_params=meta["init_params"],
            variables=io.unflatten_tree(arrays),
            adata=saved_adata if adata is None else adata,
            history=history_from_json(meta["history"]),
            is_trained=bool(meta["is_trained"]),
            indices=tuple(
                None if idx[k] is None else np.asarray(idx[k])
                for k in ("train", "validation", "test")
            ),
            config=cls._config_from_json(meta["config"]),
        )
        return cls._from_parts(parts)

    @classmethod
    def from_scvi_tools(cls, dir_path: str, adata=None, prefix: str | None = None):
        """Load a model saved by scvi-tools' ``save`` (no torch needed, no code run).

        ``adata`` (the model's genes, known categories) or the saved ``adata.h5ad`` if any.
        """
        read = scvi_tools.read_scvi_tools(dir_path, prefix)
        unknown = sorted(set(read["init_params"]) - set(cls._non_kwargs) - cls._model_kwargs)
        if unknown:
            raise ValueError(
                f"The saved model uses {cls._model_name} arguments jaxvi does not support: "
                f"{unknown}."
            )
        config = cls._make_config(read["registry"], read["init_params"])
        parts = ModelParts(
            registry=read["registry"],
            init_params=read["init_params"],
            variables=cls._from_state_dict(read["state_dict"], config),
            adata=adata,
            history=read["history"],
            is_trained=read["is_trained"],
            indices=read["indices"],
        )
        return cls._from_parts(parts, read["adata_path"])

    # ----------------------------------------------------------------- scArches
    @staticmethod
    def prepare_query_anndata(
        adata, reference_model, return_reference_var_names: bool = False, inplace: bool = True
    ):
        """Zero-pad and reorder ``adata``'s genes to a reference's (scArches).

        ``reference_model`` is a model or a saved jaxvi or scvi-tools directory; see
        :func:`jaxvi.model.scarches.prepare_query_anndata`.
        """
        if isinstance(reference_model, BaseModel):
            reference_model = list(reference_model.registry_["var_names"])
        return scarches.prepare_query_anndata(
            adata, reference_model, return_reference_var_names, inplace
        )

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
    ):
        """A query model initialised from a reference (scArches), ready to :meth:`train`.

        ``reference_model`` is a model of this class or a saved jaxvi or scvi-tools
        directory; the freeze options follow scvi-tools (see :mod:`jaxvi.model.scarches`).
        """
        del accelerator, device, freeze_classifier, freeze_dropout  # see scarches
        if isinstance(reference_model, str | os.PathLike):
            reference_model = cls.load(str(reference_model), adata=None)
        elif not isinstance(reference_model, cls):
            raise TypeError(
                f"reference_model must be a jaxvi {cls._model_name} or the path of a saved "
                f"jaxvi or scvi-tools model, got {type(reference_model).__name__}."
            )
        if inplace_subset_query_vars:
            scarches.subset_query_genes(adata, reference_model.registry_["var_names"])
        registry = scarches.query_registry(reference_model.registry_, adata)
        if not transfer_batch and len(registry["batch_categories"]) > len(
            reference_model.registry_["batch_categories"]
        ):
            raise ValueError(
                "This model does not allow for query having batch categories missing from "
                "the reference."
            )
        fresh = cls(adata, **reference_model.init_params_)  # variables in the query's shapes
        variables = scarches.extend_variables(
            reference_model.variables, reference_model.config, fresh.variables, fresh.config
        )
        freeze = scarches.FreezeOptions(
            unfrozen=unfrozen,
            freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer,
            freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder,
        )
        training = QueryTraining(
            update_mask=scarches.freeze_masks(fresh.config, variables, freeze),
            network_training=False,  # scvi-tools trains a query model in eval mode
        )
        parts = ModelParts(registry, fresh.init_params_, variables, adata, query_training=training)
        return cls._from_parts(parts)

    # ---------------------------------------------------------------- helpers
    def _next_key(self) -> jax.Array:
        self._n_calls += 1
        return jax.random.fold_in(jax.random.key(settings.seed), self._n_calls)

    def _next_key_int(self) -> int:
        return int(jax.random.randint(self._next_key(), (), 0, 2**31 - 1))

    def to_device(self, devices="auto") -> None:
        """Where queries run: ``"auto"`` (JAX's default device) or, as ``train(devices=)``,
        an int, a list of devices or a ``Mesh``: the cells are then sharded over them."""
        mesh = resolve_devices(devices)
        if mesh is not None and self.minified_data_type is not None:
            raise ValueError("Data-parallel queries need the counts; this model is minified.")
        self._mesh = mesh

    def _query_inputs(self, adata, indices, batch_size):
        """``(adata, indices, source, batch_size)`` of a query: the model's AnnData and all
        its cells by default, and where they live for queries (:func:`jaxvi.data.make_source`:
        a backed AnnData's counts stay on disk, the cells are sharded over the mesh of
        :meth:`to_device`, or moved in bounded pieces)."""
        adata = self.adata if adata is None else adata
        if adata is None:
            raise ValueError("This model has no AnnData; pass `adata=`.")
        if indices is None:
            indices = np.arange(adata.n_obs)
        indices = np.asarray(indices)
        if indices.dtype == bool:
            indices = np.flatnonzero(indices)
        if indices.size == 0:
            raise ValueError("`indices` selects no cells.")
        if indices.min() < 0 or indices.max() >= adata.n_obs:
            raise IndexError(f"`indices` out of range for {adata.n_obs} cells.")
        bs = settings.batch_size if batch_size is None else int(batch_size)
        source: DataSource = make_source(adata, self.registry_, purpose="query", mesh=self._mesh)
        return adata, indices.astype(np.int64), source, bs

    def _query(self, adata, indices, batch_size) -> tuple:
        """``(adata, Query)`` of the module with the next key (see :meth:`_query_inputs`)."""
        adata, indices, source, bs = self._query_inputs(adata, indices, batch_size)
        key = self._next_key()
        return adata, posterior.Query(self.module, self.variables, source, indices, key, bs)

    def _elbo_terms(self, adata, indices, batch_size) -> dict:
        _, query = self._query(adata, indices, batch_size)
        return posterior.get_elbo_terms(query.replace(module=self.model_def))

    def _batch_codes(self, transform_batch) -> np.ndarray:
        return posterior.batch_codes(self.registry_["batch_categories"], transform_batch)
