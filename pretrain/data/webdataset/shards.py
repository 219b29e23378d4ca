"""Shard lists: paths, brace patterns (``a/{00000..00099}.tar``), globs, ``::``-joined lists."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence

_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_ALTERNATIVES = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expands ``{000..012}`` numeric ranges (zero padding kept) and ``{a,b}`` alternatives."""
    match = _RANGE.search(pattern)
    if match:
        first, last = match.group(1), match.group(2)
        width = len(first) if first.startswith("0") and len(first) > 1 else 0
        step = 1 if int(last) >= int(first) else -1
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [
            expanded
            for number in range(int(first), int(last) + step, step)
            for expanded in expand_braces(f"{head}{number:0{width}d}{tail}")
        ]
    match = _ALTERNATIVES.search(pattern)
    if match:
        head, tail = pattern[: match.start()], pattern[match.end() :]
        return [
            expanded
            for choice in match.group(1).split(",")
            for expanded in expand_braces(f"{head}{choice}{tail}")
        ]
    return [pattern]


def resolve_shards(shards: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Paths from paths, brace patterns (``a/{00000..00099}.tar``), globs, ``::``-joined lists.

    Globs are sorted; the order of everything else is kept, so the sample order is reproducible.
    """
    if isinstance(shards, str | os.PathLike):
        shards = str(shards).split("::")
    paths: list[str] = []
    for item in shards:
        for expanded in expand_braces(str(item)):
            if glob.has_magic(expanded):
                matches = sorted(glob.glob(expanded))
                if not matches:
                    raise FileNotFoundError(f"No shard matches {expanded!r}")
                paths.extend(matches)
            else:
                paths.append(expanded)
    if not paths:
        raise ValueError(f"No shards given: {shards!r}")
    return paths
