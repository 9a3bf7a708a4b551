"""Shared helpers for the benchmark scripts: machine / version / commit info, timing, output.

Nothing here imports jax or torch at module level, so a worker process can set thread
counts and environment variables before the frameworks load.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

# Benchmarks measure compilation as a first run pays it: jaxvi's persistent compilation cache
# is off unless a script (first_minute.py, compare_scvi.py --jax-cache-dir) or the caller
# sets JAXVI_CACHE_DIR.
os.environ.setdefault("JAXVI_CACHE_DIR", "")

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

_PACKAGES = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpy",
    "scipy",
    "anndata",
    "torch",
    "lightning",
    "scvi-tools",
    "jaxvi",
)


# ------------------------------------------------------------------------- machine
def n_cores() -> int:
    """CPU cores this process may run on (affinity-aware)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD-relevant CPU flags (avx*, fma, amx*) from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if re.match(r"^(avx|fma|amx|sse4)", f))
    except OSError:
        pass
    return []


def total_ram_gb() -> float | None:
    """Total physical memory in GiB (``MemTotal``)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except OSError:
        pass
    return None


def machine_info(with_jax: bool = True) -> dict:
    """Host, CPU, cores, RAM, OS, relevant environment and (optionally) JAX devices."""
    info = {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": n_cores(),
        "os_cpu_count": os.cpu_count(),
        "ram_gb": total_ram_gb(),
        "platform": platform.platform(),
        "env": {
            k: os.environ[k]
            for k in sorted(os.environ)
            if k.startswith(("OMP_", "OPENBLAS_", "MKL_", "XLA_", "JAX_", "TF_CPP"))
        },
    }
    if with_jax:
        import jax

        info["jax_backend"] = jax.default_backend()
        info["jax_devices"] = [str(d) for d in jax.devices()]
    return info


def versions() -> dict:
    """Python and package versions (None when a package is not installed)."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_info() -> dict:
    """HEAD commit, whether the working tree is dirty, and which paths differ."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO_DIR, capture_output=True, text=True, check=False
        ).stdout

    # porcelain lines start 'XY path' with X often a space: strip no line's start
    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line.strip()]
    # A copy of the tree whose .git is not the tree's own (the device machine's) names the
    # commit that ran in this variable.
    return {
        "commit": os.environ.get("JAXVI_BENCH_COMMIT") or git("rev-parse", "HEAD").strip() or None,
        "commit_subject": git("log", "-1", "--format=%s").strip() or None,
        "dirty": bool(changed),
        # jaxvi's own sources decide the measured speed; other dirty paths do not.
        "dirty_jaxvi_paths": sorted(p for p in changed if p.startswith("jaxvi/")),
        "dirty_paths": changed[:50],
    }


def git_changed_between(a: str | None, b: str | None, prefix: str = "jaxvi/") -> list[str]:
    """Paths under ``prefix`` that differ between commits ``a`` and ``b``."""
    if not a or not b or a == b:
        return []
    out = subprocess.run(
        ["git", "diff", "--name-only", a, b, "--", prefix],
        cwd=REPO_DIR,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sorted(line for line in out.splitlines() if line)


# -------------------------------------------------------------------------- timing
def now() -> float:
    """Monotonic wall clock in seconds."""
    return time.perf_counter()


@contextlib.contextmanager
def timer(out: dict, key: str):
    """``with timer(d, "train_s"): ...`` stores the elapsed wall seconds in ``d[key]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        out[key] = time.perf_counter() - t0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def current_rss_mb() -> float | None:
    """Current resident set size in MiB (from /proc/self/statm)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def system_busy_s() -> float | None:
    """CPU seconds all processes on this machine have spent busy since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


def own_cpu_s() -> float:
    """CPU seconds (user + system) this process has used."""
    t = os.times()
    return t.user + t.system


