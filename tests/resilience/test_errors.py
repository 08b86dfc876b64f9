"""classify(): real exceptions from google-genai, discord.py, aiohttp and the runtime -> verdicts."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import aiohttp
import discord
import pytest
from aiohttp import web
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from resilience import errors as errors_module
from resilience.errors import (
    CallTimeoutError,
    Category,
    CircuitOpenError,
    Classification,
    MutexTimeoutError,
    RetryHintTooLongError,
    classify,
    parse_duration,
    seconds_until_pacific_midnight,
    user_message_for,
)

PACIFIC = ZoneInfo("America/Los_Angeles")
# 2026-11-23 09:00 Pacific (PST, UTC-8): 15 h before the daily quota resets.
NOW = datetime(2026, 11, 23, 9, 0, tzinfo=PACIFIC).timestamp()


def gemini_error(
    code: int, message: str = "error", status: str = "", details: list[Any] | None = None
) -> BaseException:
    """Raise through the SDK's own dispatch (ClientError for 4xx, ServerError for 5xx) and return it."""
    body: dict[str, Any] = {"error": {"code": code, "message": message, "status": status}}
    if details is not None:
        body["error"]["details"] = details
    try:
        genai_errors.APIError.raise_error(code, body, None)
    except genai_errors.APIError as exc:
        return exc
    raise AssertionError("raise_error did not raise")


def retry_info(delay: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}


def quota_failure(
    quota_id: str, metric: str = "generativelanguage.googleapis.com/generate_content_requests"
) -> dict:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaMetric": metric, "quotaId": quota_id, "quotaValue": "50"}],
    }


