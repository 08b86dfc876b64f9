"""The HTTP health, admin and metrics API (aiohttp, loopback by default); a registry service.

Read-only views: ``GET /live``, ``GET /ready``, ``GET /metrics`` and ``GET /api/health/...``
(``/api/health/errors``: the failure groups, through the operations). The trace views
``GET /api/traces`` and ``GET /api/traces/{trace_id}``, ``GET /api/admin/load`` and
``GET /api/health/healing`` (the healer's history) read only, but need the admin token like the
admin actions: a trace says who asked when, the healer's history what it restarted and recovered.
Admin actions: ``POST /api/admin/...`` and ``POST /api/test/gemini``, each a thin view over the
injected operations object (``bot.operations.Operations``: this module never imports ``bot/``),
each requiring ``Authorization: Bearer <ADMIN_API_TOKEN>``:

- no token configured: 403 ``admin_disabled`` (the admin API is off, and says why);
- no or malformed ``Authorization`` header, or a wrong token: 401 ``unauthorized``.

Errors are JSON ``{"error": <code>, "message": <sentence>, "trace_id": ...}`` plus data fields:
404 ``unknown_name`` (with ``kind``, ``name``, ``valid``), 400 ``invalid_request`` /
``invalid_body``, 503 ``unavailable``, 504 ``timeout``, and for any other failure 503
``dependency_failure`` (retryable) or 500 ``internal`` with the ``category``; never a stack
or a secret. Every request runs in a ``request_context`` (its trace id is logged and sent
back as ``X-Trace-Id``), is counted in ``metrics.http_requests`` by route template and status,
and runs under a timeout so a stuck handler answers 504 instead of piling up.

Hostile or broken clients: connections are capped, a request head must arrive within a few
seconds, a request aiohttp cannot parse is one warning line; health bodies show file names, not
absolute paths, without the admin token; the health routes that query SQLite reuse a reading
for a second.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import hmac
import json
import logging
import math
import os
import re
import sys
import tracemalloc
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aiohttp import web
from aiohttp.http import HttpProcessingError

from resilience.context import current_trace_id, request_context
from resilience.errors import Category, classify
from resilience.registry import ServiceState

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

    from resilience.breakers import BreakerBoard
    from resilience.clock import Clock
    from resilience.degradation import DegradationState, QueueStats
    from resilience.registry import ServiceRegistry
    from services.metrics import Metrics

log = structlog.get_logger("services.http_api")

ACTOR = "http"
"""The ``by`` the API passes to every operation (the admin log's ``actor``)."""

UNMATCHED_ROUTE = "<unmatched>"
"""The route label of requests that matched no route (never the raw path: it is unbounded)."""

ERROR_RATE_WINDOW = 300.0  # seconds of counter history behind "recent" error rates
RATE_SAMPLE_EVERY = 10.0  # at most one counter sample per 10 s, so frequent polling keeps the window
RATE_SAMPLES = 64  # > ERROR_RATE_WINDOW / RATE_SAMPLE_EVERY + 1
DEGRADED_QUEUE_AGE = 60.0  # a pending item older than this makes the status degraded
QUEUE_READ_TTL = 1.0  # seconds a health route reuses its SQLite queue reading
# Open connections the API admits at once; LimitNOFILE in deploy/gemini-bot.service leaves room for them.
DEFAULT_MAX_CONNECTIONS = 64
# The load test stops starting requests after 60 s (bot.operations.LOAD_TEST_MAX_SECONDS) and
# cancels what still runs; this leaves it time to answer.
LOAD_TEST_TIMEOUT = 75.0
_CATEGORIES = frozenset(c.value for c in Category)
# An absolute path inside any text: a "/" that follows no word character, dot, colon, slash or
# tilde (so URLs, relative paths and keys such as "thread:5/a" do not match), then components.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^/\s'\"(),;<>]+/)*[^/\s'\"(),;<>]+/?")


# --- what the API reads and calls -------------------------------------------------------------


class QueueStatsSource(Protocol):
    """What the degradation view reads: ``services.storage.SqliteStore`` fits."""

    async def stats(self, *, now: float) -> QueueStats: ...


class AdminOperations(Protocol):
    """The operator actions the admin routes call: ``bot.operations.Operations`` fits."""

    async def maintenance_on(self, message: str | None = None, *, by: str | None = None) -> Any: ...
    async def maintenance_off(self, *, by: str | None = None) -> Any: ...
    async def circuit_reset(self, name: str, *, by: str | None = None) -> Any: ...
    async def circuit_open(
        self, name: str, duration: float | None = None, *, reason: str | None = None, by: str | None = None
    ) -> Any: ...
    async def queue_drain(self, *, by: str | None = None) -> Any: ...
    async def datastore_validate(self, name: str | None = None, *, by: str | None = None) -> Any: ...
    async def datastore_recover(self, name: str, *, by: str | None = None) -> Any: ...
    async def mutex_release(self, key: str, *, by: str | None = None) -> Any: ...
    async def gc(self, *, by: str | None = None) -> Any: ...
    async def discord_reconnect(self, *, by: str | None = None) -> Any: ...
    async def test_gemini(self, *, by: str | None = None) -> Any: ...
    async def trace(self, trace_id: str, *, by: str | None = None) -> Any: ...
    async def traces(
        self,
        *,
        slow: bool = False,
        limit: int = 50,
        window: float | None = None,
        since: float | None = None,
        route: str | None = None,
        by: str | None = None,
    ) -> Any: ...
    async def errors(self, *, limit: int = 20, by: str | None = None) -> Any: ...
    async def load_shed(
        self,
        *,
        user_per_minute: int | None = None,
        guild_per_minute: int | None = None,
        queue_new_messages: bool | None = None,
        by: str | None = None,
    ) -> Any: ...
    async def load_restore(self, *, by: str | None = None) -> Any: ...
    async def load_status(self, *, by: str | None = None) -> Any: ...
    async def healing(self, *, by: str | None = None) -> Any: ...
    async def load_test(
        self, requests: int = 20, concurrency: int = 4, *, confirm: bool = False, by: str | None = None
    ) -> Any: ...


class LatencyWindow:
    """The last ``maxlen`` durations (seconds), for exact recent percentiles.

    Prometheus histograms give bucket counts, not percentiles: whoever times a message calls
    ``observe(seconds)`` (one deque append) and the performance view reads ``percentiles()``.
    """

    __slots__ = ("_samples",)

    def __init__(self, maxlen: int = 1000) -> None:
        self._samples: deque[float] = deque(maxlen=maxlen)

    def observe(self, seconds: float) -> None:
        self._samples.append(seconds)

    def __len__(self) -> int:
        return len(self._samples)

    @property
    def maxlen(self) -> int:
        """How many samples the window keeps."""
        return self._samples.maxlen or 0

    def percentiles(self) -> dict[str, float | int | None]:
        """``{"count", "p50", "p95", "p99", "max"}`` in seconds (nearest rank; None when empty)."""
        ordered = sorted(self._samples)
        if not ordered:
            return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}

        def rank(q: float) -> float:
            return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 6)

        return {
            "count": len(ordered),
            "p50": rank(0.50),
            "p95": rank(0.95),
            "p99": rank(0.99),
            "max": round(ordered[-1], 6),
        }


