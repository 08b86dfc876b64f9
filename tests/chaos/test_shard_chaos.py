"""Chaos: three shard processes on one PostgreSQL database, one of them ``kill -9``ed mid-run.

Three real bot children (``python -m bot run`` with ``SHARD_COUNT=3`` and ``SHARD_IDS=0``, ``1``,
``2``) share a PostgreSQL server (tests/pg.py) and the emulators. Users write in guilds of every
shard and in DMs (shard 0) under the default fault mix of ``python -m rehearsal simulate`` (10% of
Gemini calls fail: 40% hangs past the timeout, 30% 503, 20% 429, 10% 500; 2% of Discord sends 503).
Mid-run the process of shard 1 is SIGKILLed while it holds claims, and started again
``RESTART_AFTER`` seconds later. Meanwhile no process receives shard 1's messages (Discord sends a
shard's events to its session only): the restarted process reads them back from the channels
(``bot.catchup``, taking over). The promise, judged by ``rehearsal.ledger`` as for every chaos
scenario: none lost, none answered twice, answers in order per conversation; the items the dead
process had claimed are handed back by a live process's heartbeat (three missed beats) and
answered. Then an operator opens the ``gemini`` breaker through one process's HTTP API and the
other two show it open within a second.

The size is a parameter: ``SHARD_CHAOS_MESSAGES`` (default 300), ``SHARD_CHAOS_RATE`` (messages a
second, default 10) and ``SHARD_CHAOS_RESTART_AFTER`` (seconds, default 20). The issue's full run:

    SHARD_CHAOS_MESSAGES=2000 .venv/bin/python -m pytest -m chaos -s tests/chaos/test_shard_chaos.py
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rehearsal.ledger import Ledger
from rehearsal.simulate import DEFAULT_MIX, InjectedFaults, SimulationOptions, install_gemini_mix, parse_mix
from sandbox.discord_emu import shard_of
from sandbox.faults import Fault
from services.coordination import GONE_AFTER_SECONDS, HEARTBEAT_SECONDS
from tests.chaos.support import BotApi, assert_promise_kept, started_bot
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators
from tests.pg import PostgresServer

SHARDS = 3
VICTIM = 1
MESSAGES = int(os.environ.get("SHARD_CHAOS_MESSAGES", "300"))
RATE = float(os.environ.get("SHARD_CHAOS_RATE", "10"))
RESTART_AFTER = float(os.environ.get("SHARD_CHAOS_RESTART_AFTER", "20"))
GUILDS_PER_SHARD, CHANNELS_PER_GUILD, USERS, DM_USERS = 2, 2, 12, 3
SETTLE_TIMEOUT = 240.0

pytestmark = [
    pytest.mark.chaos,
    # start-ups, the traffic, the restart and the settling, each bounded
    pytest.mark.timeout(int(180 + MESSAGES / RATE + RESTART_AFTER + SETTLE_TIMEOUT)),
]


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)
# A dead process's claims come back at a live process's heartbeat once it missed three.
TAKEN_UP = HEARTBEAT_SECONDS + GONE_AFTER_SECONDS + HEARTBEAT_SECONDS + 10.0


def claimed_by(pg_server: PostgresServer, url: str, pid: int) -> list[int]:
    """Ids of the queue items a process (by pid: process names are host:pid) holds claimed."""
    rows = pg_server.fetch(
        url,
        "SELECT q.id FROM queue q JOIN processes p ON p.id = q.claimed_by "
        f"WHERE q.state = 'claimed' AND p.name LIKE '%:{int(pid)}'",
    )
    return [int(r[0]) for r in rows]


@contextlib.asynccontextmanager
async def shard_bot(
    spawn_bot: SpawnBot, emulators: Emulators, env: dict[str, str], shard: int
) -> AsyncIterator[BotApi]:
    """A bot child holding ``shard``, once its shard's session is live and /ready says so."""
    async with started_bot(spawn_bot, emulators, env, timeout=30.0) as api:
        discord = emulators.discord
        await discord.wait_until(lambda: shard in discord.shard_sessions, timeout=30)

        async def ready() -> bool:
            return bool((await api.get("/ready"))["ready"])

        await api.wait_until(ready, timeout=30)
        yield api


