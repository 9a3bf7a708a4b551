"""Device memory: :func:`estimate` what training takes, the :func:`largest_dataset` that fits,
and JAX's GPU memory policy (:func:`configure`). The same functions as
:mod:`jaxvi.parallel.memory`, at the top of the package."""

from jaxvi.parallel.memory import (
    MemoryEstimate,
    configure,
    estimate,
    largest_dataset,
    scvi_parameter_count,
)

__all__ = [
    "MemoryEstimate",
    "configure",
    "estimate",
    "largest_dataset",
    "scvi_parameter_count",
]
