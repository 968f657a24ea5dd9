"""Each distribution installs on its own: it imports only what it declares, and the dependency
rule holds (core depends on nothing of ours; agent, router and adapters on core only)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())
OURS = {p.name for p in PACKAGES}


def declared(package: Path) -> set[str]:
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0] for req in project["dependencies"]}
    return {name.lower().replace("_", "-") for name in names}


def optional(package: Path) -> set[str]:
    """Distributions of the package's extras (`pip install infermesh-dev[plots]`)."""
    project = tomllib.loads((package / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    names = {
        re.split(r"[\s<>=!~;\[]", req, maxsplit=1)[0] for reqs in extras.values() for req in reqs
    }
    return {name.lower().replace("_", "-") for name in names}


def parse(path: Path, attempts: int = 3) -> ast.Module:
    """`ast.parse` of `path`, retried on CPython 3.11's spurious "AST constructor recursion depth
    mismatch" SystemError (python/cpython#106905: the AST builder's depth counter is shared, so
    another thread building an AST at the same moment, e.g. pytest rewriting a module imported
    by a background thread, corrupts it)."""
    source = path.read_text()
    for attempt in range(attempts):
        try:
            return ast.parse(source, filename=str(path))
        except SystemError as exc:
            if "recursion depth mismatch" not in str(exc) or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def imported_top_modules(package: Path) -> dict[str, str]:
    """Top-level module (or `infermesh.<sub>`) -> the first file that imports it."""
    found: dict[str, str] = {}
    for path in sorted((package / "src").rglob("*.py")):
        tree = parse(path)
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                parts = name.split(".")
                key = ".".join(parts[:2]) if parts[0] == "infermesh" else parts[0]
                found.setdefault(key, str(path.relative_to(ROOT)))
    return found


def distribution_of(module: str) -> str | None:
    if module.startswith("infermesh."):
        return "infermesh-" + module.split(".")[1]
    if module in sys.stdlib_module_names or module == "__future__":
        return None
    dists = packages_distributions().get(module)
    assert dists, f"no installed distribution provides {module!r}"
    return dists[0].lower().replace("_", "-")


@pytest.mark.parametrize("package", PACKAGES, ids=[p.name for p in PACKAGES])
def test_distribution_imports_only_what_it_declares(package: Path) -> None:
    allowed = declared(package) | {package.name}
    # Packages that come with the ones declared (e.g. grpcio's protobuf) must still be declared
    # when imported directly; only these are provided by the declared ones by construction.
    undeclared = {}
    extras = optional(package)
    for module, where in imported_top_modules(package).items():
        if module.lower().replace("_", "-") in extras:
            continue  # an extra's module, imported only when that extra is installed
        dist = distribution_of(module)
        if dist is not None and dist not in allowed:
            undeclared[module] = f"{dist} (imported in {where})"
    assert not undeclared, f"{package.name} imports undeclared distributions: {undeclared}"


@pytest.mark.parametrize("package", PACKAGES, ids=[p.name for p in PACKAGES])
def test_dependency_rule_between_our_distributions(package: Path) -> None:
    ours = declared(package) & OURS
    if package.name == "infermesh-core":
        assert ours == set()
    elif package.name == "infermesh-dev":
        assert "infermesh-core" in ours
    else:
        assert ours == {"infermesh-core"}, f"{package.name} may depend on infermesh-core only"
