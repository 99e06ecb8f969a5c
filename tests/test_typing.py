"""The package ships ``py.typed``, so mypy checks it (``make test`` runs it) with no blanket
ignores: the configuration and the ``# type: ignore`` comments are checked here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "dilconv"


def _mypy_config() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]


def test_the_package_is_marked_typed():
    assert (SRC / "py.typed").is_file()


def test_mypy_checks_the_package_strictly_without_blanket_ignores():
    config = _mypy_config()
    assert config["files"] == ["src/dilconv"]
    for flag in ("disallow_untyped_defs", "check_untyped_defs", "warn_unused_ignores",
                 "warn_redundant_casts"):
        assert config.get(flag) is True, flag
    assert not config.get("ignore_errors")
    assert not config.get("ignore_missing_imports"), "only per-module, for untyped libraries"
    for override in config.get("overrides", []):
        assert not override.get("ignore_errors"), override
        modules = override["module"]
        modules = [modules] if isinstance(modules, str) else modules
        assert not [m for m in modules if m.split(".")[0] == "dilconv"], override


def test_make_test_runs_mypy_before_pytest():
    recipe = re.search(r"^test:.*\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M)
    assert recipe is not None
    commands = recipe.group(1).splitlines()
    mypy = [i for i, c in enumerate(commands) if "/bin/mypy" in c]
    pytest_ = [i for i, c in enumerate(commands) if "pytest" in c]
    assert mypy and pytest_ and mypy[0] < pytest_[0], commands


def test_every_type_ignore_names_its_error_code():
    bare = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(SRC.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"type:\s*ignore(?!\[)", line)
    ]
    assert not bare, "a # type: ignore without [code] hides every error on its line:\n" + (
        "\n".join(bare))
