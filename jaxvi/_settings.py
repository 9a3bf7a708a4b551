"""Global settings, as ``scvi.settings``: ``jaxvi.settings.seed``, ``batch_size``, ...."""

from __future__ import annotations

import dataclasses

from jaxvi._compilation import cache_dir, set_cache_dir

__all__ = ["Settings", "settings"]


@dataclasses.dataclass
class Settings:
    """Global defaults.

    Attributes
    ----------
    seed
        Seed for parameter initialisation, the data split, training and sampling when a
        method is not given one (scvi-tools' ``settings.seed``; jaxvi defaults to 0 so that
        runs are reproducible).
    batch_size
        Minibatch size of the inference methods when ``batch_size=None`` (128, as scvi-tools).
    stream_chunk_cells
        Consecutive training cells per disk read when training streams from a backed AnnData
        (:mod:`jaxvi.data`; 1024).
    stream_max_host_bytes
        Host memory for the blocks in flight when streaming (1 GiB). The passes over the
        counts at setup (checks, and the library prior of ``use_observed_lib_size=False``)
        read pieces of at most ``stream_max_host_bytes / 32`` stored values.
    inference_bytes_per_call
        Most bytes of (dense float32) counts a prediction method moves to the device in one
        call (256 MiB). Prediction methods keep the data on the host and send it in pieces
        of at most this size (at least one minibatch), so any number of cells goes through
        with bounded device memory. For a backed AnnData each piece is read from disk when
        its call needs it, so this also bounds what a query reads into host memory at once
        (importance weights move their anchors' counts in groups of at most this size).
    compilation_cache_dir
        Where JAX's persistent compilation cache keeps compiled programs, so that a second
        run of the same script skips compilation (default ``$JAXVI_CACHE_DIR``, else
        ``$XDG_CACHE_HOME/jaxvi/xla`` or ``~/.cache/jaxvi/xla``); None turns it off. A
        directory that cannot be written turns it off with a warning.
    """

    seed: int = 0
    batch_size: int = 128
    stream_chunk_cells: int = 1024
    stream_max_host_bytes: int = 2**30
    inference_bytes_per_call: int = 256 * 2**20

    @property
    def compilation_cache_dir(self) -> str | None:
        return cache_dir()

    @compilation_cache_dir.setter
    def compilation_cache_dir(self, path) -> None:
        set_cache_dir(path)


settings = Settings()