class FakeResponse:
    """The attributes discord.HTTPException.__init__ reads from an aiohttp response."""

    def __init__(self, status: int, reason: str = "Reason", headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = CIMultiDict(headers or {})


def discord_error(
    cls: type[discord.HTTPException],
    status: int,
    body: dict[str, Any] | str,
    headers: dict[str, str] | None = None,
) -> discord.HTTPException:
    return cls(FakeResponse(status, headers=headers), body)  # type: ignore[arg-type]


class FakeSocket:
    close_code = 4000


CASES: list[tuple[str, BaseException, Category, bool, float | None]] = [
    # --- google-genai ---
    (
        "gemini 429 with RetryInfo 12s",
        gemini_error(429, "Resource exhausted", "RESOURCE_EXHAUSTED", [retry_info("12s")]),
        Category.RATE_LIMITED,
        True,
        12.0,
    ),
    (
        "gemini 429 with fractional RetryInfo",
        gemini_error(429, "Resource exhausted", "RESOURCE_EXHAUSTED", [retry_info("1.5s")]),
        Category.RATE_LIMITED,
        True,
        1.5,
    ),
    (
        "gemini 429 without hint",
        gemini_error(429, status="RESOURCE_EXHAUSTED"),
        Category.RATE_LIMITED,
        True,
        None,
    ),
    (
        "gemini 429 per-minute quota stays a rate limit",
        gemini_error(
            429, details=[quota_failure("GenerateRequestsPerMinutePerProjectPerModel"), retry_info("30s")]
        ),
        Category.RATE_LIMITED,
        True,
        30.0,
    ),
    (
        "gemini daily quota resets at Pacific midnight",
        gemini_error(429, details=[quota_failure("GenerateRequestsPerDayPerProjectPerModel-FreeTier")]),
        Category.QUOTA_EXHAUSTED,
        True,
        15 * 3600.0,
    ),
    (
        "gemini daily quota by metric name",
        gemini_error(429, details=[quota_failure("x", metric="generate_content_requests_per_day")]),
        Category.QUOTA_EXHAUSTED,
        True,
        15 * 3600.0,
    ),
    ("gemini 500", gemini_error(500, status="INTERNAL"), Category.UNAVAILABLE, True, None),
    ("gemini 502", gemini_error(502), Category.UNAVAILABLE, True, None),
    (
        "gemini 503 overloaded",
        gemini_error(503, "The model is overloaded.", "UNAVAILABLE"),
        Category.UNAVAILABLE,
        True,
        None,
    ),
    ("gemini 504", gemini_error(504, status="DEADLINE_EXCEEDED"), Category.UNAVAILABLE, True, None),
    (
        "gemini 400",
        gemini_error(400, "Invalid JSON payload", "INVALID_ARGUMENT"),
        Category.INVALID_INPUT,
        False,
        None,
    ),
    (
        "gemini 400 token limit",
        gemini_error(
            400,
            "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
            "INVALID_ARGUMENT",
        ),
        Category.TOO_LARGE,
        False,
        None,
    ),
    (
        "gemini 400 bad API key",
        gemini_error(400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT"),
        Category.AUTH,
        False,
        None,
    ),
    (
        "gemini 403 API key",
        gemini_error(
            403,
            "Permission denied",
            "PERMISSION_DENIED",
            [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}],
        ),
        Category.AUTH,
        False,
        None,
    ),
    (
        "gemini 401",
        gemini_error(401, "Request had invalid credentials", "UNAUTHENTICATED"),
        Category.AUTH,
        False,
        None,
    ),
    (
        "gemini 403 permission",
        gemini_error(403, "Forbidden model", "PERMISSION_DENIED"),
        Category.PERMISSION,
        False,
        None,
    ),
    (
        "gemini 404 model",
        gemini_error(404, "models/x is not found", "NOT_FOUND"),
        Category.NOT_FOUND,
        False,
        None,
    ),
    (
        "gemini malformed stream",
        genai_errors.UnknownApiResponseError("bad chunk"),
        Category.BAD_RESPONSE,
        True,
        None,
    ),
    (
        "malformed json body",
        json.JSONDecodeError("Expecting value", "<html>", 0),
        Category.BAD_RESPONSE,
        True,
        None,
    ),
    # --- timeouts and connections ---
    ("bare TimeoutError", TimeoutError(), Category.TIMEOUT, True, None),
    ("CallTimeoutError", CallTimeoutError("gemini.generate", 30.0), Category.TIMEOUT, True, None),
    ("aiohttp ServerDisconnectedError", aiohttp.ServerDisconnectedError(), Category.CONNECTION, True, None),
    ("aiohttp ClientOSError", aiohttp.ClientOSError(104, "reset"), Category.CONNECTION, True, None),
    (
        "aiohttp ServerTimeoutError is a timeout",
        aiohttp.ServerTimeoutError("read"),
        Category.TIMEOUT,
        True,
        None,
    ),
    ("ConnectionResetError", ConnectionResetError(), Category.CONNECTION, True, None),
    # --- discord.py ---
    ("discord RateLimited", discord.RateLimited(7.5), Category.RATE_LIMITED, True, 7.5),
    (
        "discord 429 body retry_after",
        discord_error(
            discord.HTTPException, 429, json.dumps({"message": "rate limited", "retry_after": 3.2})
        ),
        Category.RATE_LIMITED,
        True,
        3.2,
    ),
    (
        "discord 429 Retry-After header",
        discord_error(
            discord.HTTPException,
            429,
            {"message": "You are being rate limited.", "code": 0},
            {"Retry-After": "4"},
        ),
        Category.RATE_LIMITED,
        True,
        4.0,
    ),
    (
        "discord 50013 missing permissions",
        discord_error(discord.Forbidden, 403, {"message": "Missing Permissions", "code": 50013}),
        Category.PERMISSION,
        False,
        None,
    ),
    (
        "discord 50001 missing access",
        discord_error(discord.Forbidden, 403, {"message": "Missing Access", "code": 50001}),
        Category.PERMISSION,
        False,
        None,
    ),
    (
        "discord 10003 unknown channel",
        discord_error(discord.NotFound, 404, {"message": "Unknown Channel", "code": 10003}),
        Category.NOT_FOUND,
        False,
        None,
    ),
    (
        "discord 10008 unknown message",
        discord_error(discord.NotFound, 404, {"message": "Unknown Message", "code": 10008}),
        Category.NOT_FOUND,
        False,
        None,
    ),
    ("discord Forbidden", discord_error(discord.Forbidden, 403, "nope"), Category.PERMISSION, False, None),
    ("discord NotFound", discord_error(discord.NotFound, 404, "gone"), Category.NOT_FOUND, False, None),
    (
        "discord 503",
        discord_error(discord.DiscordServerError, 503, "upstream"),
        Category.UNAVAILABLE,
        True,
        None,
    ),
    ("discord plain 502", discord_error(discord.HTTPException, 502, ""), Category.UNAVAILABLE, True, None),
    (
        "discord 400 form body",
        discord_error(discord.HTTPException, 400, {"message": "Invalid Form Body", "code": 50035}),
        Category.INVALID_INPUT,
        False,
        None,
    ),
    (
        "discord LoginFailure",
        discord.LoginFailure("Improper token has been passed."),
        Category.AUTH,
        False,
        None,
    ),
    ("discord GatewayNotFound", discord.GatewayNotFound(), Category.CONNECTION, True, None),
    (
        "discord ConnectionClosed",
        discord.ConnectionClosed(FakeSocket(), shard_id=None, code=1006),  # type: ignore[arg-type]
        Category.CONNECTION,
        True,
        None,
    ),
    (
        "discord ConnectionClosed 4004 is bad auth",
        discord.ConnectionClosed(FakeSocket(), shard_id=None, code=4004),  # type: ignore[arg-type]
        Category.AUTH,
        False,
        None,
    ),
    # --- the runtime's own ---
    ("CircuitOpenError", CircuitOpenError("gemini", 12.5), Category.CIRCUIT_OPEN, True, 12.5),
    (
        "RetryHintTooLongError keeps the original's category",
        RetryHintTooLongError(60.0, 20.0, gemini_error(429, details=[retry_info("60s")])),
        Category.RATE_LIMITED,
        True,
        60.0,
    ),
    ("MutexTimeoutError is BUSY", MutexTimeoutError("channel:1", 5.0), Category.BUSY, True, None),
    # --- everything else ---
    ("KeyError is a bug", KeyError("x"), Category.INTERNAL, False, None),
    ("cancellation is not retryable", asyncio.CancelledError(), Category.INTERNAL, False, None),
]


@pytest.mark.parametrize(
    ("label", "exc", "category", "retryable", "retry_after"), CASES, ids=[c[0] for c in CASES]
)
def test_classify_maps_real_exceptions(
    label: str, exc: BaseException, category: Category, retryable: bool, retry_after: float | None
) -> None:
    """Each real exception gets the expected category, retryability and server hint."""
    verdict = classify(exc, now=NOW)
    assert verdict.category is category, label
    assert verdict.retryable is retryable, label
    if retry_after is None:
        assert verdict.retry_after is None, label
    else:
        assert verdict.retry_after == pytest.approx(retry_after), label


async def test_refused_connection_from_a_real_aiohttp_client_is_connection() -> None:
    """aiohttp.ClientConnectorError from a refused loopback connection -> CONNECTION, retryable."""
    # A bound socket that never listens holds the port, so the connect is refused at once and
    # no other process can take the port meanwhile.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectorError) as info:
                await session.get(f"http://127.0.0.1:{port}/", timeout=aiohttp.ClientTimeout(total=2))
    verdict = classify(info.value)
    assert verdict.category is Category.CONNECTION
    assert verdict.retryable


def test_daily_quota_is_flagged_and_says_when_it_resets() -> None:
    """A per-day QuotaFailure sets daily_quota and tells the user roughly when it resets."""
    verdict = classify(
        gemini_error(429, details=[quota_failure("GenerateRequestsPerDayPerProjectPerModel")]), now=NOW
    )
    assert verdict.daily_quota
    assert verdict.user_message == "Gemini's daily quota is used up; it resets in about 15 h."


def _violation(quota_id: str, metric: str = "generate_content_free_tier_requests") -> dict[str, Any]:
    return {
        "quotaMetric": f"generativelanguage.googleapis.com/{metric}",
        "quotaId": quota_id,
        "quotaDimensions": {"location": "global", "model": "gemini-2.0-flash"},
    }


# The shape of a real daily-quota 429 (https://github.com/googleapis/python-genai/issues/2044): the
# per-day violation beside per-minute ones, and a RetryInfo of 47 s, not the hours to the reset.
REAL_DAILY_QUOTA_DETAILS = [
    {
        "@type": "type.googleapis.com/google.rpc.Help",
        "links": [{"description": "Learn more about Gemini API quotas",
                   "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}],
    },
    {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
            _violation("GenerateRequestsPerDayPerProjectPerModel-FreeTier"),
            _violation("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"),
            _violation(
                "GenerateContentInputTokensPerModelPerMinute-FreeTier",
                "generate_content_free_tier_input_token_count",
            ),
        ],
    },
    retry_info("47s"),
]


def test_a_per_day_violation_wins_over_the_short_retry_hint_beside_it() -> None:
    """The real API sends "retry in 47s" with a used-up daily quota: the quota still resets at
    midnight Pacific (15 h away), so that is when to try again, not in 47 s."""
    exc = gemini_error(429, "You exceeded your current quota", "RESOURCE_EXHAUSTED", REAL_DAILY_QUOTA_DETAILS)
    verdict = classify(exc, now=NOW)
    assert verdict.category is Category.QUOTA_EXHAUSTED and verdict.daily_quota and verdict.retryable
    assert verdict.retry_after == pytest.approx(15 * 3600.0)
    assert verdict.user_message == "Gemini's daily quota is used up; it resets in about 15 h."


def test_a_retry_hint_past_the_daily_reset_is_still_honoured() -> None:
    """Ten seconds before midnight a "retry in 47s" is the later of the two: wait for it."""
    just_before = datetime(2026, 11, 23, 23, 59, 50, tzinfo=PACIFIC).timestamp()
    exc = gemini_error(429, status="RESOURCE_EXHAUSTED", details=REAL_DAILY_QUOTA_DETAILS)
    assert classify(exc, now=just_before).retry_after == pytest.approx(47.0)


def test_pacific_midnight_across_daylight_saving() -> None:
    """The reset is local midnight in Los Angeles, in summer (PDT) and winter (PST) alike."""
    summer = datetime(2026, 7, 1, 23, 30, tzinfo=PACIFIC).timestamp()
    winter = datetime(2026, 12, 1, 0, 0, 1, tzinfo=PACIFIC).timestamp()
    spring_forward = datetime(2026, 3, 8, 0, 0, tzinfo=PACIFIC).timestamp()  # a 23-hour day
    assert seconds_until_pacific_midnight(summer) == pytest.approx(1800)
    assert seconds_until_pacific_midnight(winter) == pytest.approx(86399)
    assert seconds_until_pacific_midnight(spring_forward) == pytest.approx(23 * 3600)


def test_user_messages_never_leak_exception_text() -> None:
    """The user message is a fixed sentence per category; secrets in the exception stay out."""
    secret = "AIzaSySECRETKEY123"
    for _label, exc, *_ in CASES:
        assert secret not in classify(exc).user_message
    leaky = gemini_error(400, f"API key {secret} not valid", "INVALID_ARGUMENT")
    verdict = classify(leaky)
    assert secret not in verdict.user_message
    assert secret not in str(verdict)


def test_user_messages_name_the_failing_service() -> None:
    """Gemini failures say Gemini, Discord failures say Discord, unknown sources stay neutral."""
    assert classify(gemini_error(429)).user_message == (
        "Gemini is rate-limiting me right now; I'll answer as soon as it lets me."
    )
    assert "Discord" in classify(discord_error(discord.DiscordServerError, 503, "")).user_message
    assert "Gemini" not in classify(TimeoutError()).user_message
    assert "Gemini" in classify(CircuitOpenError("gemini", 3.0)).user_message
    assert classify(gemini_error(400, "too long: request payload size exceeds the limit")).user_message == (
        "That message is too long for me to answer; please shorten it."
    )


def test_a_gemini_404_tells_the_user_the_model_is_gone_and_is_permanent() -> None:
    """The real 404 for an unknown or retired model: not retryable, and the sentence says it is the
    model, not a channel or a message (Discord's 404 keeps its own sentence)."""
    exc = gemini_error(
        404,
        "models/gemini-1.5-flash is not found for API version v1, or is not supported for "
        "generateContent. Call ListModels to see the list of available models and their supported methods.",
        "NOT_FOUND",
    )
    verdict = classify(exc)
    assert (verdict.category, verdict.retryable, verdict.code) == (Category.NOT_FOUND, False, 404)
    assert verdict.user_message == (
        "The Gemini model I'm set up to use doesn't exist (unknown or retired), so I can't answer; "
        "an admin needs to change my settings."
    )
    unknown_message = {"code": 10008, "message": "Unknown Message"}
    discord_404 = classify(discord_error(discord.NotFound, 404, unknown_message))
    assert "model" not in discord_404.user_message.lower()


def test_every_category_has_a_plain_sentence() -> None:
    """user_message_for answers every category with one non-empty sentence ending in a period."""
    for category in Category:
        for service in (None, "Gemini", "Discord"):
            text = user_message_for(category, 7200.0, service)
            assert text and text.endswith(".") and "{" not in text


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("12s", 12.0),
        ("1.5s", 1.5),
        (" 3s ", 3.0),
        ("0s", 0.0),
        (4, 4.0),
        ("-1s", None),
        ("nans", None),
        ("1e400s", None),
        (10**400, None),
        ("", None),
        (None, None),
        (True, None),
        ({"seconds": 3}, None),
    ],
)
def test_parse_duration(raw: object, expected: float | None) -> None:
    """Protobuf duration strings parse to seconds; garbage gives None."""
    assert parse_duration(raw) == expected


