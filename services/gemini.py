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

A model Gemini does not know (404 NOT_FOUND: a typo, a retired model, a ``-latest`` alias on
API version v1) is handled the same way: skipped for ``MISSING_MODEL_RECHECK_SECONDS`` while the
next model answers, and never counted by the breaker (it says nothing about Gemini's health).
When every model is missing, ``ModelNotFoundError`` is raised: permanent, the user gets a
sentence, the operator a log line naming the models. ``check_models`` asks Gemini about each
configured model once (``python -m bot check`` and start-up).

Streaming (``stream``, ``stream_with_parts``): the same guards around
``client.aio.models.generate_content_stream``; each chunk's text goes to a ``StreamObserver`` as it
arrives. The adaptive timeout (whose floor is the time the longest answer takes) is replaced on this
path by a silence timeout between chunks (the observer's ``silence_seconds``) under a total cap (the
adaptive timeout's maximum, ``GEMINI_TIMEOUT_SECONDS``): a long answer that keeps coming is never cut,
a stalled one is noticed in seconds. A failure after chunks is a failure of the whole attempt (the
observer hears ``interrupted``); a retry streams the answer again from its start.

Function calling (``functions``, a ``services.tools.FunctionCaller``): a manual loop, google-genai's
automatic function calling off. Each round is one guarded generation as above (streamed or not);
Gemini's calls are run by the caller between rounds (the bot's runtime: each tool's breaker and
timeout), and their results go back as one user turn of ``functionResponse`` parts. A round cap and a
time cap end the loop with a last round in mode NONE (``_function_loop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from functools import partial
from typing import Any, Literal, Protocol
from urllib.parse import urlsplit

import structlog
from google import genai
from google.genai import errors, types

from resilience.breakers import Breaker, BreakerState, Lease, describe_error
from resilience.clock import Clock
from resilience.context import span
from resilience.errors import (
    CallTimeoutError,
    Category,
    CircuitOpenError,
    Classification,
    RetryHintTooLongError,
    classify,
)
from resilience.retries import RetryPolicy
from resilience.timeouts import AdaptiveTimeout
from services.context_cache import ContextCache
from services.metrics import Metrics
from services.storage import Turn
from services.tools import FunctionCall, FunctionCaller

log = structlog.get_logger("services.gemini")

OPERATION = "gemini.generate"
# The API version the bot speaks, set explicitly rather than left to the SDK's default (v1 in
# google-genai 3.x: GOOGLE_AI_API_DEFAULT_VERSION in google/genai/_api_client.py, which the
# GOOGLE_GENAI_API_VERSION variable would otherwise change). The "-latest" aliases exist on v1beta
# only: on v1 they are "not found".
API_VERSION = "v1"
# A model Gemini answered 404 for is skipped this long before it is asked again (a model that
# comes back, or a brief 404 during a rollout, is noticed within ten minutes).
MISSING_MODEL_RECHECK_SECONDS = 600.0
# How long ``python -m bot check`` and start-up wait for Gemini to answer about the models.
MODEL_CHECK_TIMEOUT = 5.0
QUOTA_REASON = "daily quota exhausted"
PING_PROMPT = "hello"
PING_PERSONA = "You are a health check. Answer in one short sentence."
# The SDK's own deadline is only a backstop behind the AdaptiveTimeout, which must fire first
# so the breaker sees a CallTimeoutError with our operation name.
SDK_TIMEOUT_MARGIN = 5.0
MAX_CALLS_PER_ROUND = 10
"""Function calls of one round that are run; the others get an error result (``_function_loop``)."""

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
# A blocked prompt, per ``prompt_feedback.block_reason`` (types.BlockedReason); others get USER_MESSAGES.
_PROMPT_BLOCK_MESSAGES = {
    "BLOCKLIST": "Gemini refused to read that message because it contains terms it blocks; "
    "try rephrasing it.",
    "PROHIBITED_CONTENT": "Gemini refused to read that message because it may hold prohibited content, "
    "so I can't answer it.",
    "OTHER": "Gemini refused to read that message without giving a reason (it does this for some topics "
    "even with its safety filters off); try rephrasing it.",
}
# An empty answer that Gemini ended with finish_reason OTHER: no safety rating says why.
_OTHER_MESSAGE = (
    "Gemini stopped without an answer and gave no reason (it does this for some topics even with its "
    "safety filters off); try rephrasing the question."
)
_RECITATION_MESSAGE = (
    "Gemini stopped because its answer would have quoted protected text; try asking differently."
)
_NO_ROOM_MESSAGE = "Gemini ran out of room before it could answer; try a shorter or simpler question."


HARM_CATEGORIES = (
    "HARM_CATEGORY_HARASSMENT",
    "HARM_CATEGORY_HATE_SPEECH",
    "HARM_CATEGORY_SEXUALLY_EXPLICIT",
    "HARM_CATEGORY_DANGEROUS_CONTENT",
)
"""The harm categories whose filter a request can adjust (Gemini's safety settings guide: harassment,
hate speech, sexually explicit, dangerous); a server's safety threshold applies to all four."""
MODEL_BREAKER_PREFIX = "gemini:"
"""Each allowed model has a breaker of its own, named ``gemini:<model>`` (``model_breaker_name``)."""
# A model's own trouble, which the next model may not share: overloaded (503 UNAVAILABLE, "The model
# is overloaded") or its per-minute quota used up (429). The next model of the chain answers in the
# same attempt; other failures (a 500, a timeout, a refused connection) are retried as before.
_MODEL_FAILURES = frozenset({503, 429})


def model_breaker_name(model: str) -> str:
    """The name of ``model``'s breaker on the board."""
    return f"{MODEL_BREAKER_PREFIX}{model}"


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """One request's choices (a server's ``/settings``); None leaves the service's default.

    ``model`` is tried first, then the service's default chain (``GEMINI_MODEL``, then
    ``GEMINI_FALLBACK_MODELS``); a model outside ``allowed_models`` is ignored. ``temperature`` is
    Gemini's sampling temperature (0 to 2), ``max_output_tokens`` at most the service's ceiling,
    ``safety_threshold`` a lower-case ``HarmBlockThreshold`` name applied to every ``HARM_CATEGORIES``.
    """

    model: str | None = None
    temperature: float | None = None
    max_output_tokens: int | None = None
    safety_threshold: str | None = None


TOOLS: dict[str, types.ToolDict] = {
    "google_search": {"google_search": {}},
    "url_context": {"url_context": {}},
    "code_execution": {"code_execution": {}},
}
"""The tools Google runs for a request, by the names guild settings use. Each is a ``Tool`` of its
own: Gemini refuses one ``Tool`` with several tool types ("one_of 'tool_type' has more than one
initialized field", googleapis/js-genai#1383)."""


def tool_config(names: Sequence[str]) -> list[types.ToolUnionDict]:
    """The ``tools`` of a request for tool ``names`` (in ``TOOLS``' order; unknown names raise)."""
    unknown = [n for n in names if n not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tools {unknown}; known: {sorted(TOOLS)}")
    return [tool for name, tool in TOOLS.items() if name in names]


@dataclass(frozen=True, slots=True)
class Source:
    """A web page a grounded answer drew on: ``grounding_metadata.grounding_chunks[].web``, or a page
    the URL context tool read (``url_context_metadata``)."""

    title: str
    uri: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of one generation that reached Gemini and came back.

    ``ok`` is True for an answer: post ``text``. Otherwise ``text`` is empty and
    ``user_message`` is the sentence to show instead. ``model`` is the model that answered
    (a fallback when the primary's daily quota is used up); ``finish_reason`` and
    ``block_reason`` are Gemini's enum names (``"STOP"``, ``"SAFETY"``, ...) or None. The token
    counts are Gemini's ``usage_metadata`` (prompt, candidates, thoughts, cached content);
    ``sources`` the web pages a grounded answer drew on (``grounding_sources``).
    """

    kind: ReplyKind
    text: str
    model: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    block_reason: str | None = None
    user_message: str | None = None
    thought_tokens: int = 0
    cached_tokens: int = 0
    sources: tuple[Source, ...] = ()
    calls: tuple[FunctionCall, ...] = ()
    """Functions Gemini asked to call (function calling, ``services.tools``); only inside the loop."""
    content: Any = None
    """The model's ``Content`` when it asked for calls: sent back as is (thought signatures included)."""
    rounds: int = 0
    """Rounds of function calls before this answer."""

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


class ModelNotFoundError(errors.ClientError):
    """Gemini answered 404 NOT_FOUND for every configured model: unknown or retired names.

    A ``ClientError`` with the 404's code and body, so ``classify`` reads it as NOT_FOUND,
    permanent (the user is told, nothing is queued); ``models`` are the names Gemini did not
    know and ``original`` the last 404 it sent. It stays until the configuration changes or
    ``MISSING_MODEL_RECHECK_SECONDS`` pass.
    """

    def __init__(self, models: Sequence[str], original: errors.APIError) -> None:
        super().__init__(original.code, original.details, original.response)
        self.models = tuple(models)
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
        allowed_models: Sequence[str] = (),
        model_breakers: Mapping[str, Breaker] | None = None,
        temperature: float | None = None,
        safety_threshold: str | None = None,
    ) -> None:
        self.model = model
        self.fallback_models = tuple(m for m in fallback_models if m != model)
        self.allowed_models = tuple(dict.fromkeys((model, *self.fallback_models, *allowed_models)))
        self.model_breakers = dict(model_breakers or {})
        self.temperature = temperature
        self.safety_threshold = safety_threshold
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
        # model -> monotonic time to ask again about a model Gemini answered 404 for.
        self._missing: dict[str, float] = {}
        self._missing_error: errors.APIError | None = None
        # Context caches for long personas (services.context_cache), attached by the application.
        self.context_cache: ContextCache | None = None
        self.last_success: float | None = None
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        if metrics is not None:
            metrics.watch_models(self.allowed_models)

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Create the one client (and its aiohttp session, lazily on first use); idempotent."""
        if self._client is not None:
            return
        self._client = new_client(
            self._api_key, self.base_url, self.timeout.maximum + SDK_TIMEOUT_MARGIN, self._ssl_context
        )

    async def stop(self) -> None:
        """Close the client's sessions; safe to call twice."""
        if self._client is not None and self.context_cache is not None:
            await self.context_cache.stop()  # its deletions need the client
        client, self._client = self._client, None
        if client is None:
            return
        await close_client(client)

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
            "allowed_models": list(self.allowed_models),
            "model_breakers": {m: str(b.state) for m, b in self.model_breakers.items()},
            "exhausted_models": {m: round(t - now, 3) for m, t in self._exhausted.items() if t > now},
            "missing_models": {m: round(t - now, 3) for m, t in self._missing.items() if t > now},
            "last_success": self.last_success,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
        }

    # -- generation -------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        history: Sequence[Turn] = (),
        *,
        persona: str | None = None,
        tools: Sequence[str] = (),
        options: GenerationOptions | None = None,
        functions: FunctionCaller | None = None,
    ) -> Reply:
        """Answer ``prompt`` in the context of ``history`` (oldest first), as ``persona``, with the
        Google-run ``tools`` (names of ``TOOLS``: search grounding, URL context, code execution) and a
        server's ``options`` (model, temperature, output ceiling, safety threshold).

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
        config = self._config(persona, tools, options)
        return await self._generate(contents, config, options, functions=functions)

    async def generate_with_parts(
        self,
        prompt: str,
        parts: Sequence[PartLike],
        history: Sequence[Turn] = (),
        *,
        history_parts: Mapping[int, Sequence[PartLike]] | None = None,
        persona: str | None = None,
        tools: Sequence[str] = (),
        options: GenerationOptions | None = None,
        functions: FunctionCaller | None = None,
    ) -> Reply:
        """``generate`` with files: ``parts`` (images, audio, PDFs as ``types.Part``, texts as
        ``{"text": ...}``) go before ``prompt`` in the last user turn, and ``history_parts[i]``
        before the text of ``history[i]`` (files an earlier turn referred to). Same guards, same
        errors; a 400 about a file (Gemini could not read it) is not counted by the breaker."""
        contents = build_multimodal_contents(history, prompt, parts, history_parts or {})
        if not contents:
            raise ValueError("nothing to send: the prompt, the files and the history are empty")
        config = self._config(persona, tools, options)
        return await self._generate(contents, config, options, functions=functions)

    async def stream(
        self,
        prompt: str,
        history: Sequence[Turn] = (),
        *,
        observer: StreamObserver,
        persona: str | None = None,
        tools: Sequence[str] = (),
        options: GenerationOptions | None = None,
        functions: FunctionCaller | None = None,
    ) -> Reply:
        """``generate``, streamed: ``observer.text`` gets the answer so far as Gemini writes it.

        Same guards (retry -> breakers -> timeout), same model chain, same ``Reply`` and errors; the
        timeout is the observer's silence between chunks under the total cap (see the module's
        docstring). Each retry (and each next model of the chain) starts the answer again: the
        observer's next ``text`` is the new attempt's, from its start, after an ``interrupted`` if the
        failed attempt had shown any text.
        """
        contents = build_contents(history, prompt)
        if not contents:
            raise ValueError("nothing to send: the prompt and the history are empty")
        config = self._config(persona, tools, options)
        return await self._generate(contents, config, options, observer, functions)

    async def stream_with_parts(
        self,
        prompt: str,
        parts: Sequence[PartLike],
        history: Sequence[Turn] = (),
        *,
        observer: StreamObserver,
        history_parts: Mapping[int, Sequence[PartLike]] | None = None,
        persona: str | None = None,
        tools: Sequence[str] = (),
        options: GenerationOptions | None = None,
        functions: FunctionCaller | None = None,
    ) -> Reply:
        """``generate_with_parts``, streamed (see ``stream``)."""
        contents = build_multimodal_contents(history, prompt, parts, history_parts or {})
        if not contents:
            raise ValueError("nothing to send: the prompt, the files and the history are empty")
        config = self._config(persona, tools, options)
        return await self._generate(contents, config, options, observer, functions)

    def _config(
        self, persona: str | None, tools: Sequence[str], options: GenerationOptions | None = None
    ) -> types.GenerateContentConfigDict:
        """The request's ``config``: the persona as system instruction, the output ceiling, the
        temperature and safety threshold (``options`` first, then the service's defaults), the tools."""
        chosen = options or GenerationOptions()
        config: types.GenerateContentConfigDict = {}
        if persona or self.persona:
            config["system_instruction"] = persona or self.persona
        ceiling = self.max_output_tokens
        if chosen.max_output_tokens is not None:
            ceiling = chosen.max_output_tokens if ceiling is None else min(ceiling, chosen.max_output_tokens)
        if ceiling is not None:
            config["max_output_tokens"] = ceiling
        temperature = chosen.temperature if chosen.temperature is not None else self.temperature
        if temperature is not None:
            config["temperature"] = temperature
        threshold = chosen.safety_threshold or self.safety_threshold
        if threshold:
            block = types.HarmBlockThreshold(threshold.upper())
            config["safety_settings"] = [
                {"category": types.HarmCategory(category), "threshold": block} for category in HARM_CATEGORIES
            ]
        if tools:
            config["tools"] = tool_config(tools)
        return config

    async def _generate(
        self,
        contents: list[types.ContentDict],
        config: types.GenerateContentConfigDict,
        options: GenerationOptions | None = None,
        observer: StreamObserver | None = None,
        functions: FunctionCaller | None = None,
    ) -> Reply:
        # The whole call, retries included; each request to Gemini is a "gemini.attempt" inside it.
        streamed = observer is not None
        declarations = functions.declarations() if functions is not None else []
        if functions is None or not declarations:
            with span("gemini.generate", dependency="gemini", turns=len(contents), streamed=streamed) as step:
                reply = await self.retry.call(lambda: self._attempt(contents, config, options, observer))
                step.set(model=reply.model, outcome=reply.kind.value)
            return reply
        return await self._function_loop(contents, config, options, observer, functions, declarations)

    async def _function_loop(
        self,
        contents: list[types.ContentDict],
        config: types.GenerateContentConfigDict,
        options: GenerationOptions | None,
        observer: StreamObserver | None,
        functions: FunctionCaller,
        declarations: list[types.FunctionDeclarationDict],
    ) -> Reply:
        """Manual function calling: each round is one guarded generation (retry -> breakers ->
        timeout); when Gemini asks for calls, ``functions`` runs each (the bot's runtime: breaker,
        timeout, checks) and the results go back as one user turn of ``functionResponse`` parts, one
        per call, in order. After ``functions.max_rounds`` rounds, or once ``functions.seconds`` have
        passed, the next round is the last: function calling mode NONE, so Gemini answers in words.
        A retry of one round never runs the calls of an earlier round again. Token counts add up."""
        offered: types.GenerateContentConfigDict = {
            **config,
            "tools": [*(config.get("tools") or []), {"function_declarations": declarations}],
            "automatic_function_calling": {"disable": True},
        }
        last_round: types.GenerateContentConfigDict = {
            **offered,
            "tool_config": {"function_calling_config": {"mode": types.FunctionCallingConfigMode.NONE}},
        }
        history: list[Any] = list(contents)
        started = self._clock.monotonic()
        rounds, spent = 0, [0, 0, 0, 0]
        streamed = observer is not None
        while True:
            final = rounds >= functions.max_rounds or self._clock.monotonic() - started >= functions.seconds
            cfg = last_round if final else offered
            with span("gemini.generate", dependency="gemini", turns=len(history), streamed=streamed,
                      round=rounds) as step:
                reply = await self.retry.call(partial(self._attempt, history, cfg, options, observer))
                step.set(model=reply.model, outcome=reply.kind.value, calls=len(reply.calls))
            spent = [spent[0] + reply.prompt_tokens, spent[1] + reply.completion_tokens,
                     spent[2] + reply.thought_tokens, spent[3] + reply.cached_tokens]
            if not reply.calls or final:
                break
            rounds += 1
            if self._metrics is not None:
                self._metrics.tool_rounds.inc()
            results: list[dict[str, Any]] = []
            for n, call in enumerate(reply.calls):  # in order: a later call may rely on an earlier one
                if n >= MAX_CALLS_PER_ROUND or self._clock.monotonic() - started >= functions.seconds:
                    results.append({"error": "not run: too many calls in this round, or out of time"})
                else:
                    results.append(await functions.call(call))
            history.append(reply.content)
            history.append(function_responses(reply.calls, results))
        if reply.calls and not reply.text.strip():
            # Calls after the last round (a model that ignored mode NONE): no answer in words.
            reply = replace(reply, kind=ReplyKind.EMPTY, text="", user_message=USER_MESSAGES[ReplyKind.EMPTY])
        return replace(
            reply, calls=(), content=None, rounds=rounds, prompt_tokens=spent[0], completion_tokens=spent[1],
            thought_tokens=spent[2], cached_tokens=spent[3],
        )

    @property
    def sdk_client(self) -> genai.Client:
        """The running google-genai client (for the Files API, ``GeminiFiles``)."""
        if self._client is None:
            raise GeminiStoppedError("the Gemini service is not running")
        return self._client

    async def ping(self) -> Reply:
        """A tiny generation through the same guards (for the HTTP API's Gemini test)."""
        return await self.generate(PING_PROMPT, persona=PING_PERSONA)

    async def check_models(self, *, within: float = MODEL_CHECK_TIMEOUT) -> list[ModelCheck]:
        """Ask Gemini once about each configured model and log what is wrong; never raises.

        For start-up: a missing model is a warning (the bot still starts, and skips that model),
        an unreachable Gemini is "could not check", not "missing".
        """
        client = self._client
        if client is None:
            return []
        results = await check_models(client, self.allowed_models, within=within)
        log_model_checks(results, primary=self.model)
        return results

    def models(self) -> list[str]:
        """The configured models, in the order they are tried."""
        return [self.model, *self.fallback_models]

    def chain(self, options: GenerationOptions | None = None) -> list[str]:
        """The models one request tries, in order: ``options.model`` (when allowed), then ``models()``."""
        first = options.model if options is not None and options.model in self.allowed_models else None
        return list(dict.fromkeys([first, *self.models()] if first else self.models()))

    async def _attempt(
        self,
        contents: list[types.ContentDict],
        config: types.GenerateContentConfigDict,
        options: GenerationOptions | None = None,
        observer: StreamObserver | None = None,
    ) -> Reply:
        """One retry attempt through the ``gemini`` breaker: the first model of the chain Gemini has,
        whose daily quota is not used up and whose own breaker admits a call; when that model is
        overloaded or rate-limited (``_MODEL_FAILURES``), the next one, in the same attempt.

        The ``gemini`` breaker hears one outcome per attempt: success when any model answered, the
        last failure when none did (so it opens when Gemini fails whatever model is asked). A model's
        own breaker hears its failures only when another model answered the same attempt: it opens
        for a model that fails where others work, never for an outage of Gemini as a whole (which
        the ``gemini`` breaker alone counts, and alerts about once).
        """
        models = self._models(options)
        lease = self._admit()
        failure: BaseException | None = None
        closed: list[Breaker] = []
        failed: list[tuple[Lease, BaseException]] = []  # model leases, settled once the attempt ends
        try:
            for model in models:
                breaker = self.model_breakers.get(model)
                if breaker is not None and not breaker.would_admit():
                    closed.append(breaker)
                    continue
                try:
                    reply = await self._call(model, contents, config, failed, observer)
                except (_Unusable, CircuitOpenError):
                    continue  # no quota, no such model, or its breaker opened meanwhile: the next one
                except errors.APIError as exc:
                    if exc.code not in _MODEL_FAILURES:
                        raise
                    failure = exc  # this model is overloaded or rate-limited: the next may answer
                    log.info("gemini.model_fallback", model=model, code=exc.code)
                    continue
                for model_lease, error in failed:
                    model_lease.record_failure(error)  # that model failed where this one answered
                failed.clear()
                lease.record_success()
                return reply
        except Exception as exc:
            if classify(exc).category in _PER_REQUEST:
                lease.release()  # one request's content says nothing about Gemini's health
            else:
                lease.record_failure(exc)
            raise
        except BaseException:
            lease.release()  # cancelled: no outcome
            raise
        finally:
            for model_lease, _ in failed:
                model_lease.release()  # no model answered: Gemini's failure, not one model's
        if failure is not None:
            lease.record_failure(failure)
            raise failure
        lease.release()
        if closed:
            # The models left all have an open breaker of their own: transient, like an open circuit.
            soonest = min(closed, key=lambda b: b.remaining_open())
            raise CircuitOpenError(soonest.name, soonest.remaining_open())
        now = self._clock.monotonic()
        resets = [t for t in self._exhausted.values() if t > now]
        if resets:
            quota_error = self._quota_error
            assert quota_error is not None  # set whenever a model is marked exhausted
            remaining = max(0.0, min(resets) - now)
            self.breaker.force_open(remaining, reason=QUOTA_REASON)
            raise QuotaExhaustedError(self.breaker.name, remaining, quota_error) from quota_error
        error = self._no_model_error()
        log.error(
            "gemini.no_model_available",
            missing=list(error.models),
            fix="set GEMINI_MODEL / GEMINI_FALLBACK_MODELS to models Gemini has (python -m bot check)",
        )
        raise error

    def _models(self, options: GenerationOptions | None = None) -> list[str]:
        """Models to try now, in order (``chain``): those Gemini is not known to lack, whose daily
        quota is not known to be used up."""
        now = self._clock.monotonic()
        present = self._present(options)
        if not present:
            raise self._no_model_error()
        models = [m for m in present if self._exhausted.get(m, 0.0) <= now]
        if not models:
            if not self.breaker.would_admit():
                raise self._rejection(CircuitOpenError(self.breaker.name, self.breaker.remaining_open()))
            # Every model is marked exhausted, yet the breaker admits calls: an operator reset
            # it (perhaps after raising the quota), so believe them and try again.
            self._exhausted.clear()
            models = present
        return models

    def _present(self, options: GenerationOptions | None = None) -> list[str]:
        """Models of the chain Gemini is not known to lack (their quota aside), in order."""
        now = self._clock.monotonic()
        return [m for m in self.chain(options) if self._missing.get(m, 0.0) <= now]

    def _no_model_error(self) -> ModelNotFoundError:
        """The permanent error for "Gemini has none of the configured models"."""
        original = self._missing_error
        assert original is not None  # set whenever a model is marked missing
        now = self._clock.monotonic()
        missing = [m for m in self.allowed_models if self._missing.get(m, 0.0) > now]
        return ModelNotFoundError(missing, original)

    async def _call(
        self,
        model: str,
        contents: list[types.ContentDict],
        config: types.GenerateContentConfigDict,
        failed: list[tuple[Lease, BaseException]] | None = None,
        observer: StreamObserver | None = None,
    ) -> Reply:
        """One request to ``model`` through its own breaker (when it has one) and the timeout; records
        metrics and health. The ``gemini`` breaker's lease is ``_attempt``'s; a failure's model lease
        goes to ``failed`` for ``_attempt`` to settle (without it, it is recorded at once). With an
        ``observer`` the request is streamed: the silence timeout under the total cap, the text so far
        to the observer after each chunk, ``interrupted`` when it fails after showing text."""
        client = self._client
        if client is None:
            raise GeminiStoppedError("the Gemini service is not running")
        breaker = self.model_breakers.get(model)
        lease = breaker.admit() if breaker is not None else None
        started = self._clock.monotonic()
        merged = StreamedResponse() if observer is not None else None
        try:
            with span("gemini.attempt", dependency="gemini", model=model, streamed=merged is not None):
                if observer is not None and merged is not None:
                    streamed_config = config
                    if self.context_cache is not None:
                        streamed_config = await self.context_cache.config_for(model, config)
                    await read_stream(
                        lambda: client.aio.models.generate_content_stream(
                            model=model, contents=contents, config=streamed_config
                        ),
                        merged,
                        observer,
                        cap=self.timeout.maximum,
                    )
                    response = merged.response()
                else:
                    response = await self.timeout.call(
                        lambda: self._send(client, model, contents, config), OPERATION
                    )
        except Exception as exc:
            if observer is not None and merged is not None and merged.shown:
                observer.interrupted()
            verdict = classify(exc, now=self._clock.time())
            # A 404 from generateContent: Gemini does not have this model (unknown, retired, an alias
            # of another API version).
            missing = exc if isinstance(exc, errors.APIError) and verdict.code == 404 else None
            if lease is not None:
                # Settle the lease first: nothing below may leave a half-open probe unreported. None
                # of these says anything about the model's health (one user's oversized message, a
                # model that does not exist, a quota that is skipped until it resets).
                if verdict.daily_quota or missing is not None or verdict.category in _PER_REQUEST:
                    lease.release()
                elif failed is not None:
                    failed.append((lease, exc))
                else:
                    lease.record_failure(exc)
            self._observe(verdict.category.value, started, verdict.code)
            self._note_error(exc)
            if verdict.daily_quota:
                self._mark_exhausted(model, verdict, exc)
                raise _Unusable(exc) from exc
            if missing is not None:
                self._mark_missing(model, missing)
                raise _Unusable(exc) from exc
            raise
        except BaseException:
            if lease is not None:
                lease.release()  # cancelled (a Stop, a shutdown): no outcome
            raise
        if lease is not None:
            lease.record_success()
        reply = to_reply(response, model)
        self._observe(reply.kind.value, started, 200)
        self._count_tokens(reply)
        self.last_success = self._clock.time()
        return reply

    async def _send(
        self,
        client: genai.Client,
        model: str,
        contents: list[types.ContentDict],
        config: types.GenerateContentConfigDict,
    ) -> types.GenerateContentResponse:
        """One ``generate_content``, naming the persona's context cache when it has one
        (``services.context_cache``)."""

        def call(chosen: types.GenerateContentConfigDict) -> Awaitable[types.GenerateContentResponse]:
            return client.aio.models.generate_content(model=model, contents=contents, config=chosen)

        if self.context_cache is None:
            return await call(config)
        return await self.context_cache.send(model, config, call)

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

    def _mark_exhausted(self, model: str, verdict: Classification, exc: BaseException) -> None:
        """Remember that ``model``'s daily quota is used up until it resets."""
        seconds = verdict.retry_after if verdict.retry_after is not None else 0.0
        self._exhausted[model] = self._clock.monotonic() + seconds
        self._quota_error = exc

    def _mark_missing(self, model: str, exc: errors.APIError) -> None:
        """Remember for a while that Gemini does not have ``model``; tell the operator which one."""
        self._missing[model] = self._clock.monotonic() + MISSING_MODEL_RECHECK_SECONDS
        self._missing_error = exc
        left = self._present()
        log.error(
            "gemini.model_not_found",
            model=model,
            setting="GEMINI_MODEL" if model == self.model else "GEMINI_FALLBACK_MODELS",
            api_version=API_VERSION,
            detail=missing_model_sentence(model),
            next_model=left[0] if left else None,
            retry_in=MISSING_MODEL_RECHECK_SECONDS,
        )

    def _observe(self, outcome: str, started: float, code: int | None) -> None:
        """Count one attempt in the metrics, when there are metrics."""
        if self._metrics is not None:
            seconds = max(0.0, self._clock.monotonic() - started)
            self._metrics.observe_gemini(outcome, seconds, code)

    def _count_tokens(self, reply: Reply) -> None:
        """Add an answer's usage_metadata to ``bot_gemini_tokens_total{kind,model}``."""
        if self._metrics is not None:
            self._metrics.observe_tokens(
                reply.model,
                prompt=reply.prompt_tokens,
                output=reply.completion_tokens,
                thought=reply.thought_tokens,
                cached=reply.cached_tokens,
            )

    def _note_error(self, exc: BaseException) -> None:
        # describe_error keeps the type and status code only: SDK messages may carry URLs.
        self.last_error = describe_error(exc)
        self.last_error_at = self._clock.time()


class StreamObserver(Protocol):
    """Who watches a streamed generation (``GeminiService.stream``): the bot's streaming writer."""

    silence_seconds: float
    """The longest wait for the next chunk (the first one too) before the attempt times out."""

    def text(self, text: str) -> None:
        """The answer so far of the current attempt: all of it, not the new piece. Must not block."""

    def interrupted(self) -> None:
        """The current attempt failed after it had shown text: that text is not the answer."""


class StreamedResponse:
    """The chunks of one streamed attempt, merged into the response ``to_reply`` reads.

    Parts are joined in order (the text of each chunk continues the last); the finish reason, the
    grounding and URL context metadata, ``usage_metadata`` and ``prompt_feedback`` are the last ones
    any chunk carried (Gemini sends them with the last chunk). ``shown`` is whether any chunk had
    text for the observer.
    """

    def __init__(self) -> None:
        self.parts: list[types.Part] = []
        self.candidate: bool = False
        self.finish_reason: Any = None
        self.grounding: Any = None
        self.url_context: Any = None
        self.usage: Any = None
        self.feedback: Any = None
        self.version: str | None = None
        self.shown = False

    def add(self, chunk: types.GenerateContentResponse) -> str | None:
        """Take one chunk; return the answer's text so far when this chunk added to it."""
        if chunk.prompt_feedback is not None:
            self.feedback = chunk.prompt_feedback
        if chunk.usage_metadata is not None:
            self.usage = chunk.usage_metadata
        self.version = chunk.model_version or self.version
        candidate = chunk.candidates[0] if chunk.candidates else None
        if candidate is None:
            return None
        self.candidate = True
        self.finish_reason = candidate.finish_reason or self.finish_reason
        self.grounding = candidate.grounding_metadata or self.grounding
        self.url_context = candidate.url_context_metadata or self.url_context
        new = candidate.content.parts if candidate.content is not None and candidate.content.parts else []
        if not new:
            return None
        self.parts.extend(new)
        text = answer_text(self._candidate())
        if not text:
            return None
        self.shown = True
        return text

    def _candidate(self) -> types.Candidate:
        # model_construct: the parts are the SDK's own, validated when their chunk was parsed.
        content = types.Content.model_construct(role="model", parts=self.parts) if self.parts else None
        return types.Candidate.model_construct(
            content=content,
            finish_reason=self.finish_reason,
            grounding_metadata=self.grounding,
            url_context_metadata=self.url_context,
        )

    def response(self) -> types.GenerateContentResponse:
        """The whole attempt as one ``GenerateContentResponse``."""
        return types.GenerateContentResponse.model_construct(
            candidates=[self._candidate()] if self.candidate else [],
            usage_metadata=self.usage,
            prompt_feedback=self.feedback,
            model_version=self.version,
        )


async def read_stream(
    open_stream: Callable[[], Awaitable[Any]],
    merged: StreamedResponse,
    observer: StreamObserver,
    *,
    cap: float,
) -> None:
    """Read a stream into ``merged``, telling ``observer`` the text so far after each chunk.

    The deadline is ``observer.silence_seconds`` from the request and from each chunk, never past
    ``cap`` from the start; when it passes, raises ``CallTimeoutError`` (which the breaker counts).
    ``open_stream`` is ``generate_content_stream``: awaited, it gives the SDK's async iterator
    (the request goes out on its first step).
    """
    loop = asyncio.get_running_loop()
    silence = min(observer.silence_seconds, cap)
    deadline = loop.time() + cap
    scope = asyncio.timeout(silence)
    try:
        async with scope:
            stream = await open_stream()
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    text = merged.add(chunk)
                    if text is not None:
                        observer.text(text)
                    scope.reschedule(min(loop.time() + silence, deadline))
    except TimeoutError as exc:
        if not scope.expired():
            raise  # the SDK's own (its client-wide total), or another inner timeout
        waited = cap if loop.time() >= deadline else silence
        raise CallTimeoutError(OPERATION, waited) from exc


class _Unusable(Exception):
    """Internal: this model's daily quota is used up, or Gemini does not have it: try the next one
    (never leaves the service)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__("model unusable")
        self.error = error


def new_client(
    api_key: str, base_url: str | None, timeout: float, ssl_context: ssl.SSLContext | None = None
) -> genai.Client:
    """A google-genai client as the bot uses it: API version ``API_VERSION``, ``timeout`` seconds
    per request, the SDK's own retries off (``RetryPolicy`` owns retrying, and the SDK's hidden
    connection retry sleeps 1-10 s). ``ssl_context`` lets several clients share one TLS context
    (the SDK otherwise builds one per client, ~0.1 s)."""
    tls: dict[str, Any] = {}
    if ssl_context is not None:
        tls = {"async_client_args": {"ssl": ssl_context}, "client_args": {"verify": ssl_context}}
    return genai.Client(
        api_key=api_key,
        http_options=types.HttpOptions(
            base_url=base_url,
            api_version=API_VERSION,
            timeout=round(timeout * 1000),
            retry_options=types.HttpRetryOptions(attempts=1),
            **tls,
        ),
    )


async def close_client(client: genai.Client) -> None:
    """Close both of a client's sessions (``aclose()`` leaves the sync httpx client open)."""
    try:
        await client.aio.aclose()
    finally:
        client.close()


