"""Device memory policy: JAX's GPU preallocation, and clear errors when data does not fit.

By default JAX reserves 75% of a GPU's memory when it first touches the GPU, which starves a
PyTorch or TensorFlow process (or a second JAX one) on the same card. :func:`configure` sets
JAX's allocator environment variables; it must run before JAX initialises its GPU backend
(before the first array is created), e.g. right after ``import jaxvi``.

When the counts or a training step do not fit on the device, jaxvi raises a ``MemoryError``
that says how large the data is and what to do (:func:`out_of_memory_error`) instead of
XLA's ``RESOURCE_EXHAUSTED`` trace.
"""

from __future__ import annotations

import os

__all__ = ["configure", "is_out_of_memory", "out_of_memory_error"]


def configure(
    preallocate: bool | None = None,
    fraction: float | None = None,
    allocator: str | None = None,
) -> dict:
    """Set JAX's GPU memory policy for this process (before JAX uses the GPU).

    Parameters
    ----------
    preallocate
        False: allocate on demand (``XLA_PYTHON_CLIENT_PREALLOCATE=false``), the friendliest
        choice next to other frameworks; True: reserve up front (JAX's default, fastest).
    fraction
        Share of the GPU memory to reserve or cap at (``XLA_PYTHON_CLIENT_MEM_FRACTION``,
        JAX's default 0.75).
    allocator
        ``"platform"`` frees memory as soon as arrays die (slow; for debugging) or
        ``"bfc"`` (JAX's default).

    Returns
    -------
    dict of the environment variables now set.
    """
    env = {}
    if preallocate is not None:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "true" if preallocate else "false"
    if fraction is not None:
        if not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{float(fraction):.3f}"
    if allocator is not None:
        if allocator not in ("platform", "bfc"):
            raise ValueError(f"allocator must be 'platform' or 'bfc', got {allocator!r}.")
        env["XLA_PYTHON_CLIENT_ALLOCATOR"] = allocator
    from jax._src import xla_bridge

    if getattr(xla_bridge, "_backends", None):
        raise RuntimeError(
            "JAX has already initialised its backends; call jaxvi.parallel.memory.configure() "
            "before creating any array (or set the XLA_PYTHON_CLIENT_* variables before starting "
            "Python)."
        )
    os.environ.update(env)
    return env


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA's device out-of-memory error."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def out_of_memory_error(what: str, n_bytes: int | None, error: BaseException) -> MemoryError:
    """A ``MemoryError`` naming what did not fit, its size and the ways around it."""
    size = "" if n_bytes is None else f" ({n_bytes / 2**30:.2f} GiB)"
    return MemoryError(
        f"{what}{size} does not fit in device memory. Options: keep sparse counts sparse on "
        "the device (train(load_sparse_tensor=True)); stream the cells from disk (open the "
        "AnnData with backed='r'); shard the cells over several devices (train(devices=-1)); "
        "a smaller batch_size; or give JAX more of the GPU (jaxvi.parallel.memory.configure). XLA "
        f"said: {str(error).splitlines()[0][:300]}"
    )
