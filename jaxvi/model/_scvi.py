"""scVI (Lopez et al. 2018): the final model class with scvi-tools' ``SCVI`` API.

It declares its registry fields, constructor arguments, module and
:class:`~jaxvi.module.ModelDef`; everything it shares with other models is in
:class:`~jaxvi.model.BaseModel`.
"""

from __future__ import annotations

import warnings
from typing import final

import jax
import numpy as np
import pandas as pd

from jaxvi import posterior
from jaxvi._settings import settings
from jaxvi.data import registry as reglib
from jaxvi.io.bridge import state_dict_to_variables, variables_to_state_dict
from jaxvi.likelihoods import Likelihood, likelihood_name
from jaxvi.model._base import BaseModel
from jaxvi.model._parts import ModelParts
from jaxvi.module import VAE, ModelDef, VAEConfig, init_variables, vae_model_def
from jaxvi.nn import var_activation_name

__all__ = ["SCVI", "VAE_KWARGS", "config_from_registry", "library_size_prior"]

# SCVI's ``**kwargs``: further options of scvi-tools' ``VAE``.
VAE_KWARGS = frozenset(
    {
        "log_variational",
        "encode_covariates",
        "deeply_inject_covariates",
        "batch_representation",
        "use_batch_norm",
        "use_layer_norm",
        "batch_embedding_kwargs",
        "var_activation",
    }
)


