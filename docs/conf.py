"""Sphinx configuration: ``sphinx-build -W --keep-going -b html docs docs/_build/html``.

Warnings are errors and ``nitpicky`` is on, so a cross-reference to nothing fails the
build. The API page must document every name in ``jfusion.__all__`` (checked below).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import jfusion  # noqa: E402

project = "jfusion"
author = "the jfusion authors"
copyright = "the jfusion authors; Apache-2.0"  # noqa: A001
release = version = "0.1.0"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "myst_parser",  # the tutorial, guides and the results pages are markdown
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3

# Google-style docstrings; "Attributes:" as fields, so NamedTuple and dataclass attributes are
# not documented twice (once by napoleon, once by autodoc).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True
# The attributes' types are in the class signature; as :vartype: fields, a type such as
# ``int | tuple[int, int] | None`` is split at its commas into broken references.
napoleon_attr_annotations = False

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = False
add_module_names = False

nitpicky = True
# Types from other libraries (no intersphinx: the build runs offline) and the typing
# aliases used in signatures.
nitpick_ignore_regex = [
    (r"py:.*", r"(jax|jaxlib|flax|nnx|nn|np|numpy|optax|ott|typing|collections\.abc|dataclasses|enum)(\..*)?"),
    (r"py:.*", r"(Array|PyTree|Any|Callable|Sequence|Mapping|Iterable|Collection|Literal|Protocol|NamedTuple|Hashable)"),
    (r"py:.*", r"(Entry|Entries|Dim|Points|AlignmentMethod|Importance|TrainApply|Model|Variables|Subset|Progress|Layer|CellKind)"),
    (r"py:class", r"(optional|callable|float|int|str|bool|tuple|list|dict|None|ValueError|UserWarning|Exception)"),
]

html_theme = "alabaster"
html_theme_options = {"description": "Fuse trained neural networks with optimal transport, in JAX."}
html_static_path: list[str] = []


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
    # NamedTuple fields carry "Alias for field number N"; the class's Attributes say more.
    doc = getattr(obj, "__doc__", None) or ""
    if isinstance(obj, property) and doc.startswith("Alias for field number"):
        return True
    return None


def _linen_signature(app, what, name, obj, options, signature, return_annotation):
    # A linen Module's dataclass signature ends in ``parent: ... = <flax...Sentinel object>``,
    # which is no Python expression: Sphinx would fall back to splitting the whole argument
    # list at commas (breaking ``tuple[int, int]``). ``parent`` is linen's own plumbing.
    if what == "class" and signature and "_Sentinel object>" in signature:
        signature = re.sub(r",\s*parent: [^=]*= <[^>]*>", "", signature)
    return signature, return_annotation


def _check_api_coverage(app):
    """Every name in ``jfusion.__all__`` has an autodoc directive on the API page."""
    text = (Path(app.srcdir) / "api.rst").read_text()
    documented = set(re.findall(r"^\.\. auto(?:function|class|exception|module|data):: jfusion\.(\w+)", text, flags=re.M))
    missing = sorted(set(jfusion.__all__) - documented)
    if missing:
        from sphinx.util import logging

        logging.getLogger(__name__).warning(f"api.rst does not document {missing} (in jfusion.__all__)")


def setup(app):
    app.connect("autodoc-skip-member", _skip_namedtuple_fields)
    app.connect("autodoc-process-signature", _linen_signature)
    app.connect("builder-inited", _check_api_coverage)