# --- hypothesis: classify never raises --------------------------------------------------------

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.binary(max_size=4),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=5,
)
DELAYS = st.one_of(
    st.text(max_size=10),
    st.from_regex(r"-?[0-9]{0,6}(\.[0-9]{0,4})?(e[0-9]{1,4})?s?", fullmatch=True),
    st.floats(allow_nan=True, allow_infinity=True),
    JUNK,
)
TYPE_URLS = st.sampled_from(
    [
        "type.googleapis.com/google.rpc.RetryInfo",
        "type.googleapis.com/google.rpc.QuotaFailure",
        "type.googleapis.com/google.rpc.ErrorInfo",
        "junk",
    ]
)
DETAIL = st.one_of(
    st.fixed_dictionaries({"@type": TYPE_URLS, "retryDelay": DELAYS}),
    st.fixed_dictionaries(
        {
            "@type": TYPE_URLS,
            "violations": st.one_of(
                JUNK, st.lists(st.dictionaries(st.sampled_from(["quotaId", "quotaMetric"]), JUNK))
            ),
        }
    ),
    JUNK,
)
BODY = st.one_of(
    JUNK,
    st.fixed_dictionaries(
        {
            "error": st.fixed_dictionaries(
                {
                    "code": JUNK,
                    "status": JUNK,
                    "message": JUNK,
                    "details": st.lists(DETAIL, max_size=4) | JUNK,
                }
            )
        }
    ),
)
EXCEPTION_TYPES = st.sampled_from(
    [
        Exception,
        ValueError,
        TimeoutError,
        ConnectionError,
        OSError,
        asyncio.CancelledError,
        KeyboardInterrupt,
        genai_errors.APIError,
        genai_errors.ClientError,
        genai_errors.ServerError,
        genai_errors.UnknownApiResponseError,
        discord.HTTPException,
        discord.Forbidden,
        discord.NotFound,
        discord.DiscordServerError,
        discord.RateLimited,
        discord.ConnectionClosed,
        discord.LoginFailure,
        CircuitOpenError,
        RetryHintTooLongError,
        MutexTimeoutError,
        CallTimeoutError,
        aiohttp.ClientConnectorError,
        json.JSONDecodeError,
    ]
)
ATTRIBUTES = st.dictionaries(
    st.sampled_from(
        [
            "code",
            "status",
            "details",
            "message",
            "retry_after",
            "remaining",
            "original",
            "text",
            "response",
            "name",
            "operation",
        ]
    ),
    JUNK,
    max_size=6,
)


