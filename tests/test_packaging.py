"""setup.py: every runtime dependency is imported by the package, and every package it imports is declared.
Imports inside the package point one way (no cycles; models know no checkpoints or training); every command
names a function."""

import ast
import importlib
import importlib.metadata
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lexvla_jax"
# Declared but not imported by name: jaxlib is jax's backend (pinned to jax's version).
NOT_IMPORTED = {"jaxlib"}


def _setup_requirements() -> tuple[set[str], set[str]]:
    """Distribution names in setup.py: (INSTALL_REQUIRES, every requirement, extras included)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    pinned = lambda node: {
        _normalise(re.split(r"[\[=<>~]", c.value)[0])
        for c in ast.walk(node)
        if isinstance(c, ast.Constant)
        and isinstance(c.value, str)
        and re.fullmatch(r"[\w.\-\[\]]+(==|>=|~=|<)\d\S*", c.value)
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


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_imports() -> dict[str, set[str]]:
    """`{module: package modules it imports}`, imports inside functions included."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
                candidates = submodules or [base]  # `from pkg import name`: the module pkg.name, else pkg
            else:
                continue
            targets |= {c for c in candidates if c in modules and c != name}
        graph[name] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles: for each module, a path back to itself (if any)."""
    found = []
    for start in sorted(graph):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found.append(path + [start])
                    stack = []
                    break
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
    return found


def test_imports_point_one_way():
    graph = _package_imports()
    assert len(graph) > 50 and "lexvla_jax.models.lexvla" in graph["lexvla_jax.build"]
    assert not _cycles(graph), _cycles(graph)[:3]
    for name, targets in graph.items():
        if name.startswith("lexvla_jax.models"):
            outside = {t for t in targets if not t.startswith("lexvla_jax.models") and t != "lexvla_jax.sharding"}
            assert not outside, f"{name} imports {sorted(outside)}: model files know no checkpoints or training"
    flax_in_losses = [
        node
        for node in ast.walk(ast.parse((PACKAGE / "losses.py").read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any("flax" in (getattr(node, "module", None) or alias.name) for alias in node.names)
    ]
    assert not flax_in_losses
    # The embedded job's preparation is reached only from commands and configs, never from the library.
    for name, targets in graph.items():
        if not name.startswith(("lexvla_jax.miniature", "lexvla_jax.commands", "lexvla_jax.cli")):
            reached = sorted(t for t in targets if t.startswith("lexvla_jax.miniature"))
            assert not reached, f"{name} imports {reached}: only commands may run the miniature's preparation"


def test_only_commands_parse_arguments():
    """Every command's argparse lives under `commands/` (configlib parses `--config` for all of them)."""
    parsing = sorted(
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "argparse" in path.read_text() and path.parent.name != "commands" and path.name != "configlib.py"
    )
    assert not parsing, f"library modules that parse command lines: {parsing}"


def test_cycle_finder_sees_a_lazy_import_back():
    graph = {"a": {"b"}, "b": {"c"}, "c": set()}
    assert not _cycles(graph)
    graph["c"] = {"a"}
    assert ["a", "b", "c", "a"] in _cycles(graph)


def test_every_command_names_a_function():
    from lexvla_jax import cli

    for name, (target, _) in cli.COMMANDS.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function, None)), name


def _layout_block() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    return [line.split()[0] for line in block.splitlines() if re.match(r"  \S", line)]  # lexvla_jax/'s entries


def test_readme_layout_lists_the_package_files():
    listed = set(_layout_block())
    files = {p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    folders = {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} - {"models/"}
    models = {f"models/{p.name}" for p in (PACKAGE / "models").glob("*.py") if p.name != "__init__.py"}
    present = files | folders | models
    assert present == listed, f"missing from README: {sorted(present - listed)}; gone: {sorted(listed - present)}"


def test_architecture_doc_names_files_that_exist():
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"[\w/]+\.py\b", text))
    files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if ".venv" not in p.parts]
    assert len(named) > 20
    gone = sorted(n for n in named if not any(f == n or f.endswith("/" + n) for f in files))
    assert not gone, f"docs/architecture.md names files that do not exist: {gone}"


def _requirements(node) -> list[str]:
    return [
        c.value
        for c in ast.walk(node)
        if isinstance(c, ast.Constant)
        and isinstance(c.value, str)
        and re.fullmatch(r"[\w.\-\[\]]+(==|>=|~=|<)\d\S*", c.value)
    ]


def test_ranges_admit_the_constrained_versions():
    """setup.py states compatible ranges (exact pins only for torch's CPU build); constraints.txt pins each of them
    to a version inside its range, so `pip install -c constraints.txt` installs exactly what CI tests."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[_normalise(name)] = version
    requirements = [Requirement(r) for r in _requirements(ast.parse((ROOT / "setup.py").read_text()))]
    assert len(requirements) > 25
    for req in requirements:
        name = _normalise(req.name)
        assert name in pins, f"{req} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt {name}=={pins[name]} not in {req}"
        )
        exact = [s for s in req.specifier if s.operator == "=="]
        assert not exact or name == "torch", f"{req}: use a compatible range (the exact version is in constraints.txt)"
    python = re.search(r'python_requires="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    assert python == ">=3.11"
