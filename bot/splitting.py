"""Split a long answer into Discord-sized messages without breaking code fences or words.

Discord refuses messages over 2,000 characters, and blank ones. A naive cut can leave a code
block open in one message and bare in the next; here a chunk that ends inside a fence closes it,
and the next chunk reopens it with the same info string (language), so every message renders.
Every chunk shows something: text with nothing to show (empty, whitespace, bare fences such as
an answer of just "```python") is refused with ``BlankMessageError``, never split into no chunk
or a blank one (``has_visible_text`` tells beforehand).
"""

from __future__ import annotations

import re
from typing import NamedTuple

DISCORD_LIMIT = 2000
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")


class BlankMessageError(ValueError):
    """The text shows nothing (empty, whitespace, only code fence lines): there is no message to send."""


class _Fence(NamedTuple):
    reopen: str  # the line that reopens the block in the next chunk, e.g. "```python"
    marker: str  # the marker that closes it, e.g. "```"


def has_visible_text(text: str, limit: int = DISCORD_LIMIT) -> bool:
    """Whether ``text`` shows anything: a non-blank line that is neither a code fence's opening nor
    its closing line (by the rules ``split_message`` splits with)."""
    fence: _Fence | None = None
    for line in text.split("\n"):
        after = _transition(fence, line, limit)
        if after is not fence and len(line) <= limit // 4:
            fence = after
        elif line.strip():
            return True
    return False


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Return one or more chunks of at most ``limit`` characters whose code fences are all balanced.

    Each chunk has visible text. Raises ``BlankMessageError`` when ``text`` has none (see
    ``has_visible_text``): Discord rejects a blank message, and an empty code block answers nothing.
    """
    if limit < 60:
        raise ValueError("limit must leave room for code fences (>= 60)")
    text = text.strip("\n")
    if not has_visible_text(text, limit):
        raise BlankMessageError("the text has nothing to show")
    if len(text) <= limit and "```" not in text and "~~~" not in text:
        return [text]

    chunks: list[str] = []
    lines: list[str] = []
    size = 0  # len("\n".join(lines))
    shows = False  # whether ``lines`` holds a visible line (not only fences and blanks)
    fence: _Fence | None = None

    def flush() -> None:
        nonlocal lines, size, shows
        if shows:
            chunks.append("\n".join(lines) + (f"\n{fence.marker}" if fence is not None else ""))
        lines = [fence.reopen] if fence is not None else []
        size = len(fence.reopen) if fence is not None else 0
        shows = False

    def add(piece: str, after: _Fence | None, *, content: bool) -> None:
        nonlocal size, shows
        grow = len(piece) + (1 if lines else 0)
        closing = len(after.marker) + 1 if after is not None else 0
        if size + grow + closing > limit:
            flush()
            grow = len(piece) + (1 if lines else 0)
        lines.append(piece)
        size += grow
        shows = shows or (content and bool(piece.strip()))

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
            add(line, after, content=False)
            fence = after
            continue
        for piece in _pieces(line, limit - reserve - 1):
            add(piece, fence, content=True)
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
