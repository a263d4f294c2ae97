"""Name tables: how another checkpoint format's parameter names map to these, as rows of two patterns.

A pattern is a dotted name with ``{placeholders}``: ``{p}`` is weight or bias, ``{proj}`` one of an
attention's q/k/v/out projections, ``{mlp}`` a layer of an MLP in transformers' naming, ``{rest}`` any
rest of a name; any other placeholder is an index. A placeholder matches the same text on both sides.
"""

from __future__ import annotations

import re

_PLACEHOLDERS = {
    "p": "weight|bias",
    "proj": "[qkv]_proj|out_proj",
    "mlp": r"proj_in|proj_out|layers\.\d+",
    "rest": ".+",
}
_INDEX = r"\d+"


def _regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", pattern)  # text, name, text, name, ..., text
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS.get(part, _INDEX)})"
        for i, part in enumerate(parts)
    )
    return re.compile(regex)


class NameTable:
    """Rows of (their name, our name) patterns; the first row that matches a name maps it."""

    def __init__(self, rows: list[tuple[str, str]]):
        self.rows = [(theirs, ours, _regex(theirs), _regex(ours)) for theirs, ours in rows]

    def ours(self, name: str) -> str | None:
        """Their name -> ours (None if no row matches)."""
        for _, ours, theirs_re, _ in self.rows:
            if match := theirs_re.fullmatch(name):
                return ours.format(**match.groupdict())
        return None

    def theirs(self, name: str) -> tuple[str, dict[str, str]] | None:
        """Our name -> (their name pattern, the placeholders' values), or None if no row matches."""
        for theirs, _, _, ours_re in self.rows:
            if match := ours_re.fullmatch(name):
                return theirs, match.groupdict()
        return None
