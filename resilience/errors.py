"""Error categories, the runtime's own exceptions, and ``classify(exc)``.

Every failure the bot meets is turned into a ``Classification`` in one place, so that
retry policies, breakers, the queue and the user-facing text all agree on what happened.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time as _walltime
from dataclasses import dataclass, replace
from datetime import datetime, time, timedelta
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo


class Category(StrEnum):
    """What kind of failure happened, independent of which dependency raised it."""

    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    QUOTA_EXHAUSTED = "quota_exhausted"
    UNAVAILABLE = "unavailable"
    CONNECTION = "connection"
    CIRCUIT_OPEN = "circuit_open"
    BAD_RESPONSE = "bad_response"
    INVALID_INPUT = "invalid_input"
    TOO_LARGE = "too_large"
    AUTH = "auth"
    PERMISSION = "permission"
    NOT_FOUND = "not_found"
    SAFETY_BLOCKED = "safety_blocked"
    BUSY = "busy"
    QUEUE_FULL = "queue_full"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict on one exception.

    ``retryable`` means "transient: the same call may succeed later" (retry now or queue);
    ``retry_after`` is the server's hint in seconds when it gave one; ``daily_quota`` marks a
    quota that resets at the end of the day, not within the minute.
    """

    category: Category
    retryable: bool
    retry_after: float | None
    user_message: str
    code: int | None = None
    daily_quota: bool = False


class ResilienceError(Exception):
    """Root of the runtime's own exceptions."""


class CircuitOpenError(ResilienceError):
    """A breaker rejected the call without running it."""

    def __init__(self, name: str, remaining: float) -> None:
        super().__init__(f"circuit {name!r} is open; next probe in {remaining:.1f}s")
        self.name = name
        self.remaining = remaining


class CallTimeoutError(ResilienceError, TimeoutError):
    """A guarded call took longer than its timeout."""

    def __init__(self, operation: str, timeout: float) -> None:
        super().__init__(f"{operation} timed out after {timeout:.2f}s")
        self.operation = operation
        self.timeout = timeout


class RetryHintTooLongError(ResilienceError):
    """The server asked us to wait longer than the policy's cap: give up now and queue."""

    def __init__(self, retry_after: float, cap: float, original: BaseException) -> None:
        super().__init__(f"server asked to wait {retry_after:.1f}s (cap {cap:.1f}s)")
        self.retry_after = retry_after
        self.cap = cap
        self.original = original


class MutexTimeoutError(ResilienceError, TimeoutError):
    """A keyed mutex was not acquired within its timeout."""

    def __init__(self, key: str, timeout: float) -> None:
        super().__init__(f"lock {key!r} not acquired within {timeout:.2f}s")
        self.key = key
        self.timeout = timeout


class QueueFullError(ResilienceError):
    """The durable queue refused new inbound work: a cap on waiting work is reached.

    ``scope`` says which cap: ``"user"`` (the author's pending messages), ``"guild"`` (the
    server's pending messages) or ``"queue"`` (all live items, pending and claimed). ``limit``
    is that cap and ``owner`` the user or guild id it was counted for (None for ``"queue"``).
    Nothing was stored. Not retryable: the same message would wait behind the same backlog;
    the user is told to try again once earlier messages are answered.
    """

    SCOPES = ("user", "guild", "queue")

    def __init__(self, scope: str, limit: int, owner: int | str | None = None) -> None:
        if scope not in self.SCOPES:
            raise ValueError(f"scope must be one of {self.SCOPES}, not {scope!r}")
        whose = "the queue" if scope == "queue" else f"{scope} {owner}"
        super().__init__(f"{whose} already has {limit} messages waiting (the cap); not accepted")
        self.scope = scope
        self.limit = limit
        self.owner = owner


class ServiceStartError(ResilienceError):
    """A service failed to start; the services started before it were rolled back."""

    def __init__(self, service: str, cause: BaseException) -> None:
        super().__init__(f"service {service!r} failed to start: {cause!r}")
        self.service = service
        self.cause = cause


class RegistryConfigError(ResilienceError):
    """The service graph is invalid (a cycle, an unknown dependency, a duplicate name)."""


