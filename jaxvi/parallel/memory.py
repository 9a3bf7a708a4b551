"""Device memory policy: JAX's GPU preallocation, and clear errors when data does not fit.

By default JAX reserves 75% of a GPU's memory when it first touches the GPU, which starves a
PyTorch or TensorFlow process (or a second JAX one) on the same card. :func:`configure` sets
JAX's allocator environment variables; it must run before JAX initialises its GPU backend
(before the first array is created), e.g. right after ``import jaxvi``.

When the counts or a training step do not fit on the device, jaxvi raises a ``MemoryError``
that says how large the data is and what to do (:func:`out_of_memory_error`) instead of
XLA's ``RESOURCE_EXHAUSTED`` trace. :func:`estimate` says beforehand how much device memory
training an scVI model takes, and :func:`largest_dataset` how many cells fit on a device.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

__all__ = [
    "MemoryEstimate",
    "configure",
    "estimate",
    "is_out_of_memory",
    "largest_dataset",
    "out_of_memory_error",
    "scvi_parameter_count",
]

# Bytes of one step's working memory per minibatch cell and gene, in float32 words: the
# densified counts, the decoder's rate, scale and gate, the likelihood's terms and their
# gradients. Measured from XLA's buffer assignment of the compiled epoch on the CPU (19.9-20.7
# words over batch 128-1024 and 1k-4k genes, tests/parallel/test_memory_estimate.py).
_STEP_WORDS_PER_GENE = 20
# ... and per hidden unit and layer (encoder and decoder activations and their gradients).
_STEP_WORDS_PER_HIDDEN = 8
# Per cell, besides the counts: batch code, label, the per-cell log x! (4 bytes each) and the
# epoch's index grid (cells, permutation, minibatch indices and mask: 4 bytes each).
_CELL_BYTES = 12 + 16


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


def scvi_parameter_count(
    n_genes: int,
    n_hidden: int = 128,
    n_latent: int = 10,
    n_layers: int = 1,
    n_batch: int = 1,
    n_labels: int = 1,
    dispersion: str = "gene",
    gene_likelihood: str = "zinb",
    use_observed_lib_size: bool = True,
) -> tuple[int, int]:
    """``(all, trained)``: the numbers of float32 parameters of scVI's VAE (batch-norm
    statistics included) and of those the optimizer updates (Adam keeps two moments each).

    The layout is scvi-tools': an encoder of ``n_layers`` hidden layers (the first from the
    genes), a one-layer library encoder, a decoder of ``n_layers`` layers from the latent and
    the batch one-hot (injected into every layer; none for one batch), and the scale,
    dispersion and gate heads (all present; only the used ones are trained).
    """
    g, h, z, nl = int(n_genes), int(n_hidden), int(n_latent), int(n_layers)
    b = int(n_batch) if n_batch > 1 else 0
    norm = 4 * h  # batch norm: scale, bias, running mean and variance
    layer = h + norm  # bias and norm of a hidden layer
    z_encoder = g * h + (nl - 1) * h * h + nl * layer + 2 * (h * z + z)
    l_encoder = g * h + layer + 2 * (h + 1)
    decoder = (z + b) * h + (nl - 1) * (h + b) * h + nl * layer
    head = h * g + g
    px_r = {"gene": g, "gene-batch": g * max(int(n_batch), 1), "gene-label": g * n_labels}
    px_r = px_r.get(dispersion, 0)  # gene-cell: the px_r_decoder head instead
    total = z_encoder + l_encoder + decoder + 3 * head + px_r
    if not use_observed_lib_size:  # the library prior's per-batch mean and variance
        total += 2 * max(int(n_batch), 1)
    gated = gene_likelihood in ("zinb", "zip", "zinb-gene")
    theta = gene_likelihood not in ("poisson", "zip")
    trained = z_encoder + decoder + head - 4 * nl * h  # running statistics are not trained
    trained += 0 if use_observed_lib_size else l_encoder - 2 * h
    trained += head if gated else 0
    if theta:
        trained += head if dispersion == "gene-cell" else px_r
    return total, trained


class MemoryEstimate(NamedTuple):
    """Device bytes of training an scVI model (:func:`estimate`).

    Attributes
    ----------
    data
        The cells on the device: counts (dense float32, or CSR values and column indices with
        row pointers), covariates and the epoch's index grid.
    parameters
        Parameters and batch-norm statistics (float32).
    optimizer_state
        Adam's two moments of the trained parameters.
    activations
        One step's working memory (minibatch, activations, likelihood terms, gradients).
    total
        What training holds at its peak: the data, two copies of the parameters and optimizer
        state (an epoch's input is kept for the non-finite guard's replay while it writes its
        output) and one step's working memory.
    """

    data: int
    parameters: int
    optimizer_state: int
    activations: int
    total: int


def estimate(
    n_cells: int,
    n_genes: int,
    batch_size: int = 128,
    n_hidden: int = 128,
    n_latent: int = 10,
    n_layers: int = 1,
    sparse: bool = False,
    density: float = 0.1,
    n_batch: int = 1,
    **model_options,
) -> MemoryEstimate:
    """Device memory of training scVI on ``n_cells`` x ``n_genes`` counts in memory.

    Parameters
    ----------
    n_cells, n_genes
        The dataset's shape (the cells held on the device: all of them, or one streamed
        block's worth).
    batch_size
        Cells per minibatch.
    n_hidden, n_latent, n_layers, n_batch
        The model (as ``SCVI(...)``; ``n_batch`` the number of batches).
    sparse
        Counts kept as CSR on the device (``train(load_sparse_tensor=True)``, or automatically
        above 2 GiB of dense counts), with ``density`` the fraction of non-zero counts.
    **model_options
        ``n_labels``, ``dispersion``, ``gene_likelihood``, ``use_observed_lib_size`` (see
        :func:`scvi_parameter_count`).

    Returns
    -------
    :class:`MemoryEstimate` in bytes. Calibrated against XLA's buffer assignment of the
    compiled epoch on the CPU (within 25% there); a GPU's allocator adds fragmentation, and
    JAX reserves 75% of a GPU by default (:func:`configure`).
    """
    n_cells, n_genes, batch_size = int(n_cells), int(n_genes), int(batch_size)
    if n_cells < 1 or n_genes < 1 or batch_size < 1:
        raise ValueError(
            f"n_cells, n_genes and batch_size must be positive, got {n_cells}, {n_genes}, "
            f"{batch_size}."
        )
    if sparse and not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}.")
    total, trained = scvi_parameter_count(
        n_genes, n_hidden, n_latent, n_layers, n_batch, **model_options
    )
    if sparse:
        nnz = math.ceil(float(density) * n_cells * n_genes)
        pointer = 8 if nnz >= 2**31 else 4
        counts = 8 * nnz + pointer * (n_cells + 1)
    else:
        counts = 4 * n_cells * n_genes
    data = counts + _CELL_BYTES * n_cells
    parameters = 4 * total
    optimizer_state = 8 * trained
    batch = min(batch_size, n_cells)
    words = _STEP_WORDS_PER_GENE * n_genes + _STEP_WORDS_PER_HIDDEN * int(n_hidden) * n_layers
    activations = 4 * batch * words
    peak = data + 2 * (parameters + optimizer_state) + activations
    return MemoryEstimate(data, parameters, optimizer_state, activations, peak)


def largest_dataset(
    device_bytes: float,
    n_genes: int,
    batch_size: int = 128,
    *,
    sparse: bool = False,
    density: float = 0.1,
    usable: float = 0.9,
    **options,
) -> int:
    """The most cells whose training fits in ``usable * device_bytes`` (:func:`estimate`,
    same options); 0 when not even one minibatch fits."""
    budget = float(usable) * float(device_bytes)
    kwargs = {"sparse": sparse, "density": density, **options}

    def fits(n: int) -> bool:
        return estimate(n, n_genes, batch_size, **kwargs).total <= budget

    if not fits(int(batch_size)):
        return 0
    lo, hi = int(batch_size), 2 * int(batch_size)
    while fits(hi):  # the estimate grows with the cells: bracket, then bisect
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