@dataclass(frozen=True, slots=True)
class ModelCheck:
    """What Gemini said about one configured model.

    ``status`` is ``"ok"`` (it has the model and it generates content), ``"missing"`` (404, or it
    cannot generate content) or ``"unchecked"`` (no answer: unreachable, a timeout, a refused key,
    an outage; says nothing about the model). ``detail`` is one sentence for the operator.
    """

    model: str
    status: Literal["ok", "missing", "unchecked"]
    detail: str


def missing_model_sentence(model: str) -> str:
    """Why Gemini has no ``model``, and what to do."""
    sentence = (
        f"Gemini has no model {model!r} on API version {API_VERSION} (404 NOT_FOUND): a typo or a "
        "retired model; see https://ai.google.dev/gemini-api/docs/models"
    )
    if model.endswith("-latest"):
        sentence += f"; '-latest' aliases exist on v1beta only and the bot uses {API_VERSION}: name a model"
    return sentence


async def check_models(client: genai.Client, models: Sequence[str], *, within: float) -> list[ModelCheck]:
    """One ``models.get`` per model (at once), all within ``within`` seconds; never raises.

    A 404 means missing; any other failure (a refused connection, no answer in time, a wrong
    key, a 503) means Gemini could not be asked, so the model is "unchecked", not missing.
    """
    names = list(dict.fromkeys(models))
    tasks = [asyncio.ensure_future(_check_model(client, m)) for m in names]
    if not tasks:
        return []
    _, pending = await asyncio.wait(tasks, timeout=within)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)
    late = f"could not check: Gemini did not answer within {within:g} s"
    return [
        ModelCheck(model, "unchecked", late) if task in pending else task.result()
        for model, task in zip(names, tasks, strict=True)
    ]


