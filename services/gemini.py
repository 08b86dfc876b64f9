"""The Gemini service: one google-genai client behind the retry policy, the breaker and a timeout.

Every generation runs as ``retry -> breaker -> adaptive timeout -> SDK``: the policy decides
whether to try again, the breaker fails fast while Gemini is down and counts each attempt
(timeouts included, because the timeout sits inside it), and the SDK's own retries are off
(``HttpRetryOptions(attempts=1)``) so each retry is owned in exactly one place.

Answers the user cannot get (a safety block, a blocked prompt, an empty answer) come back
as a ``Reply`` with ``ok`` False and a sentence for the user; failures are exceptions for
the pipeline to ``classify``. A daily quota is handled here, below the retry policy: the
exhausted model is remembered until its quota resets and the fallback models are tried in
order; when none is left, the breaker is forced open until the first reset and
``QuotaExhaustedError`` is raised (``classify`` reads it as QUOTA_EXHAUSTED with the time
to reset; ``RetryPolicy`` never retries it, so nobody sleeps for hours).
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from google import genai
from google.genai import types

from resilience.breakers import Breaker, BreakerState, Lease, describe_error
from resilience.clock import Clock
from resilience.errors import Category, CircuitOpenError, Classification, RetryHintTooLongError, classify
from resilience.retries import RetryPolicy
from resilience.timeouts import AdaptiveTimeout
from services.metrics import Metrics
from services.storage import Turn

OPERATION = "gemini.generate"
QUOTA_REASON = "daily quota exhausted"
PING_PROMPT = "hello"
PING_PERSONA = "You are a health check. Answer in one short sentence."
# The SDK's own deadline is only a backstop behind the AdaptiveTimeout, which must fire first
# so the breaker sees a CallTimeoutError with our operation name.
SDK_TIMEOUT_MARGIN = 5.0

# Failures caused by one request's content, not by Gemini's health: the breaker ignores them.
_PER_REQUEST = frozenset({Category.INVALID_INPUT, Category.TOO_LARGE})
# Finish reasons that mean "Gemini refused", as opposed to "Gemini stopped" (STOP, MAX_TOKENS).
_REFUSALS = frozenset(
    {
        "SAFETY",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "RECITATION",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "MODEL_ARMOR",
    }
)


class ReplyKind(StrEnum):
    """What a generation produced."""

    ANSWER = "answer"
    SAFETY_BLOCKED = "safety_blocked"
    PROMPT_BLOCKED = "prompt_blocked"
    EMPTY = "empty"


USER_MESSAGES = {
    ReplyKind.SAFETY_BLOCKED: "Gemini declined to answer that for safety reasons; try rephrasing.",
    ReplyKind.PROMPT_BLOCKED: "Gemini refused to read that message because of its safety filters; "
    "try rephrasing it.",
    ReplyKind.EMPTY: "Gemini came back with an empty answer; try asking again or rephrasing.",
}
_RECITATION_MESSAGE = (
    "Gemini stopped because its answer would have quoted protected text; try asking differently."
)
_NO_ROOM_MESSAGE = "Gemini ran out of room before it could answer; try a shorter or simpler question."


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of one generation that reached Gemini and came back.

    ``ok`` is True for an answer: post ``text``. Otherwise ``text`` is empty and
    ``user_message`` is the sentence to show instead. ``model`` is the model that answered
    (a fallback when the primary's daily quota is used up); ``finish_reason`` and
    ``block_reason`` are Gemini's enum names (``"STOP"``, ``"SAFETY"``, ...) or None.
    """

    kind: ReplyKind
    text: str
    model: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    block_reason: str | None = None
    user_message: str | None = None

    @property
    def ok(self) -> bool:
        """True when there is an answer to post."""
        return self.kind is ReplyKind.ANSWER


