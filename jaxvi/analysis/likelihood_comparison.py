"""Compare likelihoods on the same counts: fit each one, score each on held-out cells.

:func:`compare_likelihoods` trains one ``SCVI`` per likelihood on the same AnnData with the same
seed (hence the same train / held-out split and initial network weights) and scores it on the
held-out cells:

* ``marginal_ll``: importance-sampled log p(x) per cell (``get_marginal_ll``), higher is better;
* ``elbo``: the evidence lower bound per cell (``get_elbo``), higher is better;
* ``cv_log_ratio`` / ``cv_pearson``: per-gene coefficient of variation across cells of
  posterior predictive draws against the observed one (median ``|log(cv_pred / cv_obs)|``,
  lower is better; Pearson r of ``log cv``, higher is better);
* ``zero_mae`` / ``zero_bias``: per-gene fraction of zeros in posterior predictive draws
  against the observed fraction (mean absolute error, and mean of predicted minus observed);
* ``train_s``, ``cells_per_s``: wall time of ``train()`` (compilation included) and training
  throughput.

:func:`synthetic_counts` draws counts from a registered likelihood with known parameters, so
that a comparison has a right answer. Only count likelihoods make sense here: a density such as
``"normal"`` has a log-likelihood that is not comparable with a probability mass.
"""

from __future__ import annotations

import time

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import scipy.sparse as sp

from jaxvi._settings import settings
from jaxvi.likelihoods import PxParams, get_likelihood
from jaxvi.model import SCVI

__all__ = [
    "COUNT_LIKELIHOODS",
    "compare_likelihoods",
    "predictive_checks",
    "synthetic_counts",
]

COUNT_LIKELIHOODS = ("poisson", "nb", "zinb", "zip", "zinb-gene")


def synthetic_counts(
    likelihood: str,
    n_cells: int = 1000,
    n_genes: int = 200,
    n_groups: int = 5,
    seed: int = 0,
) -> anndata.AnnData:
    """Counts ``(n_cells, n_genes)`` drawn from the registered ``likelihood``.

    Cells fall in ``n_groups`` groups (``obs["group"]``); each group changes ~20% of genes
    (log-fold-change N(0, 1.5)); library sizes are log-normal around 1,000. The mean is
    ``library * softmax(gene base + group effect)``; ``theta`` (if read) is per gene,
    log-normal around 2; gate logits (if read) are per gene N(-1.5, 1), plus a per-group
    N(0, 1) change when the gate is per cell and gene.

    Returns
    -------
    AnnData with float32 CSR counts in ``X`` and the true parameters: ``layers["true_mu"]``,
    ``var["true_theta"]``, ``var["true_zi_logits"]`` (the per-gene part of the gate).
    """
    lik = get_likelihood(likelihood)
    rng = np.random.default_rng(seed)
    groups = rng.integers(n_groups, size=n_cells)
    log_base = rng.normal(0.0, 1.5, n_genes)
    lfc = rng.normal(0.0, 1.5, (n_groups, n_genes)) * (rng.random((n_groups, n_genes)) < 0.2)
    logits = log_base + lfc[groups]
    scale = np.exp(logits - logits.max(1, keepdims=True))
    scale /= scale.sum(1, keepdims=True)
    library = rng.lognormal(np.log(1000.0), 0.3, n_cells)
    mu = (library[:, None] * scale).astype(np.float32)
    theta = rng.lognormal(np.log(2.0), 0.5, n_genes).astype(np.float32)
    zi_gene = rng.normal(-1.5, 1.0, n_genes).astype(np.float32)
    zi = zi_gene
    if lik.zi_logits_shape == "cell-gene":
        zi = (zi_gene + rng.normal(0.0, 1.0, (n_groups, n_genes))[groups]).astype(np.float32)
    params = PxParams(
        jnp.asarray(mu),
        jnp.asarray(theta) if lik.uses_theta else None,
        jnp.asarray(zi) if lik.uses_zi_logits else None,
    )
    x = np.asarray(jax.jit(lik.sample)(jax.random.key(seed), params), np.float32)
    adata = anndata.AnnData(
        sp.csr_matrix(x),
        obs=pd.DataFrame(
            {"group": pd.Categorical([f"g{g}" for g in groups])},
            index=[f"cell{i}" for i in range(n_cells)],
        ),
        var=pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)]),
    )
    adata.layers["true_mu"] = mu
    adata.var["true_theta"] = theta
    adata.var["true_zi_logits"] = zi_gene
    adata.uns["true_likelihood"] = likelihood
    return adata


