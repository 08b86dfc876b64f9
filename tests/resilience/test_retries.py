"""RetryPolicy and RetryBudget: what is retried, how long it waits, and what the budget allows."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import discord
import pytest
from google.genai import errors as genai_errors

from resilience.clock import FakeClock
from resilience.errors import Category, CircuitOpenError, Classification, RetryHintTooLongError
from resilience.retries import RetryBudget, RetryPolicy


def gemini_error(code: int, details: list[dict[str, Any]] | None = None) -> genai_errors.APIError:
    """A real ClientError/ServerError built by the SDK's dispatch from an error body."""
    body: dict[str, Any] = {"error": {"code": code, "message": "m", "status": "S", "details": details or []}}
    try:
        genai_errors.APIError.raise_error(code, body, None)
    except genai_errors.APIError as exc:
        return exc
    raise AssertionError("raise_error did not raise")


def retry_info(delay: str) -> list[dict[str, Any]]:
    return [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]


class RecordingSleep:
    """An injected sleep that records each delay and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.delays.append(float(seconds))


class Flaky:
    """A dependency call that raises the queued exceptions in order, then returns "ok"."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.raised: list[BaseException] = []
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            exc = self.failures.pop(0)
            self.raised.append(exc)
            raise exc
        return "ok"


@pytest.fixture
def sleep() -> RecordingSleep:
    """Records the policy's waits instead of sleeping."""
    return RecordingSleep()


async def test_retries_a_503_then_succeeds(sleep: RecordingSleep) -> None:
    """A 503 is retried after a jittered wait, and the success is returned; on_retry reports it."""
    reports: list[tuple[int, Classification, float]] = []
    policy = RetryPolicy(
        "gemini", sleep=sleep, rng=random.Random(1), on_retry=lambda a, c, d: reports.append((a, c, d))
    )
    call = Flaky(gemini_error(503))
    assert await policy.call(call) == "ok"
    assert call.calls == 2
    assert len(sleep.delays) == 1 and 0.0 <= sleep.delays[0] <= 0.5
    assert [(a, c.category, d) for a, c, d in reports] == [(1, Category.UNAVAILABLE, sleep.delays[0])]
    assert (policy.attempts, policy.retries) == (2, 1)


async def test_does_not_retry_a_400(sleep: RecordingSleep) -> None:
    """A permanent error is raised at once, unchanged, with no wait."""
    policy = RetryPolicy("gemini", sleep=sleep)
    call = Flaky(gemini_error(400))
    with pytest.raises(genai_errors.ClientError) as info:
        await policy.call(call)
    assert info.value is call.raised[0]
    assert call.calls == 1 and sleep.delays == []


async def test_honours_a_retry_info_hint_of_two_seconds_exactly(sleep: RecordingSleep) -> None:
    """Gemini's RetryInfo retryDelay "2s" is waited exactly, not jittered."""
    policy = RetryPolicy("gemini", sleep=sleep, rng=random.Random(1))
    call = Flaky(gemini_error(429, retry_info("2s")))
    assert await policy.call(call) == "ok"
    assert sleep.delays == [2.0]


async def test_honours_hints_longer_than_max_delay_but_within_the_cap(sleep: RecordingSleep) -> None:
    """A 12 s hint beats max_delay 8 s (never wait less than asked) while it is under hint_cap."""
    policy = RetryPolicy("gemini", sleep=sleep, max_delay=8.0, hint_cap=20.0)
    assert await policy.call(Flaky(gemini_error(429, retry_info("12s")))) == "ok"
    assert sleep.delays == [12.0]


async def test_honours_discord_retry_after(sleep: RecordingSleep) -> None:
    """discord.RateLimited.retry_after is the wait."""
    policy = RetryPolicy("discord.send", sleep=sleep)
    assert await policy.call(Flaky(discord.RateLimited(1.5))) == "ok"
    assert sleep.delays == [1.5]


async def test_gives_up_at_once_on_a_hint_above_the_cap(sleep: RecordingSleep) -> None:
    """A 60 s hint with a 20 s cap raises RetryHintTooLongError without sleeping or retrying."""
    policy = RetryPolicy("gemini", sleep=sleep, hint_cap=20.0, budget=RetryBudget())
    call = Flaky(gemini_error(429, retry_info("60s")))
    with pytest.raises(RetryHintTooLongError) as info:
        await policy.call(call)
    assert (info.value.retry_after, info.value.cap) == (60.0, 20.0)
    assert info.value.original is call.raised[0]
    assert info.value.__cause__ is call.raised[0]
    assert call.calls == 1 and sleep.delays == []
    assert policy.hints_too_long == 1
    assert policy.budget is not None and policy.budget.retries_spent == 0


