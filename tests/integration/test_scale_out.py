"""Two bot processes on one PostgreSQL database act as one bot.

Two real ``GeminiBot`` applications (in one test process, each with its own store, pool, session,
data directory and breakers) log in to the same emulated Discord, which, like Discord without
sharding, delivers every message to both. They share one database (``DATABASE_URL``, a real
PostgreSQL from tests/pg.py): each message is answered once, an operator's action in one reaches
the other within a second, and ``/status`` shows both.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.app import Application, build_application
from bot.client import GeminiBot
from bot.texts import ACK_MARK
from resilience.breakers import BreakerState
from resilience.degradation import Mode
from sandbox.discord_emu import SentMessage
from services.config import load_config
from tests.integration.harness import TEST_SETTINGS, Emulators, pointed_at, running_emulators
from tests.pg import PostgresServer

SECOND = 1.0


@dataclass
class Process:
    app: Application
    bot: GeminiBot


@contextlib.asynccontextmanager
async def bot_process(emus: Emulators, data_dir: Path, database_url: str) -> AsyncIterator[Process]:
    environ = {
        **emus.settings(), **TEST_SETTINGS, "DATA_DIR": str(data_dir), "LOG_FORMAT": "console",
        "DATABASE_URL": database_url, "DATABASE_POOL_SIZE": "4",
    }
    config = load_config(environ=environ, env_file=None)
    app = build_application(config)
    bot = GeminiBot(app, guild_ready_timeout=0.05, drain_interval=0.05, check_models=False)
    task = asyncio.create_task(bot.start(config.discord_token or ""))
    try:
        async with asyncio.timeout(15):
            while not bot.is_ready():
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
        yield Process(app, bot)
    finally:
        await bot.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


@pytest.fixture
async def two(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[Emulators, Process, Process]]:
    async with running_emulators(heartbeat_interval=1.0) as emus:
        with pointed_at(emus.discord):
            async with (
                bot_process(emus, tmp_path / "a", pg_url) as a,
                bot_process(emus, tmp_path / "b", pg_url) as b,
            ):
                yield emus, a, b


async def within(seconds: float, condition: Callable[[], bool]) -> float:
    """Wait until ``condition()`` holds; how long it took (fails after ``seconds``)."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < seconds, f"not within {seconds} s"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def answers(emus: Emulators, channel: int, message_id: str) -> list[SentMessage]:
    return [
        m for m in emus.discord.sent_messages(channel)
        if str((m.message_reference or {}).get("message_id")) == message_id
        and not m.content.startswith(ACK_MARK)
    ]


async def test_every_message_both_processes_receive_is_answered_once(
    two: tuple[Emulators, Process, Process], pg_url: str, pg_server: PostgresServer
) -> None:
    """Both processes get each message (no sharding); the processed ids in the shared database let
    exactly one of them accept it, and the other ignores it as seen."""
    emus, _, _ = two
    general = emus.discord.channels["general"]
    say = emus.discord.send_user_message
    sent = [await say(general, author="normal", content=f"hello {n}", mentions_bot=True) for n in range(12)]
    ids = [str(m["id"]) for m in sent]
    await emus.discord.wait_until(lambda: all(answers(emus, general, i) for i in ids), 20)
    await asyncio.sleep(1.0)  # time for a second answer, were one coming
    assert [len(answers(emus, general, i)) for i in ids] == [1] * 12
    assert pg_server.fetch(pg_url, "SELECT COUNT(*) FROM processed") == [(12,)]
    assert pg_server.fetch(pg_url, "SELECT COUNT(DISTINCT dedup_key) FROM queue") == [(12,)]


async def test_an_admin_action_in_one_process_reaches_the_other_within_a_second(
    two: tuple[Emulators, Process, Process],
) -> None:
    _, a, b = two
    gemini = b.app.board["gemini"]
    await a.bot.operations.circuit_open("gemini", reason="Gemini incident", by="test")
    took = await within(SECOND, lambda: gemini.state is BreakerState.OPEN)
    assert gemini.snapshot().forced_reason == "Gemini incident"
    await a.bot.operations.circuit_reset("gemini", by="test")
    took = max(took, await within(SECOND, lambda: gemini.state is BreakerState.CLOSED))

    await a.bot.operations.maintenance_on("Back at noon", by="test")
    took = max(took, await within(SECOND, lambda: b.app.degradation.mode is Mode.MAINTENANCE))
    assert b.app.maintenance() == "Back at noon"
    await a.bot.operations.maintenance_off(by="test")
    took = max(took, await within(SECOND, lambda: b.app.degradation.mode is Mode.NORMAL))

    await a.bot.operations.guild_tool_set(1, "google_search", True, by="test")
    took = max(took, await within(SECOND, lambda: b.app.guild_tools(1) == ("google_search",)))

    woken: list[float] = []
    drain_wake = b.app.drain_waker
    assert drain_wake is not None
    b.app.drain_waker = lambda: (woken.append(time.monotonic()), drain_wake())[1]
    await a.bot.operations.queue_drain(by="test")
    took = max(took, await within(SECOND, lambda: bool(woken)))

    await a.bot.operations.load_shed(queue_new_messages=True, user_per_minute=2, by="test")
    took = max(took, await within(SECOND, lambda: b.app.queue_new_messages))
    assert b.app.ratelimiter.status()["per_user"] == 2
    print(f"slowest action to reach the other process: {took * 1000:.0f} ms")


async def test_status_shows_every_process_and_one_that_stopped_as_gone(
    pg_url: str, tmp_path: Path
) -> None:
    async with running_emulators(heartbeat_interval=1.0) as emus:
        with pointed_at(emus.discord):
            async with bot_process(emus, tmp_path / "a", pg_url) as a:
                async with bot_process(emus, tmp_path / "b", pg_url) as b:
                    await b.bot.operations.circuit_open("gemini", by="test")
                    await b.bot._beat()  # its heartbeat, now rather than in 5 s
                    commands = a.bot.install_commands()
                    embed = await commands.status_embed()
                    [field] = [f for f in embed.fields if f.name == "Processes"]
                    lines = (field.value or "").splitlines()
                    assert len(lines) == 2 and sum("(this one)" in line for line in lines) == 1
                    [other] = [line for line in lines if "(this one)" not in line]
                    assert "gemini open" in other and "heartbeat" in other
                rows = await a.bot.operations.processes(by="test")
                assert [(r["this"], r["alive"]) for r in rows] == [(True, True), (False, False)]
                embed = await a.bot.install_commands().status_embed()
                [field] = [f for f in embed.fields if f.name == "Processes"]
                assert "gone (stopped)" in (field.value or "")
