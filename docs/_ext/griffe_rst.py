"""Griffe extension: render the reST bits of the package's docstrings as Markdown.

The docstrings are Google style but use a few reST constructs that Sphinx would understand and
Markdown does not: roles (``:class:`X```) become inline code, an ``Example::`` literal block a
fenced Python block, and a ``.. math::`` block a ``$$`` block (typeset by KaTeX in
the browser, through ``pymdownx.arithmatex``).
"""

from __future__ import annotations

import re
import textwrap
from typing import Any

import griffe

ROLE = re.compile(r":(?:class|func|mod|meth|attr|data|obj|exc):`~?([^`]+)`")
BLOCKS = {"Example::": ("**Example:**\n\n```python", "```"), ".. math::": ("$$", "$$")}


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def to_markdown(text: str) -> str:
    """The docstring ``text`` with its reST roles and blocks made Markdown."""
    lines = ROLE.sub(r"`\1`", text).splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        marker = lines[i].strip()
        if marker not in BLOCKS:
            out.append(lines[i])
            i += 1
            continue
        base = _indent(lines[i])
        j = i + 1
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > base):
            j += 1
        body = textwrap.dedent("\n".join(lines[i + 1 : j])).strip("\n")
        opening, closing = BLOCKS[marker]
        pad = " " * base
        out += [pad + row for row in (*opening.split("\n"), *body.split("\n"), closing)]
        if j < len(lines):
            out.append("")
        i = j
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring once it is loaded, before mkdocstrings parses it."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Convert ``obj``'s docstring, if it has one."""
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
