"""Gemini embeddings behind their own guards: retry (outermost) -> the ``gemini.embed`` breaker -> timeout.

Embeddings serve semantic memory (``bot.memory``), which is a nicety: an answer must never wait
long for one, nor fail because of one. So the calls have a breaker of their own (an embedding
outage does not pause generation, nor the other way round), a short timeout inside it (so a hang
is counted), and a retry policy of their own with few attempts and a budget. The caller decides
what a failure means (``bot.memory`` goes on without recall).

One ``client.aio.models.embed_content`` call embeds a batch (google-genai sends
``batchEmbedContents``); ``output_dimensionality`` shortens the vectors (``gemini-embedding-001``
is 3,072 long; Google advises normalising a shortened one, which ``normalise`` does).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import structlog
from google import genai
from google.genai import types

from resilience.breakers import Breaker
from resilience.retries import RetryPolicy

log = structlog.get_logger("services.embeddings")

EMBED_TIMEOUT_SECONDS = 5.0
"""One embedding request's time limit (inside the breaker, so a hang counts as a failure)."""
MAX_BATCH = 100
"""Texts per request: Gemini's ``batchEmbedContents`` takes at most 100."""
TaskType = Literal["RETRIEVAL_DOCUMENT", "RETRIEVAL_QUERY"]


def normalise(values: Sequence[float]) -> list[float]:
    """``values`` scaled to length 1 (all zeros stay zeros)."""
    norm = math.sqrt(sum(x * x for x in values))
    return [x / norm for x in values] if norm else [0.0 for _ in values]


class Embedder:
    """Embeds texts with Gemini; ``client`` gives the running google-genai client (the Gemini
    service's, so one aiohttp session serves both)."""

    def __init__(
        self,
        client: Callable[[], genai.Client],
        *,
        model: str,
        dimensions: int,
        breaker: Breaker,
        retry: RetryPolicy,
        timeout: float = EMBED_TIMEOUT_SECONDS,
    ) -> None:
        self._client = client
        self.model = model
        self.dimensions = dimensions
        self.breaker = breaker
        self.retry = retry
        self.timeout = timeout
        self.calls = 0
        self.failures = 0

    def available(self) -> bool:
        """Whether the breaker would let a call through now (no side effects)."""
        return self.breaker.would_admit()

    async def embed(self, texts: Sequence[str], task: TaskType) -> list[list[float]]:
        """One normalised vector per text, in order. Raises what the last attempt raised
        (``CircuitOpenError`` at once while the breaker is open, ``CallTimeoutError``, SDK errors)."""
        if not texts:
            return []
        out: list[list[float]] = []
        for start in range(0, len(texts), MAX_BATCH):
            batch = list(texts[start : start + MAX_BATCH])
            self.calls += 1
            try:
                out += await self.retry.call(lambda batch=batch: self._attempt(batch, task))  # type: ignore[misc]
            except Exception:
                self.failures += 1
                raise
        return out

    async def _attempt(self, texts: list[str], task: TaskType) -> list[list[float]]:
        return await self.breaker.call(self._request, texts, task, timeout=self.timeout)

    async def _request(self, texts: list[str], task: TaskType) -> list[list[float]]:
        response = await self._client().aio.models.embed_content(
            model=self.model,
            contents=texts,  # type: ignore[arg-type]
            config=types.EmbedContentConfig(task_type=task, output_dimensionality=self.dimensions),
        )
        embeddings = response.embeddings or []
        if len(embeddings) != len(texts):
            raise ValueError(f"Gemini returned {len(embeddings)} embeddings for {len(texts)} texts")
        return [normalise(e.values or []) for e in embeddings]
