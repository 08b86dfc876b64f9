"""Throughput of 1, 2 and 3 shard processes on one PostgreSQL database, on the same load.

``python -m bench.bench_shards [--quick] [--json] [--processes 1,2,3]``. For each process count N,
N real bot children (``python -m bot run``, ``SHARD_COUNT=N``, ``SHARD_IDS=i``) share a fresh
database on a throwaway PostgreSQL server (durable defaults, ``tests/pg.py``; or
``BENCH_DATABASE_URL``'s server) and the loopback emulators, which hold the same world for every
N: 6 guilds of 4 channels (spread over the N shards) and 50 users. The load is open loop: users
write at a fixed rate for ``STEP_SECONDS``, and the rate doubles from ``START_RATE`` until a step
leaves more than ``BOUNDED_SECONDS`` of it unanswered at its end, or its answers' p95 passes
``BOUNDED_SECONDS``; then the step between the last good rate and the bad one is tried. The figure is
the highest rate at which the backlog stayed bounded (messages/s). Gemini answers after
``GEMINI_LATENCY`` seconds (the emulator's latency fault), so a process is busy waiting, not
only computing.

Everything (PostgreSQL, the emulators, this driver, the bots) shares the machine: on the 2-core
development box the processes compete for the same two cores, so the figure shows what a process
more costs and what it buys there, not what N machines would do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from rehearsal.ledger import Ledger
from rehearsal.simulate import BotApi, BotChild, SimulationOptions, child_environment
from sandbox.__main__ import SANDBOX_DISCORD_TOKEN, SANDBOX_GEMINI_KEY, bot_settings
from sandbox.discord_emu import DiscordEmulator
from sandbox.gemini import GeminiEmulator
from tests.pg import durable_server

GUILDS, CHANNELS_PER_GUILD, USERS = 6, 4, 50
START_RATE = 10.0
STEP_SECONDS = 10.0
BOUNDED_SECONDS = 2.0
GEMINI_LATENCY = 0.2
MAX_RATE = 640.0
START_TIMEOUT = 60.0


async def _step(ledger: Ledger, channels: list[int], users: list[str], rate: float, seconds: float,
                rng: random.Random) -> dict[str, Any]:
    """Send at ``rate`` for ``seconds``; what was unanswered at the end, and the answers' latency."""
    start = len(ledger.asked)
    began = time.monotonic()
    n = 0
    while n < rate * seconds:
        delay = began + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await ledger.ask(rng.choice(channels), rng.choice(users), f"bench {n}")
        n += 1
    sent_in = time.monotonic() - began
    mine = list(ledger.asked.values())[start:]
    ledger.update()
    backlog = sum(1 for a in mine if not a.answers)
    # Then let the step settle (bounded), so the next one starts from an empty backlog.
    with contextlib.suppress(TimeoutError):
        await ledger.wait_for(lambda: all(a.answers for a in mine), timeout=max(30.0, seconds * 3))
    latencies = sorted(a.answer_seconds() or 0.0 for a in mine if a.answers)
    p95 = statistics.quantiles(latencies, n=20)[18] if len(latencies) >= 20 else max(latencies, default=0.0)
    return {
        "rate": rate, "sent": n, "send_seconds": round(sent_in, 2), "backlog_at_end": backlog,
        "unanswered_after_settling": sum(1 for a in mine if not a.answers),
        "p95_s": round(p95, 3), "bounded": backlog <= rate * BOUNDED_SECONDS and p95 <= BOUNDED_SECONDS
        and sent_in <= seconds * 1.2,
    }


async def _measure(processes: int, url: str, quick: bool) -> dict[str, Any]:
    seconds = STEP_SECONDS / 2 if quick else STEP_SECONDS
    rng = random.Random(processes)
    async with (
        DiscordEmulator(token=SANDBOX_DISCORD_TOKEN) as discord,
        GeminiEmulator(api_key=SANDBOX_GEMINI_KEY) as gemini,
    ):
        gemini.faults.add("latency", value=GEMINI_LATENCY)
        users = [f"b{i}" for i in range(USERS)]
        for key in users:
            discord.world.add_member(key, f"bench{key}")
        channels = []
        for g in range(GUILDS):
            gid = discord.world.add_guild(f"g{g}", shard=(g % processes, processes))
            channels += [
                discord.world.add_text_channel(f"c{c}", guild_id=gid) for c in range(CHANNELS_PER_GUILD)
            ]
        settings = {
            **SimulationOptions().child_settings(), "DATABASE_URL": url, "DATABASE_POOL_SIZE": "4",
            "SHARD_COUNT": str(processes), "GEMINI_TIMEOUT_SECONDS": "10",
        }
        with tempfile.TemporaryDirectory(prefix="bench_shards_") as tmp:
            children = []
            for shard in range(processes):
                data_dir = Path(tmp) / f"shard-{shard}"
                data_dir.mkdir(mode=0o700)
                env = child_environment(bot_settings(discord, gemini), data_dir,
                                        {**settings, "SHARD_IDS": str(shard)}, secrets.token_urlsafe(24))
                children.append(BotChild(env, data_dir))
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                    for child in children:
                        child.start()
                        api = BotApi(session, await child.http_port(START_TIMEOUT))
                        deadline = time.monotonic() + START_TIMEOUT
                        while not await api.ready():
                            if time.monotonic() > deadline or not child.running:
                                raise RuntimeError(f"a bot child was not ready: {child.logs}")
                            await asyncio.sleep(0.1)
                    await discord.wait_until(lambda: len(discord.shard_sessions) == processes, 30)
                    ledger = Ledger(discord, prefix="b")
                    await _step(ledger, channels, users, 2.0, 2.0, rng)  # warm-up, not counted
                    steps = []
                    rate, good, bad = START_RATE, 0.0, None
                    while rate <= MAX_RATE:
                        step = await _step(ledger, channels, users, rate, seconds, rng)
                        steps.append(step)
                        print(f"  {processes} process(es), {rate:g}/s: {step}", file=sys.stderr, flush=True)
                        if not step["bounded"]:
                            bad = rate
                            break
                        good, rate = rate, rate * 2
                    if bad is not None and good and not quick:
                        middle = (good + bad) / 2
                        step = await _step(ledger, channels, users, middle, seconds, rng)
                        steps.append(step)
                        print(f"  {processes} process(es), {middle:g}/s: {step}", file=sys.stderr, flush=True)
                        if step["bounded"]:
                            good = middle
            finally:
                for child in children:
                    await child.stop()
    return {"processes": processes, "bounded_rate_per_s": good, "steps": steps}


async def _run(quick: bool, counts: list[int]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with durable_server() as server:
        if server is None:
            return {"skipped": "no PostgreSQL: install postgresql-15", "summary": []}
        for processes in counts:
            url = server.new_database(migrated=False)
            result[f"processes_{processes}"] = await _measure(processes, url, quick)
    result["summary"] = [
        {"figure": f"highest bounded rate, {r['processes']} shard process(es)",
         "value": r["bounded_rate_per_s"], "unit": "messages/s", "target": "", "baseline": ""}
        for r in result.values() if isinstance(r, dict) and "processes" in r
    ]
    return result


def run(quick: bool = False, counts: list[int] | None = None) -> dict[str, Any]:
    return asyncio.run(_run(quick, counts or [1, 2, 3]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_shards", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--processes", default="1,2,3", help="comma-separated process counts")
    args = parser.parse_args(argv)
    result = run(args.quick, [int(p) for p in args.processes.split(",")])
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for row in result.get("summary", []):
            print(f"{row['figure']}: {row['value']:g} {row['unit']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