# --- classify ------------------------------------------------------------------------------
#
# Callers must re-raise ``asyncio.CancelledError`` before classifying: cancellation is the
# caller's own decision, not a failure of the dependency. ``classify`` returns INTERNAL
# (not retryable) for it only so that it never raises.

_PACIFIC = ZoneInfo("America/Los_Angeles")
# Depth guard for RetryHintTooLongError wrapping itself (or a cycle of originals).
_MAX_DEPTH = 5
_TOO_LONG_MARKERS = (
    "too long",
    "too large",
    "token count",
    "maximum number of tokens",
    "exceeds the maximum",
    "context length",
    "payload size",
)
_AUTH_MARKERS = ("api key", "api_key", "unauthenticated", "credential")
_BAD_KEY_MARKERS = ("api key not valid", "api_key_invalid", "api key expired", "api_key_expired")
_DISCORD_UNKNOWN_CODES = frozenset({10003, 10008})
_DISCORD_PERMISSION_CODES = frozenset({50001, 50013})
_GATEWAY_AUTH_FAILED = 4004


def user_message_for(category: Category, retry_after: float | None = None, service: str | None = None) -> str:
    """One plain sentence a Discord user can understand; never contains exception text.

    ``service`` ("Gemini", "Discord") names who failed when known; without it the wording
    stays neutral rather than blame the wrong party.
    """
    who = service or "A service I rely on"
    if category is Category.NOT_FOUND and service == "Gemini":
        return ("The Gemini model I'm set up to use doesn't exist (unknown or retired), so I can't "
                "answer; an admin needs to change my settings.")
    if category is Category.RATE_LIMITED:
        return f"{service or 'Gemini'} is rate-limiting me right now; I'll answer as soon as it lets me."
    if category is Category.QUOTA_EXHAUSTED:
        if retry_after is not None and retry_after > 0:
            return f"Gemini's daily quota is used up; it resets in about {_human_duration(retry_after)}."
        return "Gemini's daily quota is used up; I'll answer once it resets."
    messages = {
        Category.TIMEOUT: f"{who} took too long to answer; I'll try again shortly.",
        Category.UNAVAILABLE: f"{who} is overloaded or down right now; I'll answer as soon as it is back.",
        Category.CONNECTION: f"I can't reach {service or 'a service I rely on'} right now; "
        "I'll answer as soon as the connection is back.",
        Category.CIRCUIT_OPEN: f"{who} is having trouble, so I'm pausing calls to it; "
        "I'll answer when it recovers.",
        Category.BAD_RESPONSE: f"{who} sent me a garbled answer; I'll try again.",
        Category.INVALID_INPUT: f"{service or 'The service'} could not accept that request; "
        "please rephrase it.",
        Category.TOO_LARGE: "That message is too long for me to answer; please shorten it.",
        Category.AUTH: f"My credentials for {service or 'a service I rely on'} are wrong; "
        "an admin needs to fix them.",
        Category.PERMISSION: "I don't have permission to do that here; an admin needs to grant it.",
        Category.NOT_FOUND: "The channel or message I needed no longer exists.",
        Category.SAFETY_BLOCKED: "Gemini declined to answer that because of its safety filters.",
        Category.BUSY: "I'm still busy with an earlier message in this conversation; I'll get to yours next.",
        Category.QUEUE_FULL: "Too many messages are already waiting for an answer, so I can't take "
        "this one; please send it again once I've answered the earlier ones.",
        Category.INTERNAL: "Something went wrong on my side; it has been logged.",
    }
    return messages.get(category, messages[Category.INTERNAL])


def seconds_until_pacific_midnight(now: float) -> float:
    """Seconds from the POSIX time ``now`` to the next midnight in US Pacific time (Gemini quota reset)."""
    local = datetime.fromtimestamp(now, _PACIFIC)
    next_midnight = datetime.combine(local.date() + timedelta(days=1), time(0), tzinfo=_PACIFIC)
    return max(0.0, next_midnight.timestamp() - now)


