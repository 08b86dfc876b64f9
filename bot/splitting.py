"""Split a long answer into Discord-sized messages without breaking code fences or words.

Discord refuses messages over 2,000 characters. A naive cut can leave a code block open in
one message and bare in the next; here a chunk that ends inside a fence closes it, and the
next chunk reopens it with the same info string (language), so every message renders.
"""

from __future__ import annotations

import re

DISCORD_LIMIT = 2000
_FENCE = re.compile(r"^\s*(```+|~~~+)(.*)$")


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """Return chunks of at most ``limit`` characters whose code fences are all balanced."""
    if limit < 40:
        raise ValueError("limit must leave room for fences (>= 40)")
    text = text.strip("\n")
    if not text:
        return []
    if len(text) <= limit:
        return [text]

    chunks: list[str] = []
    current: list[str] = []
    size = 0
    fence: str | None = None  # the opening line of the fence we are inside, e.g. "```py"
    fence_marker = ""

    def flush() -> None:
        nonlocal current, size
        body = "\n".join(current)
        if fence is not None:
            body += "\n" + fence_marker
        if body.strip():
            chunks.append(body)
        current = [fence] if fence is not None else []
        size = len(fence) if fence is not None else 0

    for line in text.split("\n"):
        match = _FENCE.match(line)
        # Room for the line, its newline, and a closing fence if we are (or stay) inside one.
        closing = len(fence_marker) + 1 if fence is not None or match else 0
        for piece in _pieces(line, limit - closing - (len(fence) + 1 if fence else 0) - 1):
            extra = len(piece) + (1 if current else 0)
            if size + extra + closing > limit and current and current != [fence]:
                flush()
                extra = len(piece) + (1 if current else 0)
            current.append(piece)
            size += extra
        if match:
            if fence is None:
                fence, fence_marker = line.strip(), match.group(1)
            elif line.strip().startswith(fence_marker) and not match.group(2).strip():
                fence, fence_marker = None, ""
    flush()
    return chunks


def _pieces(line: str, width: int) -> list[str]:
    """Cut one over-long line at spaces where possible, hard-cut only a single huge word."""
    width = max(width, 20)
    if len(line) <= width:
        return [line]
    pieces: list[str] = []
    while len(line) > width:
        cut = line.rfind(" ", 0, width + 1)
        if cut <= width // 2:
            cut = width  # no space in a reasonable place: a hard cut beats an overlong message
            pieces.append(line[:cut])
            line = line[cut:]
        else:
            pieces.append(line[:cut])
            line = line[cut + 1 :]
    if line:
        pieces.append(line)
    return pieces
