"""Griffe extension for the docs build: render the library's reST-flavoured docstrings.

The docstrings follow the Google layout (``Args:``, ``Returns:``, ...) but use a few reST
constructs that Markdown does not know. On every object griffe loads, this rewrites:

* ``Example:`` (singular) -> ``Examples:``, so doctest examples render as code;
* ``:math:`x``` -> ``$x$`` and ``.. math::`` blocks -> ``$$ ... $$`` (found by
  ``pymdownx.arithmatex`` and converted to MathML at build time by ``mathml.py`` beside this file);
* ``:func:`name```, ``:class:`~mod.Name``` and the other Python roles -> ``name`` in code;

and shows the value of a default read from a table (``rho: float = SCAO_DEFAULTS["rho"]`` is
rendered ``rho: float = 0.999``), so the signatures show the real defaults.

Only the rendered documentation changes; the docstrings in the source stay as they are.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|mod|meth|attr|data|obj|exc|const):`~?([^`]+)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.MULTILINE)
_TABLE_DEFAULT = re.compile(r"\b[A-Z][A-Z0-9_]*_DEFAULTS\[")


def _math_blocks(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() != ".. math::":
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(line.lstrip())]
        body: list[str] = []
        i += 1
        while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        out.extend([indent + "$$", *(indent + b for b in body if b), indent + "$$", ""])
    return "\n".join(out)


def convert(text: str) -> str:
    """Rewrite one docstring (see the module docstring)."""
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", text)


def resolve_default(expression: str, module: str) -> str:
    """The ``repr`` of a default written as a table lookup (``SCAO_DEFAULTS["rho"]``, also
    wrapped in a call), evaluated in ``module``; any other expression is returned as it is."""
    if not _TABLE_DEFAULT.search(expression):
        return expression
    return repr(eval(expression, vars(importlib.import_module(module))))  # noqa: S307 - our own source


class RstToMarkdown(griffe.Extension):
    """Apply :func:`convert` to every docstring and :func:`resolve_default` to every default
    once the object tree is built."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
        if isinstance(obj, griffe.Function):
            for param in obj.parameters:
                if param.default is not None and _TABLE_DEFAULT.search(str(param.default)):
                    param.default = resolve_default(str(param.default), obj.module.path)
