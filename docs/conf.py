"""Sphinx configuration for dilconv.

The gallery (``docs/gallery/plot_*.py``) runs at every build, so its figures come from the code
as it is; it imports ``examples.*``, hence the repository root on ``sys.path``. Nothing is
fetched from the network (no intersphinx, no weights, no data sets).
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The gallery's scripts are small CPU runs; one thread each avoids two OpenMP threads waiting
# for each other on a shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from dilconv import __version__ as release  # noqa: E402

project = "dilconv"
author = "dilconv developers"
version = release
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_custom_sections = [("Shape", "params_style")]
html_theme = "furo"
html_title = "dilconv"
exclude_patterns = ["_build", "gallery/README.rst"]

sphinx_gallery_conf = {
    "examples_dirs": "gallery",
    "gallery_dirs": "auto_examples",
    # Every script runs (the default runs only names starting with plot_, which all ours do,
    # but a helper module added later must not be skipped silently either).
    "filename_pattern": r".*\.py$",
    "ignore_pattern": r"__init__\.py",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "run_stale_examples": True,
    "download_all_examples": False,
    "write_computation_times": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib",),
    "min_reported_time": 1,
}
