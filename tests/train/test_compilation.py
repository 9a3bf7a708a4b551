"""Compile once, say so, keep it: the persistent compilation cache (a second process with the
same cache directory compiles nothing new), the compile message and progress-bar phase, the
number of programs a train() and each query compile. What the compiled programs hold (no
float64, no host callbacks) and the transfer guard: ``test_device_ready.py``."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvi
from jaxvi._compilation import compile_ahead, count_compiles
from jaxvi.posterior import elbo_terms_program, latent_program, normalized_expression_program

REPO = Path(__file__).resolve().parents[2]

_RUN = """
import json, jaxvi
from jaxvi import SCVI, data
from jaxvi._compilation import count_compiles
adata = data.pbmc_small()
SCVI.setup_anndata(adata)
with count_compiles() as n:
    model = SCVI(adata, n_hidden=8, n_latent=2)
    model.train(max_epochs=1, enable_progress_bar=False)
    model.get_latent_representation()
print(json.dumps({"dir": jaxvi.settings.compilation_cache_dir, "compiles": n.compiles,
                  "hits": n.hits}))
"""


def _run(cache: Path) -> dict:
    env = {**os.environ, "JAXVI_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _RUN], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_every_program_from_the_cache(tmp_path):
    cache = tmp_path / "xla"
    first = _run(cache)
    files = {p.name for p in cache.iterdir()}
    assert first["dir"] == str(cache)
    assert any(name.startswith("jit_epoch-") for name in files), sorted(files)[:5]
    assert first["hits"] == 0
    assert first["compiles"] > 2
    second = _run(cache)
    # Every program of the second run came from the cache: no file was added.
    assert {p.name for p in cache.iterdir()} == files
    assert second["hits"] == second["compiles"] == first["compiles"]


def test_cache_dir_setting_moves_and_disables_and_survives_an_unwritable_dir(tmp_path):
    before = jaxvi.settings.compilation_cache_dir
    assert before == os.environ["JAXVI_CACHE_DIR"]  # conftest: never the user's cache
    try:
        jaxvi.settings.compilation_cache_dir = tmp_path / "moved"
        assert jaxvi.settings.compilation_cache_dir == str(tmp_path / "moved")
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "moved")
        jax.jit(lambda x: x * 3.0 + 1.0)(jnp.ones(7)).block_until_ready()
        assert list((tmp_path / "moved").iterdir())  # written to the new place
        jaxvi.settings.compilation_cache_dir = None
        assert jax.config.jax_compilation_cache_dir is None
        blocker = tmp_path / "a_file"
        blocker.write_text("")
        with pytest.warns(UserWarning, match="not writable"):
            jaxvi.settings.compilation_cache_dir = blocker / "xla"
        assert jaxvi.settings.compilation_cache_dir is None
        # Compiling goes on without a cache (and without a second warning).
        assert float(jax.jit(lambda x: x.sum() * 5.0)(jnp.ones(3))) == 15.0
    finally:
        jaxvi.settings.compilation_cache_dir = before


class _Bar:
    disable, desc = False, "Training"

    def __init__(self):
        self.calls = []

    def set_description(self, desc):
        self.calls.append(desc)
        self.desc = desc

    def unpause(self):
        self.calls.append("unpause")


def test_compile_ahead_logs_shows_a_phase_and_restarts_the_clock(caplog):
    fn = jax.jit(lambda x: jnp.tanh(x) @ x.T)
    bar, x = _Bar(), jnp.ones((5, 4))
    with caplog.at_level(logging.INFO, logger="jaxvi"), count_compiles() as n:
        seconds = compile_ahead(fn, (x,), "the test program", bar)
        fn(x).block_until_ready()  # compiled already
    assert n.compiles == 1
    assert seconds > 0
    text = caplog.text
    assert "Compiling the test program (XLA)" in text
    assert "Compiled the test program in" in text
    assert bar.calls == ["Training (compiling the test program)", "Training", "unpause"]


def test_train_announces_its_compile_on_the_bar_and_the_log(small_model, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="jaxvi"):
        small_model.train(max_epochs=1, check_val_every_n_epoch=1)
    assert "Compiled the training epoch in" in caplog.text
    assert "Compiled the validation program in" in caplog.text
    assert "compiling the training epoch" in capsys.readouterr().err


def test_programs_per_train_and_per_query(small_model):
    """What docs/user_guide/first_minute.md says: a train() compiles one program, its
    epoch (validation's program is shared by the fits of a model); each query method one
    program for its options, shared by calls whose cells fall in the same chunk bucket; the
    ELBO and reconstruction error share theirs; gene lists of lengths in one power-of-two
    bucket share one."""
    model = small_model
    kwargs = {"enable_progress_bar": False, "check_val_every_n_epoch": 1}
    model.train(max_epochs=1, **kwargs)
    with count_compiles() as n:
        model.train(max_epochs=2, **kwargs)
    assert n.names == ("jit(epoch)",)
    # Fresh program caches: the counts below do not depend on the tests that ran before.
    for factory in (latent_program, normalized_expression_program, elbo_terms_program):
        factory.cache_clear()
    runs = {}
    calls = {
        "latent": lambda: model.get_latent_representation(),
        "latent_again": lambda: model.get_latent_representation(indices=np.arange(40)),
        "normalized": lambda: model.get_normalized_expression(),
        "genes_3": lambda: model.get_normalized_expression(gene_list=model.adata.var_names[:3]),
        "genes_4": lambda: model.get_normalized_expression(gene_list=model.adata.var_names[4:8]),
        "elbo": lambda: model.get_elbo(),
        "reconstruction": lambda: model.get_reconstruction_error(),
    }
    for name, call in calls.items():
        with count_compiles() as n:
            call()
        runs[name] = [p for p in n.names if p == "jit(run)"]
    assert {k: len(v) for k, v in runs.items()} == {
        "latent": 1,
        "latent_again": 0,
        "normalized": 1,
        "genes_3": 1,
        "genes_4": 0,
        "elbo": 1,
        "reconstruction": 0,
    }
    genes = model.get_normalized_expression(gene_list=model.adata.var_names[4:7])
    full = model.get_normalized_expression()
    assert list(genes.columns) == list(model.adata.var_names[4:7])
    np.testing.assert_allclose(genes.to_numpy().mean(0), full.iloc[:, 4:7].to_numpy().mean(0),
                               rtol=0.2)  # fmt: skip
