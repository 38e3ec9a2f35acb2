"""MkDocs hook and Markdown extension: math rendered to MathML when the site is built.

``pymdownx.arithmatex`` (generic mode) finds the math of a page, ``\\( \\)``, ``\\[ \\]``,
``$ $`` and ``$$ $$``, and wraps it in ``<span class="arithmatex">`` / ``<div class="arithmatex">``.
:class:`MathMLExtension` then replaces each of those with the MathML that the PyPI package
``latex2mathml`` (in the ``docs`` extra) makes from the TeX. The browser draws
MathML itself (MathML Core: Chromium 109+, Firefox, Safari), so the site needs no script and no
network: it reads the same offline. The docstrings rendered by mkdocstrings go through the same
extension (their ``:math:`` roles and ``.. math::`` blocks become ``$ $`` and ``$$ $$`` in
``rst_to_markdown.py``).

The file is listed under ``hooks:`` in ``mkdocs.yml``; its ``on_config`` adds the extension to
the Markdown extensions before the plugins read them (mkdocstrings builds its renderer from that
list). A formula that latex2mathml cannot convert is logged as a warning, which fails
``mkdocs build --strict``.
"""

from __future__ import annotations

import html
import logging
import re
import xml.etree.ElementTree as etree
from typing import Any

from latex2mathml.converter import convert as latex_to_mathml
from markdown import Extension, Markdown
from markdown.treeprocessors import Treeprocessor

_log = logging.getLogger("mkdocs.hooks.mathml")

#: arithmatex's generic output: the TeX wrapped in \( \) (inline) or \[ \] (display).
_WRAPPED = re.compile(r"\A\s*\\([(\[])(.*)\\([)\]])\s*\Z", re.DOTALL)
#: a display formula with rows (``\\``) or alignment (``&``) outside an environment.
_ROWS = re.compile(r"\\\\|(?<!\\)&")
#: an environment (``\begin{cases} ... \end{cases}``), whose rows are its own.
_ENVIRONMENT = re.compile(r"\\begin\{(\w+\*?)\}.*?\\end\{\1\}", re.DOTALL)
#: ``\text{...}`` (latex2mathml keeps the backslash of ``\_`` in text: ``warmup\_steps``).
_TEXT = re.compile(r"\\text\{([^{}]*)\}")


def to_mathml(tex: str, display: bool) -> str:
    """The MathML of one formula (``display=True``: a block). A display formula of several
    rows or with ``&`` alignment points outside any environment is set in a ``split``
    environment, as Sphinx sets a multi-line ``.. math::`` block (latex2mathml has no
    ``aligned``)."""
    tex = tex.strip()
    if display and _ROWS.search(_ENVIRONMENT.sub("", tex)):
        tex = "\\begin{split}" + tex + "\\end{split}"
    tex = _TEXT.sub(lambda m: "\\text{" + re.sub(r"\\([_%#])", r"\1", m.group(1)) + "}", tex)
    return latex_to_mathml(tex, display="block" if display else "inline")


class _MathMLTreeprocessor(Treeprocessor):
    """Replaces arithmatex's wrapped TeX by MathML (stashed, so Markdown leaves it as is)."""

    def run(self, root: etree.Element) -> None:
        for el in root.iter():
            if "arithmatex" not in (el.get("class") or "").split() or len(el):
                continue
            match = _WRAPPED.match(el.text or "")
            if match is None:
                continue
            opening, tex = match.group(1), match.group(2)
            display = opening == "["
            if display:
                tex = html.unescape(tex)  # arithmatex escapes the HTML specials of display math
            try:
                mathml = to_mathml(tex, display)
            except Exception as exc:  # noqa: BLE001 - any failure of the converter is reported
                _log.warning("math: latex2mathml could not convert %r: %s", tex, exc)
                continue
            el.text = self.md.htmlStash.store(mathml)
            el.set("class", " ".join([*(el.get("class") or "").split(), "mathml"]))


class MathMLExtension(Extension):
    """A Markdown extension: arithmatex's math as MathML (loads ``pymdownx.arithmatex``
    in generic mode if the Markdown instance does not have it)."""

    def extendMarkdown(self, md: Markdown) -> None:
        if "arithmatex-inline" not in md.inlinePatterns:
            from pymdownx.arithmatex import ArithmatexExtension

            ArithmatexExtension(generic=True).extendMarkdown(md)
        # after the inline patterns (priority 20), before the pretty-printer (10)
        md.treeprocessors.register(_MathMLTreeprocessor(md), "mathml", 15)
        md.registerExtension(self)


def on_config(config: Any) -> Any:
    """MkDocs hook: add :class:`MathMLExtension` to the site's Markdown extensions."""
    config.markdown_extensions.append(MathMLExtension())
    return config


try:  # run before the plugins' on_config (mkdocstrings copies the list of extensions there)
    from mkdocs.plugins import event_priority

    on_config = event_priority(100)(on_config)
except ImportError:  # pragma: no cover - imported outside a docs build (tests)
    pass