async def _check_model(client: genai.Client, model: str) -> ModelCheck:
    try:
        found = await client.aio.models.get(model=model)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if isinstance(exc, errors.APIError) and exc.code == 404:
            return ModelCheck(model, "missing", missing_model_sentence(model))
        verdict = classify(exc)
        return ModelCheck(
            model, "unchecked", f"could not check: {verdict.category.value} ({describe_error(exc)})"
        )
    actions = found.supported_actions or []
    if actions and "generateContent" not in actions:
        detail = f"Gemini's {model!r} cannot generate content (it offers {', '.join(actions)})"
        return ModelCheck(model, "missing", detail)
    return ModelCheck(model, "ok", f"Gemini has {model!r}")


def log_model_checks(results: Sequence[ModelCheck], *, primary: str) -> None:
    """One warning per missing model, one for what could not be checked, one info line if all is well."""
    for result in results:
        if result.status == "missing":
            setting = "GEMINI_MODEL" if result.model == primary else "GEMINI_FALLBACK_MODELS"
            log.warning("gemini.model_missing", model=result.model, setting=setting, detail=result.detail)
    unchecked = [r for r in results if r.status == "unchecked"]
    if unchecked:
        models = [r.model for r in unchecked]
        log.warning("gemini.models_unchecked", models=models, detail=unchecked[0].detail)
    if results and all(r.status == "ok" for r in results):
        log.info("gemini.models_checked", models=[r.model for r in results])


