"""The conversation history sent to Gemini, bounded in tokens; the note when older turns are left out.

Storage already bounds a conversation in messages (``HISTORY_MAX_MESSAGES``) and characters
(``HISTORY_MAX_CHARS``). Gemini charges and limits in tokens, and the same characters can be
many more tokens (code, other scripts), so the history is also cut to ``HISTORY_MAX_TOKENS``,
newest turns first. Tokens are estimated locally (about four characters a token, Google's rule
of thumb, plus a few tokens per turn for its role and framing) rather than asked of Gemini:
``count_tokens`` is a network round trip per message on the hot path, costs quota, and fails
when Gemini does; the estimate is free and errs towards keeping less.

When turns are left out, the answer says so once per conversation ("I'm using the last N
messages"), so a user who refers to something long ago knows why the bot forgot it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from services.storage import Turn

CHARS_PER_TOKEN = 4
"""Google's rule of thumb for Gemini models: a token is about four characters."""
TURN_OVERHEAD_TOKENS = 4
"""Tokens a turn costs beyond its text (its role and the framing around it), estimated."""
MAX_CONVERSATIONS_TOLD = 10_000
"""Conversations remembered as told about left-out turns (the oldest forgotten first)."""


def estimate_tokens(text: str) -> int:
    """About how many tokens ``text`` is to Gemini: one per four characters, rounded up."""
    return -(-len(text) // CHARS_PER_TOKEN)


def fit(history: Sequence[Turn], max_tokens: int) -> tuple[list[Turn], int]:
    """The newest turns of ``history`` (oldest first) whose estimated tokens fit ``max_tokens``, and
    how many older turns were left out. A turn is kept whole or not at all."""
    budget = max_tokens
    kept = 0
    for turn in reversed(history):
        cost = estimate_tokens(turn.text) + TURN_OVERHEAD_TOKENS
        if cost > budget:
            break
        budget -= cost
        kept += 1
    start = len(history) - kept
    return list(history[start:]), start


class LeftOutNotes:
    """Remembers, per conversation, that its users were told turns are left out (bounded, in memory:
    after a restart a conversation may be told once more)."""

    def __init__(self, max_keys: int = MAX_CONVERSATIONS_TOLD) -> None:
        self._told: OrderedDict[str, None] = OrderedDict()
        self._max_keys = max_keys

    def __len__(self) -> int:
        return len(self._told)

    def first_time(self, key: str) -> bool:
        """True the first time for ``key`` (then remembered), False after."""
        if key in self._told:
            self._told.move_to_end(key)
            return False
        self._told[key] = None
        if len(self._told) > self._max_keys:
            self._told.popitem(last=False)
        return True
