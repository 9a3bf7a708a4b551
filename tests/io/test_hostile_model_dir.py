"""Saved jaxvi model directories under crashes, concurrent writers and hostile edits (issue 17,
defects 3, 4, 7, 11, 12, 13, 14, 15, 18).

Crashes are simulated in forked children that only write files (no JAX): the child dies with
``os._exit`` at its k-th file-system call, for every k until a save completes, and after each
death the directory must load as exactly the old or exactly the new model.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
import zipfile

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from jaxvi import SCVI
from jaxvi import io as jio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _adata(n=30, g=8, seed=0):
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(rng.poisson(1.5, size=(n, g)).astype(np.float32))
    a = ad.AnnData(x)
    a.obs["batch"] = pd.Categorical(np.where(np.arange(n) % 2, "a", "b"))
    SCVI.setup_anndata(a, batch_key="batch")
    return a


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model saved with its AnnData; returns (path, adata, meta, arrays)."""
    a = _adata()
    model = SCVI(a, n_hidden=4, n_latent=2)
    model.train_indices_ = np.arange(20)
    model.validation_indices_ = np.arange(20, 30)
    model.test_indices_ = np.arange(0)
    path = str(tmp_path_factory.mktemp("dir") / "model")
    model.save(path, save_anndata=True)
    meta, arrays = jio.read_model_dir(path)
    return path, a, meta, arrays


def _rewrite_npz(edit_json, path, arrays, reseal=True):
    """Replace model.npz by ``arrays`` and (as an adversary, with the ``edit_json`` fixture)
    declare them in model.json."""
    with open(os.path.join(path, jio.MODEL_NPZ), "wb") as f:
        np.savez(f, **arrays)
    if reseal:
        edit_json(
            os.path.join(path, jio.MODEL_JSON),
            lambda m: m.update(arrays=jio.array_manifest(arrays)),
        )


# ------------------------------------------------------------------ 3: crashes at every step
_FS_CALLS = ("replace", "rename", "fsync", "close", "mkdir", "link", "unlink", "remove", "rmdir")


def _crash_at(k: int, fn) -> int:
    """Run ``fn`` in a forked child that dies at its k-th file-system call; its exit code:
    0 when it finished before dying, 99 when it died."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            count = [0]

            def wrap(orig):
                def inner(*args, **kwargs):
                    count[0] += 1
                    if count[0] >= k:
                        os._exit(99)
                    return orig(*args, **kwargs)

                return inner

            originals = {name: getattr(os, name) for name in _FS_CALLS}
            exit_ = os._exit
            for name, orig in originals.items():
                setattr(os, name, wrap(orig))
            os._exit = exit_
            fn()
            exit_(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _version(meta, arrays, tag):
    new_meta = {**meta, "tag": tag}
    new_arrays = {k: v + (1.0 if tag == "B" else 0.0) for k, v in arrays.items()}
    return new_meta, new_arrays


def _check_is_one_version(path, versions):
    meta, arrays = jio.read_model_dir(path)
    tag = meta.get("tag")
    assert tag in versions, tag
    for k, v in versions[tag][1].items():
        np.testing.assert_array_equal(arrays[k], v)
    if tag != "A" or os.path.exists(os.path.join(path, jio.ADATA_FILE)):
        adata = ad.read_h5ad(os.path.join(path, jio.ADATA_FILE))
        assert adata.uns["tag"] == tag
    return tag


@pytest.mark.parametrize("with_adata", [True, False])
def test_overwrite_survives_a_crash_at_every_step(saved, tmp_path, with_adata):
    """Defect 3: killed anywhere in ``save(overwrite=True)``, the directory loads as the old
    or the new model (never "checksum mismatch"), with the matching AnnData."""
    path, adata, meta, arrays = saved
    versions = {t: _version(meta, arrays, t) for t in "AB"}
    data = {}
    for t in "AB":
        data[t] = adata.copy()
        data[t].uns["tag"] = t
    outcomes = []
    for k in range(1, 200):
        target = str(tmp_path / f"m{k}")
        jio.write_model_dir(target, *versions["A"], overwrite=False, adata=data["A"])
        code = _crash_at(
            k,
            lambda target=target: jio.write_model_dir(
                target, *versions["B"], overwrite=True, adata=data["B"] if with_adata else None
            ),
        )
        assert code in (0, 99), f"the save failed (exit {code}) instead of crashing"
        outcomes.append(
            _check_is_one_version(target, versions)
            if with_adata
            else jio.read_model_dir(target)[0]["tag"]
        )
        if code == 0:
            break
    assert outcomes[-1] == "B"
    assert "A" in outcomes
    assert k > 3  # the crash points were really exercised


def test_disk_full_while_writing_the_anndata_keeps_the_old_model(
    copy_dir, saved, tmp_path, monkeypatch
):
    """Defect 3: ENOSPC in ``adata.write_h5ad`` leaves the previous save loadable."""
    path, adata, meta, arrays = saved
    target = copy_dir(path, tmp_path / "m")
    new_meta, new_arrays = _version(meta, arrays, "B")

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", full)
    with pytest.raises(OSError, match="No space left"):
        jio.write_model_dir(target, new_meta, new_arrays, overwrite=True, adata=adata)
    got_meta, got = jio.read_model_dir(target)
    assert "tag" not in got_meta
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no staging left behind


def test_overwrite_keeps_other_files_in_the_directory(copy_dir, saved, tmp_path):
    """The switch replaces jaxvi's files only: a hub card or notes beside them stay."""
    path, adata, meta, arrays = saved
    target = copy_dir(path, tmp_path / "m")
    with open(os.path.join(target, "README.md"), "w") as f:
        f.write("notes")
    os.makedirs(os.path.join(target, "figures"))
    with open(os.path.join(target, "figures", "a.txt"), "w") as f:
        f.write("fig")
    jio.write_model_dir(target, *_version(meta, arrays, "B"), overwrite=True)
    assert open(os.path.join(target, "README.md")).read() == "notes"
    assert open(os.path.join(target, "figures", "a.txt")).read() == "fig"
    assert jio.read_model_dir(target)[0]["tag"] == "B"
    # the AnnData of the previous save is not carried into a save without one
    assert not os.path.exists(os.path.join(target, jio.ADATA_FILE))


