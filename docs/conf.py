"""Sphinx configuration of fastsgd's documentation site (docs/): MyST Markdown pages, the furo theme,
and an API reference that autodoc builds from the docstrings of the installed or built-in-place package.

Build offline, warnings as errors: python -m sphinx -W --keep-going -b html docs docs/_build/html
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The package as built in place (python setup.py build_ext --inplace) when it is not installed.
sys.path.insert(0, str(ROOT))

import fastsgd  # noqa: E402  (after the path: autodoc needs the built extension)

project = "fastsgd"
author = "the fastsgd developers"
copyright = "the fastsgd developers"
release = version = fastsgd.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_data"]

# MyST: anchors for headings (links like guide/input-rules.md#the-rules), colon fences.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# autodoc: members in source order; signatures as written, without type hints.
autodoc_member_order = "bysource"
autodoc_typehints = "none"
# Docstrings follow torch's (Google-style "Args:") or numpy's sections.
napoleon_numpy_docstring = True
napoleon_google_docstring = True

html_theme = "furo"
html_title = f"fastsgd {release}"
# Nothing is fetched at build time: no intersphinx, no remote images.
