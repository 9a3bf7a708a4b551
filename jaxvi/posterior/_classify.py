"""scANVI's classifier as a query: class probabilities of cells (scvi-tools' ``predict``)."""

from __future__ import annotations

import functools

import jax
import numpy as np

from jaxvi.data import CellData, gather
from jaxvi.module import SCANVAE
from jaxvi.posterior._programs import _scan_chunks
from jaxvi.posterior._runner import Query, run_query

__all__ = ["classify_program", "predict_probabilities"]


@functools.lru_cache(maxsize=32)
def classify_program(module: SCANVAE, sample: bool):
    """``run(key, variables, data, idx) -> (n_chunks, batch, n_labels)`` class probabilities
    (the softmax of the logits; the classifier's output as it is with
    ``classifier_logits=False``), from the posterior mean of ``q(z | x)`` or, with ``sample``,
    one draw per cell from ``fold_in(key, chunk)`` (:meth:`SCANVAE.classify`)."""
    logits = module.config.classifier_logits

    def run(key, variables, data: CellData, idx):
        def body(i, idx_i):
            batch = gather(data, idx_i)
            k = jax.random.fold_in(key, i) if sample else None
            out = module.apply(variables, batch, key=k, method=SCANVAE.classify)
            return jax.nn.softmax(out, axis=-1) if logits else out

        return _scan_chunks(body, idx)

    return jax.jit(run)


def predict_probabilities(query: Query, use_posterior_mean: bool = True) -> np.ndarray:
    """Class probabilities of the query's cells, ``(cells, n_labels)`` float32.

    Parameters
    ----------
    query
        A :class:`Query` whose ``module`` is a :class:`~jaxvi.module.SCANVAE`.
    use_posterior_mean
        Classify the posterior mean of ``q(z | x)`` (deterministic); False: one draw per cell.
    """
    if not isinstance(query.module, SCANVAE):
        raise TypeError(f"predict needs a SCANVAE module, got {type(query.module).__name__}.")
    program = classify_program(query.module, not use_posterior_mean)
    return np.asarray(run_query(program, query), np.float32)
