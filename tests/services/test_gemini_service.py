"""GeminiService against the real GeminiEmulator over loopback, with the real google-genai client.

Nothing in the SDK is patched. The breaker and the service run on a ``FakeClock``; the
retry policy sleeps through that clock too, so its waits are recorded in ``clock.sleeps``
and cost no real time. Only the hang test waits for real (one 0.2 s timeout).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import random
import socket
import ssl
import time
import warnings
from collections.abc import Sequence

import pytest
from google.genai import errors, types
from structlog.testing import capture_logs

from resilience.breakers import Breaker, BreakerState
from resilience.clock import FakeClock
from resilience.errors import (
    CallTimeoutError,
    Category,
    CircuitOpenError,
    RetryHintTooLongError,
    classify,
    seconds_until_pacific_midnight,
)
from resilience.retries import RetryPolicy
from resilience.timeouts import AdaptiveTimeout
from sandbox.gemini import GeminiEmulator
from services.gemini import (
    MISSING_MODEL_RECHECK_SECONDS,
    USER_MESSAGES,
    GeminiService,
    GeminiStoppedError,
    ModelNotFoundError,
    QuotaExhaustedError,
    Reply,
    ReplyKind,
    build_contents,
    check_configured_models,
    to_reply,
)
from services.metrics import Metrics
from services.storage import Turn

MODEL = "gemini-2.5-flash"
FALLBACK = "gemini-2.0-flash"
PERSONA = "You are Test Bot."


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One TLS context for every service in this file (the SDK builds one per client, ~0.1 s)."""
    return ssl.create_default_context()


class Harness:
    """Builds started services on one FakeClock and stops them all after the test."""

    def __init__(self, emu: GeminiEmulator, clock: FakeClock) -> None:
        self.emu = emu
        self.clock = clock
        self.services: list[GeminiService] = []

    async def service(
        self,
        *,
        fallback: Sequence[str] = (),
        fail_max: int = 5,
        max_attempts: int = 3,
        timeout: float = 2.0,
        key: str = "sandbox-key",
        metrics: Metrics | None = None,
        model: str = MODEL,
    ) -> GeminiService:
        breaker = Breaker("gemini", self.clock, fail_max=fail_max, reset_timeout=30.0)
        retry = RetryPolicy(
            "gemini",
            max_attempts=max_attempts,
            base_delay=0.5,
            max_delay=8.0,
            hint_cap=20.0,
            sleep=self.clock.sleep,
            rng=random.Random(1),
        )
        service = GeminiService(
            api_key=key,
            model=model,
            fallback_models=fallback,
            base_url=self.emu.base_url,
            persona=PERSONA,
            breaker=breaker,
            retry=retry,
            timeout=AdaptiveTimeout(timeout, minimum=timeout, maximum=timeout),
            clock=self.clock,
            metrics=metrics,
            ssl_context=ssl_context(),
        )
        await service.start()
        self.services.append(service)
        return service


def generate_requests(emu: GeminiEmulator, model: str | None = None) -> int:
    """How many generateContent requests reached the emulator (for ``model`` when given)."""
    return sum(1 for r in emu.requests if r.action == "generateContent" and model in (None, r.model))


# answers


async def test_answer_carries_text_model_finish_reason_and_tokens_and_the_history_is_sent(emu, harness):
    service = await harness.service()
    history = [Turn("user", "first", 1.0), Turn("model", "an answer", 2.0)]
    reply = await service.generate("the second question", history)
    assert reply.ok and reply.kind == "answer"
    assert reply.text == "Echo (saw 2 earlier turns): «the second question»"
    assert (reply.model, reply.finish_reason, reply.user_message) == (MODEL, "STOP", None)
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0
    body = emu.requests[-1].body
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]


async def test_persona_is_sent_as_the_system_instruction_and_can_be_overridden(harness):
    service = await harness.service()
    default = await service.generate("who are you")
    assert default.text == f"I follow my system instruction: «{PERSONA}»"
    override = await service.generate("who are you", persona="You are Pirate Bot.")
    assert override.text == "I follow my system instruction: «You are Pirate Bot.»"


async def test_ping_answers_through_the_same_guards(emu, harness):
    service = await harness.service()
    reply = await service.ping()
    assert reply.ok and reply.text
    assert generate_requests(emu) == 1
    assert service.health()["last_success"] == harness.clock.time()


