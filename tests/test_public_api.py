"""The public surface: every exported name is documented with a runnable example."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
from torch import nn

import dilconv

PUBLIC = sorted(dilconv.__all__)


def test_all_names_exist_and_are_unique():
    assert len(PUBLIC) == len(set(PUBLIC))
    for name in PUBLIC:
        assert hasattr(dilconv, name), name


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_a_docstring_with_an_example(name):
    doc = inspect.getdoc(getattr(dilconv, name)) or ""
    assert ">>>" in doc, f"{name} has no runnable Example in its docstring"


BLOCKS = [n for n in PUBLIC
          if inspect.isclass(getattr(dilconv, n)) and issubclass(getattr(dilconv, n), nn.Module)]


@pytest.mark.parametrize("name", BLOCKS)
def test_every_block_documents_its_shapes(name):
    assert "Shape" in (inspect.getdoc(getattr(dilconv, name)) or "")


def test_every_module_declares_all():
    for info in pkgutil.iter_modules(dilconv.__path__):
        module = importlib.import_module(f"dilconv.{info.name}")
        assert isinstance(getattr(module, "__all__", None), list), info.name


def test_receptive_field_tools_live_in_the_analytic_field_module():
    module = importlib.import_module("dilconv.analytic_field")
    assert inspect.ismodule(module)
    assert module.receptive_field is dilconv.receptive_field


def test_no_public_name_shadows_a_submodule():
    # `from dilconv.x import x` in __init__ rebinds dilconv.x, so `import dilconv.x as m`
    # would give the function instead of the module.
    submodules = sorted(info.name for info in pkgutil.iter_modules(dilconv.__path__))
    shadowed = set(submodules) & set(PUBLIC)
    assert not shadowed, f"public names that hide the submodule of the same name: {shadowed}"
    for name in submodules:
        assert getattr(dilconv, name) is importlib.import_module(f"dilconv.{name}"), name


def test_version_matches_package_metadata():
    from importlib.metadata import version

    assert dilconv.__version__ == version("dilconv")
