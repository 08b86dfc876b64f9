"""Split a long answer into Discord-sized messages without breaking code fences or words.

Discord refuses messages over 2,000 characters. A naive cut can leave a code block open in
one message and bare in the next; here a chunk that ends inside a fence closes it, and the
next chunk reopens it with the same info string (language), so every message renders.
"""

from __future__ import annotations

import re
from typing import NamedTuple

DISCORD_LIMIT = 2000
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


class _Fence(NamedTuple):
    reopen: str  # the line that reopens the block in the next chunk, e.g. "```python"
    marker: str  # the marker that closes it, e.g. "```"


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Return chunks of at most ``limit`` characters whose code fences are all balanced."""
    if limit < 60:
        raise ValueError("limit must leave room for code fences (>= 60)")
    text = text.strip("\n")
    if not text:
        return []
    if len(text) <= limit and "```" not in text and "~~~" not in text:
        return [text]

    chunks: list[str] = []
    lines: list[str] = []
    size = 0  # len("\n".join(lines))
    fence: _Fence | None = None

    def flush() -> None:
        nonlocal lines, size
        if lines and not (fence is not None and lines == [fence.reopen]):
            chunks.append("\n".join(lines) + (f"\n{fence.marker}" if fence is not None else ""))
        lines = [fence.reopen] if fence is not None else []
        size = len(fence.reopen) if fence is not None else 0

    def add(piece: str, after: _Fence | None) -> None:
        nonlocal size
        grow = len(piece) + (1 if lines else 0)
        closing = len(after.marker) + 1 if after is not None else 0
        if size + grow + closing > limit:
            flush()
            grow = len(piece) + (1 if lines else 0)
        lines.append(piece)
        size += grow

    for line in text.split("\n"):
        reserve = len(fence.reopen) + len(fence.marker) + 2 if fence is not None else 0
        after = _transition(fence, line, limit)
        if after is not fence and len(line) <= limit // 4:
            if fence is not None and after is None and size + len(line) + 1 > limit:
                # The closing line does not fit; the flush closes the block anyway.
                flush()
                fence = None
                lines, size = [], 0
                continue
            add(line, after)
            fence = after
            continue
        for piece in _pieces(line, limit - reserve - 1):
            add(piece, fence)
    flush()
    return chunks


def _transition(fence: _Fence | None, line: str, limit: int) -> _Fence | None:
    """The fence state after ``line``."""
    match = _FENCE.match(line)
    if match is None:
        return fence
    marker, info = match.group(1), match.group(2).strip()
    if fence is None:
        if marker[0] == "`" and "`" in info:
            return None  # not a fence: an inline code span like ```x```
        return _Fence((marker + info)[: limit // 8], marker)
    if marker[0] == fence.marker[0] and len(marker) >= len(fence.marker) and not info:
        return None
    return fence


def _pieces(line: str, width: int) -> list[str]:
    """Cut one over-long line at spaces where possible; hard-cut only a single huge word."""
    if len(line) <= width:
        return [line]
    pieces: list[str] = []
    while len(line) > width:
        cut = line.rfind(" ", 0, width + 1)
        if cut <= width // 2:
            pieces.append(line[:width])  # no space in a reasonable place: a hard cut beats an overflow
            line = line[width:]
        else:
            pieces.append(line[:cut])
            line = line[cut + 1 :]
    if line:
        pieces.append(line)
    return pieces