def test_contents_merge_same_role_turns_and_drop_empty_and_leading_model_turns():
    history = [
        Turn("model", "orphan answer", 0),
        Turn("user", "a", 1),
        Turn("user", "", 2),
        Turn("user", "b", 3),
        Turn("model", "c", 4),
    ]
    contents = build_contents(history, "d")
    assert [(c["role"], [p["text"] for p in c["parts"]]) for c in contents] == [
        ("user", ["a", "b"]),
        ("model", ["c"]),
        ("user", ["d"]),
    ]
    merged = build_contents([Turn("user", "x", 0)], "y")
    assert [(c["role"], len(c["parts"])) for c in merged] == [("user", 2)]


# refusals are outcomes, not exceptions


@pytest.mark.parametrize(
    ("fault", "kind", "finish", "block"),
    [
        ("safety", ReplyKind.SAFETY_BLOCKED, "SAFETY", None),
        ("prompt_block", ReplyKind.PROMPT_BLOCKED, None, "SAFETY"),
        ("empty", ReplyKind.EMPTY, None, None),
    ],
)
async def test_refusals_come_back_as_replies_with_a_user_message_and_are_not_retried(
    emu, harness, fault, kind, finish, block
):
    service = await harness.service()
    emu.faults.add(fault, count=1)
    reply = await service.generate("hi")
    assert not reply.ok and reply.kind is kind and reply.text == ""
    assert (reply.finish_reason, reply.block_reason) == (finish, block)
    assert reply.user_message == USER_MESSAGES[kind]
    assert generate_requests(emu) == 1 and harness.clock.sleeps == []
    assert service.breaker.failures == 0


def test_out_of_tokens_without_text_and_recitation_explain_themselves():
    def response(finish: types.FinishReason) -> types.GenerateContentResponse:
        return types.GenerateContentResponse(candidates=[types.Candidate(finish_reason=finish)])

    no_room = to_reply(response(types.FinishReason.MAX_TOKENS), MODEL)
    assert no_room.kind is ReplyKind.EMPTY and no_room.user_message and "room" in no_room.user_message
    recited = to_reply(response(types.FinishReason.RECITATION), MODEL)
    assert recited.kind is ReplyKind.SAFETY_BLOCKED and recited.user_message
    assert "protected" in recited.user_message
    cut = to_reply(
        types.GenerateContentResponse(
            candidates=[
                types.Candidate(
                    finish_reason=types.FinishReason.MAX_TOKENS,
                    content=types.Content(role="model", parts=[types.Part(text="partial")]),
                )
            ]
        ),
        MODEL,
    )
    assert cut == Reply(ReplyKind.ANSWER, "partial", MODEL, "MAX_TOKENS")


# retries


async def test_two_503s_then_success_are_retried_transparently_with_jittered_sleeps(emu, harness):
    service = await harness.service()
    emu.faults.add("503", count=2)
    reply = await service.generate("hello")
    assert reply.ok
    assert generate_requests(emu) == 3
    assert len(harness.clock.sleeps) == 2
    assert 0 <= harness.clock.sleeps[0] <= 0.5 and 0 <= harness.clock.sleeps[1] <= 1.0
    assert service.breaker.failures == 0  # the success reset the count


async def test_a_dropped_connection_is_retried_by_our_policy_not_by_the_sdks_hidden_1_to_10_s_retry(
    emu, harness
):
    service = await harness.service()
    emu.faults.add("drop", count=1)
    started = time.perf_counter()
    assert (await service.generate("hello")).ok
    assert time.perf_counter() - started < 0.9  # the SDK's own connection retry sleeps at least 1 s
    assert generate_requests(emu) == 2 and len(harness.clock.sleeps) == 1


async def test_per_minute_429_is_retried_after_exactly_its_retry_delay(emu, harness):
    service = await harness.service()
    emu.faults.add("429", count=1, retry_delay="2s")
    assert (await service.generate("hello")).ok
    assert harness.clock.sleeps == [2.0]
    assert generate_requests(emu) == 2