def parse_duration(value: object) -> float | None:
    """Parse a protobuf Duration string such as ``"12s"`` or ``"1.5s"``; None when unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        value = value.strip().removesuffix("s")
    elif not isinstance(value, int | float):
        return None
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return seconds


def classify(exc: BaseException, *, now: float | None = None) -> Classification:
    """Turn any exception into a ``Classification``; never raises.

    ``now`` (POSIX seconds) is only used to compute the time until a daily quota resets;
    it defaults to the wall clock. Callers re-raise ``asyncio.CancelledError`` before
    classifying (it comes back as INTERNAL, not retryable).
    """
    try:
        verdict = _classify(exc, _walltime.time() if now is None else now, 0)
        service = _service_of(exc, 0)
        if service is None:
            return verdict
        return replace(verdict, user_message=user_message_for(verdict.category, verdict.retry_after, service))
    except Exception:
        # A classifier that raises would turn a handled failure into a crash; fall back.
        return _verdict(Category.INTERNAL, False)


def _classify(exc: BaseException, now: float, depth: int) -> Classification:
    """Dispatch on the exception's type; the order matters (subclasses first)."""
    if isinstance(exc, asyncio.CancelledError):
        return _verdict(Category.INTERNAL, False)
    if isinstance(exc, RetryHintTooLongError):
        return _classify_hint_too_long(exc, now, depth)
    if isinstance(exc, CircuitOpenError):
        return _verdict(Category.CIRCUIT_OPEN, True, _non_negative(getattr(exc, "remaining", None)))
    if isinstance(exc, MutexTimeoutError):
        return _verdict(Category.BUSY, True)
    if isinstance(exc, QueueFullError):
        return _verdict(Category.QUEUE_FULL, False)
    genai_errors = _library("google.genai.errors")
    if genai_errors is not None and isinstance(exc, genai_errors.APIError):
        return _classify_genai(exc, now)
    if genai_errors is not None and isinstance(exc, genai_errors.UnknownApiResponseError):
        return _verdict(Category.BAD_RESPONSE, True)
    if isinstance(exc, json.JSONDecodeError):
        return _verdict(Category.BAD_RESPONSE, True)
    discord = _library("discord.errors")
    if discord is not None and isinstance(exc, discord.DiscordException):
        verdict = _classify_discord(exc, discord)
        if verdict is not None:
            return verdict
    # aiohttp.ServerTimeoutError is both a connection error and a TimeoutError: call it a timeout.
    if isinstance(exc, TimeoutError):
        return _verdict(Category.TIMEOUT, True)
    aiohttp_errors = _library("aiohttp.client_exceptions")
    if isinstance(exc, ConnectionError) or (
        aiohttp_errors is not None
        and isinstance(exc, aiohttp_errors.ClientConnectionError | aiohttp_errors.ClientPayloadError)
    ):
        return _verdict(Category.CONNECTION, True)
    return _verdict(Category.INTERNAL, False)


def _library(name: str) -> Any:
    """The module ``name`` if something already imported it, else None.

    An exception can only be an instance of a library's class once that library is loaded,
    so classify never imports google-genai, discord.py or aiohttp itself: the runtime stays
    independent of its users' SDKs and cheap to import (those imports cost about 2 s).
    """
    return sys.modules.get(name)


def _classify_discord(exc: BaseException, discord: Any) -> Classification | None:
    """discord.py's exceptions (``discord`` is its ``discord.errors`` module); None if not known."""
    if isinstance(exc, discord.RateLimited):
        return _verdict(
            Category.RATE_LIMITED, True, _non_negative(getattr(exc, "retry_after", None)), code=429
        )
    if isinstance(exc, discord.HTTPException):
        return _classify_discord_http(exc, discord)
    if isinstance(exc, discord.LoginFailure):
        return _verdict(Category.AUTH, False)
    if isinstance(exc, discord.ConnectionClosed):
        if _as_int(getattr(exc, "code", None)) == _GATEWAY_AUTH_FAILED:
            return _verdict(Category.AUTH, False, code=_GATEWAY_AUTH_FAILED)
        return _verdict(Category.CONNECTION, True, code=_as_int(getattr(exc, "code", None)))
    if isinstance(exc, discord.GatewayNotFound):
        return _verdict(Category.CONNECTION, True)
    return None


