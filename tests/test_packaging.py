"""setup.py: every runtime dependency is imported by the package, and every package it imports is declared."""

import ast
import importlib.metadata
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lexvla_jax"
# Declared but not imported by name: jaxlib is jax's backend; tensorflow-datasets feeds the eval readers.
NOT_IMPORTED = {"jaxlib", "tensorflow-datasets"}


def _setup_requirements() -> tuple[set[str], set[str]]:
    """Distribution names in setup.py: (INSTALL_REQUIRES, every pinned requirement, extras included)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    pinned = lambda node: {
        _normalise(re.split(r"[\[=]", c.value)[0])
        for c in ast.walk(node)
        if isinstance(c, ast.Constant) and isinstance(c.value, str) and re.fullmatch(r"[\w.\-\[\]]+==\S+", c.value)
    }
    install = [n.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == "INSTALL_REQUIRES"]
    assert install, "setup.py defines no INSTALL_REQUIRES"
    return pinned(install[0]), pinned(tree)


def _imported_modules() -> set[str]:
    names = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"lexvla_jax", "__future__"}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_dependencies_match_imports():
    required, declared = _setup_requirements()
    distributions = importlib.metadata.packages_distributions()
    imported = {module: {_normalise(d) for d in distributions.get(module, ())} for module in _imported_modules()}
    undeclared = sorted(module for module, dists in imported.items() if not dists & declared)
    assert not undeclared, f"imported but in neither install_requires nor an extra of setup.py: {undeclared}"
    provided = set().union(*imported.values())
    unused = sorted(required - provided - NOT_IMPORTED)
    assert not unused, f"in setup.py install_requires but never imported: {unused}"