@dataclass(frozen=True, slots=True)
class BoundedCache:
    """A cache's size reader that also knows the cache's bound; the memory view shows both.

    ``trim``, when given, empties the cache (or most of it) under memory pressure and returns how
    many entries went: the healer (``bot.healing``) calls it; only caches whose entries are
    rebuilt or refetched on demand have one.
    """

    size: Callable[[], int]
    bound: int
    trim: Callable[[], int] | None = None

    def __call__(self) -> int:
        return self.size()


@dataclass
class HealthSources:
    """Everything the health views and ``/ready`` read, injected by the application builder.

    ``registry`` and ``discord_connected`` may be set after construction (the registry holds
    the API itself). ``message_latency`` / ``gemini_latency``: recent-sample windows; while one
    is empty its percentiles are estimated from the Prometheus histogram instead. ``caches``:
    name -> a callable returning the cache's current size, for the memory view (a
    :class:`BoundedCache` also gives the most entries the cache may hold).
    """

    clock: Clock
    metrics: Metrics
    board: BreakerBoard
    degradation: DegradationState
    queue: QueueStatsSource
    registry: ServiceRegistry | None = None
    discord_connected: Callable[[], bool] = lambda: False
    message_latency: LatencyWindow = field(default_factory=LatencyWindow)
    gemini_latency: LatencyWindow = field(default_factory=LatencyWindow)
    caches: dict[str, Callable[[], int]] = field(default_factory=dict)
    # Set by the bot once built (bot.incidents, bot.health): the incident report, and the last
    # health assessment (reasons, alerts firing, availability) shown in the degradation view.
    incidents: Callable[[], Awaitable[dict[str, Any]]] | None = None
    assessment: Callable[[], dict[str, Any] | None] | None = None


@dataclass
class _QueueRead:
    """One route's queue reading: shared while in flight, reused until ``expires`` (monotonic)."""

    task: asyncio.Future[QueueStats]
    expires: float = math.inf


class _HttpError(Exception):
    """A refusal with its HTTP status, error code and extra body fields."""

    def __init__(self, status: int, error: str, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.message = message
        self.fields = fields


class _ConnectionLimit:
    """A protocol factory that lets at most ``limit`` connections reach aiohttp's server at once.

    aiohttp's server has no cap on open connections. Each accepted connection gets an
    :class:`_Admission`; when the connection is made it either gets a fresh aiohttp handler
    from ``factory`` (counted until the connection is lost) or, at the cap, is closed at once.
    Counting in ``connection_made``/``connection_lost`` keeps the count exact: asyncio calls
    them in pairs, while many connections may be created before any of them is made.
    """

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: int) -> None:
        self._factory = factory
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._refused_in_a_row = 0

    def __call__(self) -> asyncio.Protocol:
        return _Admission(self)

    def admit(self) -> asyncio.Protocol | None:
        """A handler for a new connection, or None (refused) at the cap."""
        if self.open >= self.limit:
            self.refused += 1
            self._refused_in_a_row += 1
            if self._refused_in_a_row == 1:  # one line per episode, not one per connection
                log.warning("http_api.connection_limit", limit=self.limit)
            return None
        if self._refused_in_a_row:
            log.info("http_api.connection_limit_cleared", refused=self._refused_in_a_row)
            self._refused_in_a_row = 0
        handler = self._factory()
        self.open += 1
        return handler

    def release(self) -> None:
        self.open -= 1


