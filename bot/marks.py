"""Invisible marks on the bot's answers: which question a message answers, and which chunk it is.

A restarted bot must tell what a dead process already posted from what Discord really returns.
Discord sends a message's ``nonce`` only in its create event, never in the channel's history
(discord.py, ``Message.nonce``: "not stored long term"), and an answer to a question that was
deleted meanwhile, or a late ``/ask`` answer, carries no reply reference. So every chunk of an
answer ends with a mark the bot controls: zero-width characters that encode the question's id
and the chunk's index, which Discord keeps in the content it returns (they are not whitespace to
its trimming, and they render as nothing). ``read`` finds them again in a message from history.

Cost: ``MARK_LENGTH`` characters of Discord's 2,000 per message (``ROOM`` is what is left for
the text); a user copying an answer copies the mark too, invisibly.
"""

from __future__ import annotations

# Four zero-width characters are the base-4 digits; an invisible separator fences the mark.
_DIGITS = ("\u200b", "\u200c", "\u200d", "\u2060")  # zero width space, non-joiner, joiner, word joiner
_VALUES = {digit: value for value, digit in enumerate(_DIGITS)}
_FENCE = "\u2063"  # invisible separator
_ID_DIGITS = 32  # 64 bits: any Discord snowflake
_INDEX_DIGITS = 6  # 12 bits: chunks 0..4095
MARK_LENGTH = 2 + _ID_DIGITS + _INDEX_DIGITS
ROOM = 2000 - MARK_LENGTH
"""Characters of answer text a marked chunk may hold within Discord's 2,000."""


def _digits(value: int, count: int) -> str:
    return "".join(_DIGITS[(value >> (2 * (count - 1 - i))) & 3] for i in range(count))


def mark(text: str, question_id: int, index: int) -> str:
    """``text`` with the mark of chunk ``index`` of the answer to ``question_id`` at its end."""
    if not 0 <= question_id < 1 << (2 * _ID_DIGITS) or not 0 <= index < 1 << (2 * _INDEX_DIGITS):
        raise ValueError(f"cannot mark question {question_id} chunk {index}")
    return f"{text}{_FENCE}{_digits(question_id, _ID_DIGITS)}{_digits(index, _INDEX_DIGITS)}{_FENCE}"


def read(content: str) -> tuple[int, int] | None:
    """The ``(question id, chunk index)`` marked at the end of ``content``, or None (no mark)."""
    if len(content) < MARK_LENGTH or content[-1] != _FENCE or content[-MARK_LENGTH] != _FENCE:
        return None
    value = 0
    for char in content[-MARK_LENGTH + 1 : -1]:
        digit = _VALUES.get(char)
        if digit is None:
            return None
        value = value << 2 | digit
    return value >> (2 * _INDEX_DIGITS), value & ((1 << (2 * _INDEX_DIGITS)) - 1)


def strip(content: str) -> str:
    """``content`` without its mark (as the user reads it)."""
    return content[:-MARK_LENGTH] if read(content) is not None else content