async def check_configured_models(
    api_key: str, base_url: str | None, models: Sequence[str], *, within: float = MODEL_CHECK_TIMEOUT
) -> list[ModelCheck]:
    """``check_models`` with a client of its own (for ``python -m bot check``), closed afterwards."""
    client = new_client(api_key, base_url, within)
    try:
        return await check_models(client, models, within=within)
    finally:
        await close_client(client)


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


PartLike = types.Part | dict[str, Any]


def build_multimodal_contents(
    history: Sequence[Turn],
    prompt: str,
    parts: Sequence[PartLike],
    history_parts: Mapping[int, Sequence[PartLike]],
) -> list[types.ContentDict]:
    """``build_contents`` with files: each turn's files go before its text (as Gemini's docs advise:
    the media first, then the question); a turn with files and no text is kept."""
    rows = [(t.role, t.text, history_parts.get(i, ())) for i, t in enumerate(history)]
    rows.append(("user", prompt, parts))
    contents: list[types.ContentDict] = []
    for role, text, extra in rows:
        role = "model" if role == "model" else "user"
        items: list[Any] = [*extra, {"text": text}] if text else [*extra]
        if not items or (role == "model" and not contents):
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(items)  # type: ignore[union-attr]
        else:
            contents.append({"role": role, "parts": items})
    return contents


