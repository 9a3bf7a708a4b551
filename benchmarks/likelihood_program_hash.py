"""Is the compiled training program of each built-in likelihood unchanged by a code change?

Hashes the lowered StableHLO of the training epoch (``make_train_epoch(...).lower(...)``) for the
built-in likelihoods and several dispersions. Identical text means XLA compiles the same
program, so the speed cannot differ: a load-independent check to go with the timings of
``likelihood_speed.py`` on a busy machine. With ``--against COMMIT`` the same hashes are
computed in a temporary git worktree at ``COMMIT`` (in a subprocess) and compared.

The script runs under both engine APIs: the one before the engine took a ``ModelDef``
(``make_train_epoch(module, tx, batch_size)``, ``epoch(state, data, train_idx, key,
kl_weights)`` with the shuffle inside) and the one after (``make_train_epoch(model_def, tx)``,
``epoch(key, state, data, idx, mask, kl_weights)`` with the minibatch grid built by the
separate ``epoch_grid`` program). Where the text differs, two more comparisons say how:

* ``ops``: the count of every StableHLO operation in the epoch program (plus, for the newer
  API, in the grid program), and the difference between the two commits;
* ``--numbers``: trains every likelihood / dispersion through the public ``SCVI.train`` for a
  few epochs (with validation) in both commits and compares the parameters bit for bit and
  every history metric (identical, or the largest relative difference).

Usage::

    python benchmarks/likelihood_program_hash.py --against 14ce6cf --numbers
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

MARKER = "@@HASHES@@ "
LIKELIHOODS = ("zinb", "nb", "poisson", "normal")
DISPERSIONS = ("gene", "gene-batch", "gene-cell")
OP = re.compile(r"\b(stablehlo|chlo|mhlo|func|sdy)\.([a-z_]+)")


def _op_counts(text: str) -> dict:
    return dict(collections.Counter(".".join(m) for m in OP.findall(text)))


def _lowered(m, adata) -> dict:
    """``{"epoch": text[, "grid": text]}`` of one model's training epoch, in either API."""
    import jax
    import jax.numpy as jnp

    import jaxvi.train as train
    from jaxvi.train import PlanConfig, init_train_state, make_train_epoch

    if hasattr(train, "epoch_grid"):  # the ModelDef engine
        from jaxvi.data import make_source

        state, tx = init_train_state(m.model_def, m.variables, PlanConfig())
        fn = make_train_epoch(m.model_def, tx)
        data = make_source(adata, m.registry_, purpose="train", load_sparse_tensor=False).data
        cells = jnp.arange(256, dtype=jnp.int32)
        grid = train.epoch_grid.lower(jax.random.key(0), cells, n_steps=2, batch_size=128)
        k, idx, mask = train.epoch_grid(jax.random.key(0), cells, n_steps=2, batch_size=128)
        epoch = fn.lower(k, state, data, idx, mask, jnp.full((2,), 0.5))
        return {"epoch": epoch.as_text(), "grid": grid.as_text()}
    state, tx = init_train_state(m.module, m.variables, PlanConfig())
    fn = make_train_epoch(m.module, tx, 128)
    data = m._device_data(adata, False)
    idx = jnp.arange(256, dtype=jnp.int32)
    epoch = fn.lower(state, data, idx, jax.random.key(0), jnp.full((2,), 0.5))
    return {"epoch": epoch.as_text()}


def hashes() -> dict:
    from compare_scvi import synthetic_adata

    import jaxvi

    adata = synthetic_adata(300, 100, 0)
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch")
    out, ops = {}, {}
    for name in LIKELIHOODS:
        for disp in DISPERSIONS:
            m = jaxvi.SCVI(adata, gene_likelihood=name, dispersion=disp)
            texts = _lowered(m, adata)
            key = f"{name}/{disp}"
            out[key] = hashlib.sha256(texts["epoch"].encode()).hexdigest()
            ops[key] = {part: _op_counts(text) for part, text in texts.items()}
    return {"hashes": out, "ops": ops}


