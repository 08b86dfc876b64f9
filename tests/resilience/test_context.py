"""Request context: binding and restoring fields, per-task trace ids, spans, the trace collector."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import structlog

from resilience.clock import FakeClock
from resilience.context import (
    MAX_SPANS_PER_TRACE,
    TraceCollector,
    current_fields,
    current_trace,
    current_trace_id,
    request_context,
    span,
)


@pytest.fixture(autouse=True)
def clean_structlog_context() -> Iterator[None]:
    """Each test starts and ends with no structlog contextvars bound."""
    structlog.contextvars.clear_contextvars()
    yield
    structlog.contextvars.clear_contextvars()


def _log_fields() -> dict[str, object]:
    """What a structlog logger configured with merge_contextvars would add to an event."""
    return dict(structlog.contextvars.merge_contextvars(None, "info", {}))  # type: ignore[arg-type]


def test_nothing_is_bound_outside_a_request() -> None:
    """Outside a request there is no trace id, no fields, and span() is a harmless no-op."""
    assert current_trace_id() is None
    assert current_trace() is None
    assert current_fields() == {}
    with span("anything"):
        pass
    assert _log_fields() == {}


def test_fields_are_bound_for_logs_and_removed_on_exit() -> None:
    """Inside the block the trace id and fields reach structlog; after it they are gone."""
    with request_context(guild=1, channel=2, user=3, thread=None) as trace:
        assert len(trace.trace_id) == 12
        int(trace.trace_id, 16)
        assert current_trace_id() == trace.trace_id
        assert _log_fields() == {"trace_id": trace.trace_id, "guild": 1, "channel": 2, "user": 3}
        assert current_fields() == {"trace_id": trace.trace_id, "guild": 1, "channel": 2, "user": 3}
    assert current_trace_id() is None
    assert _log_fields() == {}


def test_nested_contexts_join_the_trace_and_restore_outer_values() -> None:
    """A nested context keeps the trace id, overrides fields, and restores the outer ones on exit."""
    structlog.contextvars.bind_contextvars(service="bot")
    with request_context(guild=1, channel=2) as outer:
        with request_context(channel=9, user=7) as inner:
            assert inner is outer
            expected = {"service": "bot", "trace_id": outer.trace_id, "guild": 1, "channel": 9, "user": 7}
            assert _log_fields() == expected
        assert _log_fields() == {"service": "bot", "trace_id": outer.trace_id, "guild": 1, "channel": 2}
        with request_context(trace_id="feedface0001") as fresh:
            assert fresh is not outer
            assert current_trace_id() == "feedface0001"
            assert current_fields()["guild"] == 1  # fields are inherited, the trace is new
        assert current_trace_id() == outer.trace_id
    assert _log_fields() == {"service": "bot"}


def test_values_are_restored_when_the_block_raises() -> None:
    """An exception leaving the block still restores the previous bindings."""
    with pytest.raises(ValueError), request_context(user=5):
        raise ValueError("boom")
    assert current_trace_id() is None
    assert _log_fields() == {}


async def test_concurrent_tasks_keep_separate_trace_ids() -> None:
    """Requests handled concurrently each see only their own trace id, across awaits."""
    seen: dict[int, set[str | None]] = {}

    async def handle(i: int) -> str:
        async with request_context(user=i) as trace:
            ids = seen.setdefault(i, set())
            for _ in range(5):
                await asyncio.sleep(0)
                ids.add(current_trace_id())
                assert _log_fields()["user"] == i
            return trace.trace_id

    async with asyncio.timeout(2):
        trace_ids = await asyncio.gather(*(handle(i) for i in range(20)))
    assert len(set(trace_ids)) == 20
    assert all(seen[i] == {trace_ids[i]} for i in range(20))
    assert current_trace_id() is None


async def test_spans_are_timed_on_the_clock_and_errors_recorded(fake_clock: FakeClock) -> None:
    """Spans record their offset, duration and error; the collector flags the slow one."""
    collector = TraceCollector(slow_threshold=2.0, clock=fake_clock)
    with pytest.raises(ValueError):
        async with request_context(collector=collector, channel=42) as trace:
            fake_clock.advance(0.5)
            async with span("gemini"):
                fake_clock.advance(2.5)
            with pytest.raises(KeyError), span("store"):
                fake_clock.advance(0.25)
                raise KeyError("missing")
            raise ValueError("bug")
    [record] = collector.recent()
    assert record.trace_id == trace.trace_id
    assert record.fields == {"channel": 42}
    assert record.duration == 3.25
    assert record.error == "ValueError: bug"
    assert [(s.name, s.offset, s.duration, s.error) for s in record.spans] == [
        ("gemini", 0.5, 2.5, None),
        ("store", 3.0, 0.25, "KeyError: 'missing'"),
    ]
    assert record.slow_spans == ("gemini",)
    assert collector.slow() == [record]
    assert collector.get(trace.trace_id) is record
    assert record.as_dict()["spans"][0]["name"] == "gemini"


async def test_a_child_task_records_spans_into_the_parent_trace(fake_clock: FakeClock) -> None:
    """A task started inside a request inherits its trace id and its spans join that trace."""
    collector = TraceCollector(clock=fake_clock)

    async def child() -> str | None:
        with span("typing"):
            fake_clock.advance(1.0)
        return current_trace_id()

    async with request_context(collector=collector) as trace:
        assert await asyncio.create_task(child()) == trace.trace_id
    assert [s.name for s in collector.recent()[0].spans] == ["typing"]


def test_only_the_outermost_context_hands_the_trace_to_the_collector(fake_clock: FakeClock) -> None:
    """Nested contexts joining a trace do not record it twice; a whole trace over the threshold is slow."""
    collector = TraceCollector(slow_threshold=1.0, clock=fake_clock)
    with request_context(collector=collector):
        with request_context(user=1):
            pass
        fake_clock.advance(1.5)
    [record] = collector.recent()
    assert record.slow_spans == ("<request>",)
    assert record.error is None


def test_collector_is_bounded_and_keeps_slow_traces_apart(fake_clock: FakeClock) -> None:
    """Only the newest max_traces are kept (newest first); a slow trace survives a burst of fast ones."""
    collector = TraceCollector(max_traces=3, slow_threshold=1.0, clock=fake_clock)
    with request_context(collector=collector, trace_id="slow"), span("gemini"):
        fake_clock.advance(5.0)
    for i in range(10):
        with request_context(collector=collector, trace_id=f"fast{i}"), span("gemini"):
            fake_clock.advance(0.01)
    assert [r.trace_id for r in collector.recent()] == ["fast9", "fast8", "fast7"]
    assert [r.trace_id for r in collector.slow()] == ["slow"]
    assert collector.get("slow") is not None
    assert collector.get("fast0") is None


def test_spans_per_trace_are_bounded(fake_clock: FakeClock) -> None:
    """A loop inside one request cannot grow its trace without limit; dropped spans are counted."""
    collector = TraceCollector(clock=fake_clock)
    with request_context(collector=collector):
        for _ in range(MAX_SPANS_PER_TRACE + 5):
            with span("step"):
                pass
    [record] = collector.recent()
    assert len(record.spans) == MAX_SPANS_PER_TRACE
    assert record.dropped_spans == 5

