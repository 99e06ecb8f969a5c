"""Sphinx configuration for dilconv."""

project = "dilconv"
author = "dilconv developers"
release = "0.1.0"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_custom_sections = [("Shape", "params_style")]
html_theme = "furo"
exclude_patterns = ["_build"]
