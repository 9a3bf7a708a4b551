"""Sphinx configuration of the jaxvi documentation (MyST Markdown, notebooks via myst-nb).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``tests/test_docs.py``
runs exactly this, so a warning fails CI). Nothing here reaches the network: no intersphinx,
and notebooks are rendered as stored, never executed (``tests/test_notebook.py`` runs them).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Document the checkout this file belongs to, not whichever jaxvi happens to be installed.
sys.path.insert(0, str(ROOT))

import jaxvi  # noqa: E402

project = "jaxvi"
author = "the jaxvi authors"
copyright = "the jaxvi authors"  # noqa: A001
release = jaxvi.__version__
version = release

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# .rst first: autosummary writes its generated stubs with the first suffix.
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "**.ipynb_checkpoints"]

# MyST: heading anchors so that ``[text](page.md#a-heading)`` links are checked.
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3

# Notebooks: shown with whatever outputs they store; executing them belongs to the tests.
nb_execution_mode = "off"

# API reference from the numpydoc docstrings.
autosummary_generate = True
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_param = True
# Attributes as a field list: `jaxvi.settings` is an instance, and `.. attribute::` entries
# nested in its `py:data` entry would be filed as module attributes of `jaxvi`.
napoleon_use_ivar = True

# Every cross-reference must resolve, so a renamed function fails the build. Targets outside
# these docs (no intersphinx: the build stays offline) and jaxvi modules that have no API page
# yet are listed here; give a module a page, then delete it from this list.
nitpicky = True
_EXTERNAL = ["anndata", "collections", "flax", "jax", "jaxlib", "numpy", "numpyro", "optax",
             "os", "pandas", "pathlib", "scipy", "sparse", "typing"]
_UNDOCUMENTED = ["bridge", "card", "checkpoint", "dataset", "datasets", "de", "demo",
                 "distributed", "importance", "inference", "io", "likelihood_comparison",
                 "memory", "model", "module", "nn", "posterior", "registry", "scarches",
                 "scvi_io", "sharding", "special", "streaming", "torchfile", "train"]
nitpick_ignore_regex = [
    *((r"py:.*", rf"{name}(\..*)?") for name in _EXTERNAL),
    *((r"py:.*", rf"jaxvi\.{name}(\..*)?") for name in _UNDOCUMENTED),
]

html_theme = "furo"
html_title = f"jaxvi {release}"


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """NamedTuple fields are documented in their class's Attributes section already."""
    doc = getattr(obj, "__doc__", None) or ""
    if what == "class" and doc.startswith("Alias for field number"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
