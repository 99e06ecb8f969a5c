"""The runtime dependencies in pyproject.toml are exactly the third-party imports of the library.

The converters (``dilconv.convert``) also import the library they convert from (timm, effdet),
only inside the function that converts and declared in the ``convert`` extra, so that
``import dilconv`` and ``import dilconv.convert`` need neither.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
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


def _declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    specs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", spec).group()) for spec in specs}


def _names(nodes) -> set[str]:
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__", "dilconv"}


def _imported(*, converters: bool = False, module_level: bool = False) -> set[str]:
    """Top-level names of the absolute imports in src/dilconv, lazy ones included; those of
    dilconv/convert with ``converters``, the rest without; only the module-level ones with
    ``module_level``."""
    names = set()
    for path in SRC.rglob("*.py"):
        if (path.parent.name == "convert") != converters:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names |= _names(tree.body if module_level else ast.walk(tree))
    return names - set(OPTIONAL)


def _distributions(names: set[str]) -> set[str]:
    providers = packages_distributions()
    return {_normalise(dist) for name in names for dist in providers.get(name, [name])}


def test_every_declared_dependency_is_imported_by_the_library():
    unused = _declared() - _distributions(_imported() | _imported(converters=True))
    assert not unused, f"declared in pyproject.toml but never imported in src/dilconv: {unused}"


def test_every_third_party_import_is_declared():
    undeclared = _distributions(_imported()) - _declared()
    assert not undeclared, f"imported in src/dilconv but not in pyproject.toml: {undeclared}"


def test_converters_import_their_source_library_only_when_called():
    optional = _distributions(_imported(converters=True)) - _declared()
    undeclared = optional - _declared("convert")
    assert not undeclared, f"imported in dilconv/convert but not in the convert extra: {undeclared}"
    eager = _distributions(_imported(converters=True, module_level=True)) - _declared()
    assert not eager, f"dilconv/convert imports {eager} at module level; import it when called"


def test_blocks_import_converters_only_when_called():
    # The converters import the blocks; a block importing a converter at module level would be
    # an import cycle (resnet.py and _resnet_convert.py were one).
    for path in SRC.glob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                    alias.name for alias in node.names]
                assert not any(n.startswith("dilconv.convert") for n in names), path.name


def test_import_dilconv_imports_no_converter_library():
    code = ("import sys; import dilconv.convert.torchvision_resnet, dilconv.convert; "
            "import dilconv; loaded = {'timm', 'effdet', 'triton'} & set(sys.modules); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ)


def test_optional_imports_stay_in_their_module():
    for name, home in OPTIONAL.items():
        for path in SRC.rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            modules = {alias.name.partition(".")[0] for node in ast.walk(tree)
                       if isinstance(node, ast.Import) for alias in node.names}
            modules |= {node.module.partition(".")[0] for node in ast.walk(tree)
                        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module}
            assert (name in modules) == (path.name == home), (name, path.name)