@final
class SCVI(BaseModel):
    """single-cell Variational Inference (Lopez et al. 2018), scvi-tools' ``SCVI`` in JAX.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        A registry (from a saved model) to use instead of ``adata``'s.
    n_hidden, n_latent, n_layers, dropout_rate
        As scvi-tools' ``SCVI``: 128, 10, 1, 0.1.
    dispersion, gene_likelihood, use_observed_lib_size, latent_distribution
        As scvi-tools' ``SCVI``: ``"gene"``, ``"zinb"``, True, ``"normal"``.
        ``gene_likelihood`` is a registered name or a :class:`jaxvi.likelihoods.Likelihood`
        (registered under its name; the model keeps and saves only the name).
    **kwargs
        Further ``VAE`` options: ``log_variational``, ``encode_covariates``,
        ``deeply_inject_covariates``, ``batch_representation``, ``use_batch_norm``,
        ``use_layer_norm``, ``batch_embedding_kwargs`` (``{"embedding_dim": 5}``),
        ``var_activation`` (the encoder variance activation: a name such as ``"exp"``
        (default) or ``"softplus"``, or a JAX callable; see :mod:`jaxvi.nn._activations`).
    """

    _model_name = "SCVI"
    _non_kwargs = (
        "n_hidden",
        "n_latent",
        "n_layers",
        "dropout_rate",
        "dispersion",
        "gene_likelihood",
        "use_observed_lib_size",
        "latent_distribution",
    )
    _model_kwargs = VAE_KWARGS

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
        unknown = sorted(set(kwargs) - self._model_kwargs)
        if unknown:
            raise TypeError(
                f"SCVI got unexpected keyword arguments {unknown}; "
                f"allowed extra arguments: {sorted(self._model_kwargs)}."
            )
        if adata is None and registry is None:
            raise ValueError("SCVI needs an AnnData set up with `SCVI.setup_anndata(adata, ...)`.")
        registry = registry if registry is not None else reglib.get_registry(adata)
        if "var_activation" in kwargs:  # saved by name: JSON holds no functions
            kwargs["var_activation"] = var_activation_name(kwargs["var_activation"])
        init_params = {
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
        config = self._make_config(registry, init_params)
        means = variances = None
        if not config.use_observed_lib_size:
            if adata is None:
                raise ValueError("use_observed_lib_size=False needs `adata` for the prior.")
            # the counts are read in bounded pieces (a backed AnnData is not loaded)
            arrays = reglib.registry_arrays(adata, registry, counts=False)
            totals = reglib.cell_totals(adata, registry["setup_args"]["layer"])
            means, variances = library_size_prior(totals, arrays["batch_index"], config.n_batch)
        variables = init_variables(config, jax.random.key(settings.seed), means, variances)
        self._init_from_parts(ModelParts(registry, init_params, variables, adata))

    # ------------------------------------------------------------- declarations
    @classmethod
    def _make_config(cls, registry: dict, init_params: dict) -> VAEConfig:
        return config_from_registry(registry, init_params)

    @classmethod
    def _config_from_json(cls, config: dict) -> VAEConfig:
        return VAEConfig(**{**config, "n_cats_per_cov": tuple(config["n_cats_per_cov"])})

    @classmethod
    def _make_module(cls, config: VAEConfig) -> VAE:
        return VAE(config)

    @classmethod
    def _make_model_def(cls, config: VAEConfig) -> ModelDef:
        return vae_model_def(config)

    @classmethod
    def _from_state_dict(cls, state_dict: dict, config: VAEConfig) -> dict:
        return state_dict_to_variables(state_dict, config)

    def _to_state_dict(self, variables: dict) -> dict:
        if self.config.gene_likelihood not in ("zinb", "nb", "poisson", "normal"):
            raise ValueError(
                f"gene_likelihood={self.config.gene_likelihood!r} exists only in jaxvi; "
                "scvi-tools cannot load it."
            )
        return variables_to_state_dict(variables, self.config)

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
        """Register ``adata``'s counts and covariates (:func:`jaxvi.data.registry.setup_anndata`).

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

    # ---------------------------------------------------------------- queries
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
            ``"importance"`` (:meth:`~jaxvi.SCVI.get_importance_weights`; one batch in
            ``transform_batch``).
        **importance_weighting_kwargs
            ``max_cells``, ``truncation``, ``n_mc_samples``, ``n_mc_samples_per_pass`` for
            :meth:`~jaxvi.SCVI.get_importance_weights`.

        Returns
        -------
        DataFrame ``(cells, genes)`` (obs / var names), or ndarray ``(cells, genes)``,
        ``(n_samples, cells, genes)`` with ``return_mean=False``, ``(n_samples_overall, genes)``.
        """
        adata, indices, source, bs = self._query_inputs(adata, indices, batch_size)
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
            jax.device_put(np.asarray(codes, np.int32)),
            jax.device_put(_gene_bucket(gene_idx, len(var_names))),
            jax.device_put(np.float32(1.0 if latent_library else library_size)),
        )
        query = posterior.Query(self.module, self.variables, source, indices, self._next_key(), bs)
        n_samples = int(n_samples)
        if importance:
            rows = np.repeat(indices, n_samples)
            program = posterior.expression_and_latent_program(self.module, latent_library)
            exprs, zs = posterior.run_query(
                program, query.replace(indices=rows), jax.device_put(np.int32(codes[0])), *args[1:]
            )
            p = self._importance_weights(
                adata, indices, zs, transform_batch, bs, rows, **importance_weighting_kwargs
            )
        elif n_samples_overall is not None:
            # Each cell n_samples times, one z draw per row: the one-sample program serves
            # every group size (DE asks for a different count per group).
            program = posterior.normalized_expression_program(self.module, 1, latent_library)
            exprs = posterior.run_query(
                program, query.replace(indices=np.repeat(indices, n_samples)), *args
            )
        else:
            # Samples are drawn in blocks of 1, 8 or 32 so that few programs are compiled.
            block = 1 if n_samples == 1 else (8 if n_samples <= 8 else 32)
            program = posterior.normalized_expression_program(self.module, block, latent_library)
            blocks = [
                posterior.run_query(
                    program,
                    query.replace(key=jax.random.fold_in(query.key, jax.device_put(np.int32(i)))),
                    *args,
                    cell_axis=1 if block > 1 else 0,
                )
                for i in range(-(-n_samples // block))
            ]
            exprs = blocks[0] if n_samples == 1 else np.concatenate(blocks, axis=0)[:n_samples]
        exprs = np.asarray(exprs, np.float32)
        if exprs.shape[-1] != len(gene_idx):  # the gene bucket's extra genes go
            keep = gene_idx if exprs.shape[-1] == len(var_names) else slice(len(gene_idx))
            exprs = exprs[..., keep]
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


# -------------------------------------------------------------------- functions
def _gene_bucket(gene_idx: np.ndarray, n_genes: int) -> np.ndarray:
    """The genes a query program computes for ``gene_idx``: padded to a power of two (the
    first ``len(gene_idx)`` columns are the asked genes), or all genes when that is not
    fewer, so gene lists of similar lengths share one compiled program."""
    gene_idx = np.asarray(gene_idx, np.int32)
    size = 1 << max(len(gene_idx) - 1, 0).bit_length()
    if size >= n_genes:
        return np.arange(n_genes, dtype=np.int32)
    return np.concatenate([gene_idx, np.zeros(size - len(gene_idx), np.int32)])


def config_from_registry(reg: dict, init_params: dict) -> VAEConfig:
    """The :class:`VAEConfig` for a registry and ``SCVI.__init__`` arguments."""
    stats = reg["summary_stats"]
    p = dict(init_params)
    emb = dict(p.pop("batch_embedding_kwargs", None) or {})
    cov_keys = reg["setup_args"]["categorical_covariate_keys"] or []
    cov_cats = reg["categorical_covariate_categories"]
    extra = {k: p[k] for k in VAE_KWARGS - {"batch_embedding_kwargs"} if k in p}
    if "var_activation" in extra:
        extra["var_activation"] = var_activation_name(extra["var_activation"])
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

    ``totals`` ``(cells,)`` are the cells' total counts (:func:`jaxvi.data.registry.cell_totals`),
    ``batch_index`` ``(cells,)`` their batch codes. Empty cells count as log-library 0;
    batches without cells get mean 0 and variance 1 (scvi-tools' ``_init_library_size``).
    """
    totals = np.asarray(totals, np.float64).ravel()
    if np.any(totals == 0):
        warnings.warn(
            "This dataset has some empty cells, this might fail posterior. Data should be "
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