# --- the Files API -------------------------------------------------------------------------------

FILES_BREAKER = "gemini.files"
# The Files API's documented endpoints are on v1beta (https://ai.google.dev/api/files: "POST
# https://generativelanguage.googleapis.com/upload/v1beta/files", "GET .../v1beta/{name=files/*}");
# the URI it returns is used in generateContent on the bot's API version.
FILES_API_VERSION = "v1beta"
FILE_POLL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class UploadedFile:
    """A file Gemini holds for us: ``uri`` goes into a request until ``expires_at`` (POSIX seconds)."""

    name: str
    uri: str
    mime_type: str
    expires_at: float | None


class FileNotReadyError(TimeoutError):
    """An uploaded file was still PROCESSING when the wait for it ran out (transient: a later try
    may find it ACTIVE)."""


class FileRejectedError(Exception):
    """Gemini could not process an uploaded file (state FAILED): it will not work later either."""


class GeminiFiles:
    """Uploads through the Files API, behind a breaker of its own (``gemini.files``) and a timeout.

    ``upload`` sends the bytes with google-genai's resumable upload (``client.aio.files.upload``),
    then asks ``files.get`` every ``poll`` seconds (on ``clock``) until the file is ACTIVE, at most
    ``max_wait`` seconds in all; each request is one breaker call under ``timeout``. A file upload
    failing says nothing about generation, so it never counts against the ``gemini`` breaker.
    """

    def __init__(
        self,
        gemini: GeminiService,
        breaker: Breaker,
        *,
        clock: Clock,
        timeout: float,
        max_wait: float,
        poll: float = FILE_POLL_SECONDS,
    ) -> None:
        self._gemini = gemini
        self.breaker = breaker
        self._clock = clock
        self.timeout = timeout
        self.max_wait = max_wait
        self.poll = poll

    async def upload(self, data: bytes, mime_type: str, display_name: str) -> UploadedFile:
        """Upload ``data`` and wait until Gemini can use it; raises ``FileNotReadyError`` (still
        processing after ``max_wait``), ``FileRejectedError``, or what the SDK raised."""
        client = self._gemini.sdk_client
        # A fresh options object per call: the SDK writes the upload's headers into it.
        config = types.UploadFileConfig(
            mime_type=mime_type,
            display_name=display_name[:512],
            http_options=types.HttpOptions(api_version=FILES_API_VERSION),
        )
        file = await self.breaker.call(
            client.aio.files.upload, file=io.BytesIO(data), config=config, timeout=self.timeout
        )
        deadline = self._clock.monotonic() + self.max_wait
        for _ in range(max(1, int(self.max_wait / self.poll) + 1)):
            state = _name(file.state)
            if state == "ACTIVE":
                break
            if state == "FAILED":
                raise FileRejectedError(f"Gemini could not process the uploaded {mime_type} file")
            if self._clock.monotonic() + self.poll > deadline:
                raise FileNotReadyError(f"the uploaded file was still {state} after {self.max_wait:g} s")
            await self._clock.sleep(self.poll)
            file = await self.breaker.call(
                client.aio.files.get,
                name=file.name or "",
                config=types.GetFileConfig(http_options=types.HttpOptions(api_version=FILES_API_VERSION)),
                timeout=self.timeout,
            )
        else:
            raise FileNotReadyError(f"the uploaded file was not ACTIVE after {self.max_wait:g} s")
        expires = file.expiration_time.timestamp() if file.expiration_time is not None else None
        return UploadedFile(file.name or "", file.uri or "", file.mime_type or mime_type, expires)