@st.composite
def arbitrary_exceptions(draw: st.DrawFn) -> BaseException:
    """An exception of a known type, built without its constructor and filled with random attributes."""
    cls: type[BaseException] = draw(EXCEPTION_TYPES)
    exc = cls.__new__(cls)
    try:
        BaseException.__init__(exc, *draw(st.lists(JUNK, max_size=3)))
    except Exception:
        pass
    for name, value in draw(ATTRIBUTES).items():
        try:
            setattr(exc, name, value)
        except Exception:
            pass
    if draw(st.booleans()):
        exc.details = draw(BODY)  # type: ignore[attr-defined]
    if draw(st.booleans()):
        exc.original = exc  # type: ignore[attr-defined]  # a cycle
    return exc


@settings(max_examples=80, deadline=None)
@given(arbitrary_exceptions())
def test_classify_never_raises_on_arbitrary_exceptions(exc: BaseException) -> None:
    """Whatever attributes an exception carries, classify returns a Classification.

    The inner classifier is checked too: the defensive fallback in ``classify`` is a last
    resort, and junk attributes must not push a known exception type into it.
    """
    verdict = classify(exc)
    assert isinstance(verdict, Classification)
    assert isinstance(verdict.user_message, str) and verdict.user_message
    inner = errors_module._classify(exc, NOW, 0)
    assert (inner.category, inner.retryable) == (verdict.category, verdict.retryable)