class QuotaExhaustedError(RetryHintTooLongError, CircuitOpenError):
    """Every configured model's daily quota is used up; the breaker is held open until a reset.

    It is both of its parents on purpose: ``classify`` reads a ``RetryHintTooLongError``
    as the 429 it wraps (``original``: QUOTA_EXHAUSTED, ``daily_quota``, ``retry_after`` =
    seconds to the reset), and ``RetryPolicy`` never retries a ``CircuitOpenError``.
    ``remaining`` and ``retry_after`` are both the seconds until the next model resets.
    """

    def __init__(self, name: str, remaining: float, original: BaseException) -> None:
        Exception.__init__(self, f"Gemini daily quota exhausted on every model; next try in {remaining:.0f}s")
        self.name = name
        self.remaining = remaining
        self.retry_after = remaining
        self.cap = 0.0
        self.original = original


class GeminiStoppedError(ConnectionError):
    """The service is not running (not started yet, or stopped): the call may succeed later."""


class GeminiService:
    """Generates answers with Google Gemini; a registry service named ``"gemini"``.

    Everything is injected: the breaker, the retry policy and the adaptive timeout are built
    by the application (so the admin API and metrics see the same objects), ``clock`` times
    the quota memory and the health timestamps. ``fallback_models`` are tried in order, once
    each, when a model's daily quota is used up. ``ssl_context`` lets several clients share
    one TLS context (the SDK otherwise builds one per client, ~0.1 s).
    """

    name = "gemini"
    depends_on: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        api_key: str,
        model: str,
        fallback_models: Sequence[str] = (),
        base_url: str | None = None,
        persona: str,
        breaker: Breaker,
        retry: RetryPolicy,
        timeout: AdaptiveTimeout,
        clock: Clock,
        metrics: Metrics | None = None,
        max_output_tokens: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.model = model
        self.fallback_models = tuple(m for m in fallback_models if m != model)
        self.base_url = base_url
        self.persona = persona
        self.breaker = breaker
        self.retry = retry
        self.timeout = timeout
        self.max_output_tokens = max_output_tokens
        self._api_key = api_key
        self._clock = clock
        self._metrics = metrics
        self._ssl_context = ssl_context
        self._client: genai.Client | None = None
        # model -> monotonic time its daily quota resets; skipped until then.
        self._exhausted: dict[str, float] = {}
        self._quota_error: BaseException | None = None
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Create the one client (and its aiohttp session, lazily on first use); idempotent."""
        if self._client is not None:
            return
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            ctx = self._ssl_context
            tls = {"async_client_args": {"ssl": ctx}, "client_args": {"verify": ctx}}
        self._client = genai.Client(
            api_key=self._api_key,
            http_options=types.HttpOptions(
                base_url=self.base_url,
                timeout=round((self.timeout.maximum + SDK_TIMEOUT_MARGIN) * 1000),
                # Off: RetryPolicy owns retrying, and the SDK's hidden retry sleeps 1-10 s.
                retry_options=types.HttpRetryOptions(attempts=1),
                **tls,
            ),
        )

    async def stop(self) -> None:
        """Close the client's sessions; safe to call twice."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            await client.aio.aclose()
        finally:
            client.close()  # the SDK's sync httpx client, which aclose() leaves open

    def health(self) -> dict[str, Any]:
        """Running, breaker state, models (with exhausted ones and seconds to reset), last success/error."""
        now = self._clock.monotonic()
        state = self.breaker.state
        return {
            "ok": self._client is not None and state is not BreakerState.OPEN,
            "running": self._client is not None,
            "breaker": str(state),
            "breaker_remaining": round(self.breaker.remaining_open(), 3),
            "model": self.model,
            "fallback_models": list(self.fallback_models),
            "exhausted_models": {m: round(t - now, 3) for m, t in self._exhausted.items() if t > now},
            "last_success": self.last_success,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }

    # -- generation -------------------------------------------------------------------

    async def generate(
        self, prompt: str, history: Sequence[Turn] = (), *, persona: str | None = None
    ) -> Reply:
        """Answer ``prompt`` in the context of ``history`` (oldest first), as ``persona``.

        Returns a ``Reply`` whenever Gemini answered, even with a refusal (``reply.ok``
        False, ``reply.user_message`` set). Raises what the last attempt raised once the
        retry policy gives up: SDK errors (``errors.APIError``, ``TimeoutError``, aiohttp
        connection errors, ``json.JSONDecodeError``), ``CallTimeoutError``,
        ``CircuitOpenError``, ``RetryHintTooLongError``, ``QuotaExhaustedError``, or
        ``GeminiStoppedError`` when the service is not running. ``classify`` routes them all.
        A 400/413 about this request's content is not counted by the breaker. Raises
        ``ValueError`` (a caller's bug) when there is no text to send at all.
        """
        contents = build_contents(history, prompt)
        if not contents:
            raise ValueError("nothing to send: the prompt and the history are empty")
        config: types.GenerateContentConfigDict = {}
        if persona or self.persona:
            config["system_instruction"] = persona or self.persona
        if self.max_output_tokens is not None:
            config["max_output_tokens"] = self.max_output_tokens
        return await self.retry.call(lambda: self._attempt(contents, config))

    async def ping(self) -> Reply:
        """A tiny generation through the same guards (for the HTTP API's Gemini test)."""
        return await self.generate(PING_PROMPT, persona=PING_PERSONA)

    async def _attempt(
        self, contents: list[types.ContentDict], config: types.GenerateContentConfigDict
    ) -> Reply:
        """One retry attempt: the first model whose daily quota is not used up, then the next ones."""
        quota_error: BaseException | None = None
        for model in self._models():
            try:
                return await self._call(model, contents, config)
            except _DailyQuota as exc:
                quota_error = exc.error
        assert quota_error is not None  # _models() is never empty and only _DailyQuota continues
        self._quota_error = quota_error
        remaining = max(0.0, min(self._exhausted.values()) - self._clock.monotonic())
        self.breaker.force_open(remaining, reason=QUOTA_REASON)
        raise QuotaExhaustedError(self.breaker.name, remaining, quota_error) from quota_error

    def _models(self) -> list[str]:
        """Models to try now, in order: those whose daily quota is not known to be used up."""
        now = self._clock.monotonic()
        models = [m for m in (self.model, *self.fallback_models) if self._exhausted.get(m, 0.0) <= now]
        if not models:
            if not self.breaker.would_admit():
                raise self._rejection(CircuitOpenError(self.breaker.name, self.breaker.remaining_open()))
            # Every model is marked exhausted, yet the breaker admits calls: an operator reset
            # it (perhaps after raising the quota), so believe them and try again.
            self._exhausted.clear()
            models = [self.model, *self.fallback_models]
        return models

    async def _call(
        self, model: str, contents: list[types.ContentDict], config: types.GenerateContentConfigDict
    ) -> Reply:
        """One request to ``model`` through the breaker and the timeout; records metrics and health."""
        client = self._client
        if client is None:
            raise GeminiStoppedError("the Gemini service is not running")
        lease = self._admit()
        started = self._clock.monotonic()
        try:
            response = await self.timeout.call(
                lambda: client.aio.models.generate_content(model=model, contents=contents, config=config),
                OPERATION,
            )
        except Exception as exc:
            verdict = classify(exc, now=self._clock.time())
            # Settle the lease first: nothing below may leave a half-open probe unreported.
            if verdict.daily_quota or verdict.category in _PER_REQUEST:
                # Neither says anything about Gemini's health, so neither counts: one user's
                # oversized messages must not open the breaker for everyone, and when every
                # model's quota is used up _attempt forces the breaker open instead.
                lease.release()
            else:
                lease.record_failure(exc)
            self._observe(verdict.category.value, started, verdict.code)
            self._note_error(exc)
            if verdict.daily_quota:
                self._mark_exhausted(model, verdict)
                raise _DailyQuota(exc) from exc
            raise
        except BaseException:
            lease.release()  # cancelled: no outcome
            raise
        lease.record_success()
        reply = to_reply(response, model)
        self._observe(reply.kind.value, started, 200, reply.prompt_tokens, reply.completion_tokens)
        self.last_success = self._clock.time()
        return reply

    def _admit(self) -> Lease:
        """A breaker lease; while held open for the quota, the rejection says so."""
        try:
            return self.breaker.admit()
        except CircuitOpenError as exc:
            raise self._rejection(exc) from None

    def _rejection(self, exc: CircuitOpenError) -> CircuitOpenError:
        """``exc``, or a ``QuotaExhaustedError`` when the breaker is held open for the daily quota."""
        if self._quota_error is not None and self.breaker.snapshot().forced_reason == QUOTA_REASON:
            error = QuotaExhaustedError(self.breaker.name, exc.remaining, self._quota_error)
            error.__cause__ = self._quota_error
            return error
        return exc

    def _mark_exhausted(self, model: str, verdict: Classification) -> None:
        """Remember that ``model``'s daily quota is used up until it resets."""
        seconds = verdict.retry_after if verdict.retry_after is not None else 0.0
        self._exhausted[model] = self._clock.monotonic() + seconds

    def _observe(
        self,
        outcome: str,
        started: float,
        code: int | None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        """Count one attempt in the metrics, when there are metrics."""
        if self._metrics is not None:
            seconds = max(0.0, self._clock.monotonic() - started)
            self._metrics.observe_gemini(outcome, seconds, code, prompt_tokens, completion_tokens)

    def _note_error(self, exc: BaseException) -> None:
        # describe_error keeps the type and status code only: SDK messages may carry URLs.
        self.last_error = describe_error(exc)
        self.last_error_at = self._clock.time()


class _DailyQuota(Exception):
    """Internal: this model's daily quota is used up, try the next one (never leaves the service)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__("daily quota")
        self.error = error


def build_contents(history: Sequence[Turn], prompt: str) -> list[types.ContentDict]:
    """Gemini ``contents`` for ``history`` + ``prompt``: valid for every model.

    Empty turns are dropped (Gemini rejects empty parts), leading model turns are dropped
    (a conversation must start with the user), and consecutive turns of one role are merged
    into one content (older models insist on alternating roles; a failed answer leaves
    two user turns in a row). Plain dicts, not pydantic models: the SDK converts either, and
    dicts cost it about 40% less CPU per request with a long history (bench_pipeline).
    """
    contents: list[types.ContentDict] = []
    for role, text in [*((t.role, t.text) for t in history), ("user", prompt)]:
        role = "model" if role == "model" else "user"
        if not text or (role == "model" and not contents):
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].append({"text": text})  # type: ignore[union-attr]
        else:
            contents.append({"role": role, "parts": [{"text": text}]})
    return contents


def to_reply(response: types.GenerateContentResponse, model: str) -> Reply:
    """Turn an SDK response into a ``Reply``: an answer, a refusal, or an empty answer."""
    usage = response.usage_metadata
    prompt_tokens = (usage.prompt_token_count or 0) if usage else 0
    completion_tokens = (usage.candidates_token_count or 0) if usage else 0
    feedback = response.prompt_feedback
    block = _name(feedback.block_reason) if feedback else None
    candidate = response.candidates[0] if response.candidates else None
    finish = _name(candidate.finish_reason) if candidate else None

    def refusal(kind: ReplyKind, message: str | None = None) -> Reply:
        return Reply(
            kind, "", model, finish, prompt_tokens, completion_tokens, block, message or USER_MESSAGES[kind]
        )

    if block is not None and block != "BLOCKED_REASON_UNSPECIFIED":
        return refusal(ReplyKind.PROMPT_BLOCKED)
    text = response.text if candidate is not None else None
    if text and text.strip():
        return Reply(ReplyKind.ANSWER, text, model, finish, prompt_tokens, completion_tokens, block)
    if finish == "RECITATION":
        return refusal(ReplyKind.SAFETY_BLOCKED, _RECITATION_MESSAGE)
    if finish in _REFUSALS:
        return refusal(ReplyKind.SAFETY_BLOCKED)
    if finish == "MAX_TOKENS":  # thinking models can spend the whole budget before the answer
        return refusal(ReplyKind.EMPTY, _NO_ROOM_MESSAGE)
    return refusal(ReplyKind.EMPTY)


def _name(value: object) -> str | None:
    """An SDK enum (or the raw string it could not parse) as its plain name."""
    if value is None:
        return None
    return str(getattr(value, "value", value))