def predictive_checks(x: np.ndarray, draws: np.ndarray) -> dict:
    """Per-gene coefficient of variation and zero fraction, observed against predicted.

    Parameters
    ----------
    x
        Observed counts ``(cells, genes)``.
    draws
        Posterior predictive draws ``(cells, genes, n_samples)``.

    Returns
    -------
    dict of scalars ``cv_log_ratio``, ``cv_pearson``, ``zero_mae``, ``zero_bias`` and per-gene
    arrays ``cv_obs``, ``cv_pred``, ``zero_obs``, ``zero_pred`` (each ``(genes,)``). The CV uses
    genes with a non-zero observed and predicted mean.
    """
    x = np.asarray(x, np.float64)
    draws = np.asarray(draws, np.float64)
    if draws.ndim == 2:
        draws = draws[..., None]

    def cv(a):  # across cells (axis 0)
        m = a.mean(0)
        return np.where(m > 0, a.std(0) / np.where(m > 0, m, 1.0), np.nan)

    cv_obs = cv(x)
    cv_pred = np.nanmean(np.stack([cv(draws[..., s]) for s in range(draws.shape[-1])]), 0)
    ok = np.isfinite(cv_obs) & np.isfinite(cv_pred) & (cv_obs > 0) & (cv_pred > 0)
    log_ratio = np.log(cv_pred[ok] / cv_obs[ok])
    zero_obs = (x == 0).mean(0)
    zero_pred = (draws == 0).mean((0, 2))
    pearson = np.nan  # undefined with fewer than 2 usable genes or a constant CV
    if ok.sum() >= 2 and np.ptp(cv_obs[ok]) > 0 and np.ptp(cv_pred[ok]) > 0:
        pearson = float(np.corrcoef(np.log(cv_obs[ok]), np.log(cv_pred[ok]))[0, 1])
    return {
        "cv_log_ratio": float(np.median(np.abs(log_ratio))) if ok.any() else np.nan,
        "cv_pearson": pearson,
        "zero_mae": float(np.mean(np.abs(zero_pred - zero_obs))),
        "zero_bias": float(np.mean(zero_pred - zero_obs)),
        "cv_obs": cv_obs,
        "cv_pred": cv_pred,
        "zero_obs": zero_obs,
        "zero_pred": zero_pred,
    }


def compare_likelihoods(
    adata: anndata.AnnData,
    likelihoods=COUNT_LIKELIHOODS,
    *,
    max_epochs: int = 200,
    train_size: float = 0.8,
    n_mc_samples: int = 200,
    n_pp_samples: int = 10,
    seed: int = 0,
    per_gene: bool = False,
    model_kwargs: dict | None = None,
    train_kwargs: dict | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Train one ``SCVI`` per likelihood on ``adata`` and score each on the held-out cells.

    Parameters
    ----------
    adata
        AnnData already registered with ``SCVI.setup_anndata``.
    likelihoods
        Registered names or :class:`~jaxvi.likelihoods.Likelihood` objects.
    max_epochs, train_size
        Training length and the fraction of cells trained on; the rest are held out (the same
        cells for every likelihood: ``jaxvi.settings.seed`` is set to ``seed`` before each).
    n_mc_samples
        Importance samples per held-out cell for the marginal log-likelihood.
    n_pp_samples
        Posterior predictive draws per held-out cell for the CV and zero checks.
    per_gene
        Also return the per-gene arrays of :func:`predictive_checks`.
    model_kwargs, train_kwargs
        Extra arguments for ``SCVI(...)`` and ``train(...)``.

    Returns
    -------
    ``(table, extra)``: a DataFrame indexed by likelihood with the columns listed in the module
    docstring plus ``epochs`` and ``n_heldout``; ``extra`` maps each likelihood to its per-gene
    arrays (empty unless ``per_gene``) and holds the held-out indices under ``"heldout"``.
    """

    model_kwargs = dict(model_kwargs or {})
    train_kwargs = {"enable_progress_bar": False, **(train_kwargs or {})}
    if not 0.0 < train_size < 1.0:
        raise ValueError(
            f"`train_size` must be in (0, 1) to leave held-out cells, got {train_size}."
        )
    rows, extra, heldout = {}, {}, None
    old_seed = settings.seed
    try:
        for lik in likelihoods:
            settings.seed = seed
            model = SCVI(adata, gene_likelihood=lik, **model_kwargs)
            name = model.config.gene_likelihood
            t0 = time.perf_counter()
            model.train(max_epochs=max_epochs, train_size=train_size, **train_kwargs)
            train_s = time.perf_counter() - t0
            val = np.sort(np.asarray(model.validation_indices))
            if heldout is None:
                heldout = val
            elif not np.array_equal(heldout, val):
                raise RuntimeError("The held-out cells differ between likelihoods.")
            x = adata.X[val]
            x = x.toarray() if sp.issparse(x) else np.asarray(x)
            draws = model.posterior_predictive_sample(indices=val, n_samples=n_pp_samples)
            draws = draws.todense() if hasattr(draws, "todense") else np.asarray(draws)
            checks = predictive_checks(x, draws)
            n_train = len(model.train_indices)
            epochs = len(model.history["elbo_train"])
            rows[name] = {
                "marginal_ll": float(
                    np.mean(
                        model.get_marginal_ll(
                            indices=val,
                            n_mc_samples=n_mc_samples,
                            n_mc_samples_per_pass=min(n_mc_samples, 50),
                            return_mean=False,
                        )
                    )
                ),
                "elbo": float(model.get_elbo(indices=val)),
                **{k: v for k, v in checks.items() if np.ndim(v) == 0},
                "train_s": train_s,
                "cells_per_s": n_train * epochs / train_s,
                "epochs": epochs,
                "n_heldout": len(val),
            }
            extra[name] = {k: v for k, v in checks.items() if np.ndim(v) == 1} if per_gene else {}
    finally:
        settings.seed = old_seed
    extra["heldout"] = heldout
    return pd.DataFrame.from_dict(rows, orient="index"), extra