def to_reply(response: types.GenerateContentResponse, model: str) -> Reply:
    """Turn an SDK response into a ``Reply``: an answer, a refusal, or an empty answer."""
    usage = response.usage_metadata
    prompt_tokens = (usage.prompt_token_count or 0) if usage else 0
    completion_tokens = (usage.candidates_token_count or 0) if usage else 0
    thought_tokens = (usage.thoughts_token_count or 0) if usage else 0
    cached_tokens = (usage.cached_content_token_count or 0) if usage else 0
    feedback = response.prompt_feedback
    block = _name(feedback.block_reason) if feedback else None
    candidate = response.candidates[0] if response.candidates else None
    finish = _name(candidate.finish_reason) if candidate else None

    def refusal(kind: ReplyKind, message: str | None = None) -> Reply:
        return Reply(
            kind, "", model, finish, prompt_tokens, completion_tokens, block, message or USER_MESSAGES[kind],
            thought_tokens, cached_tokens,
        )

    if block is not None and block != "BLOCKED_REASON_UNSPECIFIED":
        return refusal(ReplyKind.PROMPT_BLOCKED, _PROMPT_BLOCK_MESSAGES.get(block))
    text = answer_text(candidate) if candidate is not None else None
    calls = function_calls(candidate) if candidate is not None else ()
    if calls and candidate is not None:
        return Reply(
            ReplyKind.ANSWER, text or "", model, finish, prompt_tokens, completion_tokens, block, None,
            thought_tokens, cached_tokens, calls=calls, content=candidate.content,
        )
    if text and text.strip():
        sources = grounding_sources(candidate) if candidate is not None else ()
        return Reply(
            ReplyKind.ANSWER, text, model, finish, prompt_tokens, completion_tokens, block, None,
            thought_tokens, cached_tokens, sources,
        )
    if finish == "RECITATION":
        return refusal(ReplyKind.SAFETY_BLOCKED, _RECITATION_MESSAGE)
    if finish in _REFUSALS:
        return refusal(ReplyKind.SAFETY_BLOCKED)
    if finish == "MAX_TOKENS":  # thinking models can spend the whole budget before the answer
        return refusal(ReplyKind.EMPTY, _NO_ROOM_MESSAGE)
    if finish == "OTHER":
        return refusal(ReplyKind.EMPTY, _OTHER_MESSAGE)
    return refusal(ReplyKind.EMPTY)


