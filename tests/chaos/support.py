"""What every chaos scenario does: start the real bot process, read its HTTP API, check the outcome.

- :func:`started_bot`: ``spawn_bot`` + ``wait_ready`` + the bot's :class:`BotApi` (port read
  from its ``http_api.listening`` log line, bearer token from its environment).
- :class:`BotApi`: GET/POST on the bot's loopback HTTP API; ``breakers()``, ``queue()``,
  ``wait_queue_empty()``, ``memory()``.
- :class:`Watch`: ``async with Watch(api) as watch:`` samples breakers, queue depth (and, with
  ``ready=True``, ``/ready``) in the background while a fault lasts.
- :func:`assert_promise_kept`: every message answered or told why, none lost, none answered
  twice, answers in order per conversation; the bot's log clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from rehearsal.ledger import Ledger, Tally
from rehearsal.simulate import parse_metrics
from tests.integration.harness import BotProcess, Emulators

POLL_SECONDS = 0.05


@dataclass
class BotApi:
    """The running bot child's HTTP API on 127.0.0.1."""

    proc: BotProcess
    base: str
    token: str
    session: aiohttp.ClientSession

    async def get(self, path: str) -> Any:
        async with self.session.get(self.base + path) as response:
            return await response.json()

    async def post(self, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.session.post(self.base + path, json=body, headers=headers) as response:
            return response.status, await response.json()

    async def breakers(self) -> dict[str, str]:
        """Breaker name -> state (``closed``, ``open``, ``half_open``)."""
        body = await self.get("/api/health/circuits")
        return {row["name"]: row["state"] for row in body["breakers"]}

    async def queue(self) -> dict[str, Any]:
        """The degradation view: ``mode`` and ``queue`` (``pending``, ``depth``, ...)."""
        return await self.get("/api/health/degradation")

    async def metrics(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        """The bot's /metrics, parsed: sample name -> [(labels, value)]."""
        async with self.session.get(self.base + "/metrics") as response:
            return parse_metrics(await response.text())

    async def memory(self) -> dict[str, Any]:
        return await self.get("/api/health/memory")

    async def wait_until(self, check: Callable[[], Any], timeout: float) -> None:
        """Poll the async predicate ``check()`` until it is true; raises ``TimeoutError``."""
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(POLL_SECONDS)

    async def wait_queue_empty(self, timeout: float) -> float:
        """Wait until the durable queue holds nothing pending; return the seconds it took."""
        started = time.monotonic()

        async def empty() -> bool:
            queue = (await self.queue())["queue"]
            return queue is not None and queue["pending"] == 0

        await self.wait_until(empty, timeout)
        return time.monotonic() - started

    async def wait_breaker(self, name: str, state: str, timeout: float) -> None:
        async def reached() -> bool:
            return (await self.breakers()).get(name) == state

        await self.wait_until(reached, timeout)


class Watch:
    """What the bot's HTTP API showed while a fault lasted, sampled every ``interval`` seconds.

    ``states``: breaker name -> every state seen; ``first_seen``: (name, state) -> monotonic time
    of its first sighting; ``max_pending``: the largest queue depth; ``not_ready``: the reasons of
    each ``/ready`` refusal (sampled only with ``ready=True``).
    """

    MAX_SAMPLES = 4000  # a hard bound, far beyond any scenario

    def __init__(
        self, api: BotApi, interval: float = 0.1, *, queue: bool = True, ready: bool = False
    ) -> None:
        self.api = api
        self.interval = interval
        self.queue = queue
        self.ready = ready
        self.states: dict[str, set[str]] = {}
        self.first_seen: dict[tuple[str, str], float] = {}
        self.max_pending = 0
        self.not_ready: list[list[str]] = []
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    def saw(self, breaker: str, state: str) -> bool:
        return state in self.states.get(breaker, set())

    async def __aenter__(self) -> Watch:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while self.samples < self.MAX_SAMPLES:
            self.samples += 1
            for name, state in (await self.api.breakers()).items():
                self.states.setdefault(name, set()).add(state)
                self.first_seen.setdefault((name, state), time.monotonic())
            if self.queue:
                queue = (await self.api.queue())["queue"]
                if queue is not None:
                    self.max_pending = max(self.max_pending, int(queue["pending"]))
            if self.ready:
                body = await self.api.get("/ready")
                if not body["ready"]:
                    self.not_ready.append(body["reasons"])
            await asyncio.sleep(self.interval)


@contextlib.asynccontextmanager
async def started_bot(
    spawn_bot: Callable[..., BotProcess], emulators: Emulators, env: dict[str, str], *, timeout: float = 20.0
) -> AsyncIterator[BotApi]:
    """Start a bot child with ``env``; once it is ready, yield its API (teardown kills the child)."""
    proc = spawn_bot(env=env)
    await proc.wait_ready(emulators, timeout=timeout)
    line = await proc.wait_for_log(lambda r: r.get("event") == "http_api.listening", timeout=timeout)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield BotApi(proc, f"http://127.0.0.1:{line['port']}", env["ADMIN_API_TOKEN"], session)


def assert_promise_kept(
    ledger: Ledger,
    procs: Iterable[BotProcess] = (),
    *,
    allow: Iterable[str | re.Pattern[str]] = (),
    ordered: bool = True,
) -> Tally:
    """Every message answered or told why, none lost or answered twice (in order per conversation
    unless ``ordered=False``), and no bot log with an error or an unhandled exception."""
    tally = ledger.tally()
    owed = [ledger.describe(a) for a in ledger.unsettled()[:10]]
    assert tally.lost == 0, f"{tally.lost} of {tally.sent} messages lost, e.g. {owed}"
    twice = [ledger.describe(a) for a in ledger.asked.values() if a.duplicated][:10]
    assert tally.duplicated == 0, f"{tally.duplicated} answered twice, e.g. {twice}"
    if ordered:
        assert tally.out_of_order == 0, f"answers out of order in channels {ledger.out_of_order()}"
    for proc in procs:
        proc.assert_clean_logs(allow=allow)
    return tally
