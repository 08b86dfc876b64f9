"""SupervisedTask: interval, backoff, disable + alert, run timeout, cancellation, wake, clean stop."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest
from structlog.testing import capture_logs

from resilience.clock import FakeClock
from resilience.errors import CallTimeoutError
from resilience.tasks import SupervisedTask, TaskState, exponential_backoff


class ParkedClock(FakeClock):
    """A fake clock whose sleep never ends by itself: only ``wake()`` or ``stop()`` moves the loop on."""

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.Event().wait()


async def _forever() -> None:
    await asyncio.Event().wait()


def test_exponential_backoff_doubles_and_caps() -> None:
    """The default policy doubles from base and never exceeds the cap."""
    backoff = exponential_backoff(base=1.0, cap=10.0)
    assert [backoff(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


async def test_runs_every_interval_on_the_injected_clock(fake_clock: FakeClock) -> None:
    """Runs start immediately and then every ``interval`` seconds of (virtual) clock time."""
    times: list[float] = []
    third_run = asyncio.Event()

    async def fn() -> None:
        times.append(fake_clock.monotonic())
        if len(times) == 3:
            third_run.set()
            await _forever()

    task = SupervisedTask("tick", fn, interval=10.0, run_timeout=5.0, clock=fake_clock)
    task.start()
    async with asyncio.timeout(2):
        await third_run.wait()
    assert task.state is TaskState.RUNNING
    await task.stop()
    assert times == [1000.0, 1010.0, 1020.0]
    assert fake_clock.sleeps == [10.0, 10.0]
    assert task.stats.runs == 3
    assert task.stats.failures == 0
    assert task.state is TaskState.STOPPED


async def test_failures_back_off_and_a_success_resets_the_streak(fake_clock: FakeClock) -> None:
    """After the n-th consecutive failure the wait is backoff(n); a success returns to the interval."""
    outcomes = [RuntimeError("a"), RuntimeError("b"), None, RuntimeError("c"), None]
    done = asyncio.Event()
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        if calls > len(outcomes):
            done.set()
            await _forever()
        error = outcomes[calls - 1]
        if error is not None:
            raise error

    task = SupervisedTask(
        "flaky", fn, interval=5.0, run_timeout=1.0, backoff=lambda n: 100.0 * n, clock=fake_clock
    )
    task.start()
    async with asyncio.timeout(2):
        await done.wait()
    stats = task.stats
    await task.stop()
    assert fake_clock.sleeps == [100.0, 200.0, 5.0, 100.0, 5.0]
    assert stats.failures == 3
    assert stats.consecutive_failures == 0
    assert stats.last_error is None
    assert not stats.disabled


async def test_disables_after_n_consecutive_failures_and_alerts_once(fake_clock: FakeClock) -> None:
    """N failures in a row disable the task and call the alert hook with the name and the last error."""
    alerts: list[tuple[str, BaseException]] = []
    calls = 0

    async def fn() -> None:
        nonlocal calls
        calls += 1
        raise ValueError(f"bad {calls}")

    task = SupervisedTask(
        "drain",
        fn,
        interval=1.0,
        run_timeout=1.0,
        max_consecutive_failures=3,
        on_alert=lambda name, exc: alerts.append((name, exc)),
        clock=fake_clock,
    )
    task.start()
    async with asyncio.timeout(2):
        while task.running:
            await asyncio.sleep(0)
    assert calls == 3
    assert task.state is TaskState.DISABLED
    assert task.stats.disabled
    assert task.stats.consecutive_failures == 3
    assert [(n, str(e)) for n, e in alerts] == [("drain", "bad 3")]
    task.wake()  # waking a disabled task does not resume it
    await asyncio.sleep(0)
    assert not task.running

    # enable() re-arms: the streak restarts and it runs (and here fails) again.
    task.enable()
    async with asyncio.timeout(2):
        while task.running:
            await asyncio.sleep(0)
    assert calls == 6
    assert len(alerts) == 2
    await task.stop()
    assert task.state is TaskState.DISABLED


async def test_async_alert_hook_is_awaited_and_a_failing_hook_is_contained(fake_clock: FakeClock) -> None:
    """An async alert hook is awaited; an alert hook that raises does not crash the task."""
    seen: list[str] = []

    async def hook(name: str, exc: BaseException) -> None:
        seen.append(name)
        raise RuntimeError("pager down")

    async def fn() -> None:
        raise OSError("x")

    task = SupervisedTask(
        "t", fn, interval=1.0, run_timeout=1.0, max_consecutive_failures=1, on_alert=hook, clock=fake_clock
    )
    task.start()
    async with asyncio.timeout(2):
        while task.running:
            await asyncio.sleep(0)
    assert seen == ["t"]
    assert task.state is TaskState.DISABLED
    await task.stop()


async def test_run_timeout_counts_as_failure(fake_clock: FakeClock) -> None:
    """A run that hangs past run_timeout is cut and recorded as a CallTimeoutError."""
    alerts: list[BaseException] = []
    task = SupervisedTask(
        "hang",
        _forever,
        interval=1.0,
        run_timeout=0.02,
        max_consecutive_failures=1,
        on_alert=lambda name, exc: alerts.append(exc),
        clock=fake_clock,
    )
    task.start()
    async with asyncio.timeout(2):
        while task.running:
            await asyncio.sleep(0.005)
    assert len(alerts) == 1
    assert isinstance(alerts[0], CallTimeoutError)
    assert alerts[0].timeout == 0.02
    assert task.stats.failures == 1


async def test_cancelled_error_from_fn_is_reraised_not_counted(fake_clock: FakeClock) -> None:
    """A CancelledError escaping fn ends the loop as cancelled; it is never swallowed or counted."""

    async def fn() -> None:
        raise asyncio.CancelledError

    task = SupervisedTask("c", fn, interval=1.0, run_timeout=1.0, clock=fake_clock)
    task.start()
    inner = task._task
    assert inner is not None
    async with asyncio.timeout(2):
        with pytest.raises(asyncio.CancelledError):
            await asyncio.shield(inner)
    assert inner.cancelled()
    assert task.stats.failures == 0
    assert task.state is TaskState.STOPPED


async def test_wake_runs_now_instead_of_waiting() -> None:
    """wake() cuts the current interval short and runs fn again."""
    clock = ParkedClock()
    runs = 0
    ran = asyncio.Event()

    async def fn() -> None:
        nonlocal runs
        runs += 1
        ran.set()

    task = SupervisedTask("w", fn, interval=3600.0, run_timeout=1.0, clock=clock)
    task.start()
    async with asyncio.timeout(2):
        await ran.wait()
        ran.clear()
        for _ in range(5):
            await asyncio.sleep(0)
        assert runs == 1
        assert task.state is TaskState.SLEEPING
        task.wake()
        await ran.wait()
    assert runs == 2
    await task.stop()


async def test_stop_is_clean_idempotent_and_leaves_no_unretrieved_errors() -> None:
    """stop() while sleeping cancels and awaits the loop; stopping twice is fine; asyncio reports nothing."""
    clock = ParkedClock()
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    try:
        task = SupervisedTask("s", lambda: asyncio.sleep(0), interval=60.0, run_timeout=1.0, clock=clock)
        await task.stop()  # before start: a no-op
        task.start()
        task.start()  # already running: a no-op
        async with asyncio.timeout(2):
            while task.state is not TaskState.SLEEPING:
                await asyncio.sleep(0)
        inner = task._task
        await task.stop()
        await task.stop()
        assert inner is not None and inner.done()
        assert task.state is TaskState.STOPPED
        del inner
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert reported == []


async def test_an_expected_failure_is_logged_without_its_stack_an_unexpected_one_with_it(
    fake_clock: FakeClock,
) -> None:
    """``expected=`` types (a dependency that is down) log one line; anything else keeps its traceback."""
    outcomes: list[BaseException] = [ConnectionError("storage locked"), RuntimeError("a bug")]
    done = asyncio.Event()

    async def fn() -> None:
        if not outcomes:
            done.set()
            await _forever()
        raise outcomes.pop(0)

    task = SupervisedTask(
        "drain", fn, interval=1.0, run_timeout=5.0, clock=fake_clock, expected=(ConnectionError,)
    )
    with capture_logs() as logs:
        task.start()
        async with asyncio.timeout(2):
            await done.wait()
        await task.stop()
    failed = [r for r in logs if r["event"] == "supervised_task_failed"]
    assert [r["error"] for r in failed] == ["ConnectionError('storage locked')", "RuntimeError('a bug')"]
    assert failed[0]["exc_info"] is None
    assert isinstance(failed[1]["exc_info"], RuntimeError)