def test_classify_falls_back_to_internal_when_an_attribute_explodes() -> None:
    """An exception whose attribute access raises still gets a verdict (INTERNAL), not a crash."""

    class Exploding(genai_errors.ServerError):
        @property
        def code(self) -> int:  # type: ignore[override]
            raise RuntimeError("boom")

    exc = Exploding.__new__(Exploding)
    verdict = classify(exc)
    assert verdict.category is Category.INTERNAL
    assert not verdict.retryable


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-10, max_value=1000), BODY)
def test_classify_never_raises_on_sdk_built_gemini_errors(code: int, body: Any) -> None:
    """APIError built by the SDK's own constructor from any body still classifies."""
    try:
        exc = genai_errors.APIError(code, body)
    except Exception:
        return  # the SDK itself rejects this body; nothing for classify to see
    assert isinstance(classify(exc), Classification)


# --- the real google-genai client against a loopback server ------------------------------------


class GeminiStub:
    """A loopback HTTP server answering every request with the configured status and body."""

    def __init__(self) -> None:
        self.base_url = ""
        self.status = 200
        self.body = "{}"
        self.content_type = "application/json"
        self.hang = False
        self.release = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        if self.hang:
            await self.release.wait()
        return web.Response(status=self.status, text=self.body, content_type=self.content_type)


