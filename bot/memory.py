"""Semantic memory: what users said long ago, recalled into the question when it is relevant.

Two memories, both opt-in:

- a user's own (``/memory on``): what they say anywhere (servers, DMs, a private ``/ask``) is
  remembered for them, and recalled for their questions only;
- a server's (its managers' ``memory`` setting, off by default): what is said in the server is
  remembered for the server, and recalled for anyone's question there (never a private ``/ask``'s).

After an answer is delivered, the question is embedded (``services.embeddings``, behind the
``gemini.embed`` breaker) and stored with the start of the answer (``services.memory_store``), in a
background task so nobody waits for it. Before a question is asked, it is embedded and the most
similar memories (at most ``MEMORY_TOP_K``, similarity at least ``MIN_SCORE``) go in front of the
question in ``<memory>`` tags, newest turns of the conversation excluded (they are in the history
anyway), within ``MEMORY_MAX_TOKENS`` (estimated as ``bot.history`` does). Whenever the embedding
fails or its breaker is open, the question goes without recall, and nothing is said to the user:
the answer is only less informed. ``/memory forget`` deletes the rows, vectors and all.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Collection, Sequence
from typing import Any

import structlog

from bot.history import estimate_tokens
from resilience.clock import Clock
from resilience.errors import classify
from services.embeddings import Embedder
from services.memory_store import Memory, MemoryBackend, Scope

log = structlog.get_logger("bot.memory")

MIN_SCORE = 0.5
"""The least cosine similarity a memory needs to be recalled (embeddings are normalised)."""
MIN_CHARS = 8
"""Messages shorter than this ("ok", "thanks") are not remembered."""
ANSWER_CHARS = 300
"""How much of the answer is kept with a remembered question (recalled as context)."""
MAX_PENDING = 100
"""Background writes at most in flight; past it, a new one is dropped (and logged)."""
STOP_WAIT_SECONDS = 2.0
OPEN = "<memory>"
CLOSE = "</memory>"
HEADER = "What you remember from earlier conversations (use it only where it helps):"
UNAVAILABLE = "Semantic memory is off: this bot has no memory store."


class SemanticMemory:
    """Recall and remember through the embedder and the store; a registry service named ``"memory"``.

    ``store`` is SQLite's ``MemoryStore`` or PostgreSQL's ``PgMemoryStore``; None turns memory off
    (every call is a no-op and ``/memory`` says why).
    """

    name = "memory"
    depends_on: tuple[str, ...] = ("gemini",)

    def __init__(
        self,
        store: MemoryBackend | None,
        embedder: Embedder,
        *,
        clock: Clock,
        max_tokens: int,
        top_k: int,
        min_score: float = MIN_SCORE,
    ) -> None:
        self.store = store
        self.depends_on = ("gemini", "memory_store") if store is not None else ("gemini",)
        self.embedder = embedder
        self.max_tokens = max_tokens
        self.top_k = top_k
        self.min_score = min_score
        self._clock = clock
        self._pending: set[asyncio.Task[None]] = set()
        self.recalls = 0
        self.recall_skipped = 0
        self.remembered = 0
        self.dropped = 0

    @property
    def available(self) -> bool:
        return self.store is not None

    async def start(self) -> None:
        if self.store is None:
            log.warning("memory.unavailable", reason=UNAVAILABLE)

    async def stop(self) -> None:
        """Let background writes finish briefly, then cancel the rest; safe to call twice."""
        pending = list(self._pending)
        if pending:
            _, late = await asyncio.wait(pending, timeout=STOP_WAIT_SECONDS)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def health(self) -> dict[str, Any]:
        return {
            "ok": True,
            "available": self.available,
            "embeddings_breaker": str(self.embedder.breaker.state),
            "pending_writes": len(self._pending),
            "recalls": self.recalls,
            "recall_skipped": self.recall_skipped,
            "remembered": self.remembered,
        }

    # -- whose memory ------------------------------------------------------------------------

    def owners(
        self, *, author_id: int, guild_id: int | None, guild_on: bool, private: bool
    ) -> list[tuple[Scope, int]]:
        """The memories a question may use and join: the author's own (when they turned it on), the
        server's (when its managers did, and the question is not a private one)."""
        if self.store is None:
            return []
        owners: list[tuple[Scope, int]] = []
        if self.store.user_enabled(author_id):
            owners.append(("user", author_id))
        if guild_id is not None and guild_on and not private:
            owners.append(("guild", guild_id))
        return owners

    # -- recall ------------------------------------------------------------------------------

    async def recall(
        self, question: str, owners: Sequence[tuple[Scope, int]], *, skip: Collection[str] = ()
    ) -> str:
        """The ``<memory>`` block to put before ``question`` ("" when nothing fits, or on any failure).

        ``skip`` are texts already in the conversation's history (not recalled again).
        """
        if self.store is None or not owners or not question.strip():
            return ""
        if not self.embedder.available():
            self.recall_skipped += 1
            return ""  # the embeddings breaker is open: answer without recall, silently
        try:
            [query] = await self.embedder.embed([question], "RETRIEVAL_QUERY")
            found = await self.store.recall(
                owners, query, model=self.embedder.model, k=self.top_k + len(skip), min_score=self.min_score
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.recall_skipped += 1
            log.info("memory.recall_skipped", category=classify(exc).category.value, error=type(exc).__name__)
            return ""
        skipped = set(skip)
        memories = [m for m in found if m.text not in skipped][: self.top_k]
        block = render(memories, self.max_tokens)
        if block:
            self.recalls += 1
        return block

    # -- remember ----------------------------------------------------------------------------

    def remember(
        self,
        owners: Sequence[tuple[Scope, int]],
        *,
        author_id: int,
        guild_id: int | None,
        text: str,
        answer: str,
        said_at: float,
    ) -> None:
        """Embed and store ``text`` for each owner, in the background (never raises)."""
        if self.store is None or not owners or len(text.strip()) < MIN_CHARS:
            return
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            log.warning("memory.write_dropped", pending=len(self._pending))
            return
        task = asyncio.create_task(
            self._remember(list(owners), author_id, guild_id, text, answer[:ANSWER_CHARS], said_at)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def flush(self) -> None:
        """Wait for the background writes in flight (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    async def _remember(
        self,
        owners: list[tuple[Scope, int]],
        author_id: int,
        guild_id: int | None,
        text: str,
        answer: str,
        said_at: float,
    ) -> None:
        store = self.store
        assert store is not None
        try:
            [vector] = await self.embedder.embed([text], "RETRIEVAL_DOCUMENT")
            for scope, owner in owners:
                await store.add(
                    scope, owner, author_id=author_id, guild_id=guild_id, text=text, answer=answer,
                    model=self.embedder.model, vector=vector, said_at=said_at,
                )
            self.remembered += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("memory.not_remembered", category=classify(exc).category.value, error=type(exc).__name__)


def render(memories: Sequence[Memory], max_tokens: int) -> str:
    """``memories`` (best first) as a ``<memory>`` block of at most ``max_tokens`` (estimated): the
    best ones that fit, shown oldest first; "" when none fits."""
    budget = max_tokens - estimate_tokens(f"{OPEN}\n{HEADER}\n{CLOSE}\n\n")
    kept: list[Memory] = []
    for memory in memories:
        cost = estimate_tokens(line(memory)) + 1
        if cost > budget:
            continue
        budget -= cost
        kept.append(memory)
    if not kept:
        return ""
    lines = [line(m) for m in sorted(kept, key=lambda m: m.said_at)]
    return "\n".join([OPEN, HEADER, *lines, CLOSE]) + "\n\n"


def line(memory: Memory) -> str:
    """One remembered exchange: when, who (a mention), what they said, the start of the answer."""
    day = dt.datetime.fromtimestamp(memory.said_at, dt.UTC).strftime("%Y-%m-%d")
    text = " ".join(memory.text.split())
    answer = " ".join(memory.answer.split())
    out = f"- {day}, <@{memory.author_id}> said: {text}"
    return f"{out} (you answered: {answer})" if answer else out