# ---------------------------------------------------------------- 7: concurrent writers
def test_concurrent_saves_and_loads_never_see_a_mixed_directory(saved, tmp_path):
    """Defect 7: two processes saving to one directory while this one loads it in a loop:
    every load succeeds and every result is one complete version."""
    path, adata, meta, arrays = saved
    big = {**arrays, "pad": np.zeros(200_000, np.float32)}
    target = str(tmp_path / "m")
    versions = {}
    for t in ("A", "B", "C"):
        m, a = _version(meta, big, t)
        a = {k: v + (2.0 if t == "C" else 0.0) for k, v in a.items()}
        versions[t] = (m, a)
    jio.write_model_dir(target, *versions["A"], overwrite=False)
    pids = []
    for t in ("B", "C"):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                for _ in range(25):
                    jio.write_model_dir(target, *versions[t], overwrite=True)
                os._exit(0)
            except BaseException:
                os._exit(1)
        pids.append(pid)
    errors, seen, codes, running = [], set(), {}, set(pids)
    while running:
        try:
            got_meta, got = jio.read_model_dir(target)
            seen.add(got_meta["tag"])
            np.testing.assert_array_equal(got["pad"], versions[got_meta["tag"]][1]["pad"])
        except (ValueError, OSError) as e:
            errors.append(repr(e))
        for p in list(running):
            done, status = os.waitpid(p, os.WNOHANG)
            if done:
                codes[p] = os.waitstatus_to_exitcode(status)
                running.discard(p)
    assert errors == [], errors[:3]
    assert list(codes.values()) == [0, 0]
    assert len(seen) >= 2  # the loads really overlapped the saves
    assert jio.read_model_dir(target)[0]["tag"] in ("B", "C")
    assert [n for n in os.listdir(tmp_path) if n != "m"] == []


# -------------------------------------------------------------------------- 18: permissions
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_saved_files_respect_the_umask(saved, tmp_path, umask):
    path, adata, meta, arrays = saved
    old = os.umask(umask)
    try:
        target = str(tmp_path / "m")
        jio.write_model_dir(target, meta, arrays, overwrite=False, adata=adata)
        jio.write_model_dir(target, meta, arrays, overwrite=True, adata=adata)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o777 & ~umask
    for name in os.listdir(target):
        assert stat.S_IMODE(os.stat(os.path.join(target, name)).st_mode) == 0o666 & ~umask, name


