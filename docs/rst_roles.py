"""A griffe extension for the docs site: the docstrings' reStructuredText roles
(``:class:`~sfrtr.TokenManager` ``, ``:meth:`aclose` ``...) shown as code, as a reader
of the source sees them, instead of raw markup."""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

_ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|data|exc|mod|obj|const):`~?([^`]+)`")


def _plain(match: re.Match[str]) -> str:
    target = match.group(1)
    # ``~a.b.C`` shows ``C``, as Sphinx does; a plain target shows as written.
    shown = target.rsplit(".", 1)[-1] if match.group(0).count("~") else target
    return f"`{shown}`"


class RstRoles(Extension):
    """Rewrite every role in every docstring before it is rendered."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_plain, obj.docstring.value)
