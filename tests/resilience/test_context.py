"""Request context: binding and restoring fields, per-task trace ids, spans, the trace collector."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping

import pytest
import structlog

from resilience.clock import FakeClock
from resilience.context import (
    MAX_SPANS_PER_TRACE,
    TraceCollector,
    current_fields,
    current_trace,
    current_trace_id,
    record_error,
    request_context,
    span,
)
from resilience.fingerprints import ErrorAggregator


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
    assert record.error == "ValueError"  # the type, never the message (it may hold a user's text)
    assert [(s.name, s.offset, s.duration, s.error) for s in record.spans] == [
        ("gemini", 0.5, 2.5, None),
        ("store", 3.0, 0.25, "KeyError"),
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



# --- spans with attributes, nesting, errors, the aggregator, an exporter ------------------------------

USER_TEXT = "my secret plan is to buy 3 llamas"


def test_nested_spans_know_their_depth_and_keep_only_scalar_attributes(fake_clock: FakeClock) -> None:
    """A span inside a span is one level deeper; attributes are scalars (an object or a list is
    dropped, long text cut), bounded in number, and ``set`` adds them while the step runs."""
    collector = TraceCollector(clock=fake_clock)
    with request_context(collector=collector, route="message"):
        with span("gemini.generate", model="m1") as outer:
            with span("gemini.attempt", attempt=1, junk=object(), items=[1, 2]) as inner:
                inner.set(outcome="answer", code=200, long="x" * 500)
            outer.set(attempts=1)
        with span("discord.send", **{f"a{i}": i for i in range(40)}):
            pass
    [record] = collector.recent()
    assert record.name == "message"
    assert [(s.name, s.depth) for s in record.spans] == [
        ("gemini.attempt", 1),
        ("gemini.generate", 0),
        ("discord.send", 0),
    ]
    attempt = record.spans[0]
    assert attempt.attributes == {"attempt": 1, "outcome": "answer", "code": 200, "long": "x" * 200}
    assert record.spans[1].attributes == {"model": "m1", "attempts": 1}
    assert len(record.spans[2].attributes) == 16
    assert record.as_dict()["spans"][0]["attributes"]["outcome"] == "answer"


def test_no_users_text_reaches_a_span_a_trace_or_the_error_groups(fake_clock: FakeClock) -> None:
    """An exception whose message holds what a user wrote is recorded by its type only, everywhere."""
    errors = ErrorAggregator(clock=fake_clock)
    collector = TraceCollector(clock=fake_clock, errors=errors)
    with pytest.raises(ValueError):
        with request_context(collector=collector, route="message", user=7, guild=8):
            with span("gemini.generate"):
                raise ValueError(USER_TEXT)
    [record] = collector.recent()
    assert record.error == "ValueError"
    assert USER_TEXT not in repr(record.as_dict())
    assert USER_TEXT not in repr(errors.snapshot())


def test_a_failure_is_counted_once_with_the_innermost_spans_dependency(fake_clock: FakeClock) -> None:
    """An exception passing out through nested spans and the request is one failure, charged to the
    dependency of the innermost span (its ``dependency`` attribute, else its name's first part),
    with the request's route, user, guild and trace id. A handled failure marked with
    ``record_error`` is the trace's error and is counted too; cancellation is no error."""
    errors = ErrorAggregator(clock=fake_clock)
    collector = TraceCollector(clock=fake_clock, errors=errors)
    with pytest.raises(TimeoutError):
        with request_context(collector=collector, route="message", user=7, guild=8) as first:
            with span("answer"), span("discord.send", dependency="discord.send"):
                raise TimeoutError
    with request_context(collector=collector, route="drain", user=9) as second:
        with pytest.raises(KeyError), span("gemini.attempt"):
            raise KeyError("k")
        record_error(RuntimeError("handled"), "bot")
    with pytest.raises(asyncio.CancelledError), request_context(collector=collector, route="drain"):
        with span("gemini.attempt"):
            raise asyncio.CancelledError
    rows = {(r["dependency"], r["error"]): r for r in errors.snapshot()}
    assert set(rows) == {("discord.send", "TimeoutError"), ("gemini", "KeyError"), ("bot", "RuntimeError")}
    timeout = rows[("discord.send", "TimeoutError")]
    assert (timeout["count"], timeout["category"], timeout["route"]) == (1, "timeout", "message")
    assert (timeout["users"], timeout["guilds"], timeout["sample_trace_ids"]) == (1, 1, [first.trace_id])
    assert rows[("bot", "RuntimeError")]["sample_trace_ids"] == [second.trace_id]
    assert collector.get(second.trace_id).error == "RuntimeError"  # type: ignore[union-attr]
    assert errors.total == 3


class RecordingExporter:
    """A ``TraceExporter`` that keeps what it was handed (the real one is services.otel's)."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.started: list[tuple[str, str | None, dict[str, object]]] = []  # (name, parent, attributes)
        self.ended: dict[str, tuple[dict[str, object], BaseException | None]] = {}
        self.count = 0

    def start_trace(self, name: str, attributes: Mapping[str, object]) -> tuple[str, str]:
        if self.fail:
            raise OSError("exporter down")
        self.started.append((name, None, dict(attributes)))
        return "0af7651916cd43dd8448eb211c80319c", name

    def start_span(self, parent: str, name: str, attributes: Mapping[str, object]) -> str:
        self.count += 1
        handle = f"{name}#{self.count}"
        self.started.append((handle, parent, dict(attributes)))
        return handle

    def end_span(self, handle: str, attributes: Mapping[str, object], error: BaseException | None) -> None:
        self.ended[handle] = (dict(attributes), error)


def test_an_exporter_gets_every_span_under_its_parent_and_its_trace_id_is_the_one_logged(
    fake_clock: FakeClock,
) -> None:
    """With an exporter the trace id is the exporter's; each span goes to it under the span that
    encloses it (the root for top-level ones) with the same attributes the collector keeps, and
    the root ends with the request's fields and error."""
    exporter = RecordingExporter()
    collector = TraceCollector(clock=fake_clock, exporter=exporter)
    with pytest.raises(KeyError):
        with request_context(collector=collector, route="message", user=5) as trace:
            assert _log_fields()["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
            with span("gemini.generate", model="m"):
                with span("gemini.attempt", attempt=1):
                    pass
            with span("discord.send"):
                raise KeyError("x")
    assert trace.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert collector.get(trace.trace_id) is not None
    assert exporter.started == [
        ("message", None, {"route": "message", "user": 5}),
        ("gemini.generate#1", "message", {"model": "m"}),
        ("gemini.attempt#2", "gemini.generate#1", {"attempt": 1}),
        ("discord.send#3", "message", {}),
    ]
    assert exporter.ended["gemini.attempt#2"] == ({"attempt": 1}, None)
    attributes, error = exporter.ended["message"]
    assert attributes == {"route": "message", "user": 5, "error": "KeyError"}
    assert isinstance(error, KeyError) and isinstance(exporter.ended["discord.send#3"][1], KeyError)


def test_a_failing_exporter_never_fails_the_request(fake_clock: FakeClock) -> None:
    """An exporter that raises is counted and skipped: the request, its id and its spans go on."""
    collector = TraceCollector(clock=fake_clock, exporter=RecordingExporter(fail=True))
    with request_context(collector=collector) as trace, span("step"):
        pass
    assert len(trace.trace_id) == 12
    assert [s.name for s in collector.recent()[0].spans] == ["step"]
    assert collector.export_failures == 1


def test_a_slash_commands_trace_is_named_for_its_command(fake_clock: FakeClock) -> None:
    """Without a route, a ``command`` field names the trace (``/ask``), and its failures' route."""
    errors = ErrorAggregator(clock=fake_clock)
    collector = TraceCollector(clock=fake_clock, errors=errors)
    with request_context(collector=collector, command="ask"):
        record_error(RuntimeError("x"))
    assert collector.recent()[0].name == "/ask"
    assert errors.snapshot()[0]["route"] == "/ask"
