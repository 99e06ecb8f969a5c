"""Release hygiene: the sdist and wheel build, pass ``twine check``, hold what they should, and
the wheel installed into a fresh virtual environment imports every public name.

The build runs without isolation (no download of setuptools) from a copy of the source tree, so
the working tree gets no ``build/`` or ``*.egg-info`` from it. The fresh environment has no pip
and no torch of its own: a ``.pth`` line points it at this interpreter's site-packages, whose own
``.pth`` files (the editable install of dilconv among them) a path line does not process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import dilconv

ROOT = Path(__file__).resolve().parents[1]
NOT_COPIED = shutil.ignore_patterns(
    ".venv", ".git", "runs", "dist", "build", "_build", "auto_examples", "*.egg-info",
    "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", ".mypy_cache", "*.onnx",
)

pytest.importorskip("build")
pytest.importorskip("twine")
pytest.importorskip("setuptools")


def _run(*args: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                            timeout=300)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    source = tmp / "source"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    # Without --sdist/--wheel, build makes the sdist and then the wheel *from the sdist*, so a
    # file missing from the sdist fails the wheel.
    _run(sys.executable, "-m", "build", "--no-isolation", "--outdir", tmp / "out", source)
    (sdist,) = (tmp / "out").glob("dilconv-*.tar.gz")
    (wheel,) = (tmp / "out").glob("dilconv-*.whl")
    return sdist, wheel


def test_pyproject_takes_the_version_from_the_package():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project, "the version has one source: dilconv.__version__"
    assert "version" in project["dynamic"]


def test_twine_check_passes(dists):
    out = _run(sys.executable, "-m", "twine", "check", "--strict", *dists)
    assert out.count("PASSED") == 2, out


def test_wheel_holds_only_the_package_its_marker_and_license(dists):
    _, wheel = dists
    assert wheel.name.startswith(f"dilconv-{dilconv.__version__}-py3-none-any"), wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    info = f"dilconv-{dilconv.__version__}.dist-info/"
    strays = [n for n in names if not (n.startswith("dilconv/") or n.startswith(info))]
    assert not strays, f"files outside dilconv/ and {info}: {strays}"
    assert "dilconv/py.typed" in names
    assert f"{info}licenses/LICENSE" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    modules = {p.relative_to(ROOT / "src").as_posix() for p in (ROOT / "src/dilconv").glob("*.py")}
    assert modules <= set(names), f"modules missing from the wheel: {modules - set(names)}"


def test_sdist_holds_the_sources_and_no_build_products(dists):
    sdist, _ = dists
    top = f"dilconv-{dilconv.__version__}/"
    names = [n.removeprefix(top) for n in tarfile.open(sdist).getnames()]
    for required in ("pyproject.toml", "LICENSE", "README.md", "src/dilconv/py.typed",
                     "tests/conftest.py", "examples/__init__.py"):
        assert required in names, f"{required} missing from the sdist"
    for junk in (".venv/", "runs/", "docs/_build/", ".git/", "__pycache__"):
        assert not [n for n in names if junk in n], f"the sdist holds {junk}"


INSIDE_THE_NEW_ENV = """
import importlib.metadata, sys
from pathlib import Path
import torch
import dilconv
venv = Path(sys.prefix).resolve()
assert Path(dilconv.__file__).resolve().is_relative_to(venv), dilconv.__file__
assert not any(Path(p).resolve() == Path(SRC).resolve() for p in sys.path if p), sys.path
assert importlib.metadata.version("dilconv") == dilconv.__version__
missing = [n for n in dilconv.__all__ if getattr(dilconv, n, None) is None]
assert not missing, missing
exec("from dilconv import " + ", ".join(dilconv.__all__))
y = dilconv.DilatedBottleneck(16, 4, dilation=2)(torch.randn(1, 16, 9, 9))
assert y.shape == (1, 16, 9, 9), y.shape
print("OK", dilconv.__version__, len(dilconv.__all__))
"""


def test_the_wheel_installs_into_a_fresh_venv_and_imports_every_public_name(dists, tmp_path):
    _, wheel = dists
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])")
                .strip())
    # Reuse this interpreter's torch: a path line, not an install.
    (site / "reuse_parent_torch.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--quiet", wheel)
    # -I: no PYTHONPATH, no user site, no current directory on sys.path.
    script = f"SRC = {str(ROOT / 'src')!r}\n" + INSIDE_THE_NEW_ENV
    out = _run(python, "-I", "-c", script, cwd=tmp_path)
    assert out.split() == ["OK", dilconv.__version__, str(len(dilconv.__all__))], out