async def test_three_shards_one_killed_mid_run_and_restarted_nothing_lost_or_doubled(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot, pg_url: str,
    pg_server: PostgresServer, tmp_path: Path,
) -> None:
    discord, gemini = emulators.discord, emulators.gemini
    world = discord.world
    rng = random.Random(17)
    users = [f"u{n}" for n in range(USERS)]
    for key in users:
        world.add_member(key, f"user{key}")
    channels: list[tuple[int, str | None]] = []  # (channel, the only author there: DMs) ...
    for shard in range(SHARDS):
        for g in range(GUILDS_PER_SHARD):
            gid = world.add_guild(f"s{shard}g{g}", shard=(shard, SHARDS))
            channels += [
                (world.add_text_channel(f"c{c}", guild_id=gid), None) for c in range(CHANNELS_PER_GUILD)
            ]
    channels += [(discord.dm_channel(key), key) for key in users[:DM_USERS]]
    shard_of_channel = {c: shard_of(world.channel_guild(c), SHARDS) for c, _ in channels}

    env = {
        **bot_env, **SimulationOptions().child_settings(),
        "DATABASE_URL": pg_url, "DATABASE_POOL_SIZE": "4", "SHARD_COUNT": str(SHARDS),
    }

    def shard_env(shard: int) -> dict[str, str]:
        return {**env, "SHARD_IDS": str(shard), "DATA_DIR": str(tmp_path / f"shard-{shard}")}

    ledger = Ledger(discord, prefix="x")
    injected = InjectedFaults()
    stack = contextlib.AsyncExitStack()
    async with stack:
        apis = {s: await stack.enter_async_context(shard_bot(spawn_bot, emulators, shard_env(s), s))
                for s in range(SHARDS)}
        progress("three shard processes ready")
        install_gemini_mix(gemini.faults, 0.10, parse_mix(DEFAULT_MIX), injected)
        injected.discord.append(("send 503", discord.faults.add("503", "send", probability=0.02)))

        victim = apis[VICTIM]
        killed_at: float | None = None
        slow: Fault | None = None
        held: list[int] = []
        restarting: asyncio.Task[BotApi] | None = None
        restart_stack = contextlib.AsyncExitStack()
        began = time.monotonic()
        for n in range(MESSAGES):
            delay = began + n / RATE - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if killed_at is None and slow is None and n >= MESSAGES // 2 - 2 * RATE:
                # Slow Gemini (under its timeout) from 2 s before the kill, so the victim holds claims.
                slow = gemini.faults.add("latency", value=1.5)
            if killed_at is None and n >= MESSAGES // 2:
                held = claimed_by(pg_server, pg_url, victim.proc.pid)
                if held:
                    assert victim.proc.kill() == -9
                    killed_at = time.monotonic()
                    assert slow is not None
                    gemini.faults.remove(slow.id)
                    progress(f"killed shard {VICTIM} after {n} messages, holding {len(held)} claims")
                else:
                    assert n < MESSAGES // 2 + 10 * RATE, f"shard {VICTIM} held no claim for 10 s of traffic"
            if killed_at is not None and restarting is None and time.monotonic() - killed_at >= RESTART_AFTER:
                # Started beside the traffic, which goes on at its pace meanwhile.
                restarting = asyncio.create_task(restart_stack.enter_async_context(
                    shard_bot(spawn_bot, emulators, shard_env(VICTIM), VICTIM)
                ))
            channel, author = rng.choice(channels)
            await ledger.ask(channel, author or rng.choice(users), f"question {n}")
        sent_seconds = time.monotonic() - began
        assert killed_at is not None and held, "the victim held no claim when it was killed"
        if restarting is None:  # a short run: the restart comes after the traffic
            await asyncio.sleep(max(0.0, killed_at + RESTART_AFTER - time.monotonic()))
            restarted = await restart_stack.enter_async_context(
                shard_bot(spawn_bot, emulators, shard_env(VICTIM), VICTIM)
            )
        else:
            restarted = await restarting
        progress(f"traffic sent; shard {VICTIM} restarted")
        async with restart_stack:
            gemini.faults.clear()
            discord.faults.clear()
            unsettled = await ledger.wait_settled(SETTLE_TIMEOUT)
            assert not unsettled, [ledger.describe(a) for a in unsettled[:10]]
            progress("every message settled")
            await discord.wait_until(
                lambda: pg_server.fetch(
                    pg_url, "SELECT COUNT(*) FROM queue WHERE state IN ('pending', 'claimed')"
                ) == [(0,)],
                timeout=60,
            )
            await asyncio.sleep(1.0)  # an answer still in flight shows up as a duplicate, not as nothing
            survivors = [apis[s] for s in range(SHARDS) if s != VICTIM]
            tally = assert_promise_kept(ledger, [a.proc for a in (*survivors, restarted)])
            states = pg_server.fetch(
                pg_url, f"SELECT DISTINCT state FROM queue WHERE id IN ({','.join(map(str, held))})"
            )
            assert set(states) <= {("done",)}, states  # finished (done rows may be deleted already)
            releasers = [
                name for name, api in (("survivor", s) for s in survivors) if any(
                    r.get("event") == "queue.released_claims_of_gone_process" for r in api.proc.logs()
                )
            ] + ["restarted"] * any(
                r.get("event") == "queue.released_claims_of_gone_process" for r in restarted.proc.logs()
            )
            assert releasers, "nobody handed the dead process's claims back"
            caught_up = sum(
                int(r.get("messages", 0)) for r in restarted.proc.logs() if r.get("event") == "catchup.done"
            )
            by_shard = {s: sum(1 for a in ledger.asked.values() if shard_of_channel[a.channel_id] == s)
                        for s in range(SHARDS)}

            # An operator opens the gemini breaker through one process: the other two see it at once.
            others = [api for s, api in apis.items() if s not in (0, VICTIM)] + [restarted]
            status, _ = await apis[0].post("/api/admin/circuit/open/gemini", {"reason": "chaos"})
            assert status == 200
            opened = time.monotonic()
            for api in others:
                await api.wait_breaker("gemini", "open", timeout=1.0)
            seen_after = time.monotonic() - opened
            await apis[0].post("/api/admin/circuit/reset/gemini")
        print(
            f"\nshard chaos: {tally.sent} messages in {sent_seconds:.0f} s ({by_shard} by shard), "
            f"{tally.as_dict()['answered_direct']} answered directly, "
            f"{tally.as_dict()['answered_after_queue']} after queueing, "
            f"{tally.as_dict()['told_why']} told why, "
            f"{tally.lost} lost, {tally.duplicated} duplicated, {tally.out_of_order} channels out of order; "
            f"{len(held)} items claimed by the killed process, released by {releasers}; "
            f"{caught_up} messages handed to intake by its read-back (those already answered dropped there); "
            f"gemini force-open seen by the other two in {seen_after * 1000:.0f} ms; "
            f"injected {injected.counts()}"
        )