class _Admission(asyncio.Protocol):
    """One connection: hands every event to the aiohttp handler it was admitted to, if any."""

    def __init__(self, limit: _ConnectionLimit) -> None:
        self._limit = limit
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        inner = self._limit.admit()
        if inner is None:
            transport.close()
            return
        self._inner = inner
        inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        inner, self._inner = self._inner, None
        if inner is not None:
            self._limit.release()
            inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class _ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's connection-level logger for this server: a malformed request is one warning line.

    aiohttp answers a request it cannot parse (a broken request line or header, a non-HTTP
    client) with 400 and logs the parser's exception with its traceback, at ERROR. That is the
    client's fault, not ours: log ``http_api.bad_request`` with the reason's first line instead.
    Everything else aiohttp logs passes through unchanged.
    """

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            reason = next((line.strip() for line in exc.message.splitlines() if line.strip()), "")
            log.warning(
                "http_api.bad_request",
                peer=str(args[0]) if args else None,  # aiohttp's "Error handling request from %s"
                status=exc.code,
                error=type(exc).__name__,
                reason=reason[:120],
            )
            return
        super().log(level, msg, *args, **kwargs)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Action = Callable[[web.Request, "AdminOperations"], Awaitable[Any]]
View = Callable[[web.Request], Awaitable[tuple[Any, int]]]  # a health view's (body, status)


# --- the service -------------------------------------------------------------------------------


class HttpApi:
    """The aiohttp server; a registry service named ``http_api``.

    ``operations`` (the admin actions) may be given later with ``attach_operations`` since it
    usually needs the finished application; until then admin routes answer 503.
    ``error_status`` maps the operations' refusal types to HTTP statuses, e.g.
    ``{UnknownNameError: 404, InvalidRequestError: 400, OperationUnavailableError: 503}``;
    a 404 body carries the error's ``kind``/``name``/``valid`` attributes when it has them.
    ``port`` 0 binds any free port; the bound one is ``self.port`` and is logged as
    ``http_api.listening``. ``timeout`` bounds each handler (504), including its reading of
    the request body; ``gemini_test_timeout`` the Gemini test, which may wait out Gemini's own
    retries.

    Connection limits, so idle or hostile clients cannot pile up sockets:

    - ``header_timeout``: a connection that has not sent a complete request head within this
      many seconds of opening, or of its previous answer, is closed (silent clients, half a
      request line, headers trickled a byte at a time). This is aiohttp's keep-alive timer: it
      arms it when a connection opens and does not extend it as bytes arrive.
    - ``linger_timeout``: after the answer, a body the handler did not read (a GET sent with
      one) is read and dropped for at most this long, then the connection is closed.
    - ``max_connections``: open connections beyond this are closed as soon as they are
      accepted (``http_api.connection_limit`` is logged once per episode).
    """

    name = "http_api"
    depends_on: tuple[str, ...] = ("metrics",)

    def __init__(
        self,
        sources: HealthSources,
        *,
        host: str = "127.0.0.1",
        port: int = 3000,
        admin_token: str | None = None,
        operations: AdminOperations | None = None,
        error_status: Mapping[type[BaseException], int] | None = None,
        timeout: float = 10.0,
        gemini_test_timeout: float = 60.0,
        shutdown_timeout: float = 2.0,
        header_timeout: float = 5.0,
        linger_timeout: float = 2.0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self.sources = sources
        self.host = host
        self.port: int | None = None if port == 0 else port
        self._requested_port = port
        self._token = admin_token.encode() if admin_token else None
        self._operations = operations
        self._error_status = dict(error_status or {})
        self._timeout = timeout
        self._gemini_test_timeout = gemini_test_timeout
        self._shutdown_timeout = shutdown_timeout
        self._header_timeout = header_timeout
        self._linger_timeout = linger_timeout
        self._max_connections = max_connections
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._connections: _ConnectionLimit | None = None
        self._shutting_down = False
        self._started_at: float | None = None
        self._rate_samples: dict[str, deque[tuple[float, float, float]]] = {}
        self._queue_reads: dict[str, _QueueRead] = {}

    def attach_operations(
        self, operations: AdminOperations, error_status: Mapping[type[BaseException], int] | None = None
    ) -> None:
        """Give the admin routes their operations (once the application exists), and the HTTP
        statuses of their refusal types (added to ``error_status``)."""
        self._operations = operations
        self._error_status.update(error_status or {})

    def set_shutting_down(self, on: bool = True) -> None:
        """Make ``/ready`` answer 503 (the bot's ``close()`` calls this first)."""
        self._shutting_down = on

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        if self.port is None:
            raise RuntimeError("the HTTP API is not listening")
        return f"http://{self.host}:{self.port}"

    # -- service protocol -----------------------------------------------------------------------

    async def start(self) -> None:
        """Bind and serve; logs ``http_api.listening`` with ``host`` and the bound ``port``."""
        runner = web.AppRunner(
            self.build_app(),
            access_log=None,
            shutdown_timeout=self._shutdown_timeout,
            logger=_ServerLog(logging.getLogger("aiohttp.server")),
            keepalive_timeout=self._header_timeout,
            lingering_time=self._linger_timeout,
        )
        await runner.setup()
        try:
            server = runner.server
            assert server is not None  # setup() made it
            # What web.TCPSite does, with aiohttp's protocol factory behind the connection cap.
            connections = _ConnectionLimit(server, self._max_connections)
            listener = await asyncio.get_running_loop().create_server(
                connections, self.host, self._requested_port
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._listener, self._connections = runner, listener, connections
        self.port = int(listener.sockets[0].getsockname()[1])
        self._started_at = self.sources.clock.monotonic()
        self._shutting_down = False
        log.info("http_api.listening", host=self.host, port=self.port, admin=self._token is not None)

    async def stop(self) -> None:
        """Stop serving; in-flight requests get ``shutdown_timeout`` seconds. Safe to call twice."""
        runner, self._runner = self._runner, None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()  # stop accepting; the runner closes the open connections
        if runner is not None:
            await runner.cleanup()  # in-flight requests finish first, queue readings included
        for read in self._queue_reads.values():
            read.task.cancel()
        self._queue_reads.clear()
        if runner is not None:
            log.info("http_api.stopped", port=self.port)

    def health(self) -> dict[str, Any]:
        """``alive`` is false once the listening socket stopped serving while the API should run:
        the healer (``bot.healing``) restarts it then."""
        limit = self._connections
        listener = self._listener
        return {
            "ok": self._runner is not None,
            "alive": self._runner is None or (listener is not None and listener.is_serving()),
            "port": self.port,
            "admin_enabled": self._token is not None,
            "connections": {
                "open": limit.open if limit else 0,
                "limit": self._max_connections,
                "refused": limit.refused if limit else 0,
            },
        }

    # -- the routes -------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        """The aiohttp application with every route and the request middleware."""
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024)
        get, post = web.get, web.post
        admin, health = self._admin, self._health
        app.add_routes(
            [
                get("/live", self._live),
                get("/ready", self._ready),
                get("/metrics", self._metrics),
                get("/api/health/status", health(self._status)),
                get("/api/health/circuits", health(self._circuits)),
                get("/api/health/degradation", health(self._degradation)),
                get("/api/health/incidents", health(self._incidents)),
                get("/api/health/services", health(self._services)),
                get("/api/health/memory", health(self._memory)),
                get("/api/health/performance", health(self._performance)),
                get("/api/health/external/gemini", health(self._external_gemini)),
                get("/api/health/external/discord", health(self._external_discord)),
                post("/api/admin/maintenance/enable", admin(self._maintenance_enable)),
                post("/api/admin/maintenance/disable", admin(self._maintenance_disable)),
                post("/api/admin/circuit/reset/{name}", admin(self._circuit_reset)),
                post("/api/admin/circuit/open/{name}", admin(self._circuit_open)),
                post("/api/admin/queue/process", admin(self._queue_process)),
                post("/api/admin/datastore/validate", admin(self._datastore_validate)),
                post("/api/admin/datastore/validate/{name}", admin(self._datastore_validate)),
                post("/api/admin/datastore/recover/{name}", admin(self._datastore_recover)),
                # Conversation keys may hold any character; the key is the rest of the path.
                post("/api/admin/mutex/release/{key:.+}", admin(self._mutex_release)),
                post("/api/admin/gc", admin(self._gc)),
                post("/api/admin/discord/reconnect", admin(self._discord_reconnect)),
                post("/api/test/gemini", admin(self._test_gemini, timeout=self._gemini_test_timeout)),
                # Traces, errors and load: the trace views need the token (they show who asked what
                # when); the error groups are counts, read like the health views.
                get("/api/traces", admin(self._traces)),
                get("/api/traces/{trace_id}", admin(self._trace)),
                get("/api/health/errors", self._view(self._errors)),
                get("/api/admin/load", admin(self._load_status)),
                # The healer's settings, budgets and history: what it did to the bot, for owners.
                get("/api/health/healing", admin(self._healing)),
                post("/api/admin/load/shed", admin(self._load_shed)),
                post("/api/admin/load/restore", admin(self._load_restore)),
                post("/api/test/load", admin(self._load_test, timeout=LOAD_TEST_TIMEOUT)),
            ]
        )
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = _route_template(request)
        started = self.sources.clock.monotonic()
        with request_context(method=request.method, route=route) as trace:
            try:
                response = await handler(request)
            except asyncio.CancelledError:
                raise
            except _HttpError as exc:
                response = _error(exc)
            except web.HTTPException as exc:  # aiohttp's own 404 / 405 / 413, as JSON
                response = _error(_HttpError(exc.status, _aiohttp_code(exc.status), exc.reason))
            except Exception as exc:
                response = self._failure(exc)
            response.headers["X-Trace-Id"] = trace.trace_id
            self.sources.metrics.http_requests.labels(route, str(response.status)).inc()
            log.info(
                "http_api.request",
                status=response.status,
                duration_ms=round((self.sources.clock.monotonic() - started) * 1000, 1),
            )
            return response

    def _failure(self, exc: Exception) -> web.Response:
        """Anything a handler raised that is not a refusal: classified, never a stack in the body."""
        verdict = classify(exc)
        status = 503 if verdict.retryable else 500
        category, error = verdict.category.value, type(exc).__name__
        if verdict.retryable:  # a dependency is down (a breaker open, a timeout): expected, no stack
            log.warning("http_api.dependency_failed", category=category, error=error)
        else:
            log.error("http_api.handler_failed", category=category, error=error, exc_info=exc)
        return _error(
            _HttpError(
                status,
                "dependency_failure" if verdict.retryable else "internal",
                verdict.user_message,
                category=verdict.category.value,
                retryable=verdict.retryable,
                retry_after=verdict.retry_after,
            )
        )

    def _health(self, view: View) -> Handler:
        """Wrap a health view: its body as JSON, absolute paths cut to names unless the admin token came."""

        async def handler(request: web.Request) -> web.StreamResponse:
            body, status = await view(request)
            if not self._has_token(request):
                body = _without_paths(body)  # where the bot's files live is the operator's business
            return _json(body, status=status)

        return handler

    def _admin(self, action: Action, *, timeout: float | None = None) -> Handler:
        """Wrap an admin action: check the token, then run it under its timeout and answer its dict."""
        limit = timeout if timeout is not None else self._timeout

        async def handler(request: web.Request) -> web.StreamResponse:
            self._authorize(request)
            operations = self._operations
            if operations is None:
                raise _HttpError(503, "unavailable", "the admin operations are not attached yet; try again")
            result = await self._bounded(action(request, operations), limit)
            return _json(result)

        return handler

    def _view(self, action: Action) -> Handler:
        """A read-only view over the operations, without the token (like the health views)."""

        async def handler(request: web.Request) -> web.StreamResponse:
            operations = self._operations
            if operations is None:
                raise _HttpError(503, "unavailable", "the operations are not attached yet; try again")
            return _json(await self._bounded(action(request, operations), self._timeout))

        return handler

    def _authorize(self, request: web.Request) -> None:
        if self._token is None:
            raise _HttpError(
                403,
                "admin_disabled",
                "the admin API is disabled: set ADMIN_API_TOKEN in the bot's environment and restart",
            )
        if not self._has_token(request):
            log.warning("http_api.unauthorized", has_header="Authorization" in request.headers)
            raise _HttpError(
                401, "unauthorized", "send the admin token as 'Authorization: Bearer <ADMIN_API_TOKEN>'"
            )

    def _has_token(self, request: web.Request) -> bool:
        """Whether the request carries ``Authorization: Bearer <the admin token>``.

        The header's raw bytes are compared, never its decoded text: a client may send any bytes
        (0xFF 0xFE is not UTF-8 and does not encode back), and such a header is just a wrong token.
        """
        if self._token is None:
            return False
        raw = next((value for name, value in request.raw_headers if name.lower() == b"authorization"), b"")
        scheme, _, given = raw.partition(b" ")
        # compare_digest: constant time whatever the guess.
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self._token)

    async def _bounded(self, work: Awaitable[Any], limit: float) -> Any:
        """Run ``work`` under ``limit`` seconds; map the operations' refusals to statuses."""
        deadline = asyncio.timeout(limit)
        try:
            async with deadline:
                return await work
        except TimeoutError:
            if deadline.expired():  # ours, not a timeout the action itself raised
                raise _HttpError(504, "timeout", f"the action did not finish within {limit:g} s") from None
            raise
        except Exception as exc:
            status = self._status_for(exc)
            if status is None:
                raise
            raise self._refusal(exc, status) from None

    def _status_for(self, exc: BaseException) -> int | None:
        for kind, status in self._error_status.items():
            if isinstance(exc, kind):
                return status
        return None

    @staticmethod
    def _refusal(exc: BaseException, status: int) -> _HttpError:
        code = {400: "invalid_request", 404: "unknown_name", 503: "unavailable"}.get(status, "refused")
        fields: dict[str, Any] = {}
        if status == 404:
            for attr in ("kind", "name", "valid"):
                if hasattr(exc, attr):
                    fields[attr] = getattr(exc, attr)
        return _HttpError(status, code, str(exc), **fields)

    # -- probes ------------------------------------------------------------------------------------

    async def _live(self, request: web.Request) -> web.Response:
        """The process and its event loop answer."""
        return _json({"alive": True, "uptime": self._uptime()})

    async def _ready(self, request: web.Request) -> web.Response:
        """200 when every service runs, Discord is connected and no shutdown is under way; else 503."""
        reasons = self._not_ready_reasons()
        return _json({"ready": not reasons, "reasons": reasons}, status=503 if reasons else 200)

    def _not_ready_reasons(self) -> list[str]:
        reasons: list[str] = []
        if self._shutting_down:
            reasons.append("shutting down")
        registry = self.sources.registry
        if registry is None:
            reasons.append("services not registered")
        else:
            reasons.extend(
                f"service {name} is {state}"
                for name, state in registry.states().items()
                if state is not ServiceState.RUNNING
            )
        if not self._discord_connected():
            reasons.append("discord not connected")
        return reasons

    def _discord_connected(self) -> bool:
        try:
            return bool(self.sources.discord_connected())
        except Exception as exc:  # a broken probe reads as "not connected", never a 500 on /ready
            log.warning("http_api.discord_probe_failed", error=type(exc).__name__)
            return False

    async def _metrics(self, request: web.Request) -> web.Response:
        body, content_type = self.sources.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    # -- health views --------------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> tuple[Any, int]:
        """healthy | degraded | unhealthy with reasons; 503 when unhealthy, for ``curl -f``."""
        unhealthy = self._not_ready_reasons()
        degraded: list[str] = []
        for snap in self.sources.board.snapshot():
            if snap.state != "closed":
                target = unhealthy if snap.name == "storage" else degraded
                target.append(f"breaker {snap.name} is {snap.state}")
        mode = self.sources.degradation.snapshot()
        if str(mode.mode) != "normal":
            degraded.append(f"mode is {mode.mode}" + (f" ({mode.reason})" if mode.reason else ""))
        registry = self.sources.registry
        if registry is not None:
            for name, detail in registry.health()["services"].items():
                if detail.get("state") == ServiceState.RUNNING and not detail.get("ok"):
                    degraded.append(f"service {name} reports a problem")
        try:
            stats = await self._queue_stats("status")
        except Exception as exc:
            unhealthy.append(f"queue unreadable ({classify(exc).category.value})")
        else:
            age = stats.oldest_pending_age
            if age is not None and age >= DEGRADED_QUEUE_AGE:
                degraded.append(f"{stats.pending()} queued, oldest {age:.0f} s")
        status = "unhealthy" if unhealthy else "degraded" if degraded else "healthy"
        body = {
            "status": status,
            "reasons": unhealthy + degraded,
            "mode": str(mode.mode),
            "uptime": self._uptime(),
        }
        return body, 503 if unhealthy else 200

    async def _circuits(self, request: web.Request) -> tuple[Any, int]:
        return {"breakers": [_breaker_row(s) for s in self.sources.board.snapshot()]}, 200

    async def _degradation(self, request: web.Request) -> tuple[Any, int]:
        """The mode and the durable queue's depth; ``queue`` is null with ``queue_error`` if unreadable.
        ``assessment``: the last health assessment (its reasons, the alerts firing, availability)."""
        snap = self.sources.degradation.snapshot()
        assessment = self.sources.assessment() if self.sources.assessment is not None else None
        body: dict[str, Any] = {**snap.as_dict(), "queue": None, "queue_error": None}
        body["assessment"] = assessment
        try:
            stats = await self._queue_stats("degradation")
        except Exception as exc:
            body["queue_error"] = classify(exc).category.value
        else:
            depth: dict[str, dict[str, int]] = {}
            for (kind, state), n in stats.depth.items():
                depth.setdefault(str(kind), {})[str(state)] = n
            body["queue"] = {
                "pending": stats.pending(),
                "oldest_pending_age": _round(stats.oldest_pending_age),
                "depth": depth,
            }
        return body, 200

    async def _incidents(self, request: web.Request) -> tuple[Any, int]:
        """Incidents per dependency (count, open, MTTR, MTBF) and the latest ones; 503 before the bot
        attached its tracker."""
        report = self.sources.incidents
        if report is None:
            raise _HttpError(503, "unavailable", "incident records are not attached yet; try again")
        return await self._bounded(report(), self._timeout), 200

    async def _services(self, request: web.Request) -> tuple[Any, int]:
        registry = self.sources.registry
        if registry is None:
            return {"ok": False, "order": [], "services": {}}, 200
        return {**registry.health(), "order": registry.order}, 200

    async def _memory(self, request: web.Request) -> tuple[Any, int]:
        """Resident memory, the Python heap as the allocator and the collector see it, the largest caches."""
        caches: list[dict[str, Any]] = []
        for name, size in self.sources.caches.items():
            try:
                row: dict[str, Any] = {"name": name, "size": int(size())}
                if isinstance(size, BoundedCache):
                    row["bound"] = size.bound
                caches.append(row)
            except Exception as exc:
                caches.append({"name": name, "size": None, "error": type(exc).__name__})
        caches.sort(key=lambda c: -1 if c["size"] is None else c["size"], reverse=True)
        return (
            {
                "rss_bytes": rss_bytes(),
                # O(1) figures only: counting every object (gc.get_objects) would stall the loop
                # for tens of milliseconds on a busy heap, and this route needs no token.
                "python": {
                    "allocated_blocks": sys.getallocatedblocks(),
                    "traced_bytes": tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else None,
                    "gc_counts": list(gc.get_count()),
                    "gc_garbage": len(gc.garbage),
                },
                "caches": caches,
            },
            200,
        )

    async def _performance(self, request: web.Request) -> tuple[Any, int]:
        """Message and Gemini latency percentiles in seconds: from the recent-sample windows when fed."""
        metrics = self.sources.metrics
        return (
            {
                "message_latency": _latency(self.sources.message_latency, metrics.message_latency),
                "gemini_latency": _latency(self.sources.gemini_latency, metrics.gemini_latency),
            },
            200,
        )

    async def _external_gemini(self, request: web.Request) -> tuple[Any, int]:
        """The Gemini breaker, last success and error, and the error rate over the recent window."""
        detail = self._service_health("gemini")
        totals = _counter_totals(self.sources.metrics.gemini_requests, "outcome")
        calls = sum(totals.values())
        # Failed attempts are counted under their error category; answers under the reply kind.
        errors = sum(n for outcome, n in totals.items() if outcome in _CATEGORIES)
        recent = self._recent("gemini", calls, errors)
        return (
            {
                "breaker": self._breaker("gemini"),
                "running": detail.get("running"),
                "model": detail.get("model"),
                "exhausted_models": detail.get("exhausted_models", {}),
                "last_success": detail.get("last_success"),
                "last_error": detail.get("last_error"),
                "last_error_at": detail.get("last_error_at"),
                "calls_by_outcome": totals,
                **recent,
            },
            200,
        )

    async def _external_discord(self, request: web.Request) -> tuple[Any, int]:
        """The gateway connection, the ``discord.*`` breakers, and write failures over the recent window."""
        detail = self._service_health("discord_io")
        errors_by = detail.get("errors", {}) or {}
        errors = float(sum(errors_by.values()))
        breakers = [_breaker_row(s) for s in self.sources.board.snapshot() if s.name.startswith("discord.")]
        failing = [b for b in breakers if b["last_error"] is not None]
        recent = self._recent("discord", None, errors)
        return (
            {
                "connected": self._discord_connected(),
                "breakers": breakers,
                "last_error": failing[0]["last_error"] if failing else None,
                "errors_by_operation": errors_by,
                **recent,
            },
            200,
        )

    async def _queue_stats(self, route: str) -> QueueStats:
        """The durable queue's stats for ``route``, read from SQLite at most once per ``QUEUE_READ_TTL``.

        Concurrent requests share the reading in flight, and later ones reuse it (or its error)
        for a second after it finished: a flood of health requests cannot crowd the store that
        message handling needs.
        """
        clock = self.sources.clock
        read = self._queue_reads.get(route)
        if read is None or (read.task.done() and clock.monotonic() >= read.expires):
            stats = self._bounded(self.sources.queue.stats(now=clock.time()), self._timeout)
            read = self._queue_reads[route] = _QueueRead(asyncio.ensure_future(stats))
            read.task.add_done_callback(functools.partial(self._queue_read_done, read))
        # shield: a request that goes away does not cancel the reading the others wait for.
        return await asyncio.shield(read.task)

    def _queue_read_done(self, read: _QueueRead, task: asyncio.Future[QueueStats]) -> None:
        if task.cancelled():
            read.expires = -math.inf  # read again next time
        else:
            task.exception()  # retrieved here: every waiter may have gone
            read.expires = self.sources.clock.monotonic() + QUEUE_READ_TTL

    def _service_health(self, name: str) -> dict[str, Any]:
        registry = self.sources.registry
        if registry is None:
            return {}
        try:
            return dict(registry.get(name).health())
        except KeyError:
            return {}

    def _breaker(self, name: str) -> dict[str, Any] | None:
        board = self.sources.board
        return _breaker_row(board[name].snapshot()) if name in board else None

    def _recent(self, key: str, calls: float | None, errors: float) -> dict[str, Any]:
        """Errors (and their share of calls) over roughly the last ``ERROR_RATE_WINDOW`` seconds.

        Counters only grow, so the traffic since an earlier sample of them is the difference.
        Samples are taken when a view is read (at most one per ``RATE_SAMPLE_EVERY`` seconds);
        the base is the newest sample at least a window old (else the start, when counters were 0),
        so ``window_seconds`` says how far back the figures reach.
        """
        now = self.sources.clock.monotonic()
        samples = self._rate_samples.setdefault(key, deque(maxlen=RATE_SAMPLES))
        if not samples:
            samples.append((self._started_at if self._started_at is not None else now, 0.0, 0.0))
        while len(samples) > 1 and now - samples[1][0] >= ERROR_RATE_WINDOW:
            samples.popleft()
        base_t, base_calls, base_errors = samples[0]
        if now - samples[-1][0] >= RATE_SAMPLE_EVERY:
            samples.append((now, calls or 0.0, errors))
        window = max(0.0, now - base_t)
        recent_errors = max(0.0, errors - base_errors)
        body: dict[str, Any] = {
            "window_seconds": round(window, 1),
            "recent_errors": int(recent_errors),
            "errors_per_minute": round(recent_errors * 60 / window, 3) if window > 0 else None,
        }
        if calls is not None:
            recent_calls = max(0.0, calls - base_calls)
            body["recent_calls"] = int(recent_calls)
            body["recent_error_rate"] = round(recent_errors / recent_calls, 4) if recent_calls else None
        return body

    def _uptime(self) -> float | None:
        if self._started_at is None:
            return None
        return round(self.sources.clock.monotonic() - self._started_at, 3)

    # -- admin actions -------------------------------------------------------------------------------

    async def _maintenance_enable(self, request: web.Request, ops: AdminOperations) -> Any:
        body = await _body(request, {"message": (str, type(None))})
        return await ops.maintenance_on(body.get("message"), by=ACTOR)

    async def _maintenance_disable(self, request: web.Request, ops: AdminOperations) -> Any:
        await _body(request, {})
        return await ops.maintenance_off(by=ACTOR)

    async def _circuit_reset(self, request: web.Request, ops: AdminOperations) -> Any:
        await _body(request, {})
        return await ops.circuit_reset(request.match_info["name"], by=ACTOR)

    async def _circuit_open(self, request: web.Request, ops: AdminOperations) -> Any:
        body = await _body(request, {"duration": (int, float, type(None)), "reason": (str, type(None))})
        return await ops.circuit_open(
            request.match_info["name"], body.get("duration"), reason=body.get("reason"), by=ACTOR
        )

    async def _queue_process(self, request: web.Request, ops: AdminOperations) -> Any:
        await _body(request, {})
        return await ops.queue_drain(by=ACTOR)

    async def _datastore_validate(self, request: web.Request, ops: AdminOperations) -> Any:
        await _body(request, {})
        return await ops.datastore_validate(request.match_info.get("name"), by=ACTOR)

    async def _datastore_recover(self, request: web.Request, ops: AdminOperations) -> Any:
        await _body(request, {})
        return await ops.datastore_recover(request.match_info["name"], by=ACTOR)

    async def _mutex_release(self, request: web.Request, ops: AdminOperations) -> Any:
        await _body(request, {})
        return await ops.mutex_release(request.match_info["key"], by=ACTOR)

    async def _gc(self, request: web.Request, ops: AdminOperations) -> Any:
        await _body(request, {})
        return await ops.gc(by=ACTOR)

    async def _discord_reconnect(self, request: web.Request, ops: AdminOperations) -> Any:
        await _body(request, {})
        return await ops.discord_reconnect(by=ACTOR)

    async def _test_gemini(self, request: web.Request, ops: AdminOperations) -> Any:
        await _body(request, {})
        return await ops.test_gemini(by=ACTOR)

    # -- traces, errors, load --------------------------------------------------------------------

    async def _trace(self, request: web.Request, ops: AdminOperations) -> Any:
        return await ops.trace(request.match_info["trace_id"], by=ACTOR)

    async def _traces(self, request: web.Request, ops: AdminOperations) -> Any:
        query = request.query
        return await ops.traces(
            slow=_flag(query, "slow"),
            limit=_query_number(query, "limit", int, 50),
            window=_query_number(query, "window", float, None),
            since=_query_number(query, "since", float, None),
            route=query.get("route") or None,
            by=ACTOR,
        )

    async def _errors(self, request: web.Request, ops: AdminOperations) -> Any:
        return await ops.errors(limit=_query_number(request.query, "limit", int, 20))

    async def _load_shed(self, request: web.Request, ops: AdminOperations) -> Any:
        body = await _body(
            request,
            {
                "user_per_minute": (int, type(None)),
                "guild_per_minute": (int, type(None)),
                "queue_new_messages": (bool, type(None)),
            },
        )
        return await ops.load_shed(
            user_per_minute=body.get("user_per_minute"),
            guild_per_minute=body.get("guild_per_minute"),
            queue_new_messages=body.get("queue_new_messages"),
            by=ACTOR,
        )

    async def _healing(self, request: web.Request, ops: AdminOperations) -> Any:
        return await ops.healing(by=ACTOR)

    async def _load_status(self, request: web.Request, ops: AdminOperations) -> Any:
        return await ops.load_status(by=ACTOR)

    async def _load_restore(self, request: web.Request, ops: AdminOperations) -> Any:
        await _body(request, {})
        return await ops.load_restore(by=ACTOR)

    async def _load_test(self, request: web.Request, ops: AdminOperations) -> Any:
        body = await _body(
            request,
            {"requests": (int, type(None)), "concurrency": (int, type(None)), "confirm": (bool, type(None))},
        )
        return await ops.load_test(
            body.get("requests") or 20,
            body.get("concurrency") or 4,
            confirm=body.get("confirm") is True,
            by=ACTOR,
        )


