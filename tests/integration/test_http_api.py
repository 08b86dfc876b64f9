"""The HTTP API against a real application: real aiohttp server and client on 127.0.0.1, port 0.

Each test builds the application the bot builds (``build_application(load_config(...))``) on a
fresh data directory and a ``FakeClock``, starts its registry, and serves an ``HttpApi`` over it
with the real ``Operations``; Gemini is the sandbox emulator over loopback. ``discord_connected``
is a switch the test flips; the last test runs a real ``GeminiBot`` on the Discord emulator.

Wrong or missing admin tokens answer 401; an API with no token configured answers 403.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from bot.app import Application, build_application
from bot.operations import (
    InvalidRequestError,
    Operations,
    OperationUnavailableError,
    UnknownNameError,
    serve_operations,
)
from resilience.breakers import BreakerState
from resilience.clock import FakeClock
from resilience.degradation import ItemKind, QueueStats
from resilience.registry import ServiceRegistry
from sandbox.gemini import GeminiEmulator
from services.config import load_config
from services.http_api import HealthSources, HttpApi, QueueStatsSource
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import live_bot

API_KEY = "http-test-key-do-not-log"
TOKEN = "admin-token-for-tests-0123456789"
ERROR_STATUS = {UnknownNameError: 404, InvalidRequestError: 400, OperationUnavailableError: 503}


@dataclass
class Switch:
    """Stands in for the Discord client's connection state."""

    on: bool = False

    def __call__(self) -> bool:
        return self.on


