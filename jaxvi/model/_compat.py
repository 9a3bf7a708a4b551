"""Small rules that make jaxvi answer as scvi-tools 1.4.2 does: the external split, the
``on_step`` / ``on_epoch`` history names, 0-d results and the batch representation."""

from __future__ import annotations

import warnings

import numpy as np

__all__ = [
    "batch_representation",
    "external_split",
    "log_flags",
    "scalar",
]


def external_split(external, n_obs: int, batch_size: int, drop_last: bool):
    """``(train, validation, test)`` int64 index arrays from ``datasplitter_kwargs
    ["external_indexing"]``: a list of up to three arrays, the missing ones empty.

    Raises
    ------
    ValueError
        Not a list, an array that is not an ndarray, indices out of range, or overlapping
        sets (scvi-tools' errors).
    Warning
        Duplicate indices within a set, or cells in no set: scvi-tools raises the
        ``Warning`` class itself here, so callers catching it keep working.
    """
    if not isinstance(external, list):
        raise ValueError("External indexing is not of list type")
    if len(external) > 3:
        raise ValueError(f"External indexing has {len(external)} arrays; at most 3.")
    parts = [*external, *([None] * (3 - len(external)))]
    parts = [np.array([], np.int64) if p is None else p for p in parts]
    if not all(isinstance(p, np.ndarray) for p in parts):
        raise ValueError("One of the given external indexing arrays is not a np.array")
    parts = [np.asarray(p).astype(np.int64).ravel() for p in parts]
    for name, p in zip(("train", "valid", "test"), parts, strict=True):
        if len(np.unique(p)) < len(p):
            raise Warning(f"There are duplicate indexing in {name} set")
        if len(p) and (p.min() < 0 or p.max() >= n_obs):
            raise ValueError(f"The {name} indices are out of range for {n_obs} cells.")
    if sum(len(p) for p in parts) < n_obs:
        raise Warning("There are missing indices please fix or remove those lines")
    for (a, b), (na, nb) in zip(
        ((0, 1), (0, 2), (2, 1)),
        (("train", "valid"), ("train", "test"), ("test", "valid")),
        strict=True,
    ):
        if np.intersect1d(parts[a], parts[b]).size:
            raise ValueError(f"There are overlapping indexing between {na} and {nb} sets")
    left = len(parts[0]) % batch_size
    if 0 < left < 3 and not drop_last:
        warnings.warn(
            f"Last batch will have a small size of {left} samples. Consider changing "
            f"batch_size from {batch_size} or the external indices.",
            UserWarning,
            stacklevel=4,
        )
    return tuple(parts)


def log_flags(plan_kw: dict):
    """Take scvi-tools' ``on_step`` / ``on_epoch`` out of ``plan_kw`` and return the history
    key renaming they imply.

    jaxvi runs an epoch as one compiled program and keeps per-epoch values only. With
    ``on_step=True, on_epoch=True`` scvi-tools names its per-epoch entries ``<name>_epoch``;
    jaxvi does the same (its per-step ``train_loss_step`` has no jaxvi counterpart).

    Raises
    ------
    ValueError
        For ``on_epoch=False``: nothing per epoch would be logged, and jaxvi keeps no
        per-step values.
    """
    on_step = bool(plan_kw.pop("on_step", False))
    on_epoch = plan_kw.pop("on_epoch", True)
    if not on_epoch:
        raise ValueError(
            "plan_kwargs on_epoch=False: jaxvi logs per-epoch values only (an epoch is one "
            "compiled program), so nothing would be logged. Use on_epoch=True."
        )
    if not on_step:
        return lambda name: name
    return lambda name: name if name == "kl_weight" or name.endswith("_epoch") else f"{name}_epoch"


def scalar(value) -> np.float64:
    """A 0-d NumPy float64: a ``float`` (``isinstance(x, float)``) that also has ``ndim``,
    ``item()`` and ``shape``, so callers of both scvi-tools' 0-d tensors and floats work."""
    return np.float64(value)


def batch_representation(config, variables: dict, batch_index: np.ndarray) -> np.ndarray:
    """Each cell's batch as the networks see it: ``(cells, embedding_dim)`` rows of the
    learned embedding (``batch_representation="embedding"``, what scvi-tools'
    ``get_batch_representation`` returns), or the ``(cells, n_batch)`` one-hot encoding
    (scvi-tools raises ``KeyError`` there: it has no embedding)."""
    batch_index = np.asarray(batch_index, np.int64).ravel()
    if config.batch_representation == "embedding":
        table = np.asarray(variables["params"]["batch_embedding"]["embedding"], np.float32)
        return table[batch_index]
    return np.eye(config.n_batch, dtype=np.float32)[batch_index]
