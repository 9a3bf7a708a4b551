"""The user-facing ``SCVI`` class: scvi-tools' API over jaxvi's functional core.

The class holds the configuration, the variables pytree (parameters, batch-norm statistics,
library prior) and the training history; every computation is a module-level function of
:mod:`jaxvi.train`, :mod:`jaxvi.inference`, :mod:`jaxvi.registry` and :mod:`jaxvi.io`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from jaxvi import checkpoint as ckpt
from jaxvi import inference, io, posterior, scarches, schema, scvi_io
from jaxvi import registry as reglib
from jaxvi._settings import settings
from jaxvi.dataset import CellData, to_device
from jaxvi.dataset import to_host as host_cell_data
from jaxvi.importance import get_importance_weights
from jaxvi.likelihoods import Likelihood, likelihood_name
from jaxvi.memory import is_out_of_memory, out_of_memory_error
from jaxvi.module import VAE, VAEConfig, init_variables
from jaxvi.sharding import resolve_devices, sharded_cell_data, to_host
from jaxvi.streaming import StreamingData, backed_cell_data
from jaxvi.train import (
    FitProgress,
    NonFiniteError,
    PlanConfig,
    TrainingInterrupted,
    fit,
    get_max_epochs_heuristic,
    init_train_state,
    make_evaluate,
    split_indices,
)

__all__ = ["SCVI"]

MINIFY_TYPES = ("latent_posterior_parameters", "latent_posterior_parameters_with_counts")
MINIFY_UNS_KEY = "_scvi_adata_minify_type"
QZM_KEY, QZV_KEY, LIB_KEY = "scvi_latent_qzm", "scvi_latent_qzv", "observed_lib_size"

# Above this many bytes of dense float32 counts, sparse input stays CSR on the device.
DENSE_LIMIT_BYTES = 2**31

_VAE_KWARGS = {
    "log_variational",
    "encode_covariates",
    "deeply_inject_covariates",
    "batch_representation",
    "use_batch_norm",
    "use_layer_norm",
    "batch_embedding_kwargs",
}
_TRAINER_KWARGS = {
    "early_stopping_monitor",
    "early_stopping_patience",
    "early_stopping_min_delta",
    "early_stopping_mode",
    "gradient_clip_val",
    "precision",
}
# Lightning's ``precision`` values -> JAX's default matmul precision for training.
_PRECISION = {
    "32": "float32",
    "32-true": "float32",
    "bf16": "BF16_BF16_F32",
    "bf16-mixed": "BF16_BF16_F32",
    "bf16-true": "BF16_BF16_F32",
    "tf32": "tensorfloat32",
}


class SCVI:
    """single-cell Variational Inference (Lopez et al. 2018), scvi-tools' ``SCVI`` in JAX.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        A registry (from a saved model) to use instead of ``adata``'s.
    n_hidden, n_latent, n_layers, dropout_rate, dispersion, gene_likelihood,
    use_observed_lib_size, latent_distribution
        As scvi-tools' ``SCVI``: 128, 10, 1, 0.1, ``"gene"``, ``"zinb"``, True, ``"normal"``.
        ``gene_likelihood`` is a registered name or a :class:`jaxvi.likelihoods.Likelihood`
        (registered under its name; the model keeps and saves only the name).
    **kwargs
        Further ``VAE`` options: ``log_variational``, ``encode_covariates``,
        ``deeply_inject_covariates``, ``batch_representation``, ``use_batch_norm``,
        ``use_layer_norm``, ``batch_embedding_kwargs`` (``{"embedding_dim": 5}``).
    """

    def __init__(
        self,
        adata=None,
        registry: dict | None = None,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str | Likelihood = "zinb",
        use_observed_lib_size: bool = True,
        latent_distribution: str = "normal",
        **kwargs,
    ):
        unknown = sorted(set(kwargs) - _VAE_KWARGS)
        if unknown:
            raise TypeError(
                f"SCVI got unexpected keyword arguments {unknown}; "
                f"allowed extra arguments: {sorted(_VAE_KWARGS)}."
            )
        if adata is None and registry is None:
            raise ValueError("SCVI needs an AnnData set up with `SCVI.setup_anndata(adata, ...)`.")
        self.registry_ = registry if registry is not None else reglib.get_registry(adata)
        self.adata = adata
        self.init_params_ = {
            "n_hidden": n_hidden,
            "n_latent": n_latent,
            "n_layers": n_layers,
            "dropout_rate": dropout_rate,
            "dispersion": dispersion,
            "gene_likelihood": likelihood_name(gene_likelihood),
            "use_observed_lib_size": use_observed_lib_size,
            "latent_distribution": latent_distribution,
            **kwargs,
        }
        self.config = config_from_registry(self.registry_, self.init_params_)
        self.module = VAE(self.config)
        means = variances = None
        if not self.config.use_observed_lib_size:
            if adata is None:
                raise ValueError("use_observed_lib_size=False needs `adata` for the prior.")
            # the counts are read in bounded pieces (a backed AnnData is not loaded)
            arrays = reglib.registry_arrays(adata, self.registry_, counts=False)
            totals = reglib.cell_totals(adata, self.registry_["setup_args"]["layer"])
            means, variances = library_size_prior(
                totals, arrays["batch_index"], self.config.n_batch
            )
        self.variables = init_variables(
            self.config, jax.random.key(settings.seed), means, variances
        )
        self.history_: dict[str, pd.DataFrame] = {}
        self.is_trained_ = False
        self.train_indices_ = self.validation_indices_ = self.test_indices_ = None
        self._n_calls = 0
        self._mesh = None

    # ------------------------------------------------------------------ setup
    @classmethod
    def setup_anndata(
        cls,
        adata,
        layer: str | None = None,
        batch_key: str | None = None,
        labels_key: str | None = None,
        size_factor_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
    ) -> None:
        """Register ``adata``'s counts and covariates (see :func:`jaxvi.registry.setup_anndata`).

        Writes the registry to ``adata.uns["_jaxvi"]`` and the batch / label codes to
        ``adata.obs["_scvi_batch"]`` / ``["_scvi_labels"]``.
        """
        reglib.setup_anndata(
            adata,
            layer=layer,
            batch_key=batch_key,
            labels_key=labels_key,
            size_factor_key=size_factor_key,
            categorical_covariate_keys=categorical_covariate_keys,
            continuous_covariate_keys=continuous_covariate_keys,
        )

    # ------------------------------------------------------------- properties
    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch metrics: one DataFrame per key, indexed by ``epoch``."""
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

    @property
    def summary_string(self) -> str:
        """One-paragraph description of the model, as scvi-tools prints it."""
        p = self.init_params_
        s = (
            "SCVI model with the following parameters: \n"
            f"n_hidden: {p['n_hidden']}, n_latent: {p['n_latent']}, "
            f"n_layers: {p['n_layers']}, dropout_rate: {p['dropout_rate']}, "
            f"dispersion: {p['dispersion']}, gene_likelihood: {p['gene_likelihood']}, "
            f"latent_distribution: {p['latent_distribution']}."
        )
        return s + f"\nTraining status: {'Trained' if self.is_trained_ else 'Not Trained'}"

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
            them (parameters replicated, cells sharded; :mod:`jaxvi.sharding`), across
            processes after :func:`jaxvi.distributed.initialize`. Queries afterwards use the
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
            them all (:mod:`jaxvi.streaming`; host memory bounded by
            ``settings.stream_max_host_bytes``). Default: when the AnnData is backed.
            Combines with ``devices=``: each block is then sharded over the mesh.
        checkpoint_dir, checkpoint_every_n_epochs, checkpoint_keep
            Write a checkpoint (parameters, optimizer and batch-norm state, epoch, history,
            split, settings) to ``checkpoint_dir/epoch_<N>`` every this many epochs, keeping the
            newest ``checkpoint_keep`` (see :mod:`jaxvi.checkpoint`); also on interruption.
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
        unknown = sorted(set(trainer_kwargs) - _TRAINER_KWARGS)
        if unknown:
            raise TypeError(
                f"train() got unexpected keyword arguments {unknown}; "
                f"allowed: {sorted(_TRAINER_KWARGS)}."
            )
        if self.adata is None:
            raise ValueError("This model has no AnnData to train on (loaded without data).")
        if self.minified_data_type is not None:
            raise ValueError("A model with minified data cannot be trained.")
        _check_accelerator(accelerator)
        seed = settings.seed if seed is None else int(seed)
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
        plan_kw = {**(plan_config or {}), **(plan_kwargs or {})}
        if "gradient_clip_val" in trainer_kwargs:
            plan_kw["gradient_clip_val"] = trainer_kwargs.pop("gradient_clip_val")
        precision = trainer_kwargs.pop("precision", None)
        if precision is not None and str(precision) not in _PRECISION:
            raise ValueError(
                f"precision={precision!r} is not supported; use one of {sorted(_PRECISION)}."
            )
        plan = PlanConfig.from_kwargs(plan_kw)
        splitter = dict(datasplitter_kwargs or {})
        drop_last = bool(splitter.pop("drop_last", False))
        external = splitter.pop("external_indexing", None)
        if splitter:
            raise TypeError(f"Unsupported datasplitter_kwargs {sorted(splitter)}.")
        n_obs = self.adata.n_obs
        if max_epochs is None:
            max_epochs = get_max_epochs_heuristic(n_obs)
        if int(max_epochs) < 1:
            raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
        if external is not None:
            train_idx, val_idx, test_idx = (np.asarray(a, np.int64) for a in external)
        else:
            train_idx, val_idx, test_idx = split_indices(
                n_obs,
                train_size,
                validation_size,
                batch_size=batch_size,
                shuffle=shuffle_set_split,
                seed=seed,
                drop_last=drop_last,
            )
        mesh = resolve_devices(devices)
        if mesh is not None and self.minified_data_type is not None:
            raise ValueError("Data-parallel queries need the counts; this model is minified.")
        if streaming is None:
            streaming = bool(getattr(self.adata, "isbacked", False))
        self._mesh = mesh
        freeze = getattr(self, "_query_freeze", None) or {}  # set by load_query_data
        state, _ = init_train_state(self.module, self.variables, plan, freeze.get("update_mask"))
        run = {  # what must agree with a checkpoint for an exact continuation
            "n_cells": int(n_obs),
            "batch_size": int(batch_size),
            "drop_last": drop_last,
            "plan": ckpt.plan_to_json(plan),
            "config": dataclasses.asdict(self.config),
            "check_val_every_n_epoch": check_val_every_n_epoch,
            "early_stopping": bool(early_stopping),
            "trainer_kwargs": dict(trainer_kwargs),
        }
        history_before, progress = self.history_, None
        if resume is not None:
            meta, arrays = ckpt.read_checkpoint(resume)
            ckpt.check_same_run(meta, run)
            seed = int(meta["seed"])
            split = meta["split"]
            train_idx, val_idx, test_idx = (
                np.asarray(split[k], np.int64) for k in ("train", "validation", "test")
            )
            history_before = ckpt.history_from_json(meta["history_before"])
            progress = FitProgress(**meta["progress"])
            state = ckpt.restore_state(state, meta, arrays)
        checkpointer = None
        if checkpoint_dir is not None:
            checkpointer = ckpt.Checkpointer(
                checkpoint_dir,
                checkpoint_every_n_epochs,
                checkpoint_keep,
                {
                    **run,
                    "seed": seed,
                    "max_epochs": int(max_epochs),
                    "split": {
                        "train": [int(i) for i in train_idx],
                        "validation": [int(i) for i in val_idx],
                        "test": [int(i) for i in test_idx],
                    },
                    "history_before": ckpt.history_to_json(history_before),
                },
            )
        splits = (train_idx, val_idx, test_idx)
        if streaming:
            data = StreamingData(
                self.adata,
                self.registry_,
                train_idx,
                val_idx,
                chunk_cells=settings.stream_chunk_cells,
                max_host_bytes=settings.stream_max_host_bytes,
                mesh=mesh,
            )
        else:
            data = self._device_data(self.adata, load_sparse_tensor)
        matmul = _PRECISION[str(precision)] if precision is not None else None
        try:
            with jax.default_matmul_precision(matmul), _out_of_memory_as("A training step"):
                state, history, epoch_fn = fit(
                    self.module,
                    state,
                    data,
                    train_idx=train_idx,
                    val_idx=val_idx,
                    plan=plan,
                    max_epochs=int(max_epochs),
                    batch_size=int(batch_size),
                    seed=seed,
                    check_val_every_n_epoch=check_val_every_n_epoch,
                    early_stopping=early_stopping,
                    progress_bar=enable_progress_bar,
                    history=history_before,
                    drop_last=drop_last,
                    progress=progress,
                    on_epoch_end=checkpointer,
                    **freeze,
                    **trainer_kwargs,
                )
        except (TrainingInterrupted, NonFiniteError) as err:
            # Keep the last completed epoch (interruption) or the last finite step.
            self._set_trained(err.state, err.history, splits)
            if isinstance(err, TrainingInterrupted) and checkpointer is not None:
                checkpointer.write(err.state, err.progress)
            raise
        self._epoch_fn = epoch_fn
        self._set_trained(state, history, splits)

    def _set_trained(self, state, history, splits) -> None:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        if state.buffers:
            variables["buffers"] = state.buffers
        if self._mesh is not None:  # host copies: usable with any device placement
            variables = jax.tree_util.tree_map(to_host, variables)
        self.variables = variables
        self.history_ = history
        self.is_trained_ = True
        self.train_indices_, self.validation_indices_, self.test_indices_ = (
            np.asarray(a) for a in splits
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
        adata, indices, data, bs = self._query_inputs(adata, indices, batch_size)
        mode = "dist" if return_dist else ("mean" if give_mean else "sample")
        program = inference.latent_program(self.config, mode, int(mc_samples))
        out = inference.run_chunked(program, self.variables, data, indices, bs, self._next_key())
        if return_dist:
            return tuple(np.asarray(a, np.float32) for a in out)
        return np.asarray(out, np.float32)

    def get_normalized_expression(
        self,
        adata=None,
        indices=None,
        transform_batch=None,
        gene_list=None,
        library_size: float | str = 1,
        n_samples: int = 1,
        n_samples_overall: int | None = None,
        weights: str | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
        return_numpy: bool | None = None,
        silent: bool = True,
        **importance_weighting_kwargs,
    ):
        """Denoised expression ``px_scale * library_size`` from one z sample per cell.

        Parameters
        ----------
        transform_batch
            Batch category (or list of them, averaged) to decode every cell with.
        gene_list
            Genes to return (default all).
        library_size
            Scaling of ``px_scale`` (1: frequencies), or ``"latent"`` for ``px_rate``.
        n_samples
            z samples per cell; averaged when ``return_mean``.
        n_samples_overall
            Draw this many expression vectors over the cells (with replacement); needs
            ``return_numpy=True``.
        weights
            How ``n_samples_overall`` draws are resampled: ``None``/``"uniform"``, or
            ``"importance"`` (:meth:`get_importance_weights`; one batch in ``transform_batch``).
        **importance_weighting_kwargs
            ``max_cells``, ``truncation``, ``n_mc_samples``, ``n_mc_samples_per_pass`` for
            :meth:`get_importance_weights`.

        Returns
        -------
        DataFrame ``(cells, genes)`` (obs / var names), or ndarray ``(cells, genes)``,
        ``(n_samples, cells, genes)`` with ``return_mean=False``, ``(n_samples_overall, genes)``.
        """
        adata, indices, data, bs = self._query_inputs(adata, indices, batch_size)
        if weights not in (None, "uniform", "importance"):
            raise ValueError(f"weights must be None, 'uniform' or 'importance', got {weights!r}.")
        importance = weights == "importance" and n_samples_overall is not None
        if n_samples_overall is not None:
            if n_samples != 1:
                raise ValueError("Use either n_samples or n_samples_overall, not both.")
            n_samples = int(n_samples_overall) // len(indices) + 1
        if int(n_samples) < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        if n_samples > 1 and not return_mean and return_numpy is False:
            warnings.warn(
                "`return_numpy` must be True if `n_samples > 1` and `return_mean` is False, "
                "returning an `np.ndarray`.",
                UserWarning,
                stacklevel=2,
            )
            return_numpy = True
        var_names = pd.Index([str(v) for v in self.registry_["var_names"]])
        if gene_list is None:
            gene_idx = np.arange(len(var_names))
        else:
            gene_idx = var_names.get_indexer([str(g) for g in gene_list])
            if np.any(gene_idx < 0):
                missing = [g for g, i in zip(gene_list, gene_idx, strict=True) if i < 0][:5]
                raise ValueError(f"gene_list has genes the model does not know: {missing}.")
        codes = self._batch_codes(transform_batch)
        if weights == "importance" and len(codes) > 1:
            raise NotImplementedError(
                "Importance weights cannot be computed when expression levels are averaged "
                "across batches."
            )
        latent_library = library_size == "latent"
        if not latent_library and not np.isscalar(library_size):
            raise ValueError(f"library_size must be a number or 'latent', got {library_size!r}.")
        args = (
            jnp.asarray(codes, jnp.int32),
            jnp.asarray(gene_idx, jnp.int32),
            jnp.float32(1.0 if latent_library else library_size),
        )
        key = self._next_key()
        n_samples = int(n_samples)
        if importance:
            rows = np.repeat(indices, n_samples)
            program = inference.expression_and_latent_program(self.config, latent_library)
            exprs, zs = inference.run_chunked(
                program, self.variables, data, rows, bs, key, args[0][0], *args[1:]
            )
            p = get_importance_weights(
                self,
                adata,
                indices,
                zs,
                transform_batch,
                batch_size=bs,
                rows=rows,
                **importance_weighting_kwargs,
            )
        elif n_samples_overall is not None:
            # Each cell n_samples times, one z draw per row: the one-sample program serves
            # every group size (DE asks for a different count per group).
            program = inference.normalized_expression_program(self.config, 1, latent_library)
            exprs = inference.run_chunked(
                program, self.variables, data, np.repeat(indices, n_samples), bs, key, *args
            )
        else:
            # Samples are drawn in blocks of 1, 8 or 32 so that few programs are compiled.
            block = 1 if n_samples == 1 else (8 if n_samples <= 8 else 32)
            program = inference.normalized_expression_program(self.config, block, latent_library)
            blocks = [
                inference.run_chunked(
                    program,
                    self.variables,
                    data,
                    indices,
                    bs,
                    jax.random.fold_in(key, i),
                    *args,
                    cell_axis=1 if block > 1 else 0,
                )
                for i in range(-(-n_samples // block))
            ]
            exprs = blocks[0] if n_samples == 1 else np.concatenate(blocks, axis=0)[:n_samples]
        exprs = np.asarray(exprs, np.float32)
        if n_samples_overall is not None:
            flat = exprs.reshape(-1, exprs.shape[-1])
            rng = np.random.default_rng(int(self._next_key_int()))
            draws = rng.choice(
                flat.shape[0], int(n_samples_overall), replace=True, p=p if importance else None
            )
            exprs = flat[draws]
        elif n_samples > 1 and return_mean:
            exprs = exprs.mean(axis=0)
        if return_numpy is None or return_numpy is False:
            obs_names = adata.obs_names[np.asarray(indices)]
            return pd.DataFrame(exprs, index=obs_names, columns=var_names[gene_idx])
        return exprs

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
        :func:`jaxvi.importance.get_importance_weights`.

        Returns
        -------
        float64 ``(n_draws,)`` summing to one.
        """
        return get_importance_weights(
            self,
            adata,
            indices,
            zs,
            transform_batch,
            max_cells,
            truncation,
            n_mc_samples,
            n_mc_samples_per_pass,
            batch_size,
        )

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

        See :func:`jaxvi.de.differential_expression` for every argument. Returns a DataFrame
        indexed by gene: ``proba_m1, proba_m2, bayes_factor, scale1, scale2`` (vanilla) or
        ``proba_de, proba_not_de, bayes_factor, scale1, scale2, pseudocounts, delta,
        lfc_mean, ...`` (change), raw statistics, ``is_de_fdr_<target>`` (change) and the
        ``comparison`` / ``group1`` / ``group2`` columns, one block per comparison.
        """
        from jaxvi import de

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
        return posterior.get_likelihood_parameters(
            self, adata, indices, n_samples, give_mean, batch_size
        )

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
        return posterior.posterior_predictive_sample(
            self, adata, indices, transform_batch, n_samples, gene_list, batch_size
        )

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
        return posterior.get_marginal_ll(
            self, adata, indices, n_mc_samples, batch_size, return_mean, n_mc_samples_per_pass
        )

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
        return posterior.get_latent_library_size(self, adata, indices, give_mean, batch_size)

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
        return posterior.get_feature_correlation_matrix(
            self,
            adata,
            indices,
            n_samples,
            batch_size,
            rna_size_factor,
            transform_batch,
            correlation_type,
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
        rec, kl_z, kl_l = self._elbo_terms(adata, indices, batch_size)
        elbo = -(rec + kl_z + kl_l)
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
        rec, _, _ = self._elbo_terms(adata, indices, batch_size)
        return {"reconstruction_loss": float(np.mean(rec)) if return_mean else rec}

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
        if minified_data_type not in MINIFY_TYPES:
            raise NotImplementedError(
                f"Minification method {minified_data_type} is not supported."
            )
        if not self.config.use_observed_lib_size:
            raise ValueError(
                "Minification is not supported for models that do not use observed library size."
            )
        if self.adata is None:
            raise ValueError("This model has no AnnData to minify.")
        for key in (use_latent_qzm_key, use_latent_qzv_key):
            if key not in self.adata.obsm:
                raise ValueError(
                    f"adata.obsm['{key}'] not found: store the latent posterior first, e.g. "
                    "`qzm, qzv = model.get_latent_representation(return_dist=True)`."
                )
        arrays = reglib.registry_arrays(self.adata, self.registry_)
        x = arrays["X"]
        mini = self.adata.copy()
        if minified_data_type == "latent_posterior_parameters":
            empty = sp.csr_matrix(x.shape, dtype=np.float32)
            layer = self.registry_["setup_args"]["layer"]
            if layer is None:
                mini.X = empty
            else:
                mini.layers[layer] = empty
            for name in list(mini.layers):
                mini.layers[name] = sp.csr_matrix(x.shape, dtype=np.float32)
        n_latent = self.config.n_latent
        for src, dst in ((use_latent_qzm_key, QZM_KEY), (use_latent_qzv_key, QZV_KEY)):
            value = np.asarray(self.adata.obsm[src], np.float32)
            if value.shape != (self.adata.n_obs, n_latent):
                raise ValueError(
                    f"adata.obsm['{src}'] has shape {value.shape}, expected "
                    f"({self.adata.n_obs}, {n_latent})."
                )
            mini.obsm[dst] = value
        mini.obs[LIB_KEY] = np.asarray(x.sum(axis=1), np.float32).ravel()
        mini.uns[MINIFY_UNS_KEY] = minified_data_type
        self.adata = mini

    def _refuse_if_minified(self, name: str) -> None:
        if self.minified_data_type == "latent_posterior_parameters":
            raise ValueError(f"The SCVI.{name} function currently does not support minified data.")

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
        ``format="scvi-tools"`` writes scvi-tools' ``model.pt`` instead (see
        :func:`jaxvi.scvi_io.write_scvi_tools`), which ``scvi.model.SCVI.load`` reads.
        """
        if format == "scvi-tools":
            return scvi_io.write_scvi_tools(self, dir_path, prefix, overwrite, save_anndata)
        if format != "jaxvi":
            raise ValueError(f"format must be 'jaxvi' or 'scvi-tools', got {format!r}.")
        if prefix is not None:
            raise NotImplementedError("`prefix` is not supported; use a separate directory.")
        meta = {
            "model_name": "SCVI",
            "jaxvi_version": _version(),
            "init_params": self.init_params_,
            "config": dataclasses.asdict(self.config),
            "registry": self.registry_,
            "is_trained": self.is_trained_,
            "history": {
                k: {"epoch": [int(i) for i in v.index], "values": [float(x) for x in v.iloc[:, 0]]}
                for k, v in self.history_.items()
            },
            "indices": {
                name: None if arr is None else [int(i) for i in arr]
                for name, arr in (
                    ("train", self.train_indices_),
                    ("validation", self.validation_indices_),
                    ("test", self.test_indices_),
                )
            },
        }
        arrays = io.flatten_tree(jax.device_get(self.variables))
        adata = self.adata if save_anndata else None
        if save_anndata and adata is None:
            raise ValueError("save_anndata=True but the model has no AnnData.")
        io.write_model_dir(dir_path, meta, arrays, overwrite=overwrite, adata=adata)

    @classmethod
    def load(cls, dir_path: str, adata=None) -> SCVI:
        """Load a model saved by :meth:`save`; ``adata`` (same genes) or the saved one.

        Without ``adata`` and without a saved ``adata.h5ad`` the model loads with no data;
        pass ``adata`` to its query methods. A scvi-tools directory (``model.pt``, no
        ``model.json``) is read with :meth:`from_scvi_tools`.
        """
        if not os.path.exists(os.path.join(dir_path, io.MODEL_JSON)) and (
            scvi_io.is_scvi_tools_dir(dir_path)
        ):
            return cls.from_scvi_tools(dir_path, adata=adata)
        # model.json, model.npz and adata.h5ad from one version, schema-checked (jaxvi.schema)
        meta, arrays, saved_adata = io.read_saved_model(dir_path, read_adata=adata is None)
        if meta.get("model_name") != "SCVI":
            raise ValueError(f"{dir_path} holds a {meta.get('model_name')!r} model, not SCVI.")
        reg = meta["registry"]
        adata = saved_adata if adata is None else adata
        if adata is not None:
            reglib.registry_arrays(adata, reg, counts=False)  # genes and categories
            reglib.check_counts_structure(adata, reg["setup_args"]["layer"])
            adata.uns[reglib.UNS_KEY] = reg
        model = cls.__new__(cls)
        model.registry_ = reg
        model.adata = adata
        model.init_params_ = meta["init_params"]
        cfg = dict(meta["config"])
        cfg["n_cats_per_cov"] = tuple(cfg["n_cats_per_cov"])
        model.config = VAEConfig(**cfg)
        model.module = VAE(model.config)
        variables = io.unflatten_tree(arrays)
        _check_variables(variables, model.config)
        model.variables = jax.tree_util.tree_map(jnp.asarray, variables)
        model.history_ = {
            k: pd.DataFrame({k: v["values"]}, index=pd.Index(v["epoch"], name="epoch"))
            for k, v in meta["history"].items()
        }
        model.is_trained_ = bool(meta["is_trained"])
        idx = meta["indices"]
        model.train_indices_ = None if idx["train"] is None else np.asarray(idx["train"])
        model.validation_indices_ = (
            None if idx["validation"] is None else np.asarray(idx["validation"])
        )
        model.test_indices_ = None if idx["test"] is None else np.asarray(idx["test"])
        model._n_calls = 0
        model._mesh = None
        return model

    @classmethod
    def from_scvi_tools(cls, dir_path: str, adata=None, prefix: str | None = None) -> SCVI:
        """Load a model saved by scvi-tools' ``SCVI.save`` (no torch needed, no code run).

        See :func:`jaxvi.scvi_io.read_scvi_tools`.
        """
        return scvi_io.read_scvi_tools(cls, dir_path, adata=adata, prefix=prefix)

    # ----------------------------------------------------------------- scArches
    @staticmethod
    def prepare_query_anndata(
        adata, reference_model, return_reference_var_names: bool = False, inplace: bool = True
    ):
        """Zero-pad and reorder ``adata``'s genes to a reference's (scArches).

        See :func:`jaxvi.scarches.prepare_query_anndata`.
        """
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
    ) -> SCVI:
        """A query model initialised from a reference (scArches), ready to :meth:`train`.

        ``reference_model`` is a jaxvi ``SCVI`` or a saved jaxvi or scvi-tools directory; see
        :func:`jaxvi.scarches.load_query_data` for the freeze options.
        """
        return scarches.load_query_data(
            cls,
            adata,
            reference_model,
            inplace_subset_query_vars=inplace_subset_query_vars,
            accelerator=accelerator,
            device=device,
            unfrozen=unfrozen,
            freeze_dropout=freeze_dropout,
            freeze_expression=freeze_expression,
            freeze_decoder_first_layer=freeze_decoder_first_layer,
            freeze_batchnorm_encoder=freeze_batchnorm_encoder,
            freeze_batchnorm_decoder=freeze_batchnorm_decoder,
            freeze_classifier=freeze_classifier,
            transfer_batch=transfer_batch,
        )

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

    def _data_arrays(self, adata) -> dict:
        arrays = reglib.registry_arrays(adata, self.registry_)
        if adata.uns.get(MINIFY_UNS_KEY) is not None:
            arrays["qz_m"] = adata.obsm[QZM_KEY]
            arrays["qz_v"] = adata.obsm[QZV_KEY]
            arrays["observed_lib_size"] = adata.obs[LIB_KEY].to_numpy()
        return arrays

    def _device_data(self, adata, load_sparse_tensor: bool | None) -> CellData:
        if self._mesh is not None:
            return sharded_cell_data(adata, self.registry_, self._mesh)
        arrays = self._data_arrays(adata)
        x = arrays["X"]
        if adata.uns.get(MINIFY_UNS_KEY) == "latent_posterior_parameters":
            load_sparse_tensor = True  # all-zero counts: nothing to densify
        if load_sparse_tensor is None:
            load_sparse_tensor = sp.issparse(x) and x.shape[0] * x.shape[1] * 4 > DENSE_LIMIT_BYTES
        return to_device(arrays, sparse=bool(load_sparse_tensor))

    def _query_inputs(self, adata, indices, batch_size):
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
        # A backed AnnData's counts stay on disk: run_chunked reads and moves bounded pieces
        # (sharded over the mesh, if any).
        data = None
        if getattr(adata, "isbacked", False) and adata.uns.get(MINIFY_UNS_KEY) is None:
            data = backed_cell_data(adata, self.registry_)
        if data is not None:
            return adata, indices.astype(np.int64), data.replace(mesh=self._mesh), bs
        if self._mesh is not None:  # sharded over the devices of the mesh
            return adata, indices.astype(np.int64), self._device_data(adata, None), bs
        # Host data: run_chunked moves bounded pieces to the device (any dataset size).
        data = host_cell_data(self._data_arrays(adata))
        return adata, indices.astype(np.int64), data, bs

    def _elbo_terms(self, adata, indices, batch_size):
        adata, indices, data, bs = self._query_inputs(adata, indices, batch_size)
        if not hasattr(self, "_evaluate_fn"):
            self._evaluate_fn = make_evaluate(self.module)
        out = inference.run_chunked(
            self._evaluate_fn, self.variables, data, indices, bs, self._next_key()
        )
        return tuple(np.asarray(a, np.float64) for a in out)

    def _batch_codes(self, transform_batch) -> np.ndarray:
        if transform_batch is None:
            return np.array([-1])
        cats = [str(c) for c in self.registry_["batch_categories"]]
        values = (
            transform_batch if isinstance(transform_batch, list | tuple) else [transform_batch]
        )
        codes = []
        for v in values:
            if str(v) not in cats:
                raise ValueError(f"transform_batch {v!r} is not a batch category ({cats[:10]}).")
            codes.append(cats.index(str(v)))
        return np.asarray(codes)


# -------------------------------------------------------------------- functions
def config_from_registry(reg: dict, init_params: dict) -> VAEConfig:
    """The :class:`VAEConfig` for a registry and ``SCVI.__init__`` arguments."""
    stats = reg["summary_stats"]
    p = dict(init_params)
    emb = dict(p.pop("batch_embedding_kwargs", None) or {})
    cov_keys = reg["setup_args"]["categorical_covariate_keys"] or []
    cov_cats = reg["categorical_covariate_categories"]
    extra = {k: p[k] for k in _VAE_KWARGS - {"batch_embedding_kwargs"} if k in p}
    return VAEConfig(
        n_input=stats["n_vars"],
        n_batch=stats["n_batch"],
        n_labels=stats["n_labels"],
        n_hidden=int(p["n_hidden"]),
        n_latent=int(p["n_latent"]),
        n_layers=int(p["n_layers"]),
        n_continuous_cov=stats["n_extra_continuous_covs"],
        n_cats_per_cov=tuple(len(cov_cats[k]) for k in cov_keys),
        dropout_rate=float(p["dropout_rate"]),
        dispersion=p["dispersion"],
        gene_likelihood=p["gene_likelihood"],
        latent_distribution=p["latent_distribution"],
        use_observed_lib_size=bool(p["use_observed_lib_size"]),
        use_size_factor_key=reg["setup_args"]["size_factor_key"] is not None,
        batch_embedding_dim=int(emb.get("embedding_dim", 5)),
        **extra,
    )


def library_size_prior(totals, batch_index: np.ndarray, n_batch: int):
    """Per-batch mean and population variance of the log library, each ``(1, n_batch)``.

    ``totals`` ``(cells,)`` are the cells' total counts (:func:`jaxvi.registry.cell_totals`),
    ``batch_index`` ``(cells,)`` their batch codes. Empty cells count as log-library 0;
    batches without cells get mean 0 and variance 1 (scvi-tools' ``_init_library_size``).
    """
    totals = np.asarray(totals, np.float64).ravel()
    if np.any(totals == 0):
        warnings.warn(
            "This dataset has some empty cells, this might fail inference. Data should be "
            "filtered with `scanpy.pp.filter_cells()`",
            UserWarning,
            stacklevel=3,
        )
    log_lib = np.log(np.where(totals > 0, totals, 1.0))
    means = np.zeros(n_batch)
    variances = np.ones(n_batch)
    for b in range(n_batch):
        sel = batch_index == b
        if np.any(sel):
            means[b] = log_lib[sel].mean()
            variances[b] = log_lib[sel].var()
            if variances[b] <= 0:
                raise ValueError(
                    f"Batch code {b} has {int(sel.sum())} cell(s) all with the same library "
                    "size, so the log-library prior of use_observed_lib_size=False has "
                    "variance 0 (scvi-tools fails here too). Use the observed library size or "
                    "merge that batch."
                )
    return means[None].astype(np.float32), variances[None].astype(np.float32)


@contextlib.contextmanager
def _out_of_memory_as(what: str):
    """Turn XLA's device out-of-memory error into a clear ``MemoryError``."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory_error(what, None, e) from None


def _check_accelerator(accelerator: str) -> None:
    if accelerator in ("auto", None):
        return
    backend = jax.default_backend()
    wanted = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(str(accelerator))
    if wanted is None:
        raise ValueError(f"Unknown accelerator {accelerator!r}; use 'auto', 'cpu', 'gpu', 'tpu'.")
    if wanted != backend:
        raise ValueError(
            f"accelerator={accelerator!r} requested but JAX's default backend is {backend!r}; "
            "install the matching jax extra (e.g. `pip install jaxvi[cuda12]`)."
        )


def _check_variables(variables: dict, config: VAEConfig) -> None:
    shapes = jax.eval_shape(lambda k: init_variables(config, k), jax.random.key(0))
    empty = jax.tree_util.tree_map(lambda s: np.empty(s.shape, s.dtype), shapes)
    expected = {k: v.shape for k, v in io.flatten_tree(empty).items()}
    got = io.flatten_tree(variables)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(f"Saved arrays do not match the model: missing {missing}, extra {extra}.")
    for k, shape in expected.items():
        if got[k].shape != shape:
            raise ValueError(f"Saved array {k} has shape {got[k].shape}, expected {shape}.")
    dtypes = {k: v.dtype for k, v in io.flatten_tree(empty).items()}
    schema.check_weights(got, "saved model", dtypes)  # dtypes, finite, variances >= 0


def _version() -> str:
    from jaxvi import __version__

    return __version__
