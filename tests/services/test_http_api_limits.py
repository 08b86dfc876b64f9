"""The HTTP API's connection limits against raw sockets: header timeout, connection cap, linger.

Each test serves a real ``HttpApi`` on 127.0.0.1 port 0 with short limits and opens plain
TCP connections that send nothing, or half a request head, as a slowloris client would.
Every wait is bounded; no assertion depends on how fast the machine is: a close may come late,
never early (aiohttp's timers run on the loop's monotonic clock, the one read here).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from structlog.testing import capture_logs

from resilience.breakers import BreakerBoard
from resilience.clock import FakeClock
from resilience.degradation import DegradationState, QueueStats
from services.http_api import HealthSources, HttpApi
from services.metrics import Metrics

WAIT = 10.0  # the bound on every wait for the server: far above any expected delay


class UnreadQueue:
    """A queue source for routes that never read the queue (``/live``): reading it is a test bug."""

    async def stats(self, *, now: float) -> QueueStats:
        raise AssertionError("this test reads no queue")


@contextlib.asynccontextmanager
async def serving(**kw: Any) -> AsyncIterator[HttpApi]:
    """An ``HttpApi(**kw)`` listening on a loopback port, stopped on exit."""
    clock = FakeClock()
    sources = HealthSources(
        clock=clock,
        metrics=Metrics(process_metrics=False),
        board=BreakerBoard(clock),
        degradation=DegradationState(clock),
        queue=UnreadQueue(),
    )
    api = HttpApi(sources, host="127.0.0.1", port=0, **kw)
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


async def until(check: Callable[[], bool]) -> None:
    """Wait (bounded) for a condition on the server's side of the sockets."""
    async with asyncio.timeout(WAIT):
        while not check():
            await asyncio.sleep(0.005)


def open_count(api: HttpApi) -> int:
    return int(api.health()["connections"]["open"])


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def live_status(api: HttpApi) -> int:
    async with aiohttp.ClientSession() as http, http.get(api.url + "/live") as response:
        return response.status


async def test_connections_that_never_finish_their_request_head_are_closed_after_the_header_timeout(
) -> None:
    """100 sockets, silent or with half a request head: each is closed, unanswered, no sooner
    than ``header_timeout`` after it opened; meanwhile a normal request gets its answer."""
    header_timeout = 1.0
    connected = 0
    async with serving(header_timeout=header_timeout, max_connections=200) as api:

        async def slow_client(half_a_head: bool) -> tuple[bytes, float]:
            nonlocal connected
            opened = time.monotonic()  # before connecting: the server's timer starts later
            reader, writer = await connect(api.port)
            connected += 1
            try:
                if half_a_head:
                    writer.write(b"GET /live HTTP/1.1\r\nHost: test\r\nX-Slow: ")
                data = await reader.read()  # until the server closes
                return data, time.monotonic() - opened
            finally:
                writer.close()

        async with asyncio.timeout(WAIT):
            clients = [asyncio.create_task(slow_client(i % 2 == 1)) for i in range(100)]
            await until(lambda: connected == 100)
            assert await live_status(api) == 200
            results = await asyncio.gather(*clients)
        assert [data for data, _ in results] == [b""] * 100  # closed without an answer
        assert min(seconds for _, seconds in results) >= header_timeout
        await until(lambda: open_count(api) == 0)


async def test_connections_past_the_cap_are_closed_at_once_and_a_freed_slot_serves_again() -> None:
    async with serving(max_connections=4, header_timeout=60) as api:
        held = [await connect(api.port) for _ in range(4)]
        await until(lambda: open_count(api) == 4)
        with capture_logs() as logs:
            for _ in range(3):
                reader, writer = await connect(api.port)
                async with asyncio.timeout(WAIT):
                    assert await reader.read() == b""  # closed before it sent a byte
                writer.close()
        assert api.health()["connections"] == {"open": 4, "limit": 4, "refused": 3}
        warnings = [e for e in logs if e["event"] == "http_api.connection_limit"]
        assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"  # once, not per connection

        held.pop()[1].close()
        await until(lambda: open_count(api) == 3)
        with capture_logs() as logs:
            assert await live_status(api) == 200
        [cleared] = [e for e in logs if e["event"] == "http_api.connection_limit_cleared"]
        assert cleared["refused"] == 3
        for _, writer in held:
            writer.close()


async def test_an_unread_request_body_holds_the_connection_only_for_the_linger_timeout() -> None:
    """A GET announcing a body it never sends gets its answer, then the connection closes."""
    async with serving(linger_timeout=0.2, header_timeout=60) as api:
        reader, writer = await connect(api.port)
        try:
            writer.write(b"GET /live HTTP/1.1\r\nHost: test\r\nContent-Length: 1000\r\n\r\n")
            async with asyncio.timeout(WAIT / 2):  # aiohttp's default linger is 10 s
                response = await reader.read()
        finally:
            writer.close()
        assert response.startswith(b"HTTP/1.1 200 ")
        await until(lambda: open_count(api) == 0)