class LoadProbe:
    """How much CPU *other* processes used while a block ran (timings are only clean when ~0).

    ``foreign_cpu_s`` = machine-wide busy CPU seconds minus this process's; ``foreign_cores``
    is that divided by the wall time (0 = quiet machine, 1 = one core busy elsewhere).
    """

    def __enter__(self):
        self.t0, self.sys0, self.own0 = time.perf_counter(), system_busy_s(), own_cpu_s()
        self.load0 = os.getloadavg()[0]
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        sys1, own1 = system_busy_s(), own_cpu_s()
        self.result = {"wall_s": wall, "own_cpu_s": own1 - self.own0, "loadavg1_start": self.load0}
        if self.sys0 is not None and sys1 is not None:
            foreign = max(0.0, (sys1 - self.sys0) - (own1 - self.own0))
            self.result["foreign_cpu_s"] = foreign
            self.result["foreign_cores"] = foreign / wall if wall > 0 else None
        return False


def wait_for_quiet(max_wait_s: float, threshold: float = 0.3, window_s: float = 3.0) -> dict:
    """Wait (up to ``max_wait_s``) until other processes use < ``threshold`` cores."""
    t0 = time.perf_counter()
    while True:
        s0 = system_busy_s()
        time.sleep(window_s)
        s1 = system_busy_s()
        busy = None if s0 is None or s1 is None else (s1 - s0) / window_s
        waited = time.perf_counter() - t0
        if busy is None or busy < threshold or waited >= max_wait_s:
            return {"waited_s": waited, "busy_cores": busy}


def steady_from_epoch_ends(ends: list[float]) -> float | None:
    """Seconds per epoch from epoch-end timestamps, excluding the first epoch."""
    if len(ends) < 2:
        return None
    return (ends[-1] - ends[0]) / (len(ends) - 1)


# ------------------------------------------------------------------------- workers
# The tools the side-by-side scripts compare, in the order they run, and their names in tables.
TOOLS = ("scvi", "jaxvi")
TOOL_NAMES = {"scvi": "scvi-tools", "jaxvi": "jaxvi"}


def pbmc_adata(tool: str):
    """jaxvi's bundled PBMC counts (700 x 765, cell types in ``obs["bulk_labels"]``). A
    scvi-tools worker (``tool != "jaxvi"``) reads the same file without importing jaxvi (its
    import would load jaxvi's modules into that process)."""
    if tool == "jaxvi":
        import jaxvi.data

        return jaxvi.data.pbmc68k_reduced()
    import importlib.util

    import anndata

    spec = importlib.util.find_spec("jaxvi")
    root = Path(next(iter(spec.submodule_search_locations)))
    return anndata.read_h5ad(root / "data" / "pbmc68k_reduced_counts.h5ad")