@pytest.fixture
async def gemini_stub() -> AsyncIterator[tuple[GeminiStub, genai.Client]]:
    """A GeminiStub on 127.0.0.1:0 and a real genai.Client pointed at it (SDK retries off, 2 s timeout)."""
    stub = GeminiStub()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", stub.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    stub.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    client = sdk_client(stub.base_url, timeout_ms=2000)
    try:
        yield stub, client
    finally:
        stub.release.set()
        await client.aio.aclose()
        await runner.cleanup()


def sdk_client(base_url: str, timeout_ms: int) -> genai.Client:
    """A real google-genai client for the stub, with the SDK's own retries off."""
    options = genai_types.HttpOptions(
        base_url=base_url, timeout=timeout_ms, retry_options=genai_types.HttpRetryOptions(attempts=1)
    )
    return genai.Client(api_key="test-key", http_options=options)


async def _sdk_failure(client: genai.Client) -> BaseException:
    try:
        await client.aio.models.generate_content(model="gemini-2.5-flash", contents="hi")
    except Exception as exc:
        return exc
    raise AssertionError("the call succeeded")


SDK_CASES = [
    (
        429,
        {"error": {"code": 429, "status": "RESOURCE_EXHAUSTED", "details": [retry_info("2s")]}},
        Category.RATE_LIMITED,
        2.0,
    ),
    (
        429,
        {
            "error": {
                "code": 429,
                "status": "RESOURCE_EXHAUSTED",
                "details": [quota_failure("RequestsPerDay")],
            }
        },
        Category.QUOTA_EXHAUSTED,
        None,
    ),
    (
        503,
        {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}},
        Category.UNAVAILABLE,
        None,
    ),
    (
        400,
        {
            "error": {
                "code": 400,
                "message": "API key not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT",
                "details": [
                    {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
                ],
            }
        },
        Category.AUTH,
        None,
    ),
    (
        400,
        {
            "error": {
                "code": 400,
                "message": "The input token count (2000000) exceeds the maximum number of "
                "tokens allowed (1048576).",
                "status": "INVALID_ARGUMENT",
            }
        },
        Category.TOO_LARGE,
        None,
    ),
]


