"""Sphinx configuration of the jaxvi documentation (MyST Markdown, notebooks via myst-nb).

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (``tests/test_docs.py``
runs exactly this, so a warning fails CI). Nothing here reaches the network: no intersphinx,
and notebooks are rendered as stored, never executed (``tests/test_notebook.py`` runs them).
"""

from __future__ import annotations

import builtins
import importlib
import inspect
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Document the checkout this file belongs to, not whichever jaxvi happens to be installed.
sys.path.insert(0, str(ROOT))

import jaxvi  # noqa: E402

# The notebooks predate nbformat's cell ids; nbformat fills them in when reading.
warnings.filterwarnings("ignore", message="Cell is missing an id field")

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

# autosummary rewrites its stubs on every build but never deletes one; start clean so that a
# name removed from the API leaves no orphan page behind.
shutil.rmtree(Path(__file__).parent / "api" / "generated", ignore_errors=True)

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

# Every cross-reference must resolve, so a renamed or deleted function fails the build
# (``_resolve_missing`` below decides what else passes).
nitpicky = True
# What jax.Array annotations resolve to; the path does not import (jaxlib's own module is
# ``jaxlib._jax``), so ``_resolve_missing`` cannot tell that it exists.
nitpick_ignore_regex = [(r"py:class", r"jax\.jaxlib\._jax\..*")]

html_theme = "furo"
html_title = f"jaxvi {release}"


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    """NamedTuple fields are documented in their class's Attributes section already."""
    doc = getattr(obj, "__doc__", None) or ""
    if what == "class" and doc.startswith("Alias for field number"):
        return True
    return None


def _skip_builtin_methods(app, what, name, obj, skip, options):
    """A class derived from a builtin (``ModelCard(str)``) lists its own members, not the
    builtin's dozens of methods that ``:inherited-members:`` would add."""
    func = getattr(obj, "__func__", obj)  # a staticmethod (str.maketrans) wraps its function
    owner = getattr(builtins, getattr(func, "__qualname__", "").partition(".")[0], None)
    native = inspect.isbuiltin(func) or inspect.ismethoddescriptor(func)
    if what == "class" and isinstance(owner, type) and native:
        return True
    return None


def _drop_builtin_docstrings(app, what, name, obj, options, lines):
    """A module constant (``EPS = 1e-8``) would otherwise show ``float``'s own docstring."""
    builtin_doc = type(obj).__doc__ if type(obj).__module__ == "builtins" else None
    if (
        what in ("data", "attribute")
        and builtin_doc
        and " ".join(lines).split() == (builtin_doc.split())
    ):
        lines.clear()


def _public_path(target: str) -> str:
    """``jaxvi.likelihoods._likelihood.Likelihood`` -> ``jaxvi.likelihoods.Likelihood``."""
    return ".".join(part for part in target.split(".") if not part.startswith("_"))


def _python_object_exists(target: str) -> bool:
    """Whether ``target`` names an importable module or an attribute of one."""
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # noqa: BLE001 - any import failure means "not this prefix"
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def _resolve_missing(app, env, node, contnode):
    """Resolve or excuse a Python cross-reference that Sphinx found no target for.

    - A private definition path (what type annotations resolve to) is retried at its public
      path: ``jaxvi.likelihoods._likelihood.Likelihood`` links to ``jaxvi.likelihoods.Likelihood``.
    - A reference to an object that exists but has no page (an internal jaxvi module, or
      numpy, pandas, jax, ...: the build is offline, so no intersphinx) is shown as plain text.
    - Anything else, a name that does not exist, is left to fail the build.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    domain = env.get_domain("py")
    public = _public_path(target)
    if public != target:
        found = domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], public, node, contnode
        )
        if found is not None:
            return found
    module = node.get("py:module")
    candidates = [target, f"builtins.{target}"]
    if module:
        candidates.insert(0, f"{module}.{target}")
    if any(_python_object_exists(c) for c in candidates):
        return contnode
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("autodoc-skip-member", _skip_builtin_methods)
    app.connect("autodoc-process-docstring", _drop_builtin_docstrings)
    app.connect("missing-reference", _resolve_missing)