def _service_of(exc: BaseException, depth: int) -> str | None:
    """Which dependency failed, for the user message: "Gemini", "Discord", or None if unknown."""
    original = getattr(exc, "original", None)
    if isinstance(exc, RetryHintTooLongError) and depth < _MAX_DEPTH and isinstance(original, BaseException):
        return _service_of(original, depth + 1)
    genai_errors = _library("google.genai.errors")
    if genai_errors is not None and isinstance(
        exc, genai_errors.APIError | genai_errors.UnknownApiResponseError
    ):
        return "Gemini"
    discord = _library("discord.errors")
    if discord is not None and isinstance(exc, discord.DiscordException):
        return "Discord"
    if isinstance(exc, CircuitOpenError | CallTimeoutError):
        label = _as_str(getattr(exc, "name", None) or getattr(exc, "operation", None)).lower()
        if "gemini" in label:
            return "Gemini"
        if "discord" in label:
            return "Discord"
    return None


def _classify_hint_too_long(exc: RetryHintTooLongError, now: float, depth: int) -> Classification:
    """Same category as the original error, with the hint the policy refused to wait for."""
    original = getattr(exc, "original", None)
    if depth < _MAX_DEPTH and isinstance(original, BaseException):
        inner = _classify(original, now, depth + 1)
    else:
        inner = _verdict(Category.RATE_LIMITED, True)
    retry_after = _non_negative(getattr(exc, "retry_after", None))
    if retry_after is None:
        retry_after = inner.retry_after
    return _verdict(
        inner.category,
        inner.retryable,
        retry_after,
        code=inner.code,
        daily_quota=inner.daily_quota,
    )


def _classify_genai(exc: BaseException, now: float) -> Classification:
    """google-genai ``APIError``: the HTTP code plus the JSON error body in ``.details``."""
    code = _as_int(getattr(exc, "code", None))
    status = _as_str(getattr(exc, "status", None)).upper()
    message = _as_str(getattr(exc, "message", None)).lower()
    details = _error_details(getattr(exc, "details", None))
    if code == 429 or status == "RESOURCE_EXHAUSTED":
        hint = _retry_delay(details)
        if _is_daily_quota(details):
            # A per-day quota resets at midnight Pacific, whatever RetryInfo says: the real API puts
            # a short hint ("22s", "47s") beside a per-day violation, and trusting it would ask the
            # exhausted model again all day. A hint past the reset (just before midnight) still holds.
            to_reset = seconds_until_pacific_midnight(now)
            retry_after = to_reset if hint is None else max(hint, to_reset)
            return _verdict(Category.QUOTA_EXHAUSTED, True, retry_after, code=code, daily_quota=True)
        return _verdict(Category.RATE_LIMITED, True, hint, code=code)
    if code is not None and 500 <= code < 600:
        return _verdict(Category.UNAVAILABLE, True, _retry_delay(details), code=code)
    if code == 408 or status == "DEADLINE_EXCEEDED":
        return _verdict(Category.TIMEOUT, True, code=code)
    if code == 413 or (code == 400 and any(m in message for m in _TOO_LONG_MARKERS)):
        return _verdict(Category.TOO_LARGE, False, code=code)
    if code in (401, 403) and (
        code == 401 or status == "UNAUTHENTICATED" or _mentions(message, details, _AUTH_MARKERS)
    ):
        return _verdict(Category.AUTH, False, code=code)
    # The real API answers a wrong key with 400 INVALID_ARGUMENT + ErrorInfo API_KEY_INVALID.
    if code == 400 and _mentions(message, details, _BAD_KEY_MARKERS):
        return _verdict(Category.AUTH, False, code=code)
    if code == 403:
        return _verdict(Category.PERMISSION, False, code=code)
    if code == 404:
        return _verdict(Category.NOT_FOUND, False, code=code)
    if code is not None and 400 <= code < 500:
        return _verdict(Category.INVALID_INPUT, False, code=code)
    return _verdict(Category.INTERNAL, False, code=code)


