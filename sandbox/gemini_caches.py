"""The emulator's explicit context caches (``cachedContents``) and deterministic embeddings.

Context caching, modelled on google-genai 3.x (``google/genai/caches.py``: ``POST cachedContents``
with ``{"model": "models/m", "systemInstruction", "contents", "ttl": "300s"}``, ``GET`` and ``DELETE``
of the resource name ``cachedContents/{id}``) and https://ai.google.dev/gemini-api/docs/caching:

- a cache holds at least the model's minimum of tokens (1,024 for Flash, 4,096 for Pro), else
  400 INVALID_ARGUMENT "Cached content is too small";
- it lives ``ttl`` (default one hour), then is gone: ``get``, ``delete`` and a ``generateContent``
  naming it answer 403 PERMISSION_DENIED "CachedContent not found (or permission denied)";
- a ``generateContent`` with ``cachedContent`` may not also set ``systemInstruction``, ``tools`` or
  ``toolConfig`` (400), must use the cache's model (400), and reports the cache's tokens as
  ``cachedContentTokenCount``.

The documented endpoints are on v1beta; which versions serve them is not checked here: any.

Embeddings are a hashed bag of words: each word (lower-case letters and digits) adds +-1 to one of
``dims`` buckets chosen by its hash, and the vector is normalised to length 1. Texts that share
words are close (cosine = shared words over the geometric mean of their counts); texts with no
word in common are orthogonal, but for hash collisions. So recall is testable and deterministic.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sandbox import responder

CACHE_MIN_TOKENS = {"flash": 1024, "pro": 4096}
DEFAULT_TTL_SECONDS = 3600.0
MAX_CACHES = 1000  # caches remembered, newest kept (a bound, not the real API's)
DEFAULT_EMBEDDING_DIMENSIONS = 3072  # gemini-embedding-001's full size
_WORD = re.compile(r"[a-z0-9]+")
_TTL = re.compile(r"^(\d+(?:\.\d+)?)s$")


def bag_of_words(text: str, dims: int = DEFAULT_EMBEDDING_DIMENSIONS) -> list[float]:
    """A normalised hashed bag-of-words vector of ``text`` in ``dims`` dimensions (zeros: no word)."""
    vector = [0.0] * dims
    for word in _WORD.findall(text.lower()):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        vector[int.from_bytes(digest[:4], "big") % dims] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(x * x for x in vector))
    return [round(x / norm, 6) for x in vector] if norm else vector


def embeddings(body: dict[str, Any]) -> dict[str, Any]:
    """The ``batchEmbedContents`` answer: one vector per request, ``outputDimensionality`` long."""
    out = []
    for request in body.get("requests", []):
        request = request if isinstance(request, dict) else {}
        dims = request.get("outputDimensionality") or DEFAULT_EMBEDDING_DIMENSIONS
        out.append({"values": bag_of_words(responder.text_of(request.get("content")), int(dims))})
    return {"embeddings": out}


@dataclass
class CachedContent:
    """One cache: what it holds and until when (wall clock)."""

    name: str
    model: str
    system_instruction: dict[str, Any] | None
    contents: list[dict[str, Any]]
    tokens: int
    created: float
    expires: float

    def resource(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": f"models/{self.model}",
            "createTime": _rfc3339(self.created),
            "updateTime": _rfc3339(self.created),
            "expireTime": _rfc3339(self.expires),
            "usageMetadata": {"totalTokenCount": self.tokens},
        }


def _rfc3339(seconds: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _error(code: int, status: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "status": status}}, status=code)


def cache_not_found() -> web.Response:
    """What the real API answers for an unknown or expired cache."""
    return _error(403, "PERMISSION_DENIED", "CachedContent not found (or permission denied)")


class ContextCaches:
    """The ``cachedContents`` resources of one emulator; ``clock`` is the wall clock of their expiry."""

    def __init__(self, clock: Callable[[], float], models: Callable[[], set[str]]) -> None:
        self.clock = clock
        self._models = models
        self.caches: OrderedDict[str, CachedContent] = OrderedDict()
        self.created = 0
        self.deleted = 0

    def live(self, name: str) -> CachedContent | None:
        """The cache ``name`` while it lives (an expired one is forgotten)."""
        cache = self.caches.get(name)
        if cache is not None and cache.expires <= self.clock():
            del self.caches[name]
            return None
        return cache

    async def handle(self, request: web.Request, body: Any) -> web.Response:
        """``POST /{v}/cachedContents``, ``GET``/``DELETE /{v}/cachedContents/{id}``, ``GET`` the list."""
        parts = request.path.strip("/").split("/")
        if len(parts) == 2 and request.method == "POST":
            return self._create(body if isinstance(body, dict) else {})
        if len(parts) == 2 and request.method == "GET":
            return web.json_response({"cachedContents": [
                c.resource() for c in list(self.caches.values()) if self.live(c.name)]})
        if len(parts) == 3:
            name = f"cachedContents/{parts[2]}"
            cache = self.live(name)
            if cache is None:
                return cache_not_found()
            if request.method == "GET":
                return web.json_response(cache.resource())
            if request.method == "DELETE":
                del self.caches[name]
                self.deleted += 1
                return web.json_response({})
        return _error(404, "NOT_FOUND", f"Method not found: {request.method} {request.path}")

    def _create(self, body: dict[str, Any]) -> web.Response:
        model = str(body.get("model", "")).removeprefix("models/")
        if model not in self._models():
            return _error(404, "NOT_FOUND", f"models/{model} is not found for createCachedContent.")
        ttl = DEFAULT_TTL_SECONDS
        if "ttl" in body:
            match = _TTL.match(str(body["ttl"]))
            if match is None:
                return _error(400, "INVALID_ARGUMENT", f"Invalid value for ttl: {body['ttl']!r}")
            ttl = float(match.group(1))
        system = body.get("systemInstruction") if isinstance(body.get("systemInstruction"), dict) else None
        contents = [c for c in body.get("contents") or [] if isinstance(c, dict)]
        tokens = responder.count_tokens(responder.text_of(system)) + sum(
            responder.count_tokens(responder.text_of(c)) for c in contents)
        minimum = CACHE_MIN_TOKENS["pro" if "-pro" in model else "flash"]
        if tokens < minimum:
            return _error(400, "INVALID_ARGUMENT",
                          f"Cached content is too small. total_token_count={tokens}, "
                          f"min_total_token_count={minimum}")
        now = self.clock()
        cache = CachedContent(f"cachedContents/{secrets.token_hex(8)}", model, system, contents, tokens, now,
                              now + ttl)
        self.caches[cache.name] = cache
        self.created += 1
        while len(self.caches) > MAX_CACHES:
            self.caches.popitem(last=False)
        return web.json_response(cache.resource())

    def apply(self, model: str, body: dict[str, Any]) -> tuple[dict[str, Any], int] | web.Response:
        """A ``generateContent`` body naming ``cachedContent``, with the cache's parts put in front, and
        the cache's tokens; or the refusal. A body without ``cachedContent`` comes back as it is."""
        name = body.get("cachedContent")
        if not name:
            return body, 0
        clashing = [k for k in ("systemInstruction", "tools", "toolConfig") if body.get(k)]
        if clashing:
            return _error(400, "INVALID_ARGUMENT",
                          "CachedContent can not be used with GenerateContent request setting "
                          "system_instruction, tools or tool_config.")
        cache = self.live(str(name))
        if cache is None:
            return cache_not_found()
        if cache.model != model:
            return _error(400, "INVALID_ARGUMENT",
                          f"Model used by GenerateContent request (models/{model}) and CachedContent "
                          f"(models/{cache.model}) has to be the same.")
        merged = {k: v for k, v in body.items() if k != "cachedContent"}
        if cache.system_instruction is not None:
            merged["systemInstruction"] = cache.system_instruction
        merged["contents"] = [*cache.contents, *(body.get("contents") or [])]
        return merged, cache.tokens
