"""The contract between a model and the engine: a :class:`ModelDef` of pure functions.

The training engine (:mod:`jaxvi.train`) and the query runner (:mod:`jaxvi.posterior`) know a
model only through this value, never through a concrete Flax module. A second model (scANVI,
or a research model outside the package) is a new ``ModelDef``; nothing in the engine changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax

__all__ = ["LossOutput", "ModelDef", "RECONSTRUCTION", "KL_LOCAL", "KL_GLOBAL"]

# Terms the engine turns into scvi-tools' ELBO metrics (``elbo_train`` is their sum); any other
# term is reported as ``<name>_train`` / ``<name>_validation`` as it is.
RECONSTRUCTION, KL_LOCAL, KL_GLOBAL = "reconstruction_loss", "kl_local", "kl_global"


class LossOutput(NamedTuple):
    """What a model's loss returns for one minibatch (scvi-tools' ``LossOutput``, as arrays).

    Attributes
    ----------
    loss
        ``()`` the objective that is differentiated: a mean over the minibatch's real cells
        (padding cells, ``mask == 0``, excluded).
    terms
        Named values reported in the history: each either per cell ``(cells,)`` (the engine
        sums it over real cells and divides by their number) or a minibatch scalar ``()``
        (weighted by the minibatch's number of real cells, as Lightning aggregates a logged
        value over an epoch). ``"reconstruction_loss"``, ``"kl_local"`` and ``"kl_global"``
        make up the ELBO.
    """

    loss: jax.Array
    terms: Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """A model as the engine sees it: three pure functions over a variables pytree.

    Attributes
    ----------
    name
        A short name (used in messages and saved checkpoints).
    init
        ``init(key) -> variables``: a fresh ``{"params": ..., "batch_stats": ...[,
        "buffers": ...]}`` pytree (``buffers`` are constants that are saved but not trained).
    loss
        ``loss(key, variables, batch, *, training, kl_weight) -> (LossOutput, batch_stats)``:
        ``key`` may be None (no sampling: posterior means, no dropout); ``batch`` is a
        :class:`jaxvi.data.Minibatch`; ``training`` selects dropout and batch-norm batch
        statistics; ``kl_weight`` is a ``()`` float scalar (KL warm-up). ``batch_stats`` are
        the updated batch-norm statistics (the input ones when nothing changed).
    trainable
        ``trainable(params) -> pytree of bool`` like ``params``: which parameters the
        optimizer may update (PyTorch never updates a parameter without a gradient, so
        parameters the loss does not use are marked False).
    prefixed_terms
        Names of terms reported as ``train_<name>`` / ``validation_<name>`` (scvi-tools'
        ``log_with_mode``, e.g. scANVI's classification metrics) instead of
        ``<name>_train`` / ``<name>_validation``.
    """

    name: str
    init: Callable[[jax.Array], dict]
    loss: Callable[..., tuple[LossOutput, dict]]
    trainable: Callable[[dict], dict]
    prefixed_terms: frozenset[str] = frozenset()
