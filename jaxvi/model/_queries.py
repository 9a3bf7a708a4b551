"""The queries every model answers (scvi-tools' ``VAEMixin``, ``RNASeqMixin``,
``EmbeddingMixin``), as thin methods over :mod:`jaxvi.posterior` and :mod:`jaxvi.analysis`.

:class:`QueryMethods` is a base of :class:`~jaxvi.model.BaseModel`; the methods reach the
model's module, variables and registry through ``_query`` / ``_query_inputs`` /
``_elbo_terms`` / ``_batch_codes``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from jaxvi import posterior
from jaxvi.analysis import de
from jaxvi.data import registry as reglib
from jaxvi.model import _compat
from jaxvi.module import KL_GLOBAL, KL_LOCAL, RECONSTRUCTION

__all__ = ["QueryMethods"]


class QueryMethods:
    """Latent, expression, likelihood, ELBO and DE queries of a trained model."""

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

    def get_aggregated_posterior(self, adata=None, indices=None, batch_size=None, dof=3.0):
        """The aggregated posterior of the cells ``indices``: the equal-weight mixture of
        their latent posteriors, with Student-t components (``dof``; normal with ``None``).

        As in scvi-tools 1.4.2 each component's scale is the cell's posterior *variance*
        (scvi-tools passes ``get_latent_representation(return_dist=True)``'s second array,
        the variance, as the scale); kept so that the same weights give the same numbers.

        Returns
        -------
        numpyro ``MixtureSameFamily`` over ``(n_latent,)`` points (scvi-tools returns the
        PyTorch equivalent); see ``jaxvi.posterior.aggregated_posterior``.

        Raises
        ------
        RuntimeError
            For a model that was never trained (as scvi-tools).
        """
        loc, scale = self._aggregate_components(adata, indices, batch_size)
        return posterior.aggregated_posterior(loc, scale, dof)

    def _aggregate_components(self, adata, indices, batch_size):
        if not self.is_trained_:
            raise RuntimeError(
                "The model is not trained: train it (or load a trained one) before asking "
                "for its aggregated posterior."
            )
        if indices is not None and len(indices) == 0:
            indices = None  # scvi-tools: an empty selection means every cell
        return self.get_latent_representation(
            adata, indices, batch_size=batch_size, return_dist=True
        )

    def differential_abundance(
        self,
        adata=None,
        sample_key: str | None = None,
        batch_size: int = 128,
        num_cells_posterior: int | None = None,
        dof: float | None = None,
    ) -> None:
        """How probable each cell's latent mean is under each sample's aggregated posterior.

        For every value of ``adata.obs[sample_key]`` (in order of appearance), the log
        density of every cell's latent mean under the aggregated posterior of that sample's
        cells (at most ``num_cells_posterior`` of them, drawn with NumPy's global generator as
        scvi-tools does). The result is stored, as in scvi-tools, in
        ``adata.obsm["da_log_probs"]``: a ``(cells, samples)`` DataFrame indexed by the cell
        names with the samples as columns.
        """
        adata = self.adata if adata is None else adata
        if sample_key is None or sample_key not in adata.obs:
            raise KeyError(f"sample_key {sample_key!r} is not a column of adata.obs.")
        us = self.get_latent_representation(adata, batch_size=batch_size, give_mean=True)
        # every cell's components once (the encoder is deterministic), each sample's by index
        loc, scale = self._aggregate_components(adata, None, batch_size)
        column = adata.obs[sample_key]
        samples = column.unique()
        log_probs = []
        for name in samples:
            idx = np.where(column == name)[0]
            if num_cells_posterior is not None and num_cells_posterior < len(idx):
                # scvi-tools draws from NumPy's global generator: the same np.random.seed
                # picks the same cells in both
                idx = np.random.choice(idx, num_cells_posterior, replace=False)  # noqa: NPY002
            log_probs.append(
                posterior.aggregated_log_prob(loc[idx], scale[idx], us, dof, batch_size)
            )
        adata.obsm["da_log_probs"] = pd.DataFrame(
            np.stack(log_probs, axis=1), index=adata.obs_names, columns=samples
        )

    def get_batch_representation(self, adata=None, indices=None, batch_size=None) -> np.ndarray:
        """Each cell's batch as the networks see it (scvi-tools' ``EmbeddingMixin``).

        Returns
        -------
        float32 ``(cells, embedding_dim)``: the learned embedding rows with
        ``batch_representation="embedding"``; ``(cells, n_batch)`` one-hot otherwise (where
        scvi-tools raises ``KeyError``).
        """
        del batch_size  # a table lookup: no minibatches
        adata, indices, _, _ = self._query_inputs(adata, indices, None, need_data=False)
        codes = reglib.registry_arrays(adata, self.registry_, counts=False)["batch_index"]
        return _compat.batch_representation(self.config, self.variables, codes[indices])

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
        silent: bool = True,
    ):
        """Counts drawn from p(x | z), z ~ q(z | x): ``sparse.GCXS`` float32 of shape
        ``(cells, genes)``, or ``(cells, genes, n_samples)`` when ``n_samples > 1``.
        ``silent`` is accepted for scvi-tools' signature (there is no progress bar)."""
        del silent
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
        0-d float64 (the mean of per-minibatch means, as scvi-tools' ``numpy.float64``), or
        ``(cells,)`` values.
        """
        self._refuse_if_minified("get_marginal_ll")
        _, query = self._query(adata, indices, batch_size)
        out = posterior.get_marginal_ll(query, n_mc_samples, return_mean, n_mc_samples_per_pass)
        return _compat.scalar(out) if return_mean else out

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
        silent: bool = True,
    ) -> pd.DataFrame:
        """Gene-gene correlation ``(genes, genes)`` of denoised expression samples;
        ``silent`` is accepted for scvi-tools' signature (there is no progress bar)."""
        del silent
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
        0-d float64 (a NumPy scalar: a ``float`` with ``ndim``/``item()``, as scvi-tools'
        0-d tensor), the mean over cells; ``(cells,)`` values with ``return_mean=False``.
        """
        self._refuse_if_minified("get_elbo")
        terms = self._elbo_terms(adata, indices, batch_size)
        elbo = -sum(terms[name] for name in (RECONSTRUCTION, KL_LOCAL, KL_GLOBAL) if name in terms)
        return _compat.scalar(np.mean(elbo)) if return_mean else elbo

    def get_reconstruction_error(
        self, adata=None, indices=None, batch_size: int | None = None, return_mean: bool = True
    ) -> dict:
        """Reconstruction negative log-likelihood (positive; lower is better).

        Returns
        -------
        ``{"reconstruction_loss": value}``: a 0-d float64 (mean over cells) or ``(cells,)``.
        """
        self._refuse_if_minified("get_reconstruction_error")
        rec = self._elbo_terms(adata, indices, batch_size)[RECONSTRUCTION]
        return {"reconstruction_loss": _compat.scalar(np.mean(rec)) if return_mean else rec}