async def test_per_minute_429_over_the_hint_cap_raises_retry_hint_too_long_without_sleeping(emu, harness):
    service = await harness.service()
    emu.faults.add("429", count=1, retry_delay="60s")
    with pytest.raises(RetryHintTooLongError) as info:
        await service.generate("hello")
    assert info.value.retry_after == 60.0
    assert isinstance(info.value.original, errors.ClientError)
    verdict = classify(info.value)
    assert (verdict.category, verdict.retryable, verdict.retry_after) == (Category.RATE_LIMITED, True, 60.0)
    assert harness.clock.sleeps == [] and generate_requests(emu) == 1


# daily quota


async def test_daily_quota_forces_the_breaker_open_until_the_reset_and_later_calls_fail_fast(emu, harness):
    service = await harness.service()
    emu.faults.add("quota_daily", target=MODEL)
    to_reset = seconds_until_pacific_midnight(harness.clock.time())
    with pytest.raises(QuotaExhaustedError) as info:
        await service.generate("hello")
    assert info.value.remaining == pytest.approx(to_reset)
    assert harness.clock.sleeps == [] and generate_requests(emu) == 1
    snap = service.breaker.snapshot()
    assert snap.state is BreakerState.OPEN and snap.forced_reason == "daily quota exhausted"
    assert snap.remaining == pytest.approx(to_reset)
    verdict = classify(info.value)
    assert verdict.category is Category.QUOTA_EXHAUSTED and verdict.daily_quota and verdict.retryable
    assert verdict.retry_after == pytest.approx(to_reset)
    assert "daily quota" in verdict.user_message and "resets in about" in verdict.user_message

    harness.clock.advance(3600)
    with pytest.raises(CircuitOpenError) as later:
        await service.generate("hello again")
    assert later.value.remaining == pytest.approx(to_reset - 3600)
    assert classify(later.value).category is Category.QUOTA_EXHAUSTED
    assert generate_requests(emu) == 1  # rejected without a request
    assert service.health()["exhausted_models"] == {MODEL: pytest.approx(to_reset - 3600)}

    emu.faults.clear()
    harness.clock.advance(to_reset)
    assert (await service.generate("hello")).ok  # the half-open probe after the reset
    assert service.breaker.state is BreakerState.CLOSED


async def test_daily_quota_on_the_primary_is_answered_by_the_fallback_and_the_primary_waits_for_midnight(
    emu, harness
):
    """The real 429 says "retry in 22s" beside its per-day violation: the bot keeps answering from
    the fallback long after those 22 s, and asks the primary again only once its quota has reset at
    midnight Pacific."""
    service = await harness.service(fallback=[FALLBACK])
    emu.faults.add("quota_daily", target=MODEL)  # the emulator's default: RetryInfo "22s"
    to_reset = seconds_until_pacific_midnight(harness.clock.time())
    first = await service.generate("hello")
    assert first.ok and first.model == FALLBACK
    assert (generate_requests(emu, MODEL), generate_requests(emu, FALLBACK)) == (1, 1)
    assert service.breaker.state is BreakerState.CLOSED and service.breaker.failures == 0
    assert harness.clock.sleeps == []

    for _ in range(3):  # each a minute later: well past the 22 s hint
        harness.clock.advance(60)
        later = await service.generate("hello")
        assert later.ok and later.model == FALLBACK
    assert (generate_requests(emu, MODEL), generate_requests(emu, FALLBACK)) == (1, 4)
    assert service.health()["exhausted_models"] == {MODEL: pytest.approx(to_reset - 180)}

    emu.faults.clear()
    harness.clock.advance(to_reset - 180)
    assert (await service.generate("hello")).model == MODEL  # back to the primary after its reset
    assert generate_requests(emu, MODEL) == 2


async def test_a_503_on_the_fallback_is_retried_on_the_fallback_without_asking_the_exhausted_primary(
    emu, harness
):
    service = await harness.service(fallback=[FALLBACK])
    emu.faults.add("quota_daily", target=MODEL)
    emu.faults.add("503", target=FALLBACK, count=1)
    reply = await service.generate("hello")
    assert reply.ok and reply.model == FALLBACK
    assert (generate_requests(emu, MODEL), generate_requests(emu, FALLBACK)) == (1, 2)
    assert len(harness.clock.sleeps) == 1


