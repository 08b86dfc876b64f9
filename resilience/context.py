"""Request context (trace id, guild, channel, user) in contextvars, spans, and a trace collector.

``request_context(...)`` binds the fields for the duration of a ``with`` / ``async with``
block, both in this module's context variable and in structlog's contextvars (so every log
line carries them through ``structlog.contextvars.merge_contextvars``), and restores the
previous values in ``finally``. ``span(name)`` times a step into the current trace; with no
current trace it is a shared no-op, so instrumented code costs almost nothing when unused.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import structlog

from resilience.clock import Clock, SystemClock

MAX_SPANS_PER_TRACE = 100


def new_trace_id() -> str:
    """A short random hex id (12 characters), enough to find one request in the logs."""
    return os.urandom(6).hex()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:200]


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One timed step: ``offset`` is seconds from the trace's start; ``error`` is set if it raised."""

    name: str
    offset: float
    duration: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class TraceRecord:
    """A finished trace as kept by the collector (``started_at`` is wall-clock seconds)."""

    trace_id: str
    fields: dict[str, Any]
    started_at: float
    duration: float
    spans: tuple[SpanRecord, ...]
    error: str | None
    slow_spans: tuple[str, ...] = ()
    dropped_spans: int = 0

    @property
    def slow(self) -> bool:
        return bool(self.slow_spans)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view for the admin API."""
        return {
            "trace_id": self.trace_id,
            "fields": dict(self.fields),
            "started_at": self.started_at,
            "duration": self.duration,
            "error": self.error,
            "slow_spans": list(self.slow_spans),
            "dropped_spans": self.dropped_spans,
            "spans": [
                {"name": s.name, "offset": s.offset, "duration": s.duration, "error": s.error}
                for s in self.spans
            ],
        }


class Trace:
    """The live trace of one request; spans append to it until its owning context exits."""

    __slots__ = (
        "clock",
        "collector",
        "dropped_spans",
        "fields",
        "spans",
        "started",
        "started_at",
        "trace_id",
    )

    def __init__(
        self, trace_id: str, fields: dict[str, Any], clock: Clock, collector: TraceCollector | None
    ) -> None:
        self.trace_id = trace_id
        self.fields = fields
        self.clock = clock
        self.collector = collector
        self.started = clock.monotonic()
        self.started_at = clock.time()
        self.spans: list[SpanRecord] = []
        self.dropped_spans = 0

    def add_span(self, record: SpanRecord) -> None:
        # Bounded so a loop inside one request cannot grow a trace without limit.
        if len(self.spans) < MAX_SPANS_PER_TRACE:
            self.spans.append(record)
        else:
            self.dropped_spans += 1


@dataclass(frozen=True, slots=True)
class _Bound:
    trace: Trace
    fields: dict[str, Any] = field(default_factory=dict)


_current: ContextVar[_Bound | None] = ContextVar("resilience_request_context", default=None)


def current_trace_id() -> str | None:
    """The trace id of the current request, or None outside one."""
    bound = _current.get()
    return bound.trace.trace_id if bound is not None else None


def current_trace() -> Trace | None:
    """The live trace of the current request, or None outside one."""
    bound = _current.get()
    return bound.trace if bound is not None else None


def current_fields() -> dict[str, Any]:
    """The bound request fields (guild, channel, user, ...) plus ``trace_id``; empty outside one."""
    bound = _current.get()
    if bound is None:
        return {}
    return {"trace_id": bound.trace.trace_id, **bound.fields}


class TraceCollector:
    """Keeps the most recent ``max_traces`` finished traces, and separately the recent slow ones.

    A trace is slow when it or one of its spans took at least ``slow_threshold`` seconds.
    Pass it to the outermost ``request_context(collector=...)``.
    """

    def __init__(
        self, max_traces: int = 200, slow_threshold: float = 5.0, clock: Clock | None = None
    ) -> None:
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.slow_threshold = slow_threshold
        self.max_traces = max_traces
        self._recent: deque[TraceRecord] = deque(maxlen=max_traces)
        # Kept apart so a burst of fast traffic does not push the slow traces out.
        self._slow: deque[TraceRecord] = deque(maxlen=max_traces)

    def add(self, trace: Trace, duration: float, error: str | None) -> TraceRecord:
        """Record a finished trace and return its record."""
        slow = tuple(s.name for s in trace.spans if s.duration >= self.slow_threshold)
        if not slow and duration >= self.slow_threshold:
            slow = ("<request>",)
        record = TraceRecord(
            trace_id=trace.trace_id,
            fields=dict(trace.fields),
            started_at=trace.started_at,
            duration=duration,
            spans=tuple(trace.spans),
            error=error,
            slow_spans=slow,
            dropped_spans=trace.dropped_spans,
        )
        self._recent.append(record)
        if slow:
            self._slow.append(record)
        return record

    def recent(self) -> list[TraceRecord]:
        """Finished traces, newest first."""
        return list(reversed(self._recent))

    def slow(self) -> list[TraceRecord]:
        """Finished slow traces, newest first."""
        return list(reversed(self._slow))

    def get(self, trace_id: str) -> TraceRecord | None:
        """The kept trace with this id, if any."""
        for record in reversed(self._recent):
            if record.trace_id == trace_id:
                return record
        for record in reversed(self._slow):
            if record.trace_id == trace_id:
                return record
        return None


class request_context:  # lower case: it reads like contextlib's managers at the call site
    """Bind request fields for a block; restores the previous ones on exit (sync or async).

    ``with request_context(guild=1, channel=2, user=3, collector=traces) as trace:`` starts a
    new trace (a fresh ``trace_id`` unless one is given). Nested inside another request
    context without a ``trace_id`` it joins the outer trace and adds/overrides fields; only the
    context that started a trace hands it to the collector. ``None`` field values are skipped.
    """

    __slots__ = (
        "_bound_token",
        "_clock",
        "_collector",
        "_fields",
        "_log_tokens",
        "_owner",
        "_trace",
        "_trace_id",
    )

    def __init__(
        self,
        *,
        trace_id: str | None = None,
        collector: TraceCollector | None = None,
        clock: Clock | None = None,
        **fields: Any,
    ) -> None:
        self._trace_id = trace_id
        self._collector = collector
        self._clock = clock
        self._fields = {k: v for k, v in fields.items() if v is not None}
        self._trace: Trace | None = None
        self._owner = False
        self._bound_token: Token[_Bound | None] | None = None
        self._log_tokens: Mapping[str, Token[Any]] = {}

    def __enter__(self) -> Trace:
        parent = _current.get()
        if parent is not None and self._trace_id is None:
            trace = parent.trace
            fields = {**parent.fields, **self._fields}
        else:
            inherited = parent.fields if parent is not None else {}
            fields = {**inherited, **self._fields}
            collector = self._collector
            if collector is None and parent is not None:
                collector = parent.trace.collector
            clock = self._clock or (collector.clock if collector is not None else None)
            if clock is None:
                clock = parent.trace.clock if parent is not None else SystemClock()
            trace = Trace(self._trace_id or new_trace_id(), fields, clock, collector)
            self._owner = True
        self._trace = trace
        self._bound_token = _current.set(_Bound(trace, fields))
        self._log_tokens = structlog.contextvars.bind_contextvars(trace_id=trace.trace_id, **self._fields)
        return trace

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            structlog.contextvars.reset_contextvars(**self._log_tokens)
        finally:
            if self._bound_token is not None:
                _current.reset(self._bound_token)
                self._bound_token = None
            trace, self._trace = self._trace, None
            if self._owner and trace is not None and trace.collector is not None:
                duration = trace.clock.monotonic() - trace.started
                trace.collector.add(trace, duration, _describe(exc) if exc is not None else None)

    async def __aenter__(self) -> Trace:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class _Span:
    __slots__ = ("_name", "_start", "_trace")

    def __init__(self, trace: Trace, name: str) -> None:
        self._trace = trace
        self._name = name
        self._start = 0.0

    def __enter__(self) -> None:
        self._start = self._trace.clock.monotonic()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        trace = self._trace
        now = trace.clock.monotonic()
        trace.add_span(
            SpanRecord(
                self._name,
                self._start - trace.started,
                now - self._start,
                _describe(exc) if exc is not None else None,
            )
        )

    async def __aenter__(self) -> None:
        self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class _NoSpan:
    """What ``span()`` returns outside a request: does nothing, allocates nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(name: str) -> _Span | _NoSpan:
    """Time a step of the current request (``with`` or ``async with``); errors are recorded, not caught."""
    bound = _current.get()
    if bound is None:
        return _NO_SPAN
    return _Span(bound.trace, name)
