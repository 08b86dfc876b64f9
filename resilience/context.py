"""Request context (trace id, guild, channel, user) in contextvars, spans, and a trace collector.

``request_context(...)`` binds the fields for the duration of a ``with`` / ``async with``
block, both in this module's context variable and in structlog's contextvars (so every log
line carries them through ``structlog.contextvars.merge_contextvars``), and restores the
previous values in ``finally``. ``span(name, **attributes)`` times a step into the current
trace (nested spans know their depth); with no current trace it is a shared no-op, so
instrumented code costs almost nothing when unused.

The ``TraceCollector`` keeps recent and slow traces (bounded: traces kept, spans per trace,
attributes per span), counts the failures spans end with in an optional error aggregator
(``resilience.fingerprints``), and hands every trace and span to an optional exporter
(OpenTelemetry, ``services.otel``), whose trace id then is the one in logs and apologies.
Nothing a user wrote is recorded: a span keeps scalar attributes its call site chose, and an
error as its type and status code, never its message.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

import structlog

from resilience.breakers import describe_error
from resilience.clock import Clock, SystemClock
from resilience.fingerprints import ErrorAggregator

MAX_SPANS_PER_TRACE = 100
MAX_ATTRIBUTES = 16  # per span; call sites set a handful
MAX_ATTRIBUTE_CHARS = 200


def new_trace_id() -> str:
    """A short random hex id (12 characters), enough to find one request in the logs."""
    return os.urandom(6).hex()


def _attribute(value: Any) -> str | int | float | bool | None:
    """A span attribute as kept: plain scalars only, text cut to ``MAX_ATTRIBUTE_CHARS``."""
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value[:MAX_ATTRIBUTE_CHARS]
    return None  # anything else (an object, a message) is not kept


def _attributes(values: Mapping[str, Any], into: dict[str, Any] | None = None) -> dict[str, Any]:
    kept = {} if into is None else into
    for key, value in values.items():
        if len(kept) >= MAX_ATTRIBUTES and key not in kept:
            break
        scalar = _attribute(value)
        if scalar is not None:
            kept[key] = scalar
    return kept


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One timed step: ``offset`` is seconds from the trace's start; ``error`` (the exception's type
    and status code, never its message) is set if it raised; ``depth`` is how many spans enclose it;
    ``attributes`` are the step's scalar facts (model, attempt, operation, ...)."""

    name: str
    offset: float
    duration: float
    error: str | None = None
    depth: int = 0
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "offset": round(self.offset, 6),
            "duration": round(self.duration, 6),
            "error": self.error,
            "depth": self.depth,
            "attributes": dict(self.attributes),
        }


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
    name: str = "request"

    @property
    def slow(self) -> bool:
        return bool(self.slow_spans)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view for the admin API."""
        return {
            "trace_id": self.trace_id,
            "name": self.name,
            "fields": dict(self.fields),
            "started_at": self.started_at,
            "duration": round(self.duration, 6),
            "error": self.error,
            "slow_spans": list(self.slow_spans),
            "dropped_spans": self.dropped_spans,
            "spans": [s.as_dict() for s in self.spans],
        }


class TraceExporter(Protocol):
    """Where spans go besides the collector (``services.otel`` implements it with OpenTelemetry).

    Handles are the exporter's own span objects. ``start_trace`` opens the root span of a new
    trace and returns the trace id everything (logs, apologies, the collector) uses. Calls
    happen on the event loop and must not block; a failing exporter never fails a request.
    """

    def start_trace(self, name: str, attributes: Mapping[str, Any]) -> tuple[str, Any]: ...
    def start_span(self, parent: Any, name: str, attributes: Mapping[str, Any]) -> Any: ...
    def end_span(self, handle: Any, attributes: Mapping[str, Any], error: BaseException | None) -> None: ...


class Trace:
    """The live trace of one request; spans append to it until its owning context exits."""

    __slots__ = (
        "clock",
        "collector",
        "dropped_spans",
        "error",
        "exported",
        "fields",
        "name",
        "noted",
        "spans",
        "started",
        "started_at",
        "trace_id",
    )

    def __init__(
        self,
        trace_id: str,
        fields: dict[str, Any],
        clock: Clock,
        collector: TraceCollector | None,
        name: str = "request",
    ) -> None:
        self.trace_id = trace_id
        self.fields = fields
        self.clock = clock
        self.collector = collector
        self.name = name
        self.started = clock.monotonic()
        self.started_at = clock.time()
        self.spans: list[SpanRecord] = []
        self.dropped_spans = 0
        self.error: str | None = None
        self.exported: Any = None  # the exporter's root span, when there is an exporter
        self.noted: BaseException | None = None  # the last exception handed to the error aggregator

    def add_span(self, record: SpanRecord) -> None:
        # Bounded so a loop inside one request cannot grow a trace without limit.
        if len(self.spans) < MAX_SPANS_PER_TRACE:
            self.spans.append(record)
        else:
            self.dropped_spans += 1

    def note_error(self, exc: BaseException, dependency: str | None) -> None:
        """Count ``exc`` once in the collector's error aggregator (the innermost span that saw it
        names the dependency); cancellation is no error."""
        if exc is self.noted or not isinstance(exc, Exception):
            return
        self.noted = exc
        errors = self.collector.errors if self.collector is not None else None
        if errors is None:
            return
        fields = self.fields
        errors.record_exception(
            exc,
            dependency=dependency,
            route=self.route,
            user=fields.get("user"),
            guild=fields.get("guild"),
            trace_id=self.trace_id,
        )

    def fail(self, exc: BaseException, dependency: str | None = None) -> None:
        """Mark the request as failed by ``exc`` though it was handled (a bug answered with an
        apology): the trace records the error and the aggregator counts it."""
        self.error = describe_error(exc)
        self.note_error(exc, dependency)

    @property
    def route(self) -> str:
        return _route_of(self.fields) or self.name


def _route_of(fields: Mapping[str, Any]) -> str | None:
    """What a request serves: its ``route`` field, or ``/<command>`` for a slash command."""
    route = fields.get("route")
    if route is None and fields.get("command") is not None:
        route = f"/{fields['command']}"
    return None if route is None else str(route)


@dataclass(frozen=True, slots=True)
class _Bound:
    trace: Trace
    fields: dict[str, Any] = field(default_factory=dict)


_current: ContextVar[_Bound | None] = ContextVar("resilience_request_context", default=None)
_open_span: ContextVar[_Span | None] = ContextVar("resilience_open_span", default=None)


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


def record_error(exc: BaseException, dependency: str | None = None) -> None:
    """Mark the current request as failed by ``exc`` (handled, e.g. with an apology); no-op outside one."""
    bound = _current.get()
    if bound is not None:
        bound.trace.fail(exc, dependency)


class TraceCollector:
    """Keeps the most recent ``max_traces`` finished traces, and separately the recent slow ones.

    A trace is slow when it or one of its spans took at least ``slow_threshold`` seconds.
    Pass it to the outermost ``request_context(collector=...)``. With ``errors`` (an
    ``ErrorAggregator``) every failure a span or a request ends with is counted there; with
    ``exporter`` every trace and span also goes to it (OpenTelemetry), and its trace ids are used.
    """

    def __init__(
        self,
        max_traces: int = 200,
        slow_threshold: float = 5.0,
        clock: Clock | None = None,
        *,
        errors: ErrorAggregator | None = None,
        exporter: TraceExporter | None = None,
    ) -> None:
        self.clock: Clock = clock if clock is not None else SystemClock()
        self.slow_threshold = slow_threshold
        self.max_traces = max_traces
        self.errors = errors
        self.exporter = exporter
        self.export_failures = 0
        self._recent: deque[TraceRecord] = deque(maxlen=max_traces)
        # Kept apart so a burst of fast traffic does not push the slow traces out.
        self._slow: deque[TraceRecord] = deque(maxlen=max_traces)

    def __len__(self) -> int:
        """Traces kept (recent and slow; one that is both counts once per list)."""
        return len(self._recent) + len(self._slow)

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
            name=trace.name,
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

    def trim(self, keep: int) -> int:
        """Forget all but the newest ``keep`` traces of each list (memory pressure); returns how many went."""
        dropped = 0
        for kept in (self._recent, self._slow):
            while len(kept) > max(0, keep):
                kept.popleft()
                dropped += 1
        return dropped

    def get(self, trace_id: str) -> TraceRecord | None:
        """The kept trace with this id, if any."""
        for record in reversed(self._recent):
            if record.trace_id == trace_id:
                return record
        for record in reversed(self._slow):
            if record.trace_id == trace_id:
                return record
        return None

    # -- the exporter, guarded: tracing never fails a request ------------------------------------

    def _export(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except Exception:
            self.export_failures += 1
            return None


class request_context:  # lower case: it reads like contextlib's managers at the call site
    """Bind request fields for a block; restores the previous ones on exit (sync or async).

    ``with request_context(guild=1, channel=2, user=3, collector=traces) as trace:`` starts a
    new trace (a fresh ``trace_id`` unless one is given; the exporter's when the collector has
    one). ``name`` names the trace (default: the ``route`` field, ``/<command>`` for a ``command``
    field, else ``"request"``). Nested
    inside another request context without a ``trace_id`` it joins the outer trace and
    adds/overrides fields; only the context that started a trace hands it to the collector.
    ``None`` field values are skipped. An exception leaving the block is the trace's error.
    """

    __slots__ = (
        "_bound_token",
        "_clock",
        "_collector",
        "_fields",
        "_log_tokens",
        "_name",
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
        name: str | None = None,
        **fields: Any,
    ) -> None:
        self._trace_id = trace_id
        self._collector = collector
        self._clock = clock
        self._name = name
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
            name = self._name or _route_of(fields) or "request"
            trace_id = self._trace_id
            exported = None
            exporter = collector.exporter if collector is not None else None
            if exporter is not None:
                started = collector._export(exporter.start_trace, name, _attributes(fields))  # type: ignore[union-attr]
                if started is not None:
                    exported_id, exported = started
                    trace_id = trace_id or exported_id
            trace = Trace(trace_id or new_trace_id(), fields, clock, collector, name)
            trace.exported = exported
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
            if self._owner and trace is not None:
                self._finish(trace, exc)

    @staticmethod
    def _finish(trace: Trace, exc: BaseException | None) -> None:
        collector = trace.collector
        if exc is not None:
            trace.error = describe_error(exc)
            trace.note_error(exc, None)  # no span saw it: a failure of the request itself
        if collector is None:
            return
        duration = trace.clock.monotonic() - trace.started
        collector.add(trace, duration, trace.error)
        exporter = collector.exporter
        if exporter is not None and trace.exported is not None:
            attributes = _attributes(trace.fields)
            if trace.error is not None:
                attributes["error"] = trace.error
            collector._export(exporter.end_span, trace.exported, attributes, exc)

    async def __aenter__(self) -> Trace:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class _Span:
    """One step of the current trace; ``set(**attributes)`` adds facts while it runs."""

    __slots__ = ("_attributes", "_depth", "_exported", "_name", "_start", "_token", "_trace")

    def __init__(self, trace: Trace, name: str, attributes: dict[str, Any]) -> None:
        self._trace = trace
        self._name = name
        self._attributes = attributes
        self._start = 0.0
        self._depth = 0
        self._exported: Any = None
        self._token: Token[_Span | None] | None = None

    def set(self, **attributes: Any) -> None:
        """Add or replace attributes of this step (scalars only; at most ``MAX_ATTRIBUTES``)."""
        _attributes(attributes, self._attributes)

    def __enter__(self) -> _Span:
        trace = self._trace
        parent = _open_span.get()
        if parent is not None and parent._trace is not trace:
            parent = None  # an open span of another trace (a request context nested with its own id)
        if parent is not None:
            self._depth = parent._depth + 1
        collector = trace.collector
        exporter = collector.exporter if collector is not None else None
        if exporter is not None:
            upper = parent._exported if parent is not None else trace.exported
            if upper is not None:
                self._exported = collector._export(  # type: ignore[union-attr]
                    exporter.start_span, upper, self._name, self._attributes
                )
        self._token = _open_span.set(self)
        self._start = trace.clock.monotonic()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        trace = self._trace
        now = trace.clock.monotonic()
        if self._token is not None:
            _open_span.reset(self._token)
            self._token = None
        error = None
        if exc is not None:
            error = describe_error(exc)
            trace.note_error(exc, str(self._attributes.get("dependency") or self._name.partition(".")[0]))
        trace.add_span(
            SpanRecord(self._name, self._start - trace.started, now - self._start, error, self._depth,
                       self._attributes)
        )
        if self._exported is not None:
            collector = trace.collector
            assert collector is not None and collector.exporter is not None
            collector._export(collector.exporter.end_span, self._exported, self._attributes, exc)

    async def __aenter__(self) -> _Span:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)


class _NoSpan:
    """What ``span()`` returns outside a request: does nothing, allocates nothing."""

    __slots__ = ()

    def set(self, **attributes: Any) -> None:
        return None

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    async def __aenter__(self) -> _NoSpan:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None


_NO_SPAN = _NoSpan()


def span(name: str, **attributes: Any) -> _Span | _NoSpan:
    """Time a step of the current request (``with`` or ``async with``); errors are recorded, not caught.

    ``attributes`` are scalar facts about the step (never a user's text); a ``dependency``
    attribute names what a failure inside it is charged to (default: the name's first part).
    ``with span("gemini.attempt", model=m) as step: ... step.set(outcome="answer")``.
    """
    bound = _current.get()
    if bound is None:
        return _NO_SPAN
    return _Span(bound.trace, name, _attributes(attributes) if attributes else {})