async def test_daily_quota_on_every_model_holds_the_breaker_open_until_midnight_not_the_hint(emu, harness):
    """Both models' daily quotas are used up (each 429 saying "retry in 22s"): the breaker stays open
    until the quotas reset at midnight Pacific, and no model is asked again before then."""
    service = await harness.service(fallback=[FALLBACK])
    emu.faults.add("quota_daily")
    to_reset = seconds_until_pacific_midnight(harness.clock.time())
    with pytest.raises(QuotaExhaustedError) as info:
        await service.generate("hello")
    assert info.value.remaining == pytest.approx(to_reset)
    assert service.breaker.remaining_open() == pytest.approx(to_reset)
    assert generate_requests(emu) == 2 and harness.clock.sleeps == []
    assert classify(info.value).retry_after == pytest.approx(to_reset)

    harness.clock.advance(60)
    with pytest.raises(QuotaExhaustedError):
        await service.generate("hello")
    assert generate_requests(emu) == 2  # rejected by the breaker: nobody asked


async def test_an_operator_reset_of_the_breaker_lets_calls_try_the_exhausted_models_again(emu, harness):
    service = await harness.service(fallback=[FALLBACK])
    emu.faults.add("quota_daily", target="*", count=2)
    with pytest.raises(QuotaExhaustedError):
        await service.generate("hello")
    service.breaker.reset()
    reply = await service.generate("hello")
    assert reply.ok and reply.model == MODEL
    assert generate_requests(emu) == 3


# models Gemini does not have


RETIRED = "gemini-1.5-flash"  # retired by Google; the emulator answers it 404 NOT_FOUND, like the real API


async def test_a_404_model_moves_to_the_fallback_is_remembered_and_never_counts_against_the_breaker(
    emu, harness
):
    service = await harness.service(model=RETIRED, fallback=[FALLBACK], fail_max=2)
    with capture_logs() as logs:
        for _ in range(4):
            reply = await service.generate("hello")
            assert reply.ok and reply.model == FALLBACK
    assert (generate_requests(emu, RETIRED), generate_requests(emu, FALLBACK)) == (1, 4)
    assert service.breaker.state is BreakerState.CLOSED and service.breaker.failures == 0
    assert harness.clock.sleeps == []
    assert service.health()["missing_models"] == {RETIRED: MISSING_MODEL_RECHECK_SECONDS}
    [line] = [e for e in logs if e["event"] == "gemini.model_not_found"]
    assert (line["log_level"], line["model"], line["setting"], line["next_model"]) == (
        "error", RETIRED, "GEMINI_MODEL", FALLBACK)
    assert RETIRED in line["detail"] and "v1" in line["detail"]

    harness.clock.advance(MISSING_MODEL_RECHECK_SECONDS)  # asked again after a while, still missing
    assert (await service.generate("hello")).model == FALLBACK
    assert generate_requests(emu, RETIRED) == 2


async def test_a_model_that_comes_back_is_used_again_after_the_recheck_interval(emu, harness):
    emu.models.discard(FALLBACK)
    service = await harness.service(model=FALLBACK, fallback=[MODEL])
    assert (await service.generate("hello")).model == MODEL
    emu.models.add(FALLBACK)
    assert (await service.generate("hello")).model == MODEL  # still remembered as missing
    harness.clock.advance(MISSING_MODEL_RECHECK_SECONDS)
    assert (await service.generate("hello")).model == FALLBACK


async def test_when_no_configured_model_exists_the_error_is_permanent_and_the_breaker_stays_closed(
    emu, harness
):
    """Every model 404: a permanent NOT_FOUND with a sentence for the user (never queued), one log
    line naming the models, one request per model, and the breaker closed for everyone."""
    service = await harness.service(model=RETIRED, fallback=["gemini-pro-latest"], fail_max=2)
    with capture_logs() as logs:
        for _ in range(5):
            with pytest.raises(ModelNotFoundError) as info:
                await service.generate("hello")
            verdict = classify(info.value)
            assert verdict.category is Category.NOT_FOUND and not verdict.retryable
            assert "Gemini model I'm set up to use doesn't exist" in verdict.user_message
            assert info.value.models == (RETIRED, "gemini-pro-latest")
    assert (generate_requests(emu, RETIRED), generate_requests(emu, "gemini-pro-latest")) == (1, 1)
    assert service.breaker.state is BreakerState.CLOSED and service.breaker.failures == 0
    assert harness.clock.sleeps == []  # a 404 is not retried
    [gone] = [e for e in logs if e["event"] == "gemini.no_model_available"]
    assert gone["missing"] == [RETIRED, "gemini-pro-latest"] and gone["log_level"] == "error"
    not_found = {e["model"]: e for e in logs if e["event"] == "gemini.model_not_found"}
    alias = not_found["gemini-pro-latest"]
    assert "v1beta only" in alias["detail"]


