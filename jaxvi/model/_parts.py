"""The plain parts a model is made of, and checks shared by every model class.

Every way of making a model — ``SCVI(adata)``, ``load``, ``from_scvi_tools``,
``load_query_data`` — ends in one constructor, :meth:`jaxvi.model.BaseModel._init_from_parts`,
handed a :class:`ModelParts`. Readers of model files return plain data (dicts and arrays) and
never build a model.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import numpy as np
import pandas as pd

from jaxvi import io, schema
from jaxvi.module import ModelDef
from jaxvi.parallel.memory import is_out_of_memory, out_of_memory_error

__all__ = [
    "ModelParts",
    "QueryTraining",
    "check_accelerator",
    "check_variables",
    "history_from_json",
    "history_to_json",
    "out_of_memory_as",
]


class QueryTraining(NamedTuple):
    """How :meth:`~jaxvi.model.BaseModel.train` trains a scArches query model.

    Attributes
    ----------
    update_mask
        A pytree of bool arrays shaped like the parameters (False: the entry never changes),
        or None (every entry trains).
    network_training
        False: the loss runs the network in evaluation mode (no dropout, batch norm with its
        fixed running statistics), as scvi-tools 1.4.2 trains a query model.
    """

    update_mask: Any = None
    network_training: bool = True


class ModelParts(NamedTuple):
    """Everything a model instance holds, as plain values.

    Attributes
    ----------
    registry
        The data registry (:mod:`jaxvi.data.registry`), a JSON-friendly dict.
    init_params
        The model's constructor arguments (``n_hidden``, ``n_latent``, ...).
    variables
        ``{"params", "batch_stats"[, "buffers"]}`` pytree of arrays.
    adata
        The AnnData the model works on, or None.
    history
        Per-epoch metrics, one one-column DataFrame per name.
    is_trained
        Whether training has run.
    indices
        ``(train, validation, test)`` cell indices of the last training, each an int array
        or None.
    query_training
        Set by ``load_query_data``: how training treats a query model.
    config
        The module configuration as saved (a jaxvi file keeps it); None: derived from the
        registry and ``init_params``.
    """

    registry: dict
    init_params: dict
    variables: dict
    adata: Any = None
    history: dict = {}
    is_trained: bool = False
    indices: tuple = (None, None, None)
    query_training: QueryTraining = QueryTraining()
    config: Any = None


def check_variables(variables: dict, model_def: ModelDef) -> None:
    """Refuse ``variables`` whose arrays do not match the model's in names, shapes and
    dtypes, or hold non-finite values or negative batch-norm variances
    (:func:`jaxvi.schema.check_weights`).

    Raises
    ------
    ValueError
        Naming the missing, extra, mis-shaped, mistyped or non-finite arrays.
    """
    shapes = jax.eval_shape(model_def.init, jax.random.key(0))
    expected = {k: v.shape for k, v in io.flatten_tree(_empty_like(shapes)).items()}
    got = io.flatten_tree(variables)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    if missing or extra:
        raise ValueError(f"Saved arrays do not match the model: missing {missing}, extra {extra}.")
    for k, shape in expected.items():
        if got[k].shape != shape:
            raise ValueError(f"Saved array {k} has shape {got[k].shape}, expected {shape}.")
    dtypes = {k: v.dtype for k, v in io.flatten_tree(_empty_like(shapes)).items()}
    schema.check_weights(got, "saved model", dtypes)  # dtypes, finite, variances >= 0


def _empty_like(shapes):
    return jax.tree_util.tree_map(lambda s: np.empty(s.shape, s.dtype), shapes)


def history_to_json(history: dict[str, pd.DataFrame]) -> dict:
    """``{name: {"epoch": [...], "values": [...]}}`` of a history dict."""
    return {
        k: {"epoch": [int(i) for i in v.index], "values": [float(x) for x in v.iloc[:, 0]]}
        for k, v in history.items()
    }


def history_from_json(d: dict) -> dict[str, pd.DataFrame]:
    """The inverse of :func:`history_to_json`."""
    return {
        k: pd.DataFrame({k: v["values"]}, index=pd.Index(v["epoch"], name="epoch"))
        for k, v in d.items()
    }


@contextlib.contextmanager
def out_of_memory_as(what: str):
    """Turn XLA's device out-of-memory error into a clear ``MemoryError``."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if not is_out_of_memory(e):
            raise
        raise out_of_memory_error(what, None, e) from None


def check_accelerator(accelerator: str) -> None:
    """Refuse an ``accelerator`` that is not JAX's default backend."""
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