def function_responses(calls: Sequence[FunctionCall], results: Sequence[dict[str, Any]]) -> types.Content:
    """The user turn that answers a round of calls: one ``functionResponse`` part per call, in the
    calls' order, each with the call's name and id (as google-genai's own loop sends them)."""
    parts = [
        types.Part(function_response=types.FunctionResponse(id=call.id, name=call.name, response=result))
        for call, result in zip(calls, results, strict=True)
    ]
    return types.Content(role="user", parts=parts)


def function_calls(candidate: types.Candidate) -> tuple[FunctionCall, ...]:
    """The ``functionCall`` parts of a candidate, in order."""
    parts = candidate.content.parts if candidate.content is not None else None
    calls = [part.function_call for part in parts or [] if part.function_call is not None]
    return tuple(FunctionCall(call.name or "", dict(call.args or {}), call.id) for call in calls)


def answer_text(candidate: types.Candidate) -> str | None:
    """The answer a candidate shows: its text parts (thoughts left out, as ``response.text`` does),
    with code the code execution tool ran, and that code's output, as fenced blocks in between.

    Without code parts it is exactly ``response.text``, without the SDK's per-part ``model_dump``
    (and its warning about non-text parts).
    """
    parts = candidate.content.parts if candidate.content is not None else None
    if not parts:
        return None
    pieces: list[str] = []
    for part in parts:
        if isinstance(part.text, str):
            if not part.thought:
                pieces.append(part.text)
        elif part.executable_code is not None and part.executable_code.code:
            language = (_name(part.executable_code.language) or "").lower()
            pieces.append(_fenced(part.executable_code.code, "" if "unspecified" in language else language))
        elif part.code_execution_result is not None:
            result = part.code_execution_result
            outcome = _name(result.outcome)
            label = "Output:" if outcome in (None, "OUTCOME_OK") else f"The code failed ({outcome}):"
            pieces.append(f"{label}\n{_fenced(result.output or '(no output)', '')}")
    if not pieces:
        return None
    if len(pieces) == 1:
        return pieces[0]
    text = pieces[0]
    for piece in pieces[1:]:
        fence = piece.startswith(("```", "Output:", "The code failed"))
        if (fence or text.endswith("```")) and not text.endswith("\n"):
            text += "\n"
        text += piece
    return text


