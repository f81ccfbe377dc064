"""Griffe extension for the docs build: render ``Example:`` docstring sections as examples.

Griffe's Google-style parser turns an ``Examples:`` section into code blocks (``>>>`` lines and their
output), but treats the singular ``Example:`` -- used throughout this library -- as a free-text
admonition, where ``>>>`` lines would render as nested block quotes and ``['a', 'b']`` outputs as
broken Markdown links. This extension renames the section title before parsing. It changes only the
rendered documentation, never the code.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_TITLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rewrite ``Example:`` section titles to ``Examples:`` in every loaded docstring."""

    def on_instance(self, *, node: Any, obj: griffe.Object, agent: Any, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _EXAMPLE_TITLE.sub(r"\g<indent>Examples:", docstring.value)