# --- helpers ----------------------------------------------------------------------------------------


async def _body(request: web.Request, allowed: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    """The request's optional JSON object, with only ``allowed`` fields of the allowed types (else 400)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _HttpError(400, "invalid_body", "the body is not valid JSON") from None
    except RecursionError:  # e.g. 30,000 nested "[": the decoder recurses once per level
        raise _HttpError(400, "invalid_body", "the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise _HttpError(400, "invalid_body", "the body must be a JSON object")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        expected = ", ".join(allowed) or "no fields"
        raise _HttpError(
            400, "invalid_body", f"unexpected field(s) {', '.join(unknown)}; expected {expected}"
        )
    for name, types in allowed.items():
        value = data.get(name)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            kinds = " or ".join("null" if t is type(None) else "number" if t in (int, float) else "text"
                                for t in dict.fromkeys(float if t is int else t for t in types))
            raise _HttpError(400, "invalid_body", f"field {name!r} must be {kinds}")
    return data


def _flag(query: Mapping[str, str], name: str) -> bool:
    """A query flag: ``?slow=1`` / ``true`` / ``yes`` (absent: False)."""
    value = query.get(name, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise _HttpError(400, "invalid_request", f"query parameter {name!r} must be 1 or 0")


def _query_number(query: Mapping[str, str], name: str, kind: type[int] | type[float], default: Any) -> Any:
    """A numeric query parameter (absent: ``default``), else 400."""
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise _HttpError(400, "invalid_request", f"query parameter {name!r} must be {noun}") from None


def _without_paths(value: Any) -> Any:
    """``value`` (a JSON-able body) with every absolute path in its strings cut to its last part."""
    if isinstance(value, str):
        return _ABSOLUTE_PATH.sub(lambda m: PurePosixPath(m.group()).name, value)
    if isinstance(value, dict):
        return {key: _without_paths(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_without_paths(item) for item in value]
    return value


def _json(body: Any, *, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body, default=str), status=status, content_type="application/json")


def _error(exc: _HttpError) -> web.Response:
    body = {"error": exc.error, "message": exc.message, "trace_id": current_trace_id(), **exc.fields}
    response = _json(body, status=exc.status)
    if exc.status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _aiohttp_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(status, "http_error")


def _route_template(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


def _breaker_row(snap: Any) -> dict[str, Any]:
    return {
        "name": snap.name,
        "state": str(snap.state),
        "since": snap.since,
        "failures": snap.failures,
        "remaining": round(snap.remaining, 3),
        "last_error": snap.last_error,
        "forced_reason": snap.forced_reason,
    }


def _counter_totals(counter: Counter, label: str) -> dict[str, float]:
    """A labelled counter's values summed by one label."""
    totals: dict[str, float] = {}
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = sample.labels.get(label, "")
                totals[key] = totals.get(key, 0.0) + sample.value
    return totals


def _latency(window: LatencyWindow, histogram: Histogram) -> dict[str, Any]:
    if len(window):
        return {"source": "window", **window.percentiles()}
    return {"source": "histogram", **_histogram_percentiles(histogram)}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _histogram_percentiles(histogram: Histogram) -> dict[str, Any]:
    """Percentiles estimated from a histogram's buckets (all labels together), like ``histogram_quantile``."""
    buckets: dict[float, float] = {}
    for metric in histogram.collect():
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    ordered = sorted(buckets.items())
    count = ordered[-1][1] if ordered else 0.0
    if not count:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}

    def quantile(q: float) -> float:
        rank = q * count
        lower, below = 0.0, 0.0
        for bound, cumulative in ordered:
            if cumulative >= rank:
                if math.isinf(bound):
                    return lower  # beyond the last finite bucket: its bound is all we know
                share = (rank - below) / (cumulative - below) if cumulative > below else 1.0
                return round(lower + (bound - lower) * share, 6)
            lower, below = bound, cumulative
        return lower

    return {
        "count": int(count),
        "p50": quantile(0.5),
        "p95": quantile(0.95),
        "p99": quantile(0.99),
        "max": None,  # a histogram does not keep it
    }


def rss_bytes() -> int | None:
    """Resident memory from /proc/self/statm (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