async def test_hint_above_the_cap_on_the_last_attempt_still_reports_the_hint(sleep: RecordingSleep) -> None:
    """When the last allowed attempt gets a too-long hint, the caller still learns the hint."""
    policy = RetryPolicy("gemini", sleep=sleep, max_attempts=2)
    call = Flaky(gemini_error(503), gemini_error(429, retry_info("300s")))
    with pytest.raises(RetryHintTooLongError) as info:
        await policy.call(call)
    assert info.value.retry_after == 300.0
    assert call.calls == 2 and len(sleep.delays) == 1


async def test_does_not_retry_an_open_circuit(sleep: RecordingSleep) -> None:
    """CircuitOpenError is retryable for the queue but never retried inside the policy."""
    policy = RetryPolicy("gemini", sleep=sleep)
    call = Flaky(CircuitOpenError("gemini", 5.0))
    with pytest.raises(CircuitOpenError) as info:
        await policy.call(call)
    assert info.value is call.raised[0]
    assert call.calls == 1 and sleep.delays == []
    assert (policy.retries, policy.budget_denied) == (0, 0)


async def test_exhausted_attempts_reraise_the_last_original_exception(sleep: RecordingSleep) -> None:
    """After max_attempts the last SDK exception itself is raised, not tenacity's RetryError."""
    policy = RetryPolicy("gemini", sleep=sleep, max_attempts=3)
    call = Flaky(gemini_error(503), gemini_error(502), gemini_error(500))
    with pytest.raises(genai_errors.ServerError) as info:
        await policy.call(call)
    assert info.value is call.raised[-1]
    assert call.calls == 3 and len(sleep.delays) == 2
    assert policy.exhausted == 1