# ------------------------------------------------------------- 11, 12: weights in model.npz
@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda a: a["params/px_r"].__setitem__(0, np.nan), "params/px_r.*non-finite"),
        (lambda a: a["params/px_r"].__setitem__(0, np.inf), "params/px_r.*non-finite"),
        (
            lambda a: a["batch_stats/z_encoder/encoder/layer0_bn/var"].__setitem__(0, -1.0),
            "layer0_bn/var.*negative",
        ),
        (
            lambda a: a.update({"params/px_r": a["params/px_r"].astype(np.float64)}),
            "params/px_r.*float64.*float32",
        ),
        (lambda a: a.update({"params/px_r": a["params/px_r"].astype(">f4")}), "params/px_r.*>f4"),
        (lambda a: a.update({"params/px_r": a["params/px_r"] > 0}), "params/px_r.*bool"),
    ],
)
def test_bad_weights_are_refused_naming_the_array(
    copy_dir, edit_json, saved, tmp_path, edit, match
):
    path, adata, meta, arrays = saved
    target = copy_dir(path, tmp_path / "m")
    arrays = {k: v.copy() for k, v in arrays.items()}
    edit(arrays)
    _rewrite_npz(edit_json, target, arrays)
    with pytest.raises(ValueError, match=match):
        SCVI.load(target, adata=adata)


# ----------------------------------------------------------------- 13, 15: model.json schema
def _set(path_in_meta, value):
    def fn(meta):
        node = meta
        *parents, leaf = path_in_meta
        for p in parents:
            node = node[p]
        node[leaf] = value

    return fn


def _delete(path_in_meta):
    def fn(meta):
        node = meta
        *parents, leaf = path_in_meta
        for p in parents:
            node = node[p]
        del node[leaf]

    return fn


SCHEMA_CASES = {
    "config.n_hidden": _set(("config", "n_hidden"), "many"),
    "config.n_input": _set(("config", "n_input"), 10**12),
    "config.n_layers": _set(("config", "n_layers"), 3000),
    "config.dropout_rate": _set(("config", "dropout_rate"), [0.1]),
    "registry.summary_stats": _delete(("registry", "summary_stats")),
    "registry.var_names": _set(("registry", "var_names"), 5),
    "registry.batch_categories": _set(("registry", "batch_categories"), ["a"]),
    "init_params": _set(("init_params",), []),
    "history": _set(("history",), {"elbo": {"epoch": [0], "values": "x"}}),
    "indices.train": _set(("indices", "train"), [0, 10**9]),
    "indices.validation": _set(("indices", "validation"), [-1]),
    "is_trained": _set(("is_trained",), "yes"),
    "model_name": _delete(("model_name",)),
    "arrays": _set(("arrays", "params/px_r", "shape"), [-1]),
}


@pytest.mark.parametrize("field", sorted(SCHEMA_CASES))
def test_edited_model_json_gets_a_value_error_naming_the_field(
    copy_dir, edit_json, saved, tmp_path, field
):
    """Defects 13, 14 (n_layers=3000 is refused at once) and 15 (split indices in range)."""
    path, adata, meta, arrays = saved
    target = copy_dir(path, tmp_path / "m")
    edit_json(os.path.join(target, jio.MODEL_JSON), SCHEMA_CASES[field])
    start = time.perf_counter()
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        SCVI.load(target)
    assert time.perf_counter() - start < 5.0


def test_json_checksum_catches_edits_of_plain_values(copy_dir, edit_json, saved, tmp_path):
    """Defect 15: a changed split index (valid JSON, in range) is detected."""
    path, adata, meta, arrays = saved
    target = copy_dir(path, tmp_path / "m")
    edit_json(
        os.path.join(target, jio.MODEL_JSON), _set(("indices", "train", 0), 21), reseal=False
    )
    with pytest.raises(ValueError, match="model.json.*checksum"):
        SCVI.load(target)


# ------------------------------------------------------------- 14: resource exhaustion
_HANG_CHILD = textwrap.dedent(
    """
    import resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
    from jaxvi import io
    for path in sys.argv[1:]:
        start = time.perf_counter()
        try:
            io.read_model_dir(path)
            print(path, "LOADED")
        except (ValueError, OSError) as e:
            print(path, "REFUSED", round(time.perf_counter() - start, 2), type(e).__name__, e)
        sys.stdout.flush()
    """
)


