"""The package's structure rules, checked on the source so that they stay true.

No import circles between jaxvi's modules; no function-local import of a jaxvi module (the
usual way a circle is dodged); no module imports another package's private modules or names;
no file over 600 lines; the final model classes stay small.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxvi"
MAX_LINES = 600
MAX_CLASS_LINES = {"SCVI": 400}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.Module, name: str, is_package: bool):
    """``(imported module, node, at module level)`` for every jaxvi import in ``tree``."""
    top_level = set(map(id, tree.body))
    parent = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(parent.split(".")[: len(parent.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "jaxvi" or target.startswith("jaxvi."):
                yield target, node, id(node) in top_level


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        deps = set()
        for target, _, top in _imports(tree, name, path.name == "__init__.py"):
            if top and target in MODULES and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def _package_of(module: str) -> str:
    """The subpackage a module belongs to (``jaxvi.data`` for ``jaxvi.data._cells``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def test_no_import_circles():
    graph = _graph()
    # A package's __init__ importing its own submodules is how it re-exports them; a
    # submodule importing its own package's __init__ back is a circle.
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_function_local_jaxvi_imports():
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for target, node, top in _imports(tree, name, path.name == "__init__.py"):
            if not top:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {target}")
    assert not found, "function-local imports of jaxvi modules:\n" + "\n".join(found)


def test_no_module_reads_another_packages_private_names():
    found = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        own = _package_of(name)
        for target, node, _ in _imports(tree, name, path.name == "__init__.py"):
            # jaxvi._settings and jaxvi._version are the package's own, shared by all
            private_module = any(p.startswith("_") for p in target.split(".")[2:])
            if private_module and _package_of(target) != own:
                found.append(f"{name}:{node.lineno} imports the private module {target}")
            if isinstance(node, ast.ImportFrom) and _package_of(target) != own:
                for alias in node.names:
                    if alias.name.startswith("_") and alias.name != "__version__":
                        found.append(f"{name}:{node.lineno} imports the private name {alias.name}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_stay_small(name):
    n = len(MODULES[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{MODULES[name]} has {n} lines (at most {MAX_LINES})"


@pytest.mark.parametrize(("class_name", "limit"), sorted(MAX_CLASS_LINES.items()))
def test_final_model_classes_stay_small(class_name, limit):
    for path in MODULES.values():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                n = node.end_lineno - node.lineno + 1
                assert n <= limit, f"{class_name} has {n} lines (at most {limit})"
                return
    pytest.fail(f"class {class_name} not found")
