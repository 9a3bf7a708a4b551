"""XLA compilation: the persistent compilation cache, and compiles that are announced and timed.

jaxvi turns on JAX's persistent compilation cache in a per-user directory when it is
imported, so a second run of the same script loads its compiled programs from disk instead of
compiling them again (``jaxvi.settings.compilation_cache_dir`` moves or disables it). The
directory is, in order: ``$JAXVI_CACHE_DIR`` (empty: no cache), a directory already given to
JAX (``JAX_COMPILATION_CACHE_DIR``), ``$XDG_CACHE_HOME/jaxvi/xla``, ``~/.cache/jaxvi/xla``.

:func:`compile_ahead` compiles a jitted function for given arguments before its first call,
with a message through the ``jaxvi`` logger (INFO) and an optional progress-bar phase, so a
bar's time estimate starts after compilation. :func:`count_compiles` counts the XLA programs
compiled (or loaded from the persistent cache) while a block runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings

import jax
from jax.experimental.compilation_cache import compilation_cache as _jax_cache

__all__ = [
    "CACHE_ENV",
    "cache_dir",
    "compile_ahead",
    "count_compiles",
    "default_cache_dir",
    "set_cache_dir",
]

logger = logging.getLogger("jaxvi")

CACHE_ENV = "JAXVI_CACHE_DIR"
# JAX's events: one per program handed to XLA (compiled or loaded from the persistent cache),
# and one per persistent-cache hit.
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_state = {"dir": None, "warned": set(), "counting": 0}
_counts = {"compiles": 0, "hits": 0}
_names: list[str] = []  # the compiled programs' names while a count_compiles block is open
_lock = threading.Lock()


def default_cache_dir() -> str | None:
    """The cache directory jaxvi uses unless told otherwise (see the module docstring)."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return env or None
    if jax.config.jax_compilation_cache_dir:
        return str(jax.config.jax_compilation_cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jaxvi", "xla")


def cache_dir() -> str | None:
    """The persistent compilation cache directory in use, or None when it is off."""
    return _state["dir"]


def _writable(path: str) -> bool:
    """Whether ``path`` is a writable directory or could be created as one, without creating
    anything (the nearest existing ancestor decides)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            return False
        probe = parent
    return os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK)


def set_cache_dir(path) -> str | None:
    """Point JAX's persistent compilation cache at ``path`` (None or ``""``: off).

    A directory that cannot be written turns the cache off with one warning (per directory);
    compilation goes on as without a cache. Programs compiled from now on are read from and
    written to the new directory. Returns the directory in use (None when off).
    """
    path = None if path in (None, "") else os.path.expanduser(os.fspath(path))
    if path is not None and not _writable(path):
        if path not in _state["warned"]:
            _state["warned"].add(path)
            warnings.warn(
                f"jaxvi's compilation cache directory {path!r} is not writable; compiled "
                "programs will not be kept between runs. Set JAXVI_CACHE_DIR or "
                "jaxvi.settings.compilation_cache_dir to a writable directory (or None).",
                UserWarning,
                stacklevel=3,
            )
        path = None
    if path == _state["dir"] and jax.config.jax_compilation_cache_dir == path:
        return path
    jax.config.update("jax_compilation_cache_dir", path)
    # JAX opens its cache once, at the first compile; start over so the change takes effect.
    _jax_cache.reset_cache()
    _state["dir"] = path
    return path


def _configure_thresholds() -> None:
    """Cache every program, however quick to compile or small: JAX's default (programs that
    took >= 1 s) skips most CPU programs, and a program skipped in one run and written in the
    next would make a warm run compile again. An explicit JAX setting is kept."""
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _on_event(name, *args, **kwargs):
    if name == _COMPILE_EVENT or name == _HIT_EVENT:
        with _lock:
            _counts["compiles" if name == _COMPILE_EVENT else "hits"] += 1
            if name == _COMPILE_EVENT and _state["counting"]:
                _names.append(str(kwargs.get("fun_name", "?")))


jax.monitoring.register_event_listener(_on_event)
jax.monitoring.register_event_duration_secs_listener(_on_event)


class CompileCount:
    """Programs compiled (``compiles``; persistent-cache loads included), their names
    (``names``, e.g. ``"jit(epoch)"``) and those loaded from the persistent cache (``hits``)
    while a :func:`count_compiles` block ran."""

    compiles: int = 0
    hits: int = 0
    names: tuple = ()


@contextlib.contextmanager
def count_compiles():
    """``with count_compiles() as n: ...``: ``n.compiles`` and ``n.hits`` afterwards (counts
    of this process, all threads)."""
    out = CompileCount()
    with _lock:
        before, n_names = dict(_counts), len(_names)
        _state["counting"] += 1
    try:
        yield out
    finally:
        with _lock:
            out.compiles = _counts["compiles"] - before["compiles"]
            out.hits = _counts["hits"] - before["hits"]
            out.names = tuple(_names[n_names:])
            _state["counting"] -= 1
            if not _state["counting"]:
                _names.clear()


def compile_ahead(fn, args, what: str, bar=None) -> float:
    """Compile the jitted ``fn`` for ``args`` now (its first call then runs at once).

    Parameters
    ----------
    fn
        A ``jax.jit`` function.
    args
        The positional arguments of its coming call (nothing is run or donated).
    what
        What is compiled, for the messages (e.g. ``"the training epoch"``).
    bar
        A tqdm bar: its description says so while compiling, and its clock restarts after,
        so the time estimate counts only the epochs (None or a disabled bar: no phase).

    Returns
    -------
    Seconds spent tracing, compiling or loading from the cache.
    """
    show = bar is not None and not getattr(bar, "disable", True)
    if show:
        desc = bar.desc
        bar.set_description(f"{desc} (compiling {what})")
    logger.info("Compiling %s (XLA)...", what)
    t0 = time.perf_counter()
    with count_compiles() as n:
        fn.lower(*args).compile()
    seconds = time.perf_counter() - t0
    hit = n.compiles and n.hits >= n.compiles
    cached = " (from the persistent compilation cache)" if hit else ""
    logger.info("Compiled %s in %.1f s%s.", what, seconds, cached)
    if show:
        bar.set_description(desc)
        bar.unpause()  # the estimate starts now, not before the compile
    return seconds


_configure_thresholds()
set_cache_dir(default_cache_dir())