async def test_waits_are_full_jitter_within_exponential_bounds(sleep: RecordingSleep) -> None:
    """Wait n is uniform(0, min(max_delay, base * 2**(n-1))), drawn from the injected rng."""
    policy = RetryPolicy(
        "gemini", sleep=sleep, max_attempts=8, base_delay=0.5, max_delay=8.0, rng=random.Random(42)
    )
    with pytest.raises(genai_errors.ServerError):
        await policy.call(Flaky(*(gemini_error(503) for _ in range(8))))
    ceilings = [min(8.0, 0.5 * 2**n) for n in range(7)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    reference = random.Random(42)
    assert sleep.delays == [reference.uniform(0.0, c) for c in ceilings]
    assert all(0.0 <= d <= c for d, c in zip(sleep.delays, ceilings, strict=True))


async def test_jitter_spreads_waits_across_the_window(sleep: RecordingSleep) -> None:
    """Over many first retries the waits cover the whole [0, base] window, not a fixed point."""
    policy = RetryPolicy("gemini", sleep=sleep, base_delay=1.0, rng=random.Random(5))
    for _ in range(200):
        await policy.call(Flaky(gemini_error(503)))
    assert min(sleep.delays) < 0.1 and max(sleep.delays) > 0.9
    assert all(0.0 <= d <= 1.0 for d in sleep.delays)


async def test_budget_caps_extra_traffic_during_an_outage(fake_clock: FakeClock) -> None:
    """1,000 calls against a dependency that always answers 503 make at most 1,150 attempts."""
    budget = RetryBudget(ratio=0.1, min_per_second=0.1, max_tokens=10, clock=fake_clock)
    policy = RetryPolicy(
        "gemini", max_attempts=3, budget=budget, sleep=fake_clock.sleep, rng=random.Random(9)
    )
    attempts = 0

    async def down() -> str:
        nonlocal attempts
        attempts += 1
        raise gemini_error(503)

    for _ in range(1000):
        fake_clock.advance(0.1)  # ten calls a second
        with pytest.raises(genai_errors.ServerError):
            await policy.call(down)
    assert attempts <= 1150
    assert attempts == 1000 + budget.retries_spent == policy.attempts
    assert budget.retries_denied > 800  # the budget, not max_attempts, stopped most calls
    assert policy.budget_denied == budget.retries_denied


async def test_without_a_budget_the_same_outage_triples_traffic(fake_clock: FakeClock) -> None:
    """The control for the budget test: no budget means 3 attempts per call."""
    policy = RetryPolicy("gemini", max_attempts=3, sleep=fake_clock.sleep, rng=random.Random(9))

    async def down() -> str:
        raise gemini_error(503)

    for _ in range(100):
        with pytest.raises(genai_errors.ServerError):
            await policy.call(down)
    assert policy.attempts == 300


async def test_budget_lets_a_healthy_service_retry_its_occasional_failures(fake_clock: FakeClock) -> None:
    """With 5% of calls failing once, every retry is granted and every call succeeds."""
    budget = RetryBudget(ratio=0.1, min_per_second=0.1, max_tokens=10, clock=fake_clock)
    policy = RetryPolicy(
        "gemini", max_attempts=3, budget=budget, sleep=fake_clock.sleep, rng=random.Random(2)
    )
    rng = random.Random(11)
    failing = 0
    for _ in range(1000):
        fake_clock.advance(0.1)
        fails = rng.random() < 0.05
        failing += fails
        call = Flaky(gemini_error(503)) if fails else Flaky()
        assert await policy.call(call) == "ok"
    assert failing > 30
    assert budget.retries_spent == policy.retries == failing
    assert budget.retries_denied == 0


async def test_budget_is_checked_last_and_a_denial_reraises_the_original(sleep: RecordingSleep) -> None:
    """Permanent errors and hints over the cap spend nothing; a denied retry raises the SDK error."""
    budget = RetryBudget(ratio=0.0, min_per_second=0.0, max_tokens=1, clock=FakeClock())
    policy = RetryPolicy("gemini", sleep=sleep, max_attempts=5, budget=budget)
    with pytest.raises(genai_errors.ClientError):
        await policy.call(Flaky(gemini_error(400)))
    with pytest.raises(RetryHintTooLongError):
        await policy.call(Flaky(gemini_error(429, retry_info("99s"))))
    assert budget.tokens == 1.0 and budget.retries_denied == 0

    call = Flaky(gemini_error(503), gemini_error(503))
    with pytest.raises(genai_errors.ServerError) as info:
        await policy.call(call)
    assert info.value is call.raised[1]
    assert (budget.retries_spent, budget.retries_denied) == (1, 1)
    assert (policy.retries, policy.budget_denied, policy.exhausted) == (1, 1, 0)
    assert call.calls == 2 and len(sleep.delays) == 1


async def test_cancellation_during_a_retry_sleep_propagates_and_is_not_retried() -> None:
    """Cancelling the caller while it waits between attempts raises CancelledError; no more attempts."""
    sleeping = asyncio.Event()

    async def blocking_sleep(seconds: float) -> None:
        sleeping.set()
        await asyncio.Event().wait()  # never set: only cancellation ends it

    policy = RetryPolicy("gemini", sleep=blocking_sleep)
    call = Flaky(gemini_error(503), gemini_error(503))
    task = asyncio.create_task(policy.call(call))
    await asyncio.wait_for(sleeping.wait(), 1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert call.calls == 1


async def test_cancellation_inside_the_call_is_not_retried(sleep: RecordingSleep) -> None:
    """A CancelledError raised by the attempt itself propagates at once."""
    policy = RetryPolicy("gemini", sleep=sleep)
    call = Flaky(asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await policy.call(call)
    assert call.calls == 1 and sleep.delays == []


def test_budget_floor_refills_a_quiet_dependency(fake_clock: FakeClock) -> None:
    """An empty bucket earns min_per_second tokens per second, capped at max_tokens."""
    budget = RetryBudget(ratio=0.1, min_per_second=0.5, max_tokens=3, clock=fake_clock)
    assert [budget.try_spend() for _ in range(4)] == [True, True, True, False]
    fake_clock.advance(2.0)
    assert budget.tokens == pytest.approx(1.0)
    assert budget.try_spend() and not budget.try_spend()
    fake_clock.advance(3600.0)
    assert budget.tokens == 3.0
    for _ in range(100):
        budget.deposit()
    assert budget.tokens == 3.0 and budget.calls == 100
    assert (budget.retries_spent, budget.retries_denied) == (4, 2)
