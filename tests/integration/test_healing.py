"""Self-healing on the whole bot in-process: each fault provoked in the sandbox and seen healed.

The real ``GeminiBot`` (discord.py, google-genai) against the emulators, with short settings so
each test takes seconds: a silent gateway is reconnected (and RESUMEs) long before discord.py's own
60 s timeout; a DataStore file corrupted on disk comes back from its backup; the HTTP API whose
listening socket died is restarted through the registry; memory above the threshold is trimmed and
collected, at most the bound an hour however often the assessment runs. The history is shown by
``GET /api/health/healing`` (admin token) and ``/admin healing`` (owners).

Every wait is bounded; nothing depends on how fast the machine is, only on the order of events.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.healing import DATASTORE, DONE, GATEWAY, HELD, MEMORY, RESTART, HealingRecord
from resilience.registry import ServiceState
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot
from tests.integration.test_slash_commands import only_text, run

TOKEN = secrets.token_urlsafe(24)
FAST = {"HEALTH_INTERVAL_SECONDS": "0.2", "ADMIN_API_TOKEN": TOKEN}
DISCORD_PY_HEARTBEAT_TIMEOUT = 60.0


@pytest.fixture
async def emulated(tmp_path: Path) -> AsyncIterator[Any]:
    """The emulators (gateway heartbeat every second) and an ``owner`` member on ADMIN_USER_IDS."""
    async with running_emulators(heartbeat_interval=1.0) as emus:
        emus.owner = emus.discord.world.add_member("owner", "carol")
        yield emus


def actions(live: Live, kind: str) -> list[HealingRecord]:
    """The healer's actions of ``kind``, oldest first."""
    return [r for r in reversed(live.app.healer.history()) if r.kind == kind]


async def wait_action(live: Live, kind: str, outcome: str = DONE, *, timeout: float = 15) -> None:
    """Wait (bounded) for the healer's first action of ``kind`` that ended with ``outcome``."""
    async with asyncio.timeout(timeout):
        while not any(r.outcome == outcome for r in actions(live, kind)):
            await asyncio.sleep(0.02)


def counted(live: Live, kind: str, outcome: str) -> float:
    return live.app.metrics.healing_actions.labels(kind, outcome)._value.get()


async def test_a_silent_gateway_is_reconnected_and_resumed_long_before_discord_pys_own_timeout(
    emulated: Any, tmp_path: Path
) -> None:
    """The emulator stops sending (no heartbeat ACK, no event) on the live connection; a question
    asked meanwhile is buffered in the session. With HEAL_GATEWAY_SILENCE_SECONDS=2 (and the 1 s
    heartbeat: a limit of 1 + 3 s) the healer closes the socket; discord.py RESUMEs, the question is
    replayed and answered. discord.py alone would wait 60 s of silence: the bound below is 40 s."""
    async with live_bot(emulated, tmp_path / "data", HEAL_GATEWAY_SILENCE_SECONDS="2", **FAST) as live:
        assert live.bot._connection.heartbeat_timeout == DISCORD_PY_HEARTBEAT_TIMEOUT
        discord = live.discord
        resumed, identified = discord.resume_count, discord.identify_count
        silenced_at = time.monotonic()
        discord.set_silent(True)
        question = await live.say("are you still there?")
        await discord.wait_until(lambda: discord.resume_count > resumed, timeout=40)
        assert time.monotonic() - silenced_at < DISCORD_PY_HEARTBEAT_TIMEOUT
        assert discord.identify_count == identified  # resumed, not a new session
        [answer] = await live.wait_replies(question["id"], timeout=15)
        assert "are you still there?" in answer.content
        record = actions(live, GATEWAY)[-1]
        assert record.outcome == DONE and "no frame from the gateway" in record.reason
        assert counted(live, GATEWAY, DONE) >= 1