@dataclass
class Served:
    app: Application
    api: HttpApi
    http: aiohttp.ClientSession
    discord: Switch

    async def call(
        self, method: str, path: str, *, token: str | None = TOKEN, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        """One request; returns (status, parsed JSON body)."""
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        async with self.http.request(method, self.api.url + path, headers=headers, data=data) as response:
            assert response.content_type == "application/json", (path, response.content_type)
            return response.status, await response.json()

    async def get(self, path: str) -> tuple[int, Any]:
        return await self.call("GET", path, token=None)

    async def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return await self.call("POST", path, body=body, **kw)


def caches_of(app: Application) -> dict[str, Callable[[], int]]:
    return {"mutex_keys": lambda: len(app.mutex), "traces": lambda: len(app.traces.recent())}


def wired_api(app: Application) -> HttpApi | None:
    """The API ``build_application`` put in the registry (its operations are attached by the bot)."""
    api = getattr(app, "http_api", None)
    return api if isinstance(api, HttpApi) else None


def make_api(app: Application, discord: Callable[[], bool], **kw: Any) -> HttpApi:
    """An API over ``app`` outside its registry (start and stop it yourself)."""
    sources = HealthSources(
        clock=app.clock,
        metrics=app.metrics,
        board=app.board,
        degradation=app.degradation,
        queue=app.storage,
        registry=app.registry,
        discord_connected=discord,
        caches=caches_of(app),
    )
    kw.setdefault("admin_token", TOKEN)
    kw.setdefault("operations", Operations(app))
    return HttpApi(sources, host="127.0.0.1", port=0, error_status=ERROR_STATUS, **kw)


@contextlib.asynccontextmanager
async def serving(
    data_dir: Path, gemini: GeminiEmulator, clock: FakeClock, **api_kw: Any
) -> AsyncIterator[Served]:
    """An application on ``data_dir`` with its registry started and an API on a loopback port.

    The application's own API (from ``HTTP_PORT=0`` and ``ADMIN_API_TOKEN``) when it has one and
    ``api_kw`` is empty; else an ``HttpApi(**api_kw)`` started beside the registry.
    """
    environ = {
        "DATA_DIR": str(data_dir),
        "GEMINI_BASE_URL": gemini.base_url,
        "GEMINI_API_KEY": API_KEY,
        "HTTP_PORT": "0",
        "ADMIN_API_TOKEN": TOKEN,
        "LOG_FORMAT": "console",
    }
    config = load_config(environ=environ, env_file=None)
    assert config.http_port == 0 and config.admin_api_token == TOKEN
    app = build_application(config, clock=clock)
    discord = Switch()
    own = wired_api(app)
    if own is not None and not api_kw:
        api, separate = own, False
        serve_operations(app)
        api.sources.discord_connected = discord
        api.sources.caches = caches_of(app)
    else:
        api, separate = make_api(app, discord, **api_kw), True
    await app.registry.start_all()
    try:
        if separate:
            await api.start()
        app.reload_settings()
        async with aiohttp.ClientSession() as http:
            yield Served(app, api, http, discord)
    finally:
        if separate:
            await api.stop()
        await app.registry.stop_all()


@pytest.fixture
async def gemini() -> AsyncIterator[GeminiEmulator]:
    async with GeminiEmulator(api_key=API_KEY) as emulator:
        yield emulator


@pytest.fixture
async def served(tmp_path: Path, gemini: GeminiEmulator, fake_clock: FakeClock) -> AsyncIterator[Served]:
    """A running application with the API on a loopback port; Discord reads as connected."""
    async with serving(tmp_path / "data", gemini, fake_clock) as s:
        s.discord.on = True
        yield s


# -- probes -----------------------------------------------------------------------------------


async def test_the_api_logs_the_port_it_bound_on_loopback_and_stops_cleanly(
    tmp_path: Path, gemini: GeminiEmulator, fake_clock: FakeClock
) -> None:
    with capture_logs() as logs:
        async with serving(tmp_path / "data", gemini, fake_clock) as s:
            [line] = [e for e in logs if e["event"] == "http_api.listening" and e["port"] == s.api.port]
            assert line["host"] == "127.0.0.1" and line["port"] == s.api.port
            assert isinstance(s.api.port, int) and s.api.port > 0
            status, body = await s.get("/live")
            assert status == 200 and body["alive"] is True
    assert any(entry["event"] == "http_api.stopped" for entry in logs)


async def test_ready_follows_discord_the_services_and_shutdown(served: Served) -> None:
    served.discord.on = False
    status, body = await served.get("/ready")
    assert (status, body) == (503, {"ready": False, "reasons": ["discord not connected"]})

    served.discord.on = True
    assert await served.get("/ready") == (200, {"ready": True, "reasons": []})

    served.api.set_shutting_down()
    status, body = await served.get("/ready")
    assert status == 503 and body["reasons"] == ["shutting down"]
    served.api.set_shutting_down(False)

    served.api.sources.registry = ServiceRegistry([served.app.metrics])  # one service, not started
    status, body = await served.get("/ready")
    assert status == 503 and body["reasons"] == ["service metrics is created"]


async def test_a_discord_probe_that_raises_reads_as_not_connected(served: Served) -> None:
    def broken() -> bool:
        raise RuntimeError("no client")

    served.api.sources.discord_connected = broken
    status, body = await served.get("/ready")
    assert status == 503 and body["reasons"] == ["discord not connected"]


# -- health views --------------------------------------------------------------------------------


async def test_status_is_healthy_then_degraded_then_unhealthy_with_reasons(served: Served) -> None:
    status, body = await served.get("/api/health/status")
    assert status == 200
    assert body == {"status": "healthy", "reasons": [], "mode": "normal", "uptime": body["uptime"]}

    served.app.board["gemini"].force_open(60, "test")
    await Operations(served.app).maintenance_on("back soon")
    status, body = await served.get("/api/health/status")
    assert status == 200 and body["status"] == "degraded" and body["mode"] == "maintenance"
    assert body["reasons"] == [
        "breaker gemini is open",
        "mode is maintenance (maintenance)",
        "service gemini reports a problem",  # its health() is not ok while its breaker is open
    ]

    served.discord.on = False
    status, body = await served.get("/api/health/status")
    assert status == 503 and body["status"] == "unhealthy"
    assert body["reasons"][0] == "discord not connected"


async def test_status_is_unhealthy_when_the_storage_breaker_is_open_and_says_the_queue_is_unreadable(
    served: Served,
) -> None:
    served.app.board["storage"].force_open(60, "disk")
    status, body = await served.get("/api/health/status")
    assert status == 503 and body["status"] == "unhealthy"
    assert body["reasons"] == ["breaker storage is open", "queue unreadable (circuit_open)"]
    status, body = await served.get("/api/health/degradation")
    assert status == 200 and body["queue"] is None and body["queue_error"] == "circuit_open"


async def test_circuits_lists_every_breaker(served: Served) -> None:
    status, body = await served.get("/api/health/circuits")
    assert status == 200
    assert [b["name"] for b in body["breakers"]] == served.app.board.names()
    assert body["breakers"][0] == {
        "name": "gemini",
        "state": "closed",
        "since": body["breakers"][0]["since"],
        "failures": 0,
        "remaining": 0.0,
        "last_error": None,
        "forced_reason": None,
    }


async def test_degradation_shows_the_mode_and_the_queue_depth(served: Served, fake_clock: FakeClock) -> None:
    await served.app.storage.enqueue(ItemKind.INBOUND, "channel:1", {"content": "hi"}, now=fake_clock.time())
    fake_clock.advance(5)
    status, body = await served.get("/api/health/degradation")
    assert status == 200
    assert body["mode"] == "normal" and body["queue_error"] is None
    assert set(body) == {"mode", "reason", "since", "message", "queue", "queue_error", "assessment"}
    assert body["assessment"] is None  # no health assessment attached to this bare application
    assert body["queue"]["pending"] == 1
    assert body["queue"]["oldest_pending_age"] == pytest.approx(5)
    assert body["queue"]["depth"]["inbound"]["pending"] == 1


async def test_degradation_shows_the_assessment_and_incidents_answer_once_attached(served: Served) -> None:
    """Before the bot attaches its tracker, /api/health/incidents is 503; then it is the report."""
    status, body = await served.get("/api/health/incidents")
    assert status == 503 and body["error"] == "unavailable"

    async def report() -> dict[str, Any]:
        return {"stored": True, "dependencies": [], "open": [], "incidents": []}

    served.app.http_api.sources.incidents = report
    served.app.http_api.sources.assessment = lambda: {"reasons": ["Gemini unavailable"]}
    status, body = await served.get("/api/health/incidents")
    assert status == 200 and body["stored"] is True
    status, body = await served.get("/api/health/degradation")
    assert body["assessment"] == {"reasons": ["Gemini unavailable"]}


async def test_services_lists_registry_states_in_start_order(served: Served) -> None:
    status, body = await served.get("/api/health/services")
    assert status == 200 and body["ok"] is True
    assert body["order"] == served.app.registry.order
    states = {name: s["state"] for name, s in body["services"].items()}
    assert states == dict.fromkeys(body["order"], "running")


async def test_memory_reports_rss_heap_and_caches_largest_first(served: Served) -> None:
    async with served.app.mutex.acquire("channel:1", 1.0):
        status, body = await served.get("/api/health/memory")
    assert status == 200
    assert body["rss_bytes"] > 10_000_000
    assert set(body["python"]) == {"allocated_blocks", "traced_bytes", "gc_counts", "gc_garbage"}
    assert body["python"]["allocated_blocks"] > 1000 and len(body["python"]["gc_counts"]) == 3
    assert body["caches"] == [{"name": "mutex_keys", "size": 1}, {"name": "traces", "size": 0}]


async def test_performance_uses_the_window_when_fed_and_the_histogram_otherwise(served: Served) -> None:
    metrics = served.app.metrics
    for seconds in (0.2, 0.3, 0.4, 3.0):
        metrics.observe_message("answered", seconds)
    status, body = await served.get("/api/health/performance")
    assert status == 200
    message = body["message_latency"]
    assert message["source"] == "histogram" and message["count"] == 4
    assert 0.25 <= message["p50"] <= 0.5 and 2.5 <= message["p99"] <= 5.0
    assert body["gemini_latency"] == {
        "source": "histogram", "count": 0, "p50": None, "p95": None, "p99": None, "max": None
    }

    for ms in range(1, 101):
        served.api.sources.message_latency.observe(ms / 1000)
    status, body = await served.get("/api/health/performance")
    assert body["message_latency"] == {
        "source": "window", "count": 100, "p50": 0.05, "p95": 0.095, "p99": 0.099, "max": 0.1
    }


async def test_external_gemini_shows_breaker_last_success_and_recent_error_rate(
    served: Served, gemini: GeminiEmulator, fake_clock: FakeClock
) -> None:
    status, body = await served.get("/api/health/external/gemini")
    assert status == 200
    assert body["breaker"]["name"] == "gemini" and body["last_success"] is None
    assert body["recent_calls"] == 0 and body["recent_error_rate"] is None

    status, result = await served.post("/api/test/gemini")
    assert status == 200 and result["ok"] is True
    gemini.faults.add("400", count=1)
    status, result = await served.post("/api/test/gemini")
    assert status == 200 and result["ok"] is False and result["category"] == "invalid_input"

    status, body = await served.get("/api/health/external/gemini")
    assert body["last_success"] is not None and body["last_error"] == "ClientError (400)"
    assert body["recent_calls"] == 2 and body["recent_errors"] == 1 and body["recent_error_rate"] == 0.5
    assert set(body) >= {"model", "exhausted_models", "last_error_at", "calls_by_outcome", "window_seconds"}

    # Counter samples are taken as views are read: once one is a window (300 s) old, it is the base.
    fake_clock.advance(400)
    body = (await served.get("/api/health/external/gemini"))[1]
    assert body["recent_calls"] == 2 and body["window_seconds"] == 400  # no newer sample yet
    fake_clock.advance(301)
    body = (await served.get("/api/health/external/gemini"))[1]
    assert body["window_seconds"] == 301
    assert (body["recent_calls"], body["recent_errors"], body["recent_error_rate"]) == (0, 0, None)


async def test_external_discord_shows_connection_breakers_and_errors(served: Served) -> None:
    status, body = await served.get("/api/health/external/discord")
    assert status == 200 and body["connected"] is True
    discord_breakers = [n for n in served.app.board.names() if n.startswith("discord.")]
    assert [b["name"] for b in body["breakers"]] == discord_breakers
    assert body["last_error"] is None and body["errors_by_operation"] == {} and body["recent_errors"] == 0


async def test_metrics_are_prometheus_text_and_count_requests_by_route_template(served: Served) -> None:
    await served.post("/api/admin/circuit/reset/gemini")
    await served.post("/api/admin/circuit/reset/storage")
    await served.get("/no/such/path")
    async with served.http.get(served.api.url + "/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["bot_http_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("/api/admin/circuit/reset/{name}", "200")] == 2
    assert requests[("<unmatched>", "404")] == 1
    assert "bot_breaker_state" in families and "process_resident_memory_bytes" in families


async def test_every_response_carries_its_trace_id_and_the_request_is_logged_with_it(served: Served) -> None:
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        async with served.http.get(served.api.url + "/live") as response:
            trace_id = response.headers["X-Trace-Id"]
    [line] = [entry for entry in logs if entry["event"] == "http_api.request"]
    assert line["status"] == 200 and line["route"] == "/live" and line["method"] == "GET"
    assert line["trace_id"] == trace_id and len(trace_id) == 12


class CountingQueue:
    """The application's real store as the API's queue source, counting the API's reads of it."""

    def __init__(self, store: QueueStatsSource) -> None:
        self.store = store
        self.reads = 0

    async def stats(self, *, now: float) -> QueueStats:
        self.reads += 1
        return await self.store.stats(now=now)


async def test_health_routes_read_the_queue_from_sqlite_at_most_once_a_second_each(
    served: Served, fake_clock: FakeClock
) -> None:
    """A flood of health requests costs one SQLite query per route and second, not one each."""
    counting = CountingQueue(served.app.storage)
    served.api.sources.queue = counting
    for route in ("/api/health/status", "/api/health/degradation"):
        answers = await asyncio.gather(*(served.get(route) for _ in range(25)))  # at once
        answers += [await served.get(route) for _ in range(25)]  # one after another
        assert [status for status, _ in answers] == [200] * 50
    assert counting.reads == 2  # one per route

    await served.app.storage.enqueue(ItemKind.INBOUND, "channel:1", {"content": "hi"}, now=fake_clock.time())
    fake_clock.advance(0.99)
    assert (await served.get("/api/health/degradation"))[1]["queue"]["pending"] == 0  # the cached reading
    fake_clock.advance(0.01)
    assert (await served.get("/api/health/degradation"))[1]["queue"]["pending"] == 1  # a second later: fresh
    assert counting.reads == 3


HEALTH_ROUTES = [
    "/api/health/status",
    "/api/health/circuits",
    "/api/health/degradation",
    "/api/health/services",
    "/api/health/memory",
    "/api/health/performance",
    "/api/health/external/gemini",
    "/api/health/external/discord",
]


async def test_health_bodies_name_files_without_their_absolute_paths_unless_the_admin_token_is_sent(
    served: Served, tmp_path: Path
) -> None:
    database = served.app.storage.path
    assert database.is_absolute() and database.is_relative_to(tmp_path)
    for token in (None, "wrong-token-0123456789"):
        for path in HEALTH_ROUTES:
            async with served.http.get(
                served.api.url + path, headers={"Authorization": f"Bearer {token}"} if token else {}
            ) as response:
                text = await response.text()
            assert str(tmp_path) not in text, (path, token)
    status, body = await served.get("/api/health/services")
    assert status == 200 and body["services"]["storage"]["path"] == database.name  # the name stays
    files = body["services"]["datastore"]["files"]
    assert files and all(f["path"] == f["name"] + ".json" for f in files.values())

    status, body = await served.call("GET", "/api/health/services")  # with the admin token
    assert status == 200 and body["services"]["storage"]["path"] == str(database)  # full detail


# -- admin: authentication -------------------------------------------------------------------------

ADMIN_ROUTES = [
    "/api/admin/maintenance/enable",
    "/api/admin/maintenance/disable",
    "/api/admin/circuit/reset/all",
    "/api/admin/circuit/open/gemini",
    "/api/admin/queue/process",
    "/api/admin/datastore/validate",
    "/api/admin/datastore/validate/maintenance",
    "/api/admin/datastore/recover/maintenance",
    "/api/admin/mutex/release/channel:1",
    "/api/admin/gc",
    "/api/admin/discord/reconnect",
    "/api/test/gemini",
]


async def test_admin_routes_refuse_a_missing_or_wrong_token_with_401(served: Served) -> None:
    for path in ADMIN_ROUTES:
        for token in (None, "wrong", TOKEN + "x", ""):
            status, body = await served.post(path, token=token)
            assert status == 401 and body["error"] == "unauthorized", (path, token)
            assert "Authorization: Bearer" in body["message"]
    async with served.http.post(
        served.api.url + "/api/admin/gc", headers={"Authorization": f"Basic {TOKEN}"}
    ) as response:
        assert response.status == 401 and response.headers["WWW-Authenticate"] == "Bearer"
    assert served.app.board["gemini"].state is BreakerState.CLOSED  # nothing ran


async def test_with_no_admin_token_configured_admin_routes_answer_403_and_say_why(
    tmp_path: Path, gemini: GeminiEmulator, fake_clock: FakeClock
) -> None:
    async with serving(tmp_path / "data", gemini, fake_clock, admin_token=None) as s:
        for path in ADMIN_ROUTES:
            for token in (None, TOKEN):
                status, body = await s.post(path, token=token)
                assert status == 403 and body["error"] == "admin_disabled", path
                assert "ADMIN_API_TOKEN" in body["message"]
        assert (await s.get("/live"))[0] == 200  # read-only routes need no token


# -- admin: the actions ----------------------------------------------------------------------------


async def test_maintenance_enable_and_disable(served: Served) -> None:
    status, body = await served.post("/api/admin/maintenance/enable", {"message": "Upgrading, back at 5"})
    assert status == 200
    assert body == {
        "enabled": True, "message": "Upgrading, back at 5", "since": body["since"], "by": "http",
        "mode": "maintenance",
    }
    status, body = await served.post("/api/admin/maintenance/enable")  # no body: the default notice
    assert status == 200 and body["enabled"] is True and body["message"]
    status, body = await served.post("/api/admin/maintenance/disable")
    assert status == 200 and body["enabled"] is False and body["mode"] == "normal"


async def test_circuit_open_and_reset(served: Served, fake_clock: FakeClock) -> None:
    opening = {"duration": 120, "reason": "incident"}
    status, body = await served.post("/api/admin/circuit/open/gemini", opening)
    assert status == 200
    assert body == {
        "name": "gemini", "state": "open", "duration": 120.0, "until": fake_clock.time() + 120,
        "reason": "incident",
    }
    status, body = await served.post("/api/admin/circuit/open/discord.send")
    assert status == 200 and body["duration"] is None
    status, body = await served.post("/api/admin/circuit/reset/all")
    assert status == 200
    assert body["reset"] == served.app.board.names()
    assert sorted(body["overrides_removed"]) == ["discord.send", "gemini"]
    assert all(b.state is BreakerState.CLOSED for b in served.app.board)


async def test_queue_process_datastore_gc_and_mutex_release(served: Served) -> None:
    status, body = await served.post("/api/admin/queue/process")
    assert status == 200 and body["pending"] == 0 and body["blocked_by"] == [] and body["woken"] is False

    status, body = await served.post("/api/admin/datastore/validate")
    assert status == 200 and body["ok"] is True
    assert {f["name"] for f in body["files"]} == set(served.app.store.names())
    status, body = await served.post("/api/admin/datastore/validate/maintenance")
    assert status == 200 and [f["name"] for f in body["files"]] == ["maintenance"]
    status, body = await served.post("/api/admin/datastore/recover/maintenance")
    assert status == 200 and body["name"] == "maintenance" and body["alert"] is False

    status, body = await served.post("/api/admin/gc")
    assert status == 200 and set(body) == {"collected", "garbage", "rss_before", "rss_after"}

    mutex = served.app.mutex
    async with mutex.acquire("thread:5/a", 1.0):  # any key, slashes too
        status, body = await served.post("/api/admin/mutex/release/thread:5/a")
        assert status == 200 and body["key"] == "thread:5/a" and body["released"] is True
        assert not mutex.locked("thread:5/a")


async def test_discord_reconnect_without_a_connected_client_is_503(served: Served) -> None:
    status, body = await served.post("/api/admin/discord/reconnect")
    assert status == 503 and body["error"] == "unavailable"
    assert "not connected" in body["message"]


async def test_unknown_names_are_404_and_list_the_valid_ones(served: Served) -> None:
    board_names = served.app.board.names()
    files = served.app.store.names()
    cases = {
        "/api/admin/circuit/reset/gemnii": ("breaker", [*board_names, "all"]),
        "/api/admin/circuit/open/all": ("breaker", board_names),
        "/api/admin/datastore/validate/nope": ("datastore file", files),
        "/api/admin/datastore/recover/nope": ("datastore file", files),
        "/api/admin/mutex/release/channel:9": ("held lock", []),
    }
    for path, (kind, valid) in cases.items():
        status, body = await served.post(path)
        assert status == 404, path
        assert body["error"] == "unknown_name" and body["kind"] == kind and body["valid"] == valid, path
        assert body["name"] == path.rsplit("/", 1)[1]


async def test_malformed_bodies_are_400(served: Served) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("/api/admin/maintenance/enable", {"raw": b"{not json"}),
        ("/api/admin/maintenance/enable", {"raw": b"\xff\xfe"}),
        ("/api/admin/maintenance/enable", {"body": ["a list"]}),
        ("/api/admin/maintenance/enable", {"body": {"message": 5}}),
        ("/api/admin/maintenance/enable", {"body": {"mesage": "typo"}}),
        ("/api/admin/circuit/open/gemini", {"body": {"duration": "ten"}}),
        ("/api/admin/circuit/open/gemini", {"body": {"duration": True}}),
        ("/api/admin/gc", {"body": {"anything": 1}}),
    ]
    for path, kw in cases:
        status, body = await served.post(path, **kw)
        assert status == 400 and body["error"] == "invalid_body", (path, kw, body)
    # Well-formed but refused by the operation itself.
    status, body = await served.post("/api/admin/circuit/open/gemini", {"duration": -5})
    assert status == 400 and body["error"] == "invalid_request" and "positive" in body["message"]
    status, body = await served.post("/api/admin/maintenance/enable", {"message": "x" * 5000})
    assert status == 400 and body["error"] == "invalid_request"
    assert served.app.board["gemini"].state is BreakerState.CLOSED