def run_marked_worker(cmd: list[str], marker: str, *, env=None, timeout=None) -> dict:
    """Run a worker process and return the JSON it printed after ``marker`` (its own line),
    with ``process_wall_s`` added; a worker that printed none raises with its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith(marker):
            res = json.loads(line[len(marker) :])
            res["process_wall_s"] = wall
            return res
    tail = (proc.stderr or "")[-4000:]
    raise RuntimeError(f"worker {cmd[2:]} failed (rc {proc.returncode}):\n{tail}")


def least_loaded(run_once, max_attempts: int, max_foreign_cores: float, what: str, tag: str):
    """Run ``run_once()`` (a worker whose result has ``train_load``) until other processes
    used <= ``max_foreign_cores`` during its train().

    The machine may be shared: on 2 cores, another busy process slows both libraries several
    fold (torch's OpenMP threads wait at barriers). Up to ``max_attempts`` runs; the one with
    the least foreign load is kept, every attempt is listed in ``attempts`` and ``clean``
    says whether the kept one was under the limit.
    """
    attempts = []
    best = None
    for _ in range(max(1, max_attempts)):
        res = run_once()
        foreign = res["train_load"].get("foreign_cores") or 0.0
        attempts.append(
            {
                "train_wall_s": res["train_wall_s"],
                "steady_s_per_epoch": res["steady_s_per_epoch"],
                "foreign_cores": foreign,
            }
        )
        if best is None or foreign < best["train_load"].get("foreign_cores", 0.0):
            best = res
        if foreign <= max_foreign_cores:
            break
        print(
            f"[{tag}]   other processes used {foreign:.2f} cores during train(); retrying",
            flush=True,
        )
    best["attempts"] = attempts
    best["clean"] = (best["train_load"].get("foreign_cores") or 0.0) <= max_foreign_cores
    if not best["clean"]:
        print(
            f"[{tag}]   WARNING: no clean run of {what} in {len(attempts)} attempts; its "
            "timings are NOT reliable",
            flush=True,
        )
    return best


# -------------------------------------------------------------------------- output
def fmt(x, spec: str = ".3g") -> str:
    """``x`` formatted with ``spec`` for a table cell; a dash for a missing value."""
    return "—" if x is None else format(x, spec)


def slug(text: str) -> str:
    """Lower-case ``[a-z0-9-]`` version of ``text`` for file names."""
    text = re.sub(r"\(r\)|\(tm\)|processor|cpu", "", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-")[:40] or "unknown"


def result_path(prefix: str, tag: str | None = None) -> Path:
    """``results/<prefix>_<cpu-slug>-<cores>c_<YYYYmmdd-HHMM>[_tag].json``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    name = f"{prefix}_{slug(cpu_model())}-{n_cores()}c_{stamp}"
    if tag:
        name += f"_{slug(tag)}"
    return RESULTS_DIR / f"{name}.json"


def write_json(path: Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON (creating the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:
        pass
    return str(obj)


def run_header(benchmark: str) -> dict:
    """The fields every result JSON starts with: the benchmark's name, when it started, the
    machine, package versions and git state."""
    return {
        "benchmark": benchmark,
        "started_utc": utc_timestamp(),
        "machine": machine_info(),
        "versions": versions(),
        "git": git_info(),
    }


def utc_timestamp() -> str:
    """Current UTC time, ISO 8601."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------- jaxvi epoch
class JaxviEpoch:
    """jaxvi's compiled training epoch over fixed training cells, for the timing scripts.

    ``epoch(state, key, kl) -> (state, EpochInfo)`` runs what ``jaxvi.train.fit`` runs for
    one in-memory epoch: the minibatch grid (``epoch_grid``, a fresh permutation of the cells)
    and the compiled epoch (``make_train_epoch``, ``guard`` as given). ``args(state, key,
    kl)`` are the epoch program's arguments (for ``fn.lower``).
    """

    def __init__(
        self, model, adata, train_idx, batch_size, *, guard="step", sparse=False, plan=None
    ):
        import jax.numpy as jnp
        import numpy as np

        from jaxvi.data import make_source
        from jaxvi.train import PlanConfig, init_train_state, make_train_epoch, steps_per_epoch

        plan = plan or PlanConfig()
        self.state, self.tx = init_train_state(model.model_def, model.variables, plan)
        self.fn = make_train_epoch(model.model_def, self.tx, guard=guard)
        source = make_source(adata, model.registry_, purpose="train", load_sparse_tensor=sparse)
        self.data = source.data
        self.cells = jnp.asarray(np.asarray(train_idx, np.int32))
        self.batch_size = int(batch_size)
        self.n_steps = steps_per_epoch(len(train_idx), self.batch_size, False)

    def args(self, state, key, kl):
        from jaxvi.train import epoch_grid

        k, idx, mask = epoch_grid(
            key, self.cells, n_steps=self.n_steps, batch_size=self.batch_size
        )
        return (k, state, self.data, idx, mask, kl)

    def __call__(self, state, key, kl):
        return self.fn(*self.args(state, key, kl))