async def test_a_datastore_file_corrupted_on_disk_is_recovered_from_its_backup(
    emulated: Any, tmp_path: Path
) -> None:
    async with live_bot(emulated, tmp_path / "data", **FAST) as live:
        app = live.app
        await app.datastore.save("admins", {"user_ids": [111]})
        await app.datastore.save("admins", {"user_ids": [111, 222]})  # the .bak holds [111]
        path = tmp_path / "data" / "admins.json"
        path.write_text('{"user_ids": [111, 2')  # a torn write
        await wait_action(live, DATASTORE)
        [record] = actions(live, DATASTORE)
        assert (record.target, record.detail) == ("admins", "recovered from bak")
        assert json.loads(path.read_text()) == {"user_ids": [111]}
        assert app.store.cached("admins") == {"user_ids": [111]}  # applied to the running bot
        assert 111 in live.bot.owners() and 222 not in live.bot.owners()
        assert [r.ok for r in await app.datastore.validate("admins")] == [True]
        quarantined = list((tmp_path / "data" / "quarantine").iterdir())
        assert quarantined and all(p.name.startswith("admins") for p in quarantined)


async def test_a_service_whose_socket_died_is_restarted_through_the_registry(
    emulated: Any, tmp_path: Path
) -> None:
    """The HTTP API's listening socket closes under it (``alive`` false while it should serve): the
    healer restarts it through the registry and ``/live`` answers again."""
    async with live_bot(emulated, tmp_path / "data", **FAST) as live, aiohttp.ClientSession() as http:
        api = live.app.http_api
        assert api._listener is not None
        api._listener.close()
        await wait_action(live, RESTART)
        [record] = actions(live, RESTART)
        assert (record.target, record.detail) == ("http_api", "restarted http_api")
        assert live.app.registry.states()["http_api"] is ServiceState.RUNNING
        async with http.get(f"{api.url}/live") as response:
            assert response.status == 200
        assert api.health()["alive"] is True


async def test_memory_above_the_threshold_is_collected_and_trimmed_at_most_the_bound_an_hour(
    emulated: Any, tmp_path: Path
) -> None:
    """HEAL_MEMORY_MB=1: every assessment (every 0.1 s) finds the bot above it. Two actions (the
    bound), then one "held" record, and nothing more however many assessments follow: no loop."""
    settings = {
        **FAST, "HEALTH_INTERVAL_SECONDS": "0.1", "HEAL_MEMORY_MB": "1", "HEAL_MAX_ACTIONS_PER_HOUR": "2"
    }
    async with (
        live_bot(emulated, tmp_path / "data", ADMIN_USER_IDS=str(emulated.owner), **settings) as live,
        aiohttp.ClientSession() as http,
    ):
        await wait_action(live, MEMORY, HELD)
        runs = live.bot.health.task.stats.runs
        async with asyncio.timeout(15):
            while live.bot.health.task.stats.runs < runs + 10:
                await asyncio.sleep(0.05)
        assert [r.outcome for r in actions(live, MEMORY)] == [DONE, DONE, HELD]
        # Held again at each assessment the healer saw (it takes the latest when several queue up).
        assert counted(live, MEMORY, DONE) == 2 and counted(live, MEMORY, HELD) >= 1
        first = actions(live, MEMORY)[0]
        assert "gc collected" in first.detail and first.reason.endswith("above 1 MiB")

        url = f"{live.app.http_api.url}/api/health/healing"
        async with http.get(url) as refused:
            assert refused.status == 401
        async with http.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            assert response.status == 200
            report = await response.json()
        assert report["max_per_hour"] == 2 and report["kinds"]["memory"]["held"] is True
        assert [row["outcome"] for row in report["history"] if row["kind"] == MEMORY] == [HELD, DONE, DONE]

        live.bot.install_commands()
        await live.bot.tree.sync()
        record = await run(live, "admin", {"healing": {}}, user="owner")
        assert record.ephemeral
        text = only_text(record)
        assert "memory 2/2 (held back" in text and "memory `process`: held" in text
        refused_record = await run(live, "admin", {"healing": {}}, user="normal")
        assert "owners" in only_text(refused_record)
