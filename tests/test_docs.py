"""The documentation site builds with warnings as errors, and the front page's claims hold.

The build is the one a reader runs (``python -m sphinx -W --keep-going -b html docs OUT``): a
broken link, a heading anchor or page that does not exist, a cross-reference to a Python
object that does not exist, or a docstring that does not parse fails it. The README and the
quickstart page share one example, which runs here on 2 epochs.
"""

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def _sphinx(src: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
    return subprocess.run(
        [*cmd, "-d", str(out / ".doctrees"), str(src), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def test_docs_build_without_warnings(tmp_path):
    result = _sphinx(DOCS, tmp_path / "html")
    assert result.returncode == 0, result.stdout + result.stderr
    pages = ("index", "user_guide/likelihoods", "benchmarks/index", "api/generated/jaxvi.SCVI")
    for page in pages:
        assert (tmp_path / "html" / f"{page}.html").is_file(), page
    # The notebooks are rendered as tutorials, not left out.
    assert (tmp_path / "html" / "tutorials" / "quickstart.html").is_file()
    api = (tmp_path / "html" / "api" / "generated" / "jaxvi.SCVI.html").read_text()
    assert 'id="jaxvi.SCVI.get_latent_representation"' in api


def test_docs_build_fails_on_broken_references(tmp_path):
    """The same configuration fails on a missing page, anchor or Python object, and lets
    through a reference to an object that exists but has no page yet."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(DOCS / "conf.py", src / "conf.py")
    (src / "other.md").write_text("# Other\n\n## A heading\n")
    (src / "index.md").write_text(
        "# Index\n\n"
        "```{toctree}\nother\n```\n\n"
        "[fine](other.md#a-heading), {func}`jaxvi.train.fit`, {class}`jaxvi.SCVI`.\n\n"
        "[gone](missing_page.md), [no anchor](other.md#no-such-heading), "
        "{func}`jaxvi.no_such_function`.\n"
    )
    result = _sphinx(src, tmp_path / "html")
    log = result.stdout + result.stderr
    assert result.returncode != 0, log
    assert "missing_page.md" in log
    assert "no-such-heading" in log
    assert "jaxvi.no_such_function" in log
    assert "jaxvi.train.fit" not in log
    assert "a-heading" not in log.replace("no-such-heading", "")


def _exists(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_every_jaxvi_name_in_the_prose_exists():
    """Code spans are not cross-references, so Sphinx cannot see a stale `jaxvi.x.y` in one."""
    pages = [README, *DOCS.rglob("*.md")]
    names = {
        n for page in pages for n in re.findall(r"\bjaxvi(?:\.[A-Za-z_]\w*)+", page.read_text())
    }
    assert len(names) > 20
    assert [n for n in sorted(names) if not _exists(n)] == []


def _first_python_block(text: str) -> str:
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


# A file the prose cites as evidence: a test file (optionally ``::test_name``), a benchmark
# script, a notebook or a committed result.
_CITED = re.compile(
    r"(?<![\w/])((?:tests|benchmarks|notebooks)/[\w./-]+\.(?:py|json|ipynb))(?:::(\w+))?"
)


def test_every_cited_file_and_test_exists():
    """Tests moved into subfolders once and 26 citations went stale: every file (and test
    function) the README and the docs name as evidence exists."""
    missing, cited = [], 0
    for page in [README, *DOCS.rglob("*.md")]:
        for path, test in _CITED.findall(page.read_text()):
            cited += 1
            target = ROOT / path
            if not target.is_file():
                missing.append(f"{page.relative_to(ROOT)}: {path}")
            elif test and not re.search(rf"def {test}\b", target.read_text()):
                missing.append(f"{page.relative_to(ROOT)}: {path}::{test}")
    assert cited > 50  # the pattern still finds the citations
    assert not missing, missing


def test_readme_is_a_front_page():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    # .ci/run runs the README's test command with pip kept quiet.
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    test_command = ci.replace("pip install -q ", "pip install ")
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    assert blocks[:2] == ['pip install -e ".[demo]" && python -m jaxvi.demo', test_command]
    # Relative links point inside the repository, at files that exist.
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        path = (ROOT / target).resolve()
        assert path.is_relative_to(ROOT), target
        assert path.exists(), target


def test_readme_example_runs(tmp_path, monkeypatch):
    code = _first_python_block(README.read_text())
    assert code == _first_python_block((DOCS / "quickstart.md").read_text())
    assert 8 <= len(code.strip().splitlines()) <= 15
    assert code.count("model.train()") == 1
    code = code.replace("model.train()", "model.train(max_epochs=2, enable_progress_bar=False)")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README example", "exec"), namespace)
    adata, model = namespace["adata"], namespace["model"]
    assert namespace["latent"].shape == (adata.n_obs, 10)
    assert namespace["expr"].shape == (adata.n_obs, adata.n_vars)
    np.testing.assert_allclose(namespace["expr"].sum(axis=1), 1e4, rtol=1e-4)
    assert model.is_trained
    assert (tmp_path / "pbmc_scvi" / "model.json").is_file()


def test_tutorials_are_the_repository_notebooks():
    """The tutorials are links to notebooks/, so the site shows what the tests run."""
    links = sorted((DOCS / "tutorials").glob("*.ipynb"))
    assert [p.name for p in links] == sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    for link in links:
        assert link.is_symlink()
        assert link.resolve() == (ROOT / "notebooks" / link.name).resolve()


def test_compatibility_page_names_every_gap():
    """Every public member of scvi-tools' SCVI and SCANVI that jaxvi lacks, and every
    argument of theirs that jaxvi's method of the same name lacks, is named on the
    compatibility page (listed by docs/tools/scvi_api_surface.py, as the page says)."""
    import pytest

    pytest.importorskip("scvi")
    sys.path.insert(0, str(DOCS / "tools"))
    try:
        import scvi_api_surface
    finally:
        sys.path.remove(str(DOCS / "tools"))
    page = (DOCS / "user_guide" / "compatibility.md").read_text()
    unnamed, checked = [], 0
    for model in ("scvi", "scanvi"):
        for row in scvi_api_surface.surface(model):
            # an absent member is named; a present one, each argument it lacks
            names = row.get("missing_args", []) if row["in_jaxvi"] else [row["name"]]
            for name in names:
                checked += 1
                if not re.search(rf"(?<![\w.]){re.escape(name)}\b", page):
                    unnamed.append(f"{model}: {row['name']} ({name})")
    assert checked > 40
    assert not unnamed, unnamed
