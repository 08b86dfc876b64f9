"""Gemini context caches for long personas (``client.aio.caches``): a persona sent once, not per question.

A persona (the system instruction) of about the model's minimum for explicit caching or more (1,024
tokens for Flash models, 4,096 for Pro, estimated at four characters a token; ``CLOSE_ENOUGH``) is put in a
``cachedContents`` resource with a TTL (``CONTEXT_CACHE_TTL_SECONDS``), and requests name it
(``cached_content``) instead of sending the persona. One cache per (model, persona); it is made
again when less than ``RENEW_MARGIN_SECONDS`` of its life is left. A changed persona is another
key, so it is never answered with the old one; ``retain`` (called whenever the settings are
reloaded) deletes the caches of personas no longer in use, so they stop costing storage.

Caching is an optimisation and never fails an answer: a request with tools keeps its persona
inline (Gemini refuses ``cached_content`` with ``system_instruction``, ``tools`` or ``tool_config``);
a cache that cannot be made (too small, a failure, a timeout of ``CREATE_TIMEOUT_SECONDS``) means
the persona goes inline, and that persona is not tried again for ``RETRY_AFTER_SECONDS``; a request
whose cache has vanished (403/404 "CachedContent not found") is sent again at once without it.

The ``cachedContents`` endpoints are documented on API version v1beta only, so the cache calls and
the requests that name a cache go to v1beta (``http_options``); all other requests stay on v1.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import structlog
from google import genai
from google.genai import errors, types

from resilience.clock import Clock

log = structlog.get_logger("services.context_cache")

CACHE_API_VERSION = "v1beta"
MIN_TOKENS = {"pro": 4096, "flash": 1024}
"""Gemini's minimum for an explicit cache, per model family (https://ai.google.dev/gemini-api/docs/caching)."""
CHARS_PER_TOKEN = 4
CLOSE_ENOUGH = 0.9
"""A persona whose estimate is within 10% under the minimum is tried anyway: Gemini's own count decides
(dense text, code and other scripts take more tokens than four characters each). A 4,000-character
persona, the longest a server can set, is such a one."""
TOO_SMALL_RETRY_SECONDS = 86400.0
"""A persona Gemini found too small is not tried again for a day (its size does not change)."""
CREATE_TIMEOUT_SECONDS = 5.0
RENEW_MARGIN_SECONDS = 60.0
RETRY_AFTER_SECONDS = 600.0
STOP_WAIT_SECONDS = 2.0
"""At shutdown, how long the deletions of this process's caches may take (they expire anyway)."""
MAX_CACHES = 100
"""Caches this process keeps at most (personas x models); past it the least recently made is deleted."""
T = TypeVar("T")


def min_tokens(model: str) -> int:
    return MIN_TOKENS["pro" if "-pro" in model else "flash"]


def persona_key(model: str, persona: str) -> str:
    return hashlib.sha256(f"{model}\0{persona}".encode()).hexdigest()


@dataclass(slots=True)
class _Entry:
    name: str
    model: str
    persona: str
    expires: float  # monotonic


