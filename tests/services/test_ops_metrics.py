"""The operations metrics of services.metrics: lock wait times, slash commands, mode, alerts."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from resilience.clock import FakeClock
from resilience.degradation import DegradationState, Mode
from resilience.errors import MutexTimeoutError
from resilience.mutex import KeyedMutex
from services.metrics import OTHER_COMMAND, Metrics


def value(m: Metrics, name: str, **labels: str) -> float | None:
    body, _ = m.render()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


async def test_a_contended_acquire_observes_how_long_it_waited() -> None:
    """``bot_mutex_wait_seconds`` gets each wait, measured on the mutex's clock; an uncontended acquire
    adds nothing; a timed-out one counts its limit."""
    clock = FakeClock()
    metrics = Metrics(process_metrics=False)
    mutex = KeyedMutex(clock=clock)
    metrics.watch_mutex(mutex)

    async with mutex.acquire("a", timeout=1.0):
        pass  # uncontended: no wait observed
    assert value(metrics, "bot_mutex_wait_seconds_count") == 0

    holder_in = asyncio.Event()
    release = asyncio.Event()

    async def hold() -> None:
        async with mutex.acquire("a", timeout=1.0):
            holder_in.set()
            await release.wait()

    task = asyncio.create_task(hold())
    await holder_in.wait()

    async def wait_for_it() -> None:
        async with mutex.acquire("a", timeout=5.0):
            pass

    waiter = asyncio.create_task(wait_for_it())
    await asyncio.sleep(0)
    clock.advance(0.3)  # the waiter has waited 0.3 s on the mutex's clock when the holder leaves
    release.set()
    await asyncio.gather(task, waiter)
    assert value(metrics, "bot_mutex_wait_seconds_count") == 1
    assert value(metrics, "bot_mutex_wait_seconds_sum") == pytest.approx(0.3)
    assert value(metrics, "bot_mutex_wait_seconds_bucket", le="0.25") == 0
    assert value(metrics, "bot_mutex_wait_seconds_bucket", le="0.5") == 1

    async with mutex.acquire("b", timeout=1.0):
        with pytest.raises(MutexTimeoutError):
            async with mutex.acquire("b", timeout=0.01):
                pass
    assert value(metrics, "bot_mutex_wait_seconds_count") == 2
    assert value(metrics, "bot_mutex_wait_seconds_sum") == pytest.approx(0.31)


def test_a_failing_wait_observer_does_not_break_the_lock() -> None:
    mutex = KeyedMutex()

    def broken(seconds: float) -> None:
        raise RuntimeError("metrics broke")

    mutex.wait_observer = broken

    async def scenario() -> None:
        async with mutex.acquire("k", timeout=1.0):
            with pytest.raises(MutexTimeoutError):
                async with mutex.acquire("k", timeout=0.01):
                    pass

    asyncio.run(scenario())


def test_commands_are_counted_by_name_and_outcome_with_a_bounded_label_set() -> None:
    """Registered names start at zero for every outcome; any other name counts as ``other``."""
    metrics = Metrics(process_metrics=False)
    metrics.set_commands(["status", "admin incidents"])
    assert value(metrics, "bot_commands_total", command="admin incidents", outcome="refused") == 0
    metrics.observe_command("status", "ok", 0.2)
    metrics.observe_command("admin incidents", "refused", 0.01)
    for n in range(50):
        metrics.observe_command(f"made-up {n}", "error", 0.1)
    assert value(metrics, "bot_commands_total", command="status", outcome="ok") == 1
    assert value(metrics, "bot_commands_total", command="admin incidents", outcome="refused") == 1
    assert value(metrics, "bot_commands_total", command=OTHER_COMMAND, outcome="error") == 50
    assert value(metrics, "bot_command_latency_seconds_count", command="status") == 1
    body = metrics.render()[0].decode()
    assert "made-up" not in body
    with pytest.raises(ValueError):
        metrics.observe_command("status", "exploded", 0.1)


def test_the_degraded_gauge_follows_the_mode() -> None:
    metrics = Metrics(process_metrics=False)
    state = DegradationState(FakeClock())
    state.add_listener(metrics.mode_listener)
    state.set(Mode.DEGRADED, "gemini breaker open")
    assert value(metrics, "bot_degraded_mode") == 1
    state.set(Mode.MAINTENANCE, "deploy")
    assert value(metrics, "bot_degraded_mode") == 0
    assert value(metrics, "bot_maintenance_mode") == 1
