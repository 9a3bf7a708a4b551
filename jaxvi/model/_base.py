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

from jaxvi import posterior
from jaxvi._settings import settings
from jaxvi.data import DataSource, make_source
from jaxvi.data import registry as reglib
from jaxvi.model import _saveload, scarches
from jaxvi.model._manager import RegistryMethods
from jaxvi.model._minify import MINIFY_UNS_KEY, minified_copy
from jaxvi.model._parts import ModelParts, check_accelerator, check_variables
from jaxvi.model._queries import QueryMethods
from jaxvi.model._training import TrainOutcome, run_training
from jaxvi.model.callbacks import epoch_hooks
from jaxvi.module import ModelDef
from jaxvi.parallel import resolve_devices, to_host
from jaxvi.train import NonFiniteError, TrainingInterrupted

__all__ = ["BaseModel"]


class BaseModel(RegistryMethods, QueryMethods, abc.ABC):
    """Abstract base of jaxvi's models (scvi-tools' ``BaseModelClass`` and mixins; the
    queries every model answers are in :class:`~jaxvi.model._queries.QueryMethods`, the
    AnnData and registry accessors in :class:`~jaxvi.model._manager.RegistryMethods`).

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
        self._adata = parts.adata
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

    @classmethod
    def _scvi_tools_config(cls, read: dict) -> tuple[dict, object]:
        """``(init_params, config)`` of a read scvi-tools directory
        (:func:`jaxvi.io.scvi_tools.read_scvi_tools`)."""
        return read["init_params"], cls._make_config(read["registry"], read["init_params"])

    def _scvi_tools_export(self, init_params: dict) -> dict:
        """What :func:`jaxvi.io.scvi_tools.write_scvi_tools` writes of this class:
        ``init_params`` in scvi-tools' form, ``non_kwargs``, and (if not the defaults)
        ``kwargs_name`` and ``extra_attrs``, the attributes its class saves besides the
        common ones."""
        return {"init_params": init_params, "non_kwargs": self._non_kwargs}

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
        callbacks: list | None = None,
        logger=None,
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
            ``{"drop_last": bool}`` (drop the ragged last minibatch instead of masking it),
            ``{"external_indexing": [train, validation, test]}`` (index arrays; missing
            ones are empty, as scvi-tools).
        plan_config, plan_kwargs
            Training-plan options with scvi-tools' names (``lr``, ``weight_decay``, ``eps``,
            ``optimizer``, ``n_epochs_kl_warmup``, ``n_steps_kl_warmup``,
            ``reduce_lr_on_plateau``, ...); ``plan_kwargs`` override ``plan_config``.
            ``on_step=True`` (with ``on_epoch=True``) names the per-epoch history entries
            ``<name>_epoch`` as scvi-tools; jaxvi keeps no per-step values.
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
        callbacks, logger
            :mod:`jaxvi.model.callbacks`: objects called at each epoch end (with the model
            and the epoch's history row; they can stop training), and loggers (one or a
            list; ``log_metrics(metrics, step)``, e.g. its ``CSVLogger`` or a Lightning
            logger).
        **trainer_kwargs
            ``early_stopping_monitor``, ``early_stopping_patience`` (45),
            ``early_stopping_min_delta`` (0), ``early_stopping_mode`` ("min"),
            ``early_stopping_warmup_epochs`` (0: checks of the monitor ignored at first),
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
        options = {k: v for k, v in locals().items() if k not in ("self", "accelerator")}
        options.update(options.pop("trainer_kwargs"))
        self._train(accelerator, options)

    def _train(self, accelerator, options: dict, engine_model=None, **engine_options) -> None:
        """The body of :meth:`train`: ``options`` are its arguments by name; a model's own
        ``train`` may pass another ``engine_model`` and :func:`run_training`'s ``split_fn``
        / ``paired_fn`` as ``engine_options``."""
        if self.adata is None:
            raise ValueError("This model has no AnnData to train on (loaded without data).")
        if self.minified_data_type is not None:
            raise ValueError("A model with minified data cannot be trained.")
        check_accelerator(accelerator)
        options = dict(options)
        max_epochs, batch_size = options["max_epochs"], options["batch_size"]
        hparams = {**self.init_params_, "max_epochs": max_epochs, "batch_size": batch_size}
        start, epoch_end, end = epoch_hooks(
            self, options.pop("callbacks"), options.pop("logger"), hparams
        )
        if start is not None:
            start()
        try:
            outcome = run_training(
                self._engine_model() if engine_model is None else engine_model,
                variables=self.variables,
                adata=self.adata,
                registry=self.registry_,
                config_json=dataclasses.asdict(self.config),
                history=self.history_,
                query_training=self._query_training,
                epoch_callback=epoch_end,
                **options,
                **engine_options,
            )
        except BaseException as err:
            if isinstance(err, TrainingInterrupted | NonFiniteError):
                self._set_trained(err.outcome)  # the last finite state is kept
            # any error (a callback's, an option's too): the loggers' runs end, as failed
            # (an MLflow run left active would refuse the next MLFlowLogger)
            if end is not None:
                end("failed")
            raise
        self._epoch_fn = outcome.epoch_fn
        self._set_trained(outcome)
        if end is not None:
            end("success")

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
        **anndata_write_kwargs,
    ) -> None:
        """Save to ``dir_path``: ``{prefix}model.json`` (settings, registry, history) and
        ``{prefix}model.npz``; nothing executes code on load.

        ``save_anndata`` also writes ``{prefix}adata.h5ad``. ``format="scvi-tools"`` writes
        scvi-tools' ``{prefix}model.pt`` instead (:func:`jaxvi.io.scvi_tools.write_scvi_tools`),
        which scvi-tools' ``load`` reads. ``anndata_write_kwargs`` are accepted for
        scvi-tools' signature and ignored (the AnnData is written with its defaults).
        """
        del anndata_write_kwargs
        _saveload.save_model(self, dir_path, prefix, overwrite, save_anndata, format)

    @classmethod
    def load(cls, dir_path: str, adata=None, prefix: str | None = None, **kwargs):
        """Load a model saved by :meth:`save` (with the same ``prefix``), or by scvi-tools
        (a ``{prefix}model.pt``, read with :meth:`from_scvi_tools`, minified ones included).

        ``adata`` (same genes) or the saved one; without both the model loads with no data
        (pass ``adata`` to its queries). ``kwargs`` (scvi-tools' ``accelerator``,
        ``device``, ``backup_url``, ...) are accepted and ignored.
        """
        del kwargs
        read = _saveload.jaxvi_parts(cls, dir_path, adata, prefix)
        if read is None:
            return cls.from_scvi_tools(dir_path, adata=adata, prefix=prefix)
        return cls._from_parts(*read)

    @classmethod
    def from_scvi_tools(cls, dir_path: str, adata=None, prefix: str | None = None):
        """Load a model saved by scvi-tools' ``save`` (no torch needed, no code run).

        ``adata`` (the model's genes, known categories) or the saved ``adata.h5ad`` if any;
        a minified one (counts absent, q(z | x) and library sizes kept) gives a minified
        model that answers every query that needs no counts.
        """
        return cls._from_parts(*_saveload.scvi_tools_parts(cls, dir_path, adata, prefix))

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
        freeze = scarches.FreezeOptions(
            unfrozen=unfrozen,
            freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer,
            freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder,
        )
        return cls._from_parts(
            scarches.query_parts(
                cls, adata, reference_model, freeze, inplace_subset_query_vars, transfer_batch
            )
        )

    # ---------------------------------------------------------------- helpers
    def _next_key(self) -> jax.Array:
        self._n_calls += 1
        with jax.transfer_guard("allow"):  # the seed and the call count: set by host code
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

    def _query_inputs(self, adata, indices, batch_size, need_data: bool = True):
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
        if not need_data:  # a table lookup (get_batch_representation): nothing to place
            return adata, indices.astype(np.int64), None, bs
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