def _fenced(code: str, language: str) -> str:
    """``code`` as a fenced block whose fence no line of the code can close early."""
    longest = max((len(run) for run in re.findall(r"`{3,}", code)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{code.rstrip()}\n{fence}\n"


MAX_SOURCES = 10
"""Sources kept of one answer (Gemini can return dozens of chunks)."""


def grounding_sources(candidate: types.Candidate) -> tuple[Source, ...]:
    """The web pages a grounded answer drew on, deduplicated, at most ``MAX_SOURCES``: the web chunks of
    ``grounding_metadata`` (Google Search), then the pages ``url_context_metadata`` says the URL
    context tool retrieved. Only http(s) addresses; the title falls back to the address's host."""
    found: dict[str, Source] = {}

    def add(uri: str | None, title: str | None) -> None:
        if not uri or uri in found or len(found) >= MAX_SOURCES:
            return
        parts = urlsplit(uri)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return
        found[uri] = Source((title or "").strip() or parts.netloc, uri)

    grounding = candidate.grounding_metadata
    for chunk in (grounding.grounding_chunks or []) if grounding is not None else []:
        if chunk.web is not None:
            add(chunk.web.uri, chunk.web.title)
    context = candidate.url_context_metadata
    for entry in (context.url_metadata or []) if context is not None else []:
        if _name(entry.url_retrieval_status) == "URL_RETRIEVAL_STATUS_SUCCESS":
            add(entry.retrieved_url, None)
    return tuple(found.values())


def _name(value: object) -> str | None:
    """An SDK enum (or the raw string it could not parse) as its plain name."""
    if value is None:
        return None
    return str(getattr(value, "value", value))
