"""Several processes (hosts) training one model: JAX's multi-controller runtime.

Every process runs the same script. After :func:`initialize`, ``jax.devices()`` lists the
devices of all processes; ``SCVI.train(devices=-1)`` then builds one mesh over all of them,
each process reads only the cells its own devices hold (``adata[start:stop]``: with a backed
AnnData, only those rows come from disk) and XLA's collectives keep the replicated parameters
identical everywhere. At the end every process holds the same trained model.

Launching:

* **Slurm**: ``srun python train.py`` with one task per host (or per GPU); ``initialize()``
  with no arguments reads the Slurm environment.
* **Kubernetes / any cluster**: start one process per host with the same command and call
  ``initialize(coordinator_address="<host0>:<port>", num_processes=N, process_id=i)``
  (``i`` from the pod index, e.g. a StatefulSet ordinal or ``JOB_COMPLETION_INDEX``).
* **TPU pods**: run the script on every worker (``gcloud compute tpus tpu-vm ssh ...
  --worker=all``); ``initialize()`` finds the pod's topology itself.
* **CPU processes** (tests, debugging): as for Kubernetes, on ``127.0.0.1``; the CPU
  collectives use Gloo, which :func:`initialize` selects.
"""

from __future__ import annotations

import jax

__all__ = ["initialize", "is_initialized", "process_count", "process_index"]


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids=None,
    **kwargs,
) -> None:
    """Join the processes of one job (``jax.distributed.initialize``), before any JAX work.

    Parameters
    ----------
    coordinator_address
        ``"host:port"`` of process 0; None lets JAX read it from Slurm, a TPU pod or the
        environment.
    num_processes, process_id
        Number of processes and this process's rank (None: from the environment).
    local_device_ids
        Devices of this host this process drives (default all).
    **kwargs
        Passed on to ``jax.distributed.initialize``.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        **kwargs,
    )


def is_initialized() -> bool:
    """Whether this process is one of several in a job (after :func:`initialize`)."""
    return jax.process_count() > 1


def process_count() -> int:
    """Number of processes in the job (1 without :func:`initialize`)."""
    return jax.process_count()


def process_index() -> int:
    """This process's rank, ``0 .. process_count() - 1``."""
    return jax.process_index()