async def test_a_missing_primary_and_a_fallback_out_of_quota_hold_the_breaker_for_the_quota(emu, harness):
    service = await harness.service(model=RETIRED, fallback=[FALLBACK])
    emu.faults.add("quota_daily", target=FALLBACK)
    with pytest.raises(QuotaExhaustedError) as info:
        await service.generate("hello")
    assert info.value.remaining == pytest.approx(seconds_until_pacific_midnight(harness.clock.time()))
    assert service.breaker.snapshot().forced_reason == "daily quota exhausted"
    assert (generate_requests(emu, RETIRED), generate_requests(emu, FALLBACK)) == (1, 1)


async def test_check_models_asks_once_per_model_and_tells_missing_from_unreachable(emu, harness):
    service = await harness.service(fallback=[RETIRED, "gemini-flash-latest", "gemini-embedding-001"])
    with capture_logs() as logs:
        results = await service.check_models()
    assert [(r.model, r.status) for r in results] == [
        (MODEL, "ok"), (RETIRED, "missing"), ("gemini-flash-latest", "missing"),
        ("gemini-embedding-001", "missing")]
    assert "v1beta only" in results[2].detail and "cannot generate content" in results[3].detail
    assert [r.action for r in emu.requests] == ["get"] * 4
    warned = [e["model"] for e in logs if e["event"] == "gemini.model_missing"]
    assert warned == [RETIRED, "gemini-flash-latest", "gemini-embedding-001"]
    assert {e["log_level"] for e in logs} == {"warning"}


async def test_check_models_says_could_not_check_when_gemini_hangs_or_is_unreachable(emu, harness):
    service = await harness.service(fallback=[FALLBACK])
    emu.faults.add("hang")
    started = time.perf_counter()
    with capture_logs() as logs:
        hung = await service.check_models(within=0.2)
    assert time.perf_counter() - started < 1.5
    assert [(r.model, r.status) for r in hung] == [(MODEL, "unchecked"), (FALLBACK, "unchecked")]
    assert "within 0.2 s" in hung[0].detail
    assert [e["event"] for e in logs] == ["gemini.models_unchecked"]

    with socket.socket() as probe:  # bound, never listening: the connection is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        refused = await check_configured_models("sandbox-key", f"http://127.0.0.1:{port}", [MODEL], within=5)
    assert [(r.model, r.status) for r in refused] == [(MODEL, "unchecked")]
    assert "connection" in refused[0].detail


# breaker


async def test_503_storm_opens_the_breaker_after_fail_max_and_later_calls_never_reach_gemini(emu, harness):
    service = await harness.service(fail_max=3)
    emu.faults.add("503")
    with pytest.raises(errors.ServerError):
        await service.generate("hello")
    assert generate_requests(emu) == 3 and service.breaker.state is BreakerState.OPEN
    for _ in range(5):
        with pytest.raises(CircuitOpenError) as info:
            await service.generate("hello")
        assert not isinstance(info.value, QuotaExhaustedError)
        assert classify(info.value).category is Category.CIRCUIT_OPEN
    assert generate_requests(emu) == 3
    assert service.health()["ok"] is False and service.health()["last_error"] == "ServerError (503)"


async def test_a_hang_is_cut_by_the_timeout_and_counted_as_a_breaker_failure(emu, harness):
    service = await harness.service(max_attempts=1, timeout=0.2)
    emu.faults.add("hang", count=1)
    started = time.perf_counter()
    with pytest.raises(CallTimeoutError) as info:
        await service.generate("hello")
    assert time.perf_counter() - started < 1.5
    assert info.value.operation == "gemini.generate"
    assert service.breaker.failures == 1
    assert service.breaker.snapshot().last_error == "CallTimeoutError"
    assert classify(info.value).category is Category.TIMEOUT
    assert (await service.generate("hello")).ok  # the client still works after the cut


