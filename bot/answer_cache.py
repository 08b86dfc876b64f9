"""Answers kept in memory: the same question in the same context, and the offline offer of ``/ask``.

Two bounded maps, per guild (a guild's entries never serve another guild; DMs are never cached):

- ``get``/``put``: an answer by the digest of everything Gemini was sent (the model and options,
  the persona, the tools, the history, the question with what memory recalled). A server turns it
  on with its ``answer_cache`` setting (default ``ANSWER_CACHE``, off); an entry lives
  ``ANSWER_CACHE_TTL_SECONDS``. Any difference in the context (one more turn of history, another
  persona) is another key: a miss. Questions with files are never cached.
- ``offline``: the latest answer to the same question (case, spaces and end punctuation aside),
  whatever the context, kept while a server's ``offline_answers`` setting is on, for at most
  ``OFFLINE_MAX_AGE_SECONDS``: when Gemini is down, ``/ask`` shows it, marked as cached and dated,
  with the usual "queued" acknowledgement (the real answer still comes).

Both hold at most ``max_entries`` entries in all, and a guild at most ``max_entries // 10`` (at
least 10) of each, so one busy server cannot evict everyone else's. The least recently used go
first. They are in memory only: a restart empties them.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from resilience.clock import Clock
from services.gemini import GenerationOptions, Reply
from services.storage import Turn

OFFLINE_MAX_AGE_SECONDS = 7 * 86400.0
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A stored answer: the ``Reply`` (its token counts zeroed: a hit costs nothing), when it was
    stored (wall clock, for the date shown) and until when it serves (monotonic)."""

    reply: Reply
    stored_at: float
    expires: float


def context_key(
    *,
    prompt: str,
    history: Sequence[Turn],
    persona: str,
    tools: Sequence[str],
    options: GenerationOptions,
) -> str:
    """The digest of everything one request sends Gemini (what makes two answers interchangeable)."""
    doc = {
        "prompt": prompt,
        "history": [[t.role, t.text] for t in history],
        "persona": persona,
        "tools": sorted(tools),
        "options": [options.model, options.temperature, options.max_output_tokens, options.safety_threshold],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def question_key(question: str) -> str:
    """A question as ``offline`` compares it: case-folded, spaces collapsed, end punctuation off."""
    return _SPACES.sub(" ", question.casefold()).strip().rstrip("?!.。 ")


class _Bounded:
    """One LRU map of (guild, key) -> CachedAnswer with a total and a per-guild bound."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self.per_guild = max(10, max_entries // 10)
        self.entries: OrderedDict[tuple[int, str], CachedAnswer] = OrderedDict()
        self.counts: dict[int, int] = {}

    def get(self, guild_id: int, key: str, now: float) -> CachedAnswer | None:
        found = self.entries.get((guild_id, key))
        if found is None:
            return None
        if found.expires <= now:
            self._remove((guild_id, key))
            return None
        self.entries.move_to_end((guild_id, key))
        return found

    def put(self, guild_id: int, key: str, entry: CachedAnswer) -> None:
        if (guild_id, key) in self.entries:
            self._remove((guild_id, key))
        if self.counts.get(guild_id, 0) >= self.per_guild:
            oldest = next(k for k in self.entries if k[0] == guild_id)
            self._remove(oldest)
        self.entries[(guild_id, key)] = entry
        self.counts[guild_id] = self.counts.get(guild_id, 0) + 1
        while len(self.entries) > self.max_entries:
            self._remove(next(iter(self.entries)))

    def drop_guild(self, guild_id: int) -> None:
        for key in [k for k in self.entries if k[0] == guild_id]:
            self._remove(key)

    def _remove(self, key: tuple[int, str]) -> None:
        del self.entries[key]
        left = self.counts[key[0]] - 1
        if left:
            self.counts[key[0]] = left
        else:
            del self.counts[key[0]]

    def __len__(self) -> int:
        return len(self.entries)


class AnswerCache:
    """The answer cache and the offline answers; built once per application."""

    def __init__(self, *, max_entries: int, ttl: float, clock: Clock) -> None:
        self.ttl = ttl
        self._clock = clock
        self._answers = _Bounded(max_entries)
        self._offline = _Bounded(max_entries)
        self.hits = 0
        self.misses = 0

    def get(self, guild_id: int, key: str) -> Reply | None:
        """The answer stored for ``key`` in guild ``guild_id``, or None (counted as a hit or a miss)."""
        found = self._answers.get(guild_id, key, self._clock.monotonic())
        if found is None:
            self.misses += 1
            return None
        self.hits += 1
        return found.reply

    def put(self, guild_id: int, key: str, reply: Reply) -> None:
        """Keep an answer for ``ttl`` seconds (only answers: never a refusal)."""
        if reply.ok:
            self._answers.put(guild_id, key, self._entry(reply, self.ttl))

    def put_offline(self, guild_id: int, question: str, reply: Reply) -> None:
        """Keep the latest answer to ``question`` for the offline offer."""
        key = question_key(question)
        if reply.ok and key:
            self._offline.put(guild_id, key, self._entry(reply, OFFLINE_MAX_AGE_SECONDS))

    def offline(self, guild_id: int, question: str) -> CachedAnswer | None:
        """The latest answer kept for ``question`` in guild ``guild_id``, or None."""
        key = question_key(question)
        return self._offline.get(guild_id, key, self._clock.monotonic()) if key else None

    def drop_guild(self, guild_id: int) -> None:
        """Forget a guild's entries (its settings changed the context, or an operator asked)."""
        self._answers.drop_guild(guild_id)
        self._offline.drop_guild(guild_id)

    def status(self) -> dict[str, Any]:
        return {
            "answers": len(self._answers),
            "offline": len(self._offline),
            "max_entries": self._answers.max_entries,
            "hits": self.hits,
            "misses": self.misses,
        }

    def _entry(self, reply: Reply, ttl: float) -> CachedAnswer:
        free = replace(reply, prompt_tokens=0, completion_tokens=0, thought_tokens=0, cached_tokens=0)
        return CachedAnswer(free, self._clock.time(), self._clock.monotonic() + ttl)
