"""Griffe extension for the docs build: render the library's reST-flavoured docstrings.

The docstrings follow the Google layout (``Args:``, ``Returns:``, ...) but use a few reST
constructs that Markdown does not know. On every object griffe loads, this rewrites:

* ``Example:`` (singular) -> ``Examples:``, so doctest examples render as code;
* ``:math:`x``` -> ``$x$`` and ``.. math::`` blocks -> ``$$ ... $$`` (found by
  ``pymdownx.arithmatex`` and converted to MathML at build time by ``mathml.py`` beside this file);
* ``:func:`name```, ``:class:`~mod.Name``` and the other Python roles -> ``name`` in code;
* an argument entry naming several parameters (``k_min, k_max: clamp of the rank.``) -> one
  entry per parameter, so each is matched to the signature and shows its type and default
  (mkdocstrings would list ``k_min, k_max`` as one unknown, "required" parameter);

and shows the value of a default read from a table (``rho: float = SCAO_DEFAULTS["rho"]`` is
rendered ``rho: float = 0.999``), so the signatures show the real defaults.

Once the package is loaded it also points an alias at the object Python imports where a module
has a submodule and an imported name alike: ``scao_fx/transforms/__init__.py`` runs
``from .scale import scale``, so ``scao_fx.transforms.scale`` is the function at run time, but
griffe gives the name to the submodule, and ``::: scao_fx.scale`` rendered the whole module
(``scale`` and ``scale_by_learning_rate`` a second time in the table of contents).

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
_ARGS_HEADER = re.compile(r"^\s*(?:Args|Arguments|Parameters|Keyword Args|Keyword Arguments|Other Parameters):\s*$")
_GROUPED_ARG = re.compile(r"^(?P<indent>\s+)(?P<names>\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)+)(?P<rest>\s*(?:\([^)]*\))?:(?:\s.*)?)$")


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


def _split_grouped_args(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    section_indent: int | None = None  # indentation of the current "Args:" header, if inside one
    entry_indent: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        if _ARGS_HEADER.match(line):
            section_indent, entry_indent = indent, None
            out.append(line)
            i += 1
            continue
        if section_indent is not None and line.strip() and indent <= section_indent:
            section_indent = None  # the section ended
        match = _GROUPED_ARG.match(line) if section_indent is not None else None
        if match and (entry_indent is None or indent == entry_indent):
            entry_indent = indent
            body = [line]
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i])
                i += 1
            while len(body) > 1 and not body[-1].strip():
                i -= 1
                body.pop()
            for name in match.group("names").split(","):
                out.append(f"{match.group('indent')}{name.strip()}{match.group('rest')}")
                out.extend(body[1:])
            continue
        if section_indent is not None and line.strip() and entry_indent is None:
            entry_indent = indent
        out.append(line)
        i += 1
    return "\n".join(out)


def convert(text: str) -> str:
    """Rewrite one docstring (see the module docstring)."""
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _split_grouped_args(text)
    text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m.group(1)}$", text)
    return _ROLE.sub(lambda m: f"`{m.group(1)}`", text)


def resolve_default(expression: str, module: str) -> str:
    """The ``repr`` of a default written as a table lookup (``SCAO_DEFAULTS["rho"]``, also
    wrapped in a call), evaluated in ``module``; any other expression is returned as it is."""
    if not _TABLE_DEFAULT.search(expression):
        return expression
    return repr(eval(expression, vars(importlib.import_module(module))))  # noqa: S307 - our own source


def _modules(module: griffe.Module):
    yield module
    for sub in module.modules.values():
        if not sub.is_alias:
            yield from _modules(sub)


def retarget_shadowed_aliases(pkg: griffe.Module) -> dict[str, str]:
    """Point every alias of ``pkg`` whose target is a submodule shadowed by an import of the
    same name (``from .scale import scale`` in the submodule's parent) at the imported object,
    as Python resolves it. Returns ``{alias path: new target path}``."""
    changed: dict[str, str] = {}
    for module in _modules(pkg):
        for name, member in list(module.members.items()):
            if not member.is_alias:
                continue
            parent_path, _, last = member.target_path.rpartition(".")
            if parent_path == pkg.path:
                parent = pkg
            elif parent_path.startswith(pkg.path + "."):
                try:
                    parent = pkg[parent_path[len(pkg.path) + 1 :]]
                except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                    continue
            else:
                continue
            if parent.is_alias or not parent.is_module:
                continue
            sub, imported = parent.members.get(last), parent.imports.get(last)
            if sub is None or sub.is_alias or not sub.is_module or not imported or imported == member.target_path:
                continue
            module.set_member(name, griffe.Alias(name, imported, parent=module))
            changed[f"{module.path}.{name}"] = imported
    return changed


class RstToMarkdown(griffe.Extension):
    """Apply :func:`convert` to every docstring and :func:`resolve_default` to every default
    once the object tree is built, and :func:`retarget_shadowed_aliases` to the package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        retarget_shadowed_aliases(pkg)

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
        if isinstance(obj, griffe.Function):
            for param in obj.parameters:
                if param.default is not None and _TABLE_DEFAULT.search(str(param.default)):
                    param.default = resolve_default(str(param.default), obj.module.path)