async def test_a_cancelled_probe_frees_the_half_open_slot(emu, harness):
    service = await harness.service(max_attempts=1, timeout=5.0)
    service.breaker.force_open(10.0)
    harness.clock.advance(10.0)
    emu.faults.add("hang", count=1)
    call = asyncio.create_task(service.generate("hello"))
    for _ in range(200):  # bounded wait for the probe to reach the emulator
        if emu.requests:
            break
        await asyncio.sleep(0.005)
    assert service.breaker.state is BreakerState.HALF_OPEN and not service.breaker.would_admit()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert service.breaker.would_admit() and service.breaker.state is BreakerState.HALF_OPEN
    assert (await service.generate("hello")).ok
    assert service.breaker.state is BreakerState.CLOSED


# permanent errors


async def test_a_wrong_key_is_a_400_classified_as_auth_and_not_retried(emu, harness):
    service = await harness.service(key="not-the-key")
    with pytest.raises(errors.ClientError) as info:
        await service.generate("hello")
    assert info.value.code == 400
    verdict = classify(info.value)
    assert verdict.category is Category.AUTH and not verdict.retryable
    assert "credentials for Gemini" in verdict.user_message
    assert generate_requests(emu) == 1 and harness.clock.sleeps == []


async def test_bad_requests_about_one_messages_content_never_open_the_breaker(emu, harness):
    service = await harness.service(fail_max=2)
    emu.faults.add("400", count=3)
    for _ in range(3):
        with pytest.raises(errors.ClientError) as info:
            await service.generate("hello")
        assert classify(info.value).category is Category.INVALID_INPUT
    assert service.breaker.state is BreakerState.CLOSED and service.breaker.failures == 0
    assert generate_requests(emu) == 3 and harness.clock.sleeps == []
    assert (await service.generate("hello")).ok


async def test_nothing_to_send_is_a_value_error_before_any_request(emu, harness):
    service = await harness.service()
    with pytest.raises(ValueError):
        await service.generate("", [Turn("model", "only an answer", 0)])
    assert generate_requests(emu) == 0


# metrics and lifecycle


async def test_every_attempt_is_observed_in_metrics_with_outcome_code_and_tokens(emu, harness):
    metrics = Metrics(process_metrics=False)
    service = await harness.service(metrics=metrics)
    emu.faults.add("503", count=1)
    reply = await service.generate("hello")

    def sample(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert sample("bot_gemini_requests_total", outcome="unavailable", code="503") == 1
    assert sample("bot_gemini_requests_total", outcome="answer", code="200") == 1
    assert sample("bot_gemini_tokens_total", kind="prompt", model=MODEL) == reply.prompt_tokens
    assert sample("bot_gemini_tokens_total", kind="output", model=MODEL) == reply.completion_tokens


async def test_health_reports_breaker_model_and_last_success_and_error(emu, harness):
    service = await harness.service(fallback=[FALLBACK])
    health = service.health()
    assert health["ok"] and health["breaker"] == "closed" and health["model"] == MODEL
    assert health["fallback_models"] == [FALLBACK] and health["last_success"] is None
    emu.faults.add("500", count=1)
    await service.generate("hello")
    health = service.health()
    assert health["last_error"] == "ServerError (500)"
    assert health["last_error_at"] < health["last_success"] == harness.clock.time()  # a retry sleep between


async def test_stop_closes_the_session_twice_safely_and_later_calls_raise_a_transient_error(harness):
    service = await harness.service()
    assert (await service.generate("hello")).ok
    client = service._client
    assert client is not None
    sessions = list(client._api_client._aiohttp_sessions.values())  # read only, to check they close
    assert sessions
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await service.stop()
        await service.stop()
        del client
        gc.collect()
    assert all(s.closed for s in sessions)
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert service.health()["running"] is False and service.health()["ok"] is False
    with pytest.raises(GeminiStoppedError) as info:
        await service.generate("hello")
    assert classify(info.value).retryable
    await service.start()  # a stopped service starts again
    assert (await service.generate("hello")).ok
