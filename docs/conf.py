"""Sphinx configuration of the pagescan documentation.

Build: ``sphinx-build -W -b html docs OUTDIR`` (``.ci/run`` does, with warnings as
errors). The pages are Markdown (MyST); the API reference is read from the docstrings
of the installed package (autodoc, Google-style sections through napoleon).
"""

from __future__ import annotations

import os
import sys

# Document the source tree even when pagescan is not installed in editable mode.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src")))

import pagescan  # noqa: E402

project = "pagescan"
author = "the pagescan authors"
copyright = "2026, the pagescan authors"
release = pagescan.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# No network at build time: intersphinx inventories are optional.
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}

html_theme = "alabaster"
html_title = f"pagescan {release}"
html_static_path: list[str] = []
