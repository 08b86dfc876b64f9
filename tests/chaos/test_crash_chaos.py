"""Chaos: ``kill -9`` of the real bot process in the middle of a Gemini outage, then a restart.

The promise under test: every message the bot accepted is answered exactly once, in order per
conversation, by whichever process is alive, however the previous one died. The instants:
while the durable queue holds the outage's messages (all acknowledged, none answered; the new
process may meet the outage again); in the middle of the drain after Gemini heals (some
answered, some in flight at Gemini, some waiting), twice in a row; and after Discord posted
late answers but before the bot heard back (posted, never recorded).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from rehearsal.ledger import Asked, Ledger, Seen
from tests.chaos.support import BotApi, Watch, assert_promise_kept, started_bot
from tests.chaos.test_gemini_chaos import (
    build_world,
    generate_requests,
    requests_about,
    settle,
    traffic,
)
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators

LATE = "You asked earlier"


def outage_env(bot_env: dict[str, str]) -> dict[str, str]:
    """One Gemini attempt per message and a quick breaker: the crash, not the retry policy, is tested."""
    return {**bot_env, "RETRY_MAX_ATTEMPTS": "1", "BREAKER_FAIL_MAX": "3", "BREAKER_RESET_SECONDS": "1"}


async def kill_9(api: BotApi, emulators: Emulators) -> None:
    """SIGKILL the bot child and wait until the Discord emulator sees its gateway gone."""
    assert api.proc.kill() == -9
    discord = emulators.discord
    await discord.wait_until(lambda: not discord.connected, timeout=5)


async def stop(api: BotApi) -> None:
    """SIGTERM; the bot exits 0 (also within discord.py's guild-ready wait, which close() cancels)."""
    assert await api.proc.terminate(timeout=15) == 0


async def run_kill_while_queued(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot, *, channels: int, count: int,
    spacing: float, watch_after: float, down_after_restart: float = 0.0,
) -> None:
    """Gemini 503s; every message acked as queued; kill -9; heal; restart: each answered once, in order.

    ``watch_after``: seconds watched once all is answered and the queue is empty, in case an
    answer still came twice (the queue being empty already rules out most of that).
    ``down_after_restart``: Gemini stays down that long after the new process is ready; its
    drain meets the outage again and must neither answer nor acknowledge anything a second time.
    """
    world = build_world(emulators, channels=channels, users=3)
    env = outage_env(bot_env)
    ledger = Ledger(emulators.discord, prefix="k")
    async with started_bot(spawn_bot, emulators, env) as first:
        emulators.gemini.faults.add("503")
        asked = await traffic(ledger, world, count, spacing=spacing)
        await ledger.wait_for(lambda: all(a.acks for a in asked), timeout=10)
        assert ledger.tally().seen[Seen.QUEUED.value] == count
        await first.wait_until(lambda: _pending_is(first, count), timeout=5)
        await kill_9(first, emulators)

    if not down_after_restart:
        emulators.gemini.faults.clear()
    healed = time.monotonic()
    async with started_bot(spawn_bot, emulators, env) as second:
        if down_after_restart:
            restarted = time.monotonic()
            await asyncio.sleep(down_after_restart)
            probes = generate_requests(emulators, restarted)
            assert probes, "the new process never tried the queued messages while Gemini was down"
            assert all(r.outcome == "fault:503" for r in probes)
            assert (await second.breakers())["gemini"] != "closed"
            assert ledger.tally().seen[Seen.QUEUED.value] == count
            assert all(len(a.acks) == 1 for a in asked), "acknowledged again after the restart"
            emulators.gemini.faults.clear()
            healed = time.monotonic()
        await settle(ledger, second, timeout=20)
        elapsed = time.monotonic() - healed
        await asyncio.sleep(watch_after)
        tally = assert_promise_kept(ledger, [first.proc, second.proc])
        assert tally.seen[Seen.ANSWERED_AFTER_QUEUE.value] == count, tally
        assert all(a.answers[0].content.startswith(LATE) and len(a.acks) == 1 for a in asked), [
            ledger.describe(a) for a in asked
        ]
        await stop(second)
    restart = "after the restart" if down_after_restart else "including the restart"
    print(f"kill while queued: {count} messages answered {elapsed:.2f} s after heal, {restart}")


async def _pending_is(api: BotApi, count: int) -> bool:
    queue = (await api.queue())["queue"]
    return queue is not None and queue["pending"] == count


@pytest.mark.timeout(30)
async def test_kill_9_while_the_outage_queue_holds_messages_then_restart_answers_each_once(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Fast subset: Gemini 503s, 8 messages in 4 channels all acked and queued; kill -9; Gemini
    heals; a new process answers each message exactly once, in order, as a late answer."""
    await run_kill_while_queued(
        emulators, bot_env, spawn_bot, channels=4, count=8, spacing=0.05, watch_after=0.0
    )


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_kill_9_mid_outage_under_steady_traffic_then_restart_answers_each_once(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Gemini 503s while 40 messages arrive over 4 s in 10 channels; all acked and queued; kill -9;
    a new process starts while Gemini is still down (its drain meets the outage: no answer, no
    second acknowledgement); Gemini heals; each message is answered exactly once, in order."""
    await run_kill_while_queued(
        emulators, bot_env, spawn_bot, channels=10, count=40, spacing=0.1, watch_after=1.1,
        down_after_restart=3.0,
    )


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_kill_9_twice_during_the_drain_after_heal_then_restart_answers_the_rest_once(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Gemini 503s; 30 messages in 6 channels queued; Gemini heals but is slow (0.4 s a call), so
    the drain takes a while. kill -9 once a third is answered (others in flight at Gemini),
    restart, kill -9 again at two thirds, restart: the rest are answered, none twice, in order."""
    gemini = emulators.gemini
    world = build_world(emulators, channels=6, users=3)
    env = outage_env(bot_env)
    ledger = Ledger(emulators.discord, prefix="m")
    count = 30
    procs = []
    async with started_bot(spawn_bot, emulators, env) as first:
        procs.append(first.proc)
        async with Watch(first) as watch:
            gemini.faults.add("503")
            asked = await traffic(ledger, world, count, spacing=0.05)
            await ledger.wait_for(lambda: all(a.acks for a in asked), timeout=10)
        assert watch.saw("gemini", "open"), watch.states
        gemini.faults.clear()
        gemini.faults.add("latency", value=0.4)
        answered_at_kill = [await kill_mid_drain(ledger, asked, first, emulators, count // 3)]

    async with started_bot(spawn_bot, emulators, env) as second:
        procs.append(second.proc)
        answered_at_kill.append(await kill_mid_drain(ledger, asked, second, emulators, 2 * count // 3))

    gemini.faults.clear()
    async with started_bot(spawn_bot, emulators, env) as third:
        procs.append(third.proc)
        await settle(ledger, third, timeout=30)
        await asyncio.sleep(1.1)  # one drain interval more: nothing is answered a second time
        tally = assert_promise_kept(ledger, procs)
        assert tally.seen[Seen.ANSWERED_AFTER_QUEUE.value] == count, tally
        assert all(len(a.acks) == 1 for a in asked), [ledger.describe(a) for a in asked if len(a.acks) != 1]
        await stop(third)
    print(f"kill during drain: {answered_at_kill} of {count} answered at the two kills, the rest after")


async def kill_mid_drain(
    ledger: Ledger, asked: list[Asked], api: BotApi, emulators: Emulators, answered: int
) -> int:
    """Once ``answered`` messages are answered and Gemini is working on others, kill -9 the bot;
    return how many were answered at the kill."""
    since = time.monotonic()

    def in_flight() -> list[Asked]:
        """Messages Gemini was asked about by this process that have no answer yet."""
        requests = generate_requests(emulators, since)
        return [a for a in asked if not a.answers and requests_about(requests, a)]

    await ledger.wait_for(
        lambda: sum(bool(a.answers) for a in asked) >= answered and bool(in_flight()), timeout=20
    )
    await kill_9(api, emulators)
    ledger.update()
    done = sum(bool(a.answers) for a in asked)
    assert answered <= done < len(asked), done
    return done


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_kill_9_after_discord_posted_late_answers_but_before_the_bot_heard_back_sends_none_twice(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Gemini 503s; 12 messages in 4 channels queued; Gemini heals and the drain answers, but
    Discord holds its responses to the answers it posts (3 s); kill -9 then. The dead process
    never recorded those answers, so they are still queued: the new one must not post them again."""
    discord, gemini = emulators.discord, emulators.gemini
    world = build_world(emulators, channels=4, users=2)
    env = outage_env(bot_env)
    ledger = Ledger(emulators.discord, prefix="p")
    count = 12
    async with started_bot(spawn_bot, emulators, env) as first:
        gemini.faults.add("503")
        asked = await traffic(ledger, world, count, spacing=0.05)
        await ledger.wait_for(lambda: all(a.acks for a in asked), timeout=10)
        discord.faults.add("latency", "send", seconds=3.0, after=True)
        gemini.faults.clear()
        await ledger.wait_for(lambda: sum(bool(a.answers) for a in asked) >= len(world.channels), timeout=10)
        await kill_9(first, emulators)
        posted = [a for a in asked if a.answers]

    discord.faults.clear()
    async with started_bot(spawn_bot, emulators, env) as second:
        await settle(ledger, second, timeout=30)
        await asyncio.sleep(1.1)  # one drain interval more: nothing is answered a second time
        tally = assert_promise_kept(ledger, [first.proc, second.proc])
        assert tally.seen[Seen.ANSWERED_AFTER_QUEUE.value] == count, tally
        assert all(len(a.answers) == 1 for a in posted)
        await stop(second)
    print(f"posted but unrecorded at the kill: {len(posted)}; none posted twice")


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_kill_9_in_a_busy_channel_after_the_answer_was_posted_then_a_late_restart_answers_once(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Gemini 503s while a busy channel fills: one question, then 30 more from others, each acked
    (60 messages after the first question). Gemini heals; Discord posts the drain's answer to the
    first question but holds its response; kill -9. The restart comes after Discord's nonce
    window (shortened to 0.5 s here), so only the bot's own look through the channel (past the 60
    messages) can stop a second answer: the question is answered exactly once."""
    discord, gemini = emulators.discord, emulators.gemini
    world = build_world(emulators, channels=1, users=4)
    env = outage_env(bot_env)
    ledger = Ledger(discord, prefix="c")
    channel = world.channels[0]
    async with started_bot(spawn_bot, emulators, env) as first:
        gemini.faults.add("503")
        question = await ledger.ask(channel, world.users[0], "first in a busy channel")
        others = [await ledger.ask(channel, world.users[1 + n % 3], "busy") for n in range(30)]
        await ledger.wait_for(lambda: all(a.acks for a in [question, *others]), timeout=10)
        discord.faults.add("latency", "send", count=1, seconds=3.0, after=True)
        gemini.faults.clear()
        await ledger.wait_for(lambda: bool(question.answers), timeout=10)
        await kill_9(first, emulators)

    monkeypatch.setattr("sandbox.discord_emu.NONCE_WINDOW_SECONDS", 0.5)
    await asyncio.sleep(0.6)
    async with started_bot(spawn_bot, emulators, env) as second:
        await settle(ledger, second, timeout=30)
        await asyncio.sleep(1.1)  # one drain interval more: nothing is answered a second time
        assert len(question.answers) == 1, ledger.describe(question)
        assert_promise_kept(ledger, [first.proc, second.proc])
        await stop(second)