@pytest.mark.parametrize(("status", "body", "category", "retry_after"), SDK_CASES)
async def test_classify_sdk_errors_from_a_real_client(
    gemini_stub: tuple[GeminiStub, genai.Client],
    status: int,
    body: dict,
    category: Category,
    retry_after: float | None,
) -> None:
    """Errors raised by the real google-genai aiohttp path classify as the table says."""
    stub, client = gemini_stub
    stub.status, stub.body = status, json.dumps(body)
    verdict = classify(await _sdk_failure(client))
    assert verdict.category is category
    if retry_after is not None:
        assert verdict.retry_after == retry_after


async def test_classify_html_502_and_malformed_json_from_a_real_client(
    gemini_stub: tuple[GeminiStub, genai.Client],
) -> None:
    """A proxy's HTML 502 is UNAVAILABLE; a 200 with a broken JSON body is BAD_RESPONSE; both retryable."""
    stub, client = gemini_stub
    stub.status, stub.body, stub.content_type = 502, "<html>Bad Gateway</html>", "text/html"
    bad_gateway = classify(await _sdk_failure(client))
    assert (bad_gateway.category, bad_gateway.retryable) == (Category.UNAVAILABLE, True)
    stub.status, stub.body, stub.content_type = 200, "{not json", "application/json"
    garbled = classify(await _sdk_failure(client))
    assert (garbled.category, garbled.retryable) == (Category.BAD_RESPONSE, True)


async def test_classify_a_hang_cut_by_the_sdk_timeout(gemini_stub: tuple[GeminiStub, genai.Client]) -> None:
    """The SDK's own 30 ms timeout on a hung server surfaces as TIMEOUT, retryable."""
    stub, _client = gemini_stub
    stub.hang = True
    quick = sdk_client(stub.base_url, timeout_ms=30)
    try:
        verdict = classify(await _sdk_failure(quick))
    finally:
        await quick.aio.aclose()
    assert (verdict.category, verdict.retryable) == (Category.TIMEOUT, True)


def test_importing_the_runtime_does_not_import_the_sdks() -> None:
    """resilience.errors stays independent of google-genai, discord.py and aiohttp (about 2 s of imports)."""
    code = (
        "import sys, resilience.errors, resilience.retries, resilience.timeouts; "
        "print(sorted(m for m in ('google.genai', 'discord', 'aiohttp') if m in sys.modules))"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, cwd=root
    )
    assert out.stdout.strip() == "[]"
