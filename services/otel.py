"""Optional OpenTelemetry export of the bot's traces (the ``[otel]`` extra); a registry service.

``resilience.context`` times every request and step itself (bounded, always on, for the admin
views); with ``OTEL_EXPORTER_OTLP_ENDPOINT`` set, ``OtelTracing`` is the collector's exporter: each
trace opens an OpenTelemetry root span, each step a child span of the step that encloses it,
with the same attributes, and the trace id the bot logs and quotes in apologies is
OpenTelemetry's (32 hex characters), so a trace found in the logs is the one in the tracing
backend. The SDK does the rest: ids, batching (``BatchSpanProcessor``: a bounded queue, a
background thread, so nothing blocks the event loop) and OTLP/HTTP export. A failure is
recorded as the span's status with the exception's type and status code; never
``record_exception``, whose message could hold what a user wrote.

Without the extra installed this module still imports (``AVAILABLE`` is False) and
``python -m bot check`` reports the setting as a problem.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from resilience.breakers import describe_error

try:
    from opentelemetry.context import Context
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode, format_trace_id, set_span_in_context
except ImportError:  # the [otel] extra is not installed
    AVAILABLE = False
else:
    AVAILABLE = True

SERVICE_NAME = "gemini-discord-bot"
TRACES_PATH = "/v1/traces"  # OTLP/HTTP's path for traces under the collector's base URL
MAX_QUEUE = 2048  # spans waiting for export at most; more are dropped (the SDK counts them)
EXPORT_TIMEOUT = 10.0  # seconds per export request


class OtelTracing:
    """A ``resilience.context.TraceExporter`` over an OpenTelemetry ``TracerProvider``.

    Build it with :meth:`otlp` (the bot) or give it a provider (tests use the SDK's
    ``InMemorySpanExporter``). ``stop()`` flushes what is queued and shuts the provider down.
    """

    name = "otel"
    depends_on: tuple[str, ...] = ()

    def __init__(self, provider: TracerProvider, *, endpoint: str | None = None) -> None:
        if not AVAILABLE:
            raise RuntimeError("OpenTelemetry is not installed: pip install -e '.[otel]'")
        self.endpoint = endpoint
        self._provider = provider
        self._tracer = provider.get_tracer(SERVICE_NAME)
        self._stopped = False

    @classmethod
    def otlp(cls, endpoint: str, *, service_name: str = SERVICE_NAME) -> OtelTracing:
        """Export in batches over OTLP/HTTP to ``endpoint`` (the collector's base URL)."""
        url = endpoint.rstrip("/") + TRACES_PATH
        return cls.with_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=url, timeout=EXPORT_TIMEOUT), max_queue_size=MAX_QUEUE
            ),
            service_name=service_name,
            endpoint=url,
        )

    @classmethod
    def with_processor(
        cls, processor: SpanProcessor, *, service_name: str = SERVICE_NAME, endpoint: str | None = None
    ) -> OtelTracing:
        """Spans go to ``processor`` (e.g. a ``SimpleSpanProcessor`` over an in-memory exporter)."""
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        provider.add_span_processor(processor)
        return cls(provider, endpoint=endpoint)

    # -- TraceExporter -----------------------------------------------------------------------

    def start_trace(self, name: str, attributes: Mapping[str, Any]) -> tuple[str, Span]:
        # An empty context: a new trace, whatever OpenTelemetry context the caller may have.
        root = self._tracer.start_span(name, context=Context(), kind=SpanKind.SERVER, attributes=attributes)
        return format_trace_id(root.get_span_context().trace_id), root

    def start_span(self, parent: Span, name: str, attributes: Mapping[str, Any]) -> Span:
        return self._tracer.start_span(name, context=set_span_in_context(parent), attributes=attributes)

    def end_span(self, handle: Span, attributes: Mapping[str, Any], error: BaseException | None) -> None:
        handle.set_attributes(attributes)
        if error is not None:
            handle.set_status(Status(StatusCode.ERROR, describe_error(error)))
        handle.end()

    # -- service protocol ----------------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to open: the exporter connects when it first sends."""

    async def stop(self) -> None:
        """Flush the queued spans and shut the provider down (in a thread: the SDK blocks); safe twice."""
        if self._stopped:
            return
        self._stopped = True
        await asyncio.to_thread(self._provider.shutdown)

    def health(self) -> dict[str, Any]:
        return {"ok": not self._stopped, "endpoint": self.endpoint}