async def raw_exchange(port: int, request: bytes, *, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send ``request`` as raw bytes on a new connection; (status, body) of what came back before close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(timeout):
            response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def test_a_non_ascii_authorization_header_is_401_not_500(served: Served) -> None:
    """The header is compared as bytes: bytes that are not UTF-8 are just a wrong token."""
    for value in (b"Bearer \xff\xfe", b"\xff\xfe", b"Bearer " + TOKEN.encode() + b"\xff", b"B\xe9arer x"):
        request = (
            b"POST /api/admin/gc HTTP/1.1\r\nHost: test\r\nAuthorization: " + value
            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        with capture_logs() as logs:
            status, body = await raw_exchange(served.api.port, request)
        assert status == 401 and json.loads(body)["error"] == "unauthorized", value
        assert not [e for e in logs if e["log_level"] == "error"], value
    status, _ = await raw_exchange(
        served.api.port,
        b"POST /api/admin/gc HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + TOKEN.encode()
        + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    assert status == 200  # the right token, sent the same raw way, still works


async def test_a_deeply_nested_body_is_400_invalid_body_not_500(served: Served) -> None:
    for raw in (b"[" * 30_000, b'{"a":' * 10_000):
        with capture_logs() as logs:
            status, body = await served.post("/api/admin/maintenance/enable", raw=raw)
        assert status == 400 and body["error"] == "invalid_body", body
        assert "nested" in body["message"]
        assert not [e for e in logs if e["log_level"] == "error"]
    assert served.app.degradation.snapshot().mode == "normal"  # nothing ran


MALFORMED_REQUESTS = [
    b"GARBAGE\r\n\r\n",  # not HTTP at all
    b"GET / FOO\r\n\r\n",  # a broken request line
    b"GET /live HTTP/9.9\r\n\r\n",  # an unknown version
    b"GET /live HTTP/1.1\r\nno colon in this header\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",  # a request line over the limit
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS ClientHello on the plain port
]


async def test_malformed_requests_get_400_and_one_warning_line_without_a_traceback(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    for request in MALFORMED_REQUESTS:
        with capture_logs() as logs:
            status, _ = await raw_exchange(served.api.port, request)
        assert status == 400, request[:20]
        [line] = [e for e in logs if e["event"] == "http_api.bad_request"]
        assert line["log_level"] == "warning" and line["status"] == 400, line
        assert "\n" not in line["reason"] and len(line["reason"]) <= 120
    aiohttp_records = [r for r in caplog.records if r.name.startswith("aiohttp")]
    noisy = [r for r in aiohttp_records if r.exc_info or r.levelno >= logging.ERROR]
    assert noisy == [], [(r.name, r.levelname, r.getMessage()) for r in noisy]
    assert (await served.get("/live"))[0] == 200  # the server still answers


async def test_a_dependency_failure_is_503_with_its_category_and_no_stack(served: Served) -> None:
    served.app.board["storage"].force_open(60, "disk trouble")
    with capture_logs() as logs:
        status, body = await served.post("/api/admin/queue/process")
    [line] = [e for e in logs if e["event"] == "http_api.dependency_failed"]
    assert line["log_level"] == "warning" and line["category"] == "circuit_open"  # expected, not a bug
    assert status == 503
    assert body["error"] == "dependency_failure" and body["category"] == "circuit_open"
    assert body["retryable"] is True and body["trace_id"]
    assert "Traceback" not in json.dumps(body)


class BrokenOperations(Operations):
    """Real operations whose ``gc`` has a bug and whose ``mutex_release`` never finishes."""

    async def gc(self, *, by: str | None = None) -> Any:
        raise KeyError(f"bug with a secret {TOKEN}")

    async def mutex_release(self, key: str, *, by: str | None = None) -> Any:
        await asyncio.Event().wait()


async def test_a_bug_is_500_without_details_and_a_stuck_action_is_504_while_others_answer(
    tmp_path: Path, gemini: GeminiEmulator, fake_clock: FakeClock
) -> None:
    async with serving(tmp_path / "data", gemini, fake_clock, timeout=0.05) as s:
        s.api.attach_operations(BrokenOperations(s.app))
        with capture_logs() as logs:
            status, body = await s.post("/api/admin/gc")
        assert status == 500 and body["error"] == "internal" and body["category"] == "internal"
        assert TOKEN not in json.dumps(body) and "KeyError" not in json.dumps(body)
        assert any(entry["event"] == "http_api.handler_failed" for entry in logs)

        stuck = asyncio.create_task(s.post("/api/admin/mutex/release/channel:1"))
        assert (await s.get("/live"))[0] == 200  # the server answers while an action hangs
        status, body = await stuck
        assert status == 504 and body["error"] == "timeout"


async def test_unknown_paths_and_wrong_methods_answer_json(served: Served) -> None:
    status, body = await served.get("/api/health/nope")
    assert status == 404 and body["error"] == "not_found"
    status, body = await served.call("GET", "/api/admin/gc")
    assert status == 405 and body["error"] == "method_not_allowed"
    status, body = await served.call("POST", "/live")
    assert status == 405


async def test_admin_routes_answer_503_until_operations_are_attached(
    tmp_path: Path, gemini: GeminiEmulator, fake_clock: FakeClock
) -> None:
    async with serving(tmp_path / "data", gemini, fake_clock, operations=None) as s:
        status, body = await s.post("/api/admin/gc")
        assert status == 503 and body["error"] == "unavailable"
        s.api.attach_operations(Operations(s.app))
        assert (await s.post("/api/admin/gc"))[0] == 200


# -- with a real bot ---------------------------------------------------------------------------------


async def test_with_a_real_bot_ready_turns_200_and_reconnect_resumes_the_gateway(tmp_path: Path) -> None:
    async with (
        running_emulators(heartbeat_interval=1.0) as emus,
        live_bot(emus, tmp_path / "data", ADMIN_API_TOKEN=TOKEN) as live,
    ):
        bot = live.bot
        api = wired_api(live.app) or make_api(live.app, lambda: bot.is_ready() and not bot.is_closed())
        separate = api.port is None  # not started by the application's registry
        if separate:
            await api.start()
        try:
            async with aiohttp.ClientSession() as http:
                served = Served(live.app, api, http, Switch())
                assert await served.get("/ready") == (200, {"ready": True, "reasons": []})
                assert (emus.discord.identify_count, emus.discord.resume_count) == (1, 0)
                status, body = await served.post("/api/admin/discord/reconnect")
                assert (status, body) == (200, {"closed": True, "code": 4000})
                await emus.discord.wait_until(lambda: emus.discord.resume_count == 1, 10)
                assert emus.discord.identify_count == 1  # resumed, not re-identified
                assert (await served.get("/ready"))[0] == 200
        finally:
            if separate:
                await api.stop()