def test_links_to_devices_fifos_and_bombs_are_refused_quickly(
    copy_dir, edit_json, saved, tmp_path
):
    """Defect 14: a model.json that is a FIFO or a link to /dev/zero, a compressed npz
    member (a zip bomb), and an npy header claiming far more data than the member holds."""
    path, adata, meta, arrays = saved
    fifo = copy_dir(path, tmp_path / "fifo")
    os.remove(os.path.join(fifo, jio.MODEL_JSON))
    os.mkfifo(os.path.join(fifo, jio.MODEL_JSON))
    zero = copy_dir(path, tmp_path / "zero")
    os.remove(os.path.join(zero, jio.MODEL_JSON))
    os.symlink("/dev/zero", os.path.join(zero, jio.MODEL_JSON))
    npz_fifo = copy_dir(path, tmp_path / "npzfifo")
    os.remove(os.path.join(npz_fifo, jio.MODEL_NPZ))
    os.mkfifo(os.path.join(npz_fifo, jio.MODEL_NPZ))

    bomb = copy_dir(path, tmp_path / "bomb")
    bombed = {**arrays, "pad": np.zeros(1 << 26, np.float32)}  # 256 MiB, ~250 KiB deflated
    with open(os.path.join(bomb, jio.MODEL_NPZ), "wb") as f:
        np.savez_compressed(f, **bombed)
    edit_json(
        os.path.join(bomb, jio.MODEL_JSON), lambda m: m.update(arrays=jio.array_manifest(bombed))
    )

    header = copy_dir(path, tmp_path / "header")
    buf = os.path.join(header, jio.MODEL_NPZ)
    with zipfile.ZipFile(buf, "w") as zf:
        for k, v in arrays.items():
            zf.writestr(k + ".npy", _npy_bytes(v))
        lie = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
        lie["shape"] = (1 << 34,)
        hdr = pyio_bytes(lambda f: np.lib.format.write_array_header_1_0(f, lie))
        zf.writestr("pad.npy", hdr + b"\x00" * 16)
    paths = [fifo, zero, npz_fifo, bomb, header]
    env = {**os.environ, "PYTHONPATH": ROOT}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _HANG_CHILD, *paths],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=ROOT,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"a hostile directory hung the reader: {e.stdout!r}")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(paths), proc.stderr[-2000:]
    for line in lines:
        assert " REFUSED " in line, line
        assert float(line.split(" REFUSED ")[1].split()[0]) < 5.0, line
    assert "regular file" in lines[0]
    assert "regular file" in lines[1]
    assert "regular" in lines[2]
    assert "compressed" in lines[3]
    assert "pad" in lines[4]
    assert "bytes" in lines[4]


def pyio_bytes(write) -> bytes:
    import io as pyio

    buf = pyio.BytesIO()
    write(buf)
    return buf.getvalue()


def _npy_bytes(arr) -> bytes:
    return pyio_bytes(lambda f: np.lib.format.write_array(f, arr))


# -------------------------------------------------------- 4: CSR structure of a saved AnnData
def _break_csr(h5ad, what):
    with h5py.File(h5ad, "r+") as f:
        g = f["X"]
        if what == "index":
            idx = g["indices"][...]
            idx[3] = 10_000
            g["indices"][...] = idx
        elif what == "indptr":
            ptr = g["indptr"][...]
            ptr[5], ptr[6] = ptr[6], ptr[5] - 1
            g["indptr"][...] = ptr


@pytest.mark.parametrize("what", ["index", "indptr"])
def test_saved_anndata_with_broken_csr_is_refused_at_load(copy_dir, saved, tmp_path, what):
    """Defect 4: a column index past the last gene (or a non-monotone indptr) in the saved
    adata.h5ad is refused by ``SCVI.load`` before any query densifies it."""
    path, adata, meta, arrays = saved
    target = copy_dir(path, tmp_path / "m")
    _break_csr(os.path.join(target, jio.ADATA_FILE), what)
    with pytest.raises(ValueError, match="adata.X.*(column index|indptr)"):
        SCVI.load(target)


def test_json_checksum_is_a_sha256_of_the_canonical_json(saved):
    path, adata, meta, arrays = saved
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    assert meta["meta_sha256"] == hashlib.sha256(text.encode()).hexdigest()
