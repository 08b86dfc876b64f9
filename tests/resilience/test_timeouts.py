"""AdaptiveTimeout follows the p95 of recent successes; with_timeout raises CallTimeoutError."""

from __future__ import annotations

import asyncio
import random

import pytest

from resilience.clock import FakeClock
from resilience.errors import CallTimeoutError, Category, classify
from resilience.timeouts import AdaptiveTimeout, with_timeout


def test_base_value_until_min_samples() -> None:
    """Before min_samples successes the timeout is the configured base."""
    timeout = AdaptiveTimeout(30.0, minimum=1.0, maximum=60.0, min_samples=10)
    for _ in range(9):
        timeout.record(0.1)
    assert timeout.current() == 30.0
    timeout.record(0.1)
    assert timeout.current() == 1.0  # p95 0.1 * 1.5 clamped up to the minimum


def test_p95_times_multiplier() -> None:
    """With 100 samples 1..100 s, p95 is 95 s and the timeout is 95 * 1.5."""
    timeout = AdaptiveTimeout(30.0, minimum=1.0, maximum=1000.0, multiplier=1.5, min_samples=10)
    durations = [float(n) for n in range(1, 101)]
    random.Random(7).shuffle(durations)
    for d in durations:
        timeout.record(d)
    assert timeout.percentile(0.95) == 95.0
    assert timeout.current() == pytest.approx(142.5)


def test_clamped_to_maximum() -> None:
    """Slow successes never push the timeout past the maximum."""
    timeout = AdaptiveTimeout(10.0, minimum=1.0, maximum=20.0, min_samples=3)
    for _ in range(3):
        timeout.record(100.0)
    assert timeout.current() == 20.0


def test_window_forgets_old_samples() -> None:
    """Only the last ``window`` durations count: a slow past is forgotten once fast calls replace it."""
    timeout = AdaptiveTimeout(10.0, minimum=0.1, maximum=100.0, multiplier=2.0, min_samples=5, window=20)
    for _ in range(20):
        timeout.record(10.0)
    assert timeout.current() == 20.0
    for _ in range(18):
        timeout.record(1.0)
    assert timeout.current() == 20.0  # two slow samples left: the 19th of 20 (p95) is slow
    timeout.record(1.0)
    assert timeout.current() == 2.0
    assert timeout.samples == 20


def test_matches_a_sorted_reference_under_random_input() -> None:
    """The incremental sorted window gives the same p95 as sorting the window each time."""
    rng = random.Random(3)
    timeout = AdaptiveTimeout(5.0, minimum=0.001, maximum=1e9, multiplier=1.0, min_samples=1, window=50)
    recent: list[float] = []
    for _ in range(2000):
        d = round(rng.expovariate(1.0), 2)  # rounding makes duplicates, which the removal must handle
        timeout.record(d)
        recent = [*recent, d][-50:]
        ordered = sorted(recent)
        rank = -(-95 * len(ordered) // 100)  # ceil(0.95 n)
        assert timeout.current() == max(ordered[rank - 1], 0.001)


def test_ignores_garbage_durations() -> None:
    """Negative, NaN and infinite durations are not recorded."""
    timeout = AdaptiveTimeout(5.0, minimum=1.0, maximum=10.0, min_samples=1)
    for d in (-1.0, float("nan"), float("inf")):
        timeout.record(d)
    assert timeout.samples == 0
    assert timeout.current() == 5.0


def test_rejects_inconsistent_bounds() -> None:
    """minimum above maximum is a configuration error."""
    with pytest.raises(ValueError):
        AdaptiveTimeout(5.0, minimum=10.0, maximum=1.0)


async def test_call_records_successes_with_the_injected_clock(fake_clock: FakeClock) -> None:
    """AdaptiveTimeout.call measures with the injected clock and records only successes."""
    timeout = AdaptiveTimeout(5.0, minimum=0.5, maximum=10.0, min_samples=1, clock=fake_clock)

    async def work() -> str:
        fake_clock.advance(2.0)
        return "ok"

    async def broken() -> str:
        fake_clock.advance(4.0)
        raise ValueError("no")

    assert await timeout.call(work, "gemini.generate") == "ok"
    with pytest.raises(ValueError):
        await timeout.call(broken, "gemini.generate")
    assert timeout.samples == 1
    assert timeout.current() == pytest.approx(3.0)


async def test_with_timeout_returns_the_result() -> None:
    """A call that finishes in time returns its value."""

    async def quick() -> int:
        return 42

    assert await with_timeout(quick, 1.0, "quick") == 42


async def test_with_timeout_raises_call_timeout_error_after_a_real_short_deadline() -> None:
    """A call that hangs past a 20 ms deadline raises CallTimeoutError(operation, timeout), chained."""
    cancelled = asyncio.Event()

    async def hang() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(CallTimeoutError) as info:
        await with_timeout(hang, 0.02, "gemini.generate")
    assert loop.time() - started < 1.0
    assert info.value.operation == "gemini.generate"
    assert info.value.timeout == 0.02
    assert isinstance(info.value.__cause__, TimeoutError)
    assert cancelled.is_set()  # the hung work was cancelled, not leaked
    assert classify(info.value).category is Category.TIMEOUT


async def test_with_timeout_leaves_an_inner_timeout_error_alone() -> None:
    """A TimeoutError raised by the work itself before the deadline is not relabelled."""

    async def inner_timeout() -> None:
        raise TimeoutError("sdk's own")

    with pytest.raises(TimeoutError) as info:
        await with_timeout(inner_timeout, 5.0, "op")
    assert not isinstance(info.value, CallTimeoutError)


async def test_outer_cancellation_propagates_as_cancelled_error() -> None:
    """Cancelling the caller raises CancelledError, not CallTimeoutError."""
    started = asyncio.Event()

    async def hang() -> None:
        started.set()
        await asyncio.sleep(10)

    task = asyncio.create_task(with_timeout(hang, 5.0, "op"))
    await asyncio.wait_for(started.wait(), 1.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
