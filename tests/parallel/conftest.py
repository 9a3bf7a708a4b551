"""Helpers shared by the multi-device and multi-process tests: worker scripts run in
subprocesses with their own XLA flags."""

import os
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def _worker_env(n_devices: int | None = None) -> dict:
    """The environment of a worker subprocess: CPU JAX, this checkout's jaxvi and the worker
    scripts importable, and ``n_devices`` fake CPU devices when given."""
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parents[1]), str(HERE), env.get("PYTHONPATH", "")]
    )
    if n_devices:
        # Appended, so the suite's compile flags (tests/conftest.py) reach the workers too.
        flags = env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}"
        env["XLA_FLAGS"] = flags.strip()
    return env


@pytest.fixture(scope="session")
def worker_env():
    """:func:`_worker_env`."""
    return _worker_env


@pytest.fixture(scope="session")
def worker_script():
    """The path of a worker script of this folder, by file name."""
    return lambda name: str(HERE / name)
