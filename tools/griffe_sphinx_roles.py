"""Griffe extension for the documentation site: Sphinx markup in docstrings rendered as Markdown.

The package's docstrings are Google style with Sphinx cross-reference roles (``:class:`Pruner```) and
reST literal-block markers (``Example::``). mkdocstrings renders Markdown, where those would show as
raw text, so this extension turns each role into inline code and each ``::`` marker into ``:``
(the indented block after it is already a Markdown code block). mkdocs.yml loads it.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

__all__ = ["SphinxRoles", "to_markdown"]

_ROLE = re.compile(
    r":(?:py:)?(?:attr|class|data|exc|func|meth|mod|obj|const):`(?:([^`<]*?)\s*<[^`>]+>|(~)?\.?([^`]+))`"
)
_LITERAL_MARKER = re.compile(r"(?m)(\S)::$")


def to_markdown(text: str) -> str:
    """Rewrite Sphinx roles and reST literal-block markers as Markdown.

    Args:
        text: A docstring.

    Returns:
        The docstring with ``:role:`a.b.c``` as `` `a.b.c` ``, ``:role:`~a.b.c``` as `` `c` ``,
        ``:role:`title <target>``` as `` `title` `` and a line-final ``::`` as ``:``.

    Example:
        >>> to_markdown("See :class:`~lightning_prune.Pruner` and :meth:`prune`. Example::")
        'See `Pruner` and `prune`. Example:'
    """

    def code(match: re.Match[str]) -> str:
        title, tilde, target = match.groups()
        if title is None:
            title = target.rsplit(".", 1)[-1] if tilde else target
        return f"`{title}`"

    return _LITERAL_MARKER.sub(r"\1:", _ROLE.sub(code, text))


class SphinxRoles(Extension):
    """Rewrite every docstring with :func:`to_markdown` as Griffe loads it."""

    def on_instance(self, *, obj: Object, **kwargs: Any) -> None:
        """Rewrite the docstring of one loaded object.

        Args:
            obj: The object Griffe just loaded.
            **kwargs: The hook's other arguments, unused.
        """
        if obj.docstring is not None:
            obj.docstring.value = to_markdown(obj.docstring.value)
