"""Is the compiled training program of each built-in likelihood unchanged by a code change?

Hashes the lowered StableHLO of the training epoch (``make_train_epoch(...).lower(...)``) for the
built-in likelihoods and several dispersions. Identical text means XLA compiles the same
program, so the speed cannot differ: a load-independent check to go with the timings of
``likelihood_speed.py`` on a busy machine. With ``--against COMMIT`` the same hashes are
computed in a temporary git worktree at ``COMMIT`` (in a subprocess) and compared.

Usage::

    python benchmarks/likelihood_program_hash.py --against 5cff330
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MARKER = "@@HASHES@@ "
LIKELIHOODS = ("zinb", "nb", "poisson", "normal")
DISPERSIONS = ("gene", "gene-batch", "gene-cell")


def hashes() -> dict:
    import jax
    import jax.numpy as jnp
    from compare_scvi import synthetic_adata

    import jaxvi
    from jaxvi.train import PlanConfig, init_train_state, make_train_epoch

    adata = synthetic_adata(300, 100, 0)
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch")
    idx = jnp.arange(256, dtype=jnp.int32)
    out = {}
    for name in LIKELIHOODS:
        for disp in DISPERSIONS:
            m = jaxvi.SCVI(adata, gene_likelihood=name, dispersion=disp)
            state, tx = init_train_state(m.module, m.variables, PlanConfig())
            fn = make_train_epoch(m.module, tx, 128)
            data = m._device_data(adata, False)
            text = fn.lower(state, data, idx, jax.random.key(0), jnp.full((2,), 0.5)).as_text()
            out[f"{name}/{disp}"] = hashlib.sha256(text.encode()).hexdigest()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--against", default=None, help="commit to compare with")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(MARKER + json.dumps(hashes()))
        return {}
    payload = {
        "benchmark": "likelihood_program_hash",
        "timestamp_utc": C.utc_timestamp(),
        "versions": C.versions(),
        "git": C.git_info(),
        "hashes": hashes(),
    }
    if args.against:
        with tempfile.TemporaryDirectory() as tmp:
            wt = os.path.join(tmp, "wt")
            subprocess.run(
                ["git", "worktree", "add", "--detach", wt, args.against],
                cwd=C.REPO_DIR,
                check=True,
                capture_output=True,
            )
            try:
                script = Path(wt) / "benchmarks" / Path(__file__).name
                script.write_text(Path(__file__).read_text())
                res = subprocess.run(
                    [sys.executable, str(script), "--child"],
                    cwd=wt,
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ, "PYTHONPATH": wt},
                )
            finally:
                subprocess.run(
                    ["git", "worktree", "remove", "--force", wt],
                    cwd=C.REPO_DIR,
                    check=False,
                    capture_output=True,
                )
        line = next(x for x in res.stdout.splitlines() if x.startswith(MARKER))
        base = json.loads(line[len(MARKER) :])
        payload["against"] = args.against
        payload["against_hashes"] = base
        payload["identical"] = {k: base.get(k) == v for k, v in payload["hashes"].items()}
        for k, same in payload["identical"].items():
            print(f"{k:20s} {'identical' if same else 'DIFFERENT'}")
    path = C.write_json(C.result_path("likelihood_program_hash"), payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
