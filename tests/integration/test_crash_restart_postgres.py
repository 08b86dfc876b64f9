"""``kill -9`` of real bot processes (``python -m bot run`` children) on PostgreSQL: every accepted
message is answered exactly once, by a restarted process or by another one still running.

On PostgreSQL a dead process's claims come back once it has lost its connection and missed three
heartbeats (``GONE_AFTER_SECONDS``): any live process's heartbeat hands them back and its drain
answers them, after looking in the channel for an answer the dead one may have posted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.coordination import GONE_AFTER_SECONDS, HEARTBEAT_SECONDS
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators
from tests.integration.test_crash_restart import (
    ALLOWED,
    SETTLE,
    answer_counts,
    answers,
    ask_everywhere,
    child_env,
    start_bot,
    stop,
)
from tests.pg import PostgresServer

# A dead process's items are taken up after its last heartbeat, three missed ones and the next beat.
TAKEN_UP = HEARTBEAT_SECONDS + GONE_AFTER_SECONDS + HEARTBEAT_SECONDS + 10.0


async def each_answered_once(emulators: Emulators, asked: list[tuple[int, int, str]], timeout: float) -> None:
    discord = emulators.discord
    try:
        await discord.wait_until(lambda: all(answer_counts(discord, asked).values()), timeout)
    except TimeoutError:
        raise AssertionError(f"unanswered after {timeout} s: {answer_counts(discord, asked)}") from None
    await asyncio.sleep(SETTLE)  # a second answer, were one coming
    counts = answer_counts(discord, asked)
    assert set(counts.values()) == {1}, counts
    for channel, mid, text in asked:
        [answer] = answers(discord, channel, mid)
        assert text in answer.content, (text, answer.content)


def holders(pg_server: PostgresServer, url: str) -> set[int]:
    """The pids of the processes holding claims (process names are host:pid)."""
    rows = pg_server.fetch(
        url,
        "SELECT DISTINCT p.name FROM queue q JOIN processes p ON p.id = q.claimed_by "
        "WHERE q.state = 'claimed'",
    )
    return {int(name.rsplit(":", 1)[1]) for (name,) in rows}


async def test_kill_9_of_one_of_two_processes_the_other_answers_its_messages_once(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot, pg_url: str,
    pg_server: PostgresServer, tmp_path: Path,
) -> None:
    """Two processes share the database and both receive every message; Gemini takes 2 s; the one
    holding claims is SIGKILLed mid-answer; the survivor takes its items up and answers each once."""
    discord, gemini = emulators.discord, emulators.gemini
    env = child_env(bot_env, DATABASE_URL=pg_url, DATABASE_POOL_SIZE="4")
    first = await start_bot(spawn_bot, emulators, {**env, "DATA_DIR": str(tmp_path / "a")})
    second = await start_bot(spawn_bot, emulators, {**env, "DATA_DIR": str(tmp_path / "b")})
    gemini.faults.add("latency", value=2.0)
    asked = await ask_everywhere(discord, per_channel=1)
    await discord.wait_until(
        lambda: sum(r.action == "generateContent" for r in gemini.requests) >= len(asked), timeout=10
    )
    held = holders(pg_server, pg_url)
    victim, survivor = (first, second) if first.pid in held else (second, first)
    assert victim.pid in held
    assert victim.kill() == -9
    gemini.faults.clear()
    await each_answered_once(emulators, asked, TAKEN_UP)
    await stop(survivor)
    survivor.assert_clean_logs(ALLOWED)
    assert any(r.get("event") == "queue.released_claims_of_gone_process" for r in survivor.logs())


async def test_kill_9_then_restart_on_postgresql_answers_every_message_exactly_once(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot, pg_url: str
) -> None:
    """The single-process restart of test_crash_restart, on PostgreSQL: the new process is another
    process to the database; it takes up the dead one's claims once it is gone."""
    discord, gemini = emulators.discord, emulators.gemini
    env = child_env(bot_env, DATABASE_URL=pg_url)
    first = await start_bot(spawn_bot, emulators, env)
    gemini.faults.add("latency", value=2.0)
    asked = await ask_everywhere(discord, per_channel=1)
    await discord.wait_until(
        lambda: sum(r.action == "generateContent" for r in gemini.requests) >= len(asked), timeout=10
    )
    assert first.kill() == -9
    await discord.wait_until(lambda: not discord.connected, timeout=5)
    assert set(answer_counts(discord, asked).values()) == {0}
    gemini.faults.clear()
    second = await start_bot(spawn_bot, emulators, env)
    await each_answered_once(emulators, asked, TAKEN_UP)
    await stop(second)
    first.assert_clean_logs(ALLOWED)
    second.assert_clean_logs(ALLOWED)