def _classify_discord_http(exc: BaseException, discord: Any) -> Classification:
    """discord.py ``HTTPException``: Discord's JSON error ``code`` first, then the HTTP status."""
    status = _as_int(getattr(exc, "status", None))
    discord_code = _as_int(getattr(exc, "code", None))
    if discord_code in _DISCORD_PERMISSION_CODES:
        return _verdict(Category.PERMISSION, False, code=status)
    if discord_code in _DISCORD_UNKNOWN_CODES:
        return _verdict(Category.NOT_FOUND, False, code=status)
    if status == 429:
        return _verdict(Category.RATE_LIMITED, True, _discord_retry_after(exc), code=status)
    if isinstance(exc, discord.DiscordServerError) or (status is not None and 500 <= status < 600):
        return _verdict(Category.UNAVAILABLE, True, code=status)
    if isinstance(exc, discord.Forbidden) or status == 403:
        return _verdict(Category.PERMISSION, False, code=status)
    if isinstance(exc, discord.NotFound) or status == 404:
        return _verdict(Category.NOT_FOUND, False, code=status)
    if status == 401:
        return _verdict(Category.AUTH, False, code=status)
    if status == 413 or discord_code == 40005:  # 40005: request entity too large
        return _verdict(Category.TOO_LARGE, False, code=status)
    if status is not None and 400 <= status < 500:
        return _verdict(Category.INVALID_INPUT, False, code=status)
    return _verdict(Category.INTERNAL, False, code=status)


def _discord_retry_after(exc: BaseException) -> float | None:
    """The 429's wait: HTTPException keeps only the body's text, so also look at the headers."""
    text = getattr(exc, "text", None)
    if isinstance(text, str) and text.lstrip().startswith("{"):
        try:
            body = json.loads(text)
        except ValueError:
            body = None
        if isinstance(body, dict):
            hint = parse_duration(body.get("retry_after"))
            if hint is not None:
                return hint
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is not None and hasattr(headers, "get"):
        for name in ("Retry-After", "X-RateLimit-Reset-After"):
            hint = parse_duration(headers.get(name))
            if hint is not None:
                return hint
    return None


def _error_details(body: object) -> list[dict[str, Any]]:
    """The ``details`` list of a Google error body, keeping only dict entries."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict):
        return []
    inner = body.get("error", body)
    if not isinstance(inner, dict):
        return []
    details = inner.get("details")
    if not isinstance(details, list):
        return []
    return [d for d in details if isinstance(d, dict)]


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """``retryDelay`` of the ``google.rpc.RetryInfo`` detail, in seconds."""
    for detail in details:
        if _as_str(detail.get("@type")).endswith("google.rpc.RetryInfo"):
            hint = parse_duration(detail.get("retryDelay"))
            if hint is not None:
                return hint
    return None


def _is_daily_quota(details: list[dict[str, Any]]) -> bool:
    """True when a ``google.rpc.QuotaFailure`` violation names a per-day quota."""
    for detail in details:
        if not _as_str(detail.get("@type")).endswith("google.rpc.QuotaFailure"):
            continue
        violations = detail.get("violations")
        if not isinstance(violations, list):
            continue
        for violation in violations:
            if not isinstance(violation, dict):
                continue
            names = (_as_str(violation.get(k)).lower() for k in ("quotaId", "quotaMetric"))
            if any("perday" in n or "per_day" in n for n in names):
                return True
    return False


def _mentions(message: str, details: list[dict[str, Any]], markers: tuple[str, ...]) -> bool:
    """True when the message or an ErrorInfo ``reason`` mentions one of the markers."""
    texts = [message]
    texts.extend(_as_str(d.get("reason")).lower() for d in details)
    return any(m in t for t in texts for m in markers)


def _verdict(
    category: Category,
    retryable: bool,
    retry_after: float | None = None,
    *,
    code: int | None = None,
    daily_quota: bool = False,
) -> Classification:
    """Build a Classification with its user message."""
    return Classification(
        category=category,
        retryable=retryable,
        retry_after=retry_after,
        user_message=user_message_for(category, retry_after),
        code=code,
        daily_quota=daily_quota,
    )


def _as_int(value: object) -> int | None:
    """An int from an attribute that may hold anything."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _as_str(value: object) -> str:
    """A str from an attribute that may hold anything (non-strings become empty)."""
    return value if isinstance(value, str) else ""


def _non_negative(value: object) -> float | None:
    """A finite, non-negative number of seconds, or None."""
    return parse_duration(value) if not isinstance(value, str) else None


def _human_duration(seconds: float) -> str:
    """'about 3 h' style rounding for user messages."""
    if seconds >= 5400:
        return f"{round(seconds / 3600)} h"
    if seconds >= 90:
        return f"{round(seconds / 60)} min"
    return f"{max(1, round(seconds))} s"
