"""Coverage-guided fuzzing (atheris / libFuzzer) of jaxvi's readers of untrusted files.

Targets
-------
``torchfile``
    The input is a whole ``model.pt`` (a zip holding ``<name>/data.pkl`` and storages), read
    by :func:`jaxvi.io.torchfile.load`.
``modeldir``
    The input is ``<4-byte little-endian length n><n bytes of model.json><model.npz>``, written
    as a directory and read by :func:`jaxvi.io.read_model_dir` (schema, checksums, npz). A JSON
    object gets its ``meta_sha256`` recomputed (as an adversary would) so that edits reach the
    schema.

A finding is any exception other than ``ValueError`` / ``FileNotFoundError`` (the readers'
documented refusals), a crash, a timeout (``-timeout``) or a memory blow-up (``-rss_limit_mb``).

Usage (from the repository root; ``pip install atheris``, or ``pip install -e .[fuzz]``)::

    python benchmarks/fuzz/fuzz_readers.py torchfile -max_total_time=600 -rss_limit_mb=4096 \\
        -timeout=20 benchmarks/fuzz/corpus/torchfile
    python benchmarks/fuzz/fuzz_readers.py modeldir -max_total_time=600 -rss_limit_mb=4096 \\
        -timeout=20 benchmarks/fuzz/corpus/modeldir

New interesting inputs are added to the corpus directory given last (pass a scratch copy to
keep the committed seeds small). ``python benchmarks/fuzz/make_corpus.py`` rewrites the
committed seeds.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile

import atheris

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TMP = tempfile.mkdtemp(prefix="jaxvi-fuzz-")


def _torchfile():
    """jaxvi.io.torchfile and its record and writer modules, instrumented (JAX is imported
    too, uninstrumented)."""
    with atheris.instrument_imports(include=["jaxvi.io"]):
        from jaxvi.io import torchfile
    return torchfile


def fuzz_torchfile_target():
    torchfile = _torchfile()
    atheris.instrument_all()  # pickle, zipfile, numpy: the parsing paths, and torchfile

    def fuzz(data: bytes) -> None:
        path = os.path.join(_TMP, "model.pt")
        with open(path, "wb") as f:
            f.write(data)
        try:
            torchfile.load(path)
        except ValueError:
            pass

    return fuzz


def fuzz_modeldir_target():
    sys.path.insert(0, ROOT)
    with atheris.instrument_imports(include=["jaxvi.io", "jaxvi.schema", "jaxvi.safefs"]):
        from jaxvi import io as jio  # imports JAX too (not instrumented: too large)

    def fuzz(data: bytes) -> None:
        if len(data) < 4:
            return
        (n,) = struct.unpack("<I", data[:4])
        meta, npz = data[4 : 4 + n], data[4 + n :]
        try:  # re-seal the JSON checksum, as an adversary would, so edits reach the schema
            parsed = json.loads(meta)
            if isinstance(parsed, dict):
                parsed[jio.DIGEST_KEY] = jio.meta_digest(parsed)
                meta = json.dumps(parsed).encode()
        except (ValueError, RecursionError, TypeError):
            pass
        d = os.path.join(_TMP, "m")
        os.makedirs(d, exist_ok=True)
        for name, part in ((jio.MODEL_JSON, meta), (jio.MODEL_NPZ, npz)):
            with open(os.path.join(d, name), "wb") as f:
                f.write(part)
        try:
            jio.read_model_dir(d)
        except (ValueError, FileNotFoundError):
            pass

    return fuzz


TARGETS = {"torchfile": fuzz_torchfile_target, "modeldir": fuzz_modeldir_target}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options] [corpus]")
    target = TARGETS[sys.argv[1]]()
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
