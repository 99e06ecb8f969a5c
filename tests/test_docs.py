"""The Sphinx site builds with -W (every docstring renders, every gallery script runs), holds
the guides, study pages and gallery, and documents every public name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dilconv

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = [
    "index", "api",
    *(f"guides/{name}" for name in ("install", "own_model", "dilate_resnet", "receptive_fields",
                                    "training", "benchmarks", "export", "weights")),
    "studies/index", *(f"studies/seed00{i}" for i in range(4)),
    "auto_examples/index",
    *(f"auto_examples/plot_{name}" for name in (
        "receptive_fields", "effective_receptive_field", "pyramid_data_flow",
        "resizer_comparison", "detector_predictions", "dilatednet_predictions")),
]
FIGURES = ["receptive_fields_001", "receptive_fields_002", "effective_receptive_field_001",
           "pyramid_data_flow_001", "pyramid_data_flow_002", "resizer_comparison_001",
           "detector_predictions_001", "dilatednet_predictions_001"]


def build_site(out: Path) -> subprocess.CompletedProcess:
    """One full HTML build (gallery included) into ``out``, warnings as errors."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS),
         str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )


def documented_names(site: Path) -> set[str]:
    """Python objects in the site's ``objects.inv``."""
    from sphinx.util.inventory import InventoryFile

    with open(site / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    return {name for kind, objects in inventory.items() if kind.startswith("py:")
            for name in objects}


# One test, so that ``pytest -n 2`` builds the site once (two builds would also race on the
# gallery's output folder, docs/auto_examples).
@pytest.mark.slow
def test_docs_build_with_guides_gallery_and_every_public_name(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("furo")
    pytest.importorskip("sphinx_gallery")
    result = build_site(tmp_path)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]

    missing_pages = [page for page in PAGES if not (tmp_path / f"{page}.html").is_file()]
    assert not missing_pages

    images = {p.name for p in (tmp_path / "_images").glob("sphx_glr_plot_*.png")}
    missing_images = [name for name in FIGURES if f"sphx_glr_plot_{name}.png" not in images]
    assert not missing_images, sorted(images)

    documented = documented_names(tmp_path)
    missing_names = [name for name in dilconv.__all__ if f"dilconv.{name}" not in documented]
    assert not missing_names
