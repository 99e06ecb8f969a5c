"""The runtime dependencies in pyproject.toml are exactly the third-party imports of the library."""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dilconv"
OPTIONAL = {"triton": "_fusion_kernels.py"}
"""Optional imports and the one module that makes them, imported on first use only: Triton for
the fused CUDA WeightedFusion kernels (torch's CUDA wheels ship it; without it, the plain path)."""


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {
        _normalise(re.match(r"[A-Za-z0-9._-]+", spec).group()) for spec in project["dependencies"]
    }


def _imported() -> set[str]:
    """Top-level names of every absolute import in src/dilconv, lazy ones included."""
    names = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "dilconv"} - set(OPTIONAL)


def _distributions(names: set[str]) -> set[str]:
    providers = packages_distributions()
    return {_normalise(dist) for name in names for dist in providers.get(name, [name])}


def test_every_declared_dependency_is_imported_by_the_library():
    unused = _declared() - _distributions(_imported())
    assert not unused, f"declared in pyproject.toml but never imported in src/dilconv: {unused}"


def test_every_third_party_import_is_declared():
    undeclared = _distributions(_imported()) - _declared()
    assert not undeclared, f"imported in src/dilconv but not in pyproject.toml: {undeclared}"


def test_optional_imports_stay_in_their_module():
    for name, home in OPTIONAL.items():
        for path in SRC.rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            modules = {alias.name.partition(".")[0] for node in ast.walk(tree)
                       if isinstance(node, ast.Import) for alias in node.names}
            modules |= {node.module.partition(".")[0] for node in ast.walk(tree)
                        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
            assert (name in modules) == (path.name == home), (name, path.name)