def numbers(epochs: int = 3) -> dict:
    """Parameters (sha256 of their bytes) and history of a short public-API training run of
    every likelihood / dispersion."""
    import jax
    import numpy as np
    from compare_scvi import synthetic_adata

    import jaxvi

    adata = synthetic_adata(300, 100, 0)
    jaxvi.SCVI.setup_anndata(adata, batch_key="batch")
    out = {}
    for name in LIKELIHOODS:
        for disp in DISPERSIONS:
            m = jaxvi.SCVI(adata, gene_likelihood=name, dispersion=disp)
            m.train(
                max_epochs=epochs,
                batch_size=128,
                check_val_every_n_epoch=1,
                enable_progress_bar=False,
            )
            leaves = jax.tree_util.tree_leaves_with_path(m.variables)
            digest = hashlib.sha256()
            for path, leaf in sorted(leaves, key=lambda pl: jax.tree_util.keystr(pl[0])):
                digest.update(jax.tree_util.keystr(path).encode())
                digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
            out[f"{name}/{disp}"] = {
                "params": digest.hexdigest(),
                "history": {k: [float(x) for x in v.iloc[:, 0]] for k, v in m.history.items()},
            }
    return out


def _child(with_numbers: bool) -> dict:
    res = hashes()
    if with_numbers:
        res["numbers"] = numbers()
    return res


def _compare_numbers(new: dict, old: dict) -> dict:
    report = {}
    for key, ours in new.items():
        theirs = old[key]
        metrics = {}
        for metric in sorted(set(ours["history"]) | set(theirs["history"])):
            a = ours["history"].get(metric)
            b = theirs["history"].get(metric)
            if a is None or b is None:
                metrics[metric] = "missing in " + ("new" if a is None else "old")
            elif a == b:
                metrics[metric] = "identical"
            else:
                rel = max(abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b, strict=True))
                metrics[metric] = f"max rel diff {rel:.2e}"
        report[key] = {"params_identical": ours["params"] == theirs["params"], "history": metrics}
    return report


def _diff_ops(new: dict, old: dict) -> dict:
    """Per model: op count differences (new epoch + grid) - old epoch, nonzero only."""
    out = {}
    for key, parts in new.items():
        total = collections.Counter()
        for counts in parts.values():
            total.update(counts)
        base = collections.Counter(old[key]["epoch"])
        diff = {op: total[op] - base[op] for op in set(total) | set(base)}
        epoch_only = collections.Counter(parts["epoch"])
        out[key] = {
            "epoch_plus_grid_minus_old": {k: v for k, v in sorted(diff.items()) if v},
            "epoch_minus_old": {
                k: epoch_only[k] - base[k]
                for k in sorted(set(epoch_only) | set(base))
                if epoch_only[k] != base[k]
            },
        }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--against", default=None, help="commit to compare with")
    ap.add_argument(
        "--numbers", action="store_true", help="also train each model and compare the results"
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(MARKER + json.dumps(_child(args.numbers)))
        return {}
    ours = _child(args.numbers)
    payload = {
        "benchmark": "likelihood_program_hash",
        "timestamp_utc": C.utc_timestamp(),
        "versions": C.versions(),
        "git": C.git_info(),
        "hashes": ours["hashes"],
        "ops": ours["ops"],
    }
    if args.numbers:
        payload["numbers"] = ours["numbers"]
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
                    [sys.executable, str(script), "--child"] + (["--numbers"] * args.numbers),
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
        payload["against_hashes"] = base["hashes"]
        payload["identical"] = {k: base["hashes"].get(k) == v for k, v in ours["hashes"].items()}
        payload["op_diff"] = _diff_ops(ours["ops"], base["ops"])
        for k, same in payload["identical"].items():
            print(f"{k:20s} {'identical' if same else 'DIFFERENT'}")
            if not same:
                print(f"{'':20s} ops (epoch + grid) - old: {payload['op_diff'][k]}")
        if args.numbers:
            payload["numbers_vs_against"] = _compare_numbers(ours["numbers"], base["numbers"])
            for k, rep in payload["numbers_vs_against"].items():
                diffs = {m: v for m, v in rep["history"].items() if v != "identical"}
                print(
                    f"{k:20s} parameters {'identical' if rep['params_identical'] else 'DIFFER'};"
                    f" history {'identical' if not diffs else diffs}"
                )
    path = C.write_json(C.result_path("likelihood_program_hash"), payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
