"""Memory pressure: thousands of conversations through the real bot process; memory stays bounded.

Each conversation is a DM from its own user. DM channels are what a bot with many users
really sees (a guild holds at most 500 channels, and 10,000 guild channels would put 10,000
channel objects in the bot's GUILD_CREATE before the first message), the emulator creates
them on first use with O(1) lookups, and the bot keys a conversation by its channel id, so
N users give N conversations. Every user asks once; ``IN_FLIGHT`` users wait for their answer
at any time (bounded concurrency, like N people chatting, 50 at a time). Meanwhile the
child's resident memory is read from ``/proc/<pid>/status`` and its caches from
``GET /api/health/memory``, which names each per-conversation cache with its bound.

Run: ``.venv/bin/python -m pytest tests/chaos/test_memory_chaos.py -q -s -m "chaos or not chaos"``
(``-s`` prints the figures: rate, RSS baseline/half/end/peak, cache sizes).

The run is CPU-bound on the bot: about 7.5 ms of CPU per message, half of it in google-genai
(building the request and validating the response). 10,000 DMs took 113-142 s on a shared
2-core machine (load 4-5); the bot alone needs about 75 s of CPU for them.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import discord
import pytest

from bot.client import BucketPruner
from rehearsal.ledger import Asked, Ledger
from tests.chaos.support import BotApi, assert_promise_kept, started_bot
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators

MB = 1024 * 1024
IN_FLIGHT = 50  # users waiting for an answer at once
ANSWER_TIMEOUT = 20.0  # seconds one user waits before the run counts the message as unanswered
RSS_EVERY = 0.25  # seconds between RSS samples
CACHES_EVERY = 1.0  # seconds between reads of the memory view
WATCH_EVERY = 0.02  # seconds between checks of the in-flight messages

# Resident memory allowed above the baseline (the RSS once the bot answered its first message).
# Measured for 10,000 DMs: +19.0 to +19.5 MB at the peak (baseline 86 MB). What fills up legitimately:
# 10,000 mutex keys (320 B each, 3 MB), 10,000 recent message ids (115 B, 1 MB), discord.py's
# 1,000 cached messages (~5 MB), a minute of rate-limit logs, SQLite's 2 MB page cache, and
# the allocator's slack around them. 30 MB leaves room for that slack to vary, and not for a
# leak of 2 KB per conversation (20 MB over 10,000).
RSS_HEADROOM = 30 * MB
# For 500 DMs: +6.3 MB measured, mostly discord.py's message cache filling to 1,000 messages.
FAST_RSS_HEADROOM = 14 * MB
# RSS growth from conversation 5,000 to 10,000. Still filling then: 5,000 more mutex keys and
# recent ids (2.2 MB), plus SQLite and allocator slack; 4.0-5.1 MB measured. Before BucketPruner,
# discord.py's rate-limit buckets (one per DM's send route, ~1 KB, kept five minutes) made it 9.3 MB.
SECOND_HALF_GROWTH = 8 * MB

# Caches the memory view shows without a fixed bound, and why each is bounded anyway.
UNBOUNDED_BY_COUNT = {
    "discord_users": "weakly held: only users that a cached message, DM channel or task holds",
    "discord_ratelimit_buckets": "BucketPruner forgets buckets idle for 10 s",
}
# Keys held or awaited are never evicted from the mutex map: at most one per message in flight.
MUTEX_SLACK = IN_FLIGHT
ROUTES_PER_CONVERSATION = 3  # discord.py buckets one DM can create: send, typing, fetch channel
BUCKET_IDLE = 10.0  # BucketPruner's default


def proc_status(pid: int, name: str = "VmRSS") -> int:
    """A field of /proc/<pid>/status in bytes (VmRSS: resident now; VmHWM: the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"{name} not in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """What one memory run measured."""

    conversations: int
    baseline_rss: int = 0
    half_rss: int = 0
    end_rss: int = 0
    peak_rss: int = 0
    seconds: float = 0.0
    bot_cpu: float = 0.0
    rss: list[tuple[float, int, int]] = field(default_factory=list)  # (monotonic, settled, bytes)
    caches: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # name -> row, per read
    view_rss: list[tuple[int, int]] = field(default_factory=list)  # (the view's rss_bytes, /proc's)
    timed_out: list[Asked] = field(default_factory=list)

    def summary(self) -> str:
        rate = self.conversations / self.seconds if self.seconds else 0.0
        return (
            f"{self.conversations} conversations in {self.seconds:.1f} s ({rate:.0f}/s, bot CPU "
            f"{self.bot_cpu:.1f} s); RSS baseline {self.baseline_rss / MB:.1f} MB, at half "
            f"{self.half_rss / MB:.1f} MB, at end {self.end_rss / MB:.1f} MB, "
            f"peak {self.peak_rss / MB:.1f} MB"
        )

    def largest(self) -> dict[str, int]:
        """The largest size each cache reached over the reads."""
        top: dict[str, int] = {}
        for read in self.caches:
            for name, row in read.items():
                top[name] = max(top.get(name, 0), row["size"] or 0)
        return top

    def busiest_window(self, seconds: float) -> int:
        """The most conversations settled within any ``seconds`` of the run."""
        best, start = 0, 0
        for t, settled, _ in self.rss:
            while self.rss[start][0] < t - seconds:
                start += 1
            best = max(best, settled - self.rss[start][1])
        return best


async def drive_conversations(api: BotApi, emulators: Emulators, ledger: Ledger, users: list[str]) -> Run:
    """One DM per user, ``IN_FLIGHT`` at a time; sample RSS and the caches while they run."""
    discord_emu, pid = emulators.discord, api.proc.pid
    run = Run(len(users))
    waiting: dict[int, tuple[Asked, asyncio.Future[None]]] = {}
    settled = 0
    half = len(users) // 2
    half_reached = asyncio.Event()
    todo = iter(users)

    async def read_caches() -> None:
        body = await api.memory()
        run.caches.append({row["name"]: row for row in body["caches"]})
        run.view_rss.append((body["rss_bytes"], proc_status(pid)))

    async def user_loop() -> None:
        nonlocal settled
        loop = asyncio.get_running_loop()
        for key in todo:  # one shared iterator: each user is taken by exactly one loop
            stop_if_broken()
            asked = await ledger.ask(discord_emu.dm_channel(key), key, "tell me something")
            done: asyncio.Future[None] = loop.create_future()
            waiting[asked.message_id] = (asked, done)
            if asked.seen.settled:  # answered before the watcher knew to look for it
                done.set_result(None)
            try:
                await asyncio.wait_for(done, ANSWER_TIMEOUT)
            except TimeoutError:
                run.timed_out.append(asked)
            finally:
                waiting.pop(asked.message_id, None)
            settled += 1
            if settled == half:
                half_reached.set()

    async def watcher() -> None:
        """Settle the in-flight messages from the emulator's log; sample RSS."""
        next_sample, read = 0.0, len(discord_emu.sent_log())
        while True:
            # Only the messages the bot just replied to can have settled: O(new replies), not
            # O(in flight), per check.
            new = discord_emu.sent_log(read)
            read += len(new)
            ledger.update()
            for reply in new:
                ref = (reply.message_reference or {}).get("message_id")
                entry = waiting.get(int(ref)) if ref is not None else None
                if entry is not None and entry[0].seen.settled and not entry[1].done():
                    entry[1].set_result(None)
            now = time.monotonic()
            if now >= next_sample:
                run.rss.append((now, settled, proc_status(pid)))
                next_sample = now + RSS_EVERY
            await asyncio.sleep(WATCH_EVERY)

    async def cache_reader() -> None:
        while True:
            await read_caches()
            await asyncio.sleep(CACHES_EVERY)

    async def at_half() -> None:
        await half_reached.wait()
        run.half_rss = proc_status(pid)

    started = time.monotonic()
    cpu_before = cpu_seconds(pid)
    helpers = [asyncio.create_task(c()) for c in (watcher, cache_reader, at_half)]

    def stop_if_broken() -> None:
        """Fail the run at once when the bot exited or a helper failed (instead of timing out)."""
        if not api.proc.running:
            raise AssertionError(f"the bot exited with {api.proc.returncode}:\n{api.proc.tail()}")
        for task in helpers:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise AssertionError(f"{task.get_coro()!r} failed") from task.exception()

    try:
        async with asyncio.TaskGroup() as users_group:  # one failing loop cancels the others
            for _ in range(IN_FLIGHT):
                users_group.create_task(user_loop())
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    run.seconds = time.monotonic() - started
    run.bot_cpu = cpu_seconds(pid) - cpu_before
    run.end_rss = proc_status(pid)
    run.peak_rss = proc_status(pid, "VmHWM")
    run.rss.append((time.monotonic(), settled, run.end_rss))
    await read_caches()
    return run


async def memory_run(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot, conversations: int
) -> Run:
    """Start the bot, answer one warm-up DM (the baseline), then ``conversations`` DMs; check the promise."""
    discord_emu = emulators.discord
    users = [f"user{i}" for i in range(conversations)]
    for key in users:
        discord_emu.world.add_member(key, key)
    ledger = Ledger(discord_emu, prefix="m")
    async with started_bot(spawn_bot, emulators, bot_env) as api:
        warm = await ledger.ask(discord_emu.dm_channel("normal"), "normal", "hello")
        await ledger.wait_for(lambda: warm.seen.settled, 10)
        baseline = proc_status(api.proc.pid)
        run = await drive_conversations(api, emulators, ledger, users)
        run.baseline_rss = baseline
        print(f"\n{run.summary()}\nlargest caches: {run.largest()}")
        assert not run.timed_out, f"unanswered within {ANSWER_TIMEOUT} s: " + "; ".join(
            ledger.describe(a) for a in run.timed_out[:10]
        )
        tally = assert_promise_kept(ledger, [api.proc])
        answered = tally.seen["answered_direct"] + tally.seen["answered_after_queue"]
        assert tally.sent == answered == conversations + 1, tally.as_dict()  # no fault: every one answered
        assert await api.proc.terminate() == 0
    return run


def assert_caches_bounded(run: Run) -> None:
    """Every cache the memory view names stayed within its bound at every read; its RSS is /proc's."""
    assert len(run.caches) >= 2, "the memory view was read fewer than twice"
    for view, proc in run.view_rss:
        assert abs(view - proc) < 4 * MB, f"the memory view says {view / MB:.1f} MB, /proc {proc / MB:.1f} MB"
    for read in run.caches:
        for name, row in read.items():
            assert row["size"] is not None, f"{name}: {row}"
            if name in UNBOUNDED_BY_COUNT:
                continue
            assert "bound" in row, f"cache {name} has no bound in the memory view"
            slack = MUTEX_SLACK if name == "mutex_keys" else 0
            assert row["size"] <= row["bound"] + slack, f"{name} over its bound: {row}"
    largest = run.largest()
    # Weak references only: users a cached message (1,000), a DM channel (128) or a message in
    # flight holds.
    assert largest["discord_users"] <= 1_000 + 128 + 2 * IN_FLIGHT, largest
    # BucketPruner keeps at most twice the buckets used in the last BUCKET_IDLE seconds (it
    # scans when the map doubles); discord.py alone keeps every bucket of the last 5 minutes.
    recent = ROUTES_PER_CONVERSATION * run.busiest_window(BUCKET_IDLE + 2 * CACHES_EVERY)
    assert largest["discord_ratelimit_buckets"] <= max(256, 2 * recent) + 2 * IN_FLIGHT, (largest, recent)


@pytest.mark.timeout(60)
async def test_500_conversations_keep_every_cache_within_its_bound(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """500 DMs from 500 users, 50 at a time: all answered once; every cache in the memory view
    within its bound at every read; RSS within FAST_RSS_HEADROOM of the baseline."""
    run = await memory_run(emulators, bot_env, spawn_bot, 500)
    assert_caches_bounded(run)
    assert run.peak_rss <= run.baseline_rss + FAST_RSS_HEADROOM, run.summary()


@pytest.mark.chaos
@pytest.mark.timeout(240)
async def test_10000_conversations_keep_memory_bounded(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """10,000 DMs from 10,000 users (10,000 conversations), 50 at a time: all answered once;
    every cache within its bound, and the two 10,000-entry ones (recent message ids, mutex
    keys) full at the end, so their eviction ran; peak RSS within RSS_HEADROOM of the
    baseline; RSS grows at most SECOND_HALF_GROWTH from conversation 5,000 to 10,000."""
    run = await memory_run(emulators, bot_env, spawn_bot, 10_000)
    assert_caches_bounded(run)
    end = run.caches[-1]
    for name in ("recent_message_ids", "mutex_keys"):
        assert end[name]["size"] == end[name]["bound"] == 10_000, end[name]  # 10,001 DMs were answered
    assert run.peak_rss <= run.baseline_rss + RSS_HEADROOM, run.summary()
    assert run.end_rss - run.half_rss <= SECOND_HALF_GROWTH, run.summary()


# --- BucketPruner (bot/client.py), which the 10,000-conversation run needs --------------------


async def test_bucket_pruner_keeps_discord_rate_limit_buckets_bounded_in_amortized_time() -> None:
    """10,000 one-off channels: the bucket map never passes 256 once idle buckets may go, and
    with none idle yet the pruner scans only when the map doubles (not on every new bucket)."""
    http = discord.http.HTTPClient(asyncio.get_running_loop())
    http._try_clear_expired_ratelimits = BucketPruner(http, idle=0.0)  # type: ignore[method-assign]
    sizes = []
    for channel in range(10_000):
        http.get_ratelimit(f"POST /channels/{{channel_id}}/messages:{channel}")
        sizes.append(len(http._buckets))
    assert max(sizes) <= 256

    http = discord.http.HTTPClient(asyncio.get_running_loop())
    pruner = BucketPruner(http, idle=60.0)
    checks = 0
    forgettable = pruner._forgettable

    def counted(bucket: discord.http.Ratelimit, now: float) -> bool:
        nonlocal checks
        checks += 1
        return forgettable(bucket, now)

    pruner._forgettable = counted  # type: ignore[method-assign]
    http._try_clear_expired_ratelimits = pruner  # type: ignore[method-assign]
    for channel in range(10_000):
        http.get_ratelimit(f"POST /channels/{{channel_id}}/messages:{channel}")
    assert len(http._buckets) == 10_000  # nothing idle for 60 s yet: nothing forgotten
    assert checks < 2 * 10_000  # discord.py's own cleanup: ~50 million checks here


async def test_bucket_pruner_keeps_buckets_in_use_or_inside_a_rate_limit_window() -> None:
    """A bucket with a request in flight, a waiter, or an unexpired window is never forgotten."""
    loop = asyncio.get_running_loop()
    http = discord.http.HTTPClient(loop)
    pruner = BucketPruner(http, idle=0.0, floor=1)
    busy, limited, idle = (http.get_ratelimit(k) for k in ("busy", "limited", "idle"))
    busy.outgoing = 1
    limited.expires = loop.time() + 30
    pruner()
    assert set(http._buckets) == {"busy", "limited"}
    assert idle not in http._buckets.values()


# --- the emulator's own memory in a long run -----------------------------------------------------


async def test_emulator_forgets_nonces_past_the_window_and_then_posts_a_resend_again(
    emulators: Emulators, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Discord emulator keeps a nonce for NONCE_WINDOW_SECONDS (Discord's safe-resend window),
    then forgets it: the nonce map holds only the window's sends, and a later resend posts anew."""
    import aiohttp

    from sandbox import discord_emu

    emu = emulators.discord
    general = emu.channels["general"]
    emu.rate_limits.set("send", 1000, 1.0, channel_id=general)  # 51 quick sends: nonces, not limits
    url = f"{emu.api_base}/channels/{general}/messages"
    headers = {"Authorization": f"Bot {emu.token}"}

    async def send(session: aiohttp.ClientSession, nonce: str) -> int:
        body = {"content": "answer", "nonce": nonce, "enforce_nonce": True}
        async with session.post(url, json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            return int((await response.json())["id"])

    async with aiohttp.ClientSession() as session:
        first = await send(session, "n-0")
        assert await send(session, "n-0") == first  # within the window: the same message
        monkeypatch.setattr(discord_emu, "NONCE_WINDOW_SECONDS", 0.0)
        for i in range(1, 50):
            await send(session, f"n-{i}")
        assert len(emu._nonces) == 1  # every earlier one is past the (now zero) window
        assert await send(session, "n-0") != first  # forgotten: a resend posts again