class ContextCache:
    """Context caches of the personas in use; ``client`` gives the running google-genai client."""

    def __init__(self, client: Callable[[], genai.Client], *, ttl: float, clock: Clock) -> None:
        self._client = client
        self.ttl = ttl
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._refused: dict[str, float] = {}  # key -> monotonic time to try again
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.created = 0
        self.deleted = 0
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    def names(self) -> list[str]:
        return [e.name for e in self._entries.values()]

    def status(self) -> dict[str, Any]:
        return {
            "caches": len(self._entries), "created": self.created, "deleted": self.deleted, "hits": self.hits
        }

    async def send(
        self,
        model: str,
        config: types.GenerateContentConfigDict,
        call: Callable[[types.GenerateContentConfigDict], Awaitable[T]],
    ) -> T:
        """``call(config)``, with the persona replaced by its cache when it qualifies; when the cache
        has vanished meanwhile, ``call`` again with the persona inline."""
        cached = await self.config_for(model, config)
        if cached is config:
            return await call(config)
        try:
            result = await call(cached)
        except errors.APIError as exc:
            if exc.code not in (403, 404) or "cachedcontent" not in str(exc.message or "").lower():
                raise
            self.forget(model, str(config.get("system_instruction")))
            log.info("context_cache.vanished", model=model, code=exc.code)
            return await call(config)
        self.hits += 1
        return result

    async def config_for(
        self, model: str, config: types.GenerateContentConfigDict
    ) -> types.GenerateContentConfigDict:
        """``config`` naming the persona's cache instead of the persona, or ``config`` itself."""
        persona = config.get("system_instruction")
        if not self.enabled or not isinstance(persona, str):
            return config
        if config.get("tools") or config.get("tool_config"):
            return config
        if len(persona) < min_tokens(model) * CHARS_PER_TOKEN * CLOSE_ENOUGH:
            return config
        name = await self._cache_for(model, persona)
        if name is None:
            return config
        out: dict[str, Any] = {k: v for k, v in config.items() if k != "system_instruction"}
        out["cached_content"] = name
        out["http_options"] = {"api_version": CACHE_API_VERSION}
        return out  # type: ignore[return-value]

    async def _cache_for(self, model: str, persona: str) -> str | None:
        key = persona_key(model, persona)
        now = self._clock.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry.expires - now > RENEW_MARGIN_SECONDS:
            return entry.name
        if self._refused.get(key, 0.0) > now:
            return None
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._entries.get(key)
            now = self._clock.monotonic()
            if entry is not None and entry.expires - now > RENEW_MARGIN_SECONDS:
                return entry.name
            try:
                async with asyncio.timeout(CREATE_TIMEOUT_SECONDS):
                    made = await self._client().aio.caches.create(
                        model=model,
                        config=types.CreateCachedContentConfig(
                            system_instruction=persona,
                            ttl=f"{round(self.ttl)}s",
                            display_name="persona",
                            http_options=types.HttpOptions(api_version=CACHE_API_VERSION),
                        ),
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                small = isinstance(exc, errors.APIError) and "too small" in str(exc.message or "").lower()
                self._refused[key] = now + (TOO_SMALL_RETRY_SECONDS if small else RETRY_AFTER_SECONDS)
                log.info(
                    "context_cache.not_created", model=model, error=type(exc).__name__, detail=str(exc)[:200]
                )
                return None
            finally:
                self._locks.pop(key, None)
            if not made.name:
                self._refused[key] = now + RETRY_AFTER_SECONDS
                return None
            old = self._entries.pop(key, None)
            self._entries[key] = _Entry(made.name, model, persona, now + self.ttl)
            self.created += 1
            log.info("context_cache.created", model=model, cache=made.name, ttl=self.ttl)
            if old is not None:
                self._delete_later(old.name)
            while len(self._entries) > MAX_CACHES:
                oldest = next(iter(self._entries))
                self._delete_later(self._entries.pop(oldest).name)
            return made.name

    def forget(self, model: str, persona: str) -> None:
        """Stop using the cache of (model, persona) (it vanished on Gemini's side)."""
        self._entries.pop(persona_key(model, persona), None)

    def retain(self, personas: Iterable[str]) -> list[str]:
        """Delete (in the background) the caches of personas not in ``personas``; returns their names."""
        keep = set(personas)
        gone = [key for key, entry in self._entries.items() if entry.persona not in keep]
        names = []
        for key in gone:
            entry = self._entries.pop(key)
            names.append(entry.name)
            self._delete_later(entry.name)
            log.info("context_cache.invalidated", model=entry.model, cache=entry.name)
        return names

    def _delete_later(self, name: str) -> None:
        try:
            task = asyncio.get_running_loop().create_task(self._delete(name))
        except RuntimeError:
            return  # no loop (start-up, tests): the cache expires by itself
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _delete(self, name: str) -> None:
        try:
            async with asyncio.timeout(CREATE_TIMEOUT_SECONDS):
                await self._client().aio.caches.delete(
                    name=name,
                    config=types.DeleteCachedContentConfig(
                        http_options=types.HttpOptions(api_version=CACHE_API_VERSION)
                    ),
                )
            self.deleted += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # it expires by itself after its TTL
            log.info("context_cache.not_deleted", cache=name, error=type(exc).__name__)

    async def settle(self) -> None:
        """Wait for the deletions in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def stop(self) -> None:
        """Delete every cache this process made (best effort, bounded), then forget them."""
        for entry in list(self._entries.values()):
            self._delete_later(entry.name)
        self._entries.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_WAIT_SECONDS):
                await self.settle()
        for task in list(self._tasks):
            task.cancel()
