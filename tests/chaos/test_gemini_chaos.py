"""Chaos: the real bot process while Gemini misbehaves (hangs, 503 storms, 429 storms, daily quota).

Every scenario: a fault -> steady traffic from several users in several channels -> what users
saw during the fault (answers, or quick "queued" acknowledgements; the breaker open; the queue
holding items) -> heal -> everything settled, the queue empty, the breaker closed -> the promise
kept (each message answered once, in order per conversation, or told why) and the logs clean.

The helpers here (``build_world``, ``traffic``, ``Watch``, ``generate_requests``) are shared
with ``test_crash_chaos.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass

import pytest

from rehearsal.ledger import Asked, Ledger, Seen
from sandbox.faults import Fault
from sandbox.gemini import RecordedRequest
from tests.chaos.support import BotApi, Watch, assert_promise_kept, started_bot
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators

GENERATE = "generateContent"
PRIMARY = "gemini-2.5-flash"  # the bot's default GEMINI_MODEL
FALLBACK = "gemini-2.5-pro"


# --- shared helpers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """The channels and users a scenario's traffic comes from."""

    channels: list[int]
    users: list[str]


def build_world(emulators: Emulators, *, channels: int, users: int) -> World:
    """``channels`` extra text channels and ``users`` members; call it before the bot starts."""
    world = emulators.discord.world
    ids = [world.add_text_channel(f"chaos-{n}") for n in range(channels)]
    keys = [f"user{n}" for n in range(users)]
    for key in keys:
        world.add_member(key, key)
    return World(ids, keys)


async def traffic(
    ledger: Ledger, world: World, count: int, *, spacing: float, text: str = "tell me something"
) -> list[Asked]:
    """``count`` messages, one every ``spacing`` seconds, round-robin over the channels and users."""
    asked = []
    for n in range(count):
        channel = world.channels[n % len(world.channels)]
        author = world.users[n % len(world.users)]
        asked.append(await ledger.ask(channel, author, text))
        await asyncio.sleep(spacing)
    return asked


def generate_requests(emulators: Emulators, since: float = 0.0) -> list[RecordedRequest]:
    """The emulator's ``generateContent`` requests received at or after ``since`` (monotonic)."""
    return [r for r in emulators.gemini.requests if r.action == GENERATE and r.time >= since]


def requests_about(requests: Iterable[RecordedRequest], asked: Asked) -> list[RecordedRequest]:
    """The requests whose last user turn is ``asked`` (its marker is in the prompt)."""
    found = []
    for request in requests:
        contents = (request.body or {}).get("contents") or [{}]
        last = " ".join(str(p.get("text", "")) for p in contents[-1].get("parts", []))
        if asked.marker in last:
            found.append(request)
    return found


def replied(asked: Iterable[Asked]) -> bool:
    """Every message has at least one reply of some kind."""
    return all(a.acks or a.answers or a.notices for a in asked)


def assert_heard_within(ledger: Ledger, asked: list[Asked], seconds: float) -> None:
    """Every message got its first reply (answer, ack or notice) within ``seconds`` of being sent."""
    slow = [ledger.describe(a) for a in asked if (a.first_reply_seconds() or float("inf")) >= seconds]
    assert not slow, slow


async def metric(api: BotApi, name: str) -> float:
    """The value of an unlabelled metric (``bot_<name>``) from the bot's /metrics; 0 if absent."""
    samples = (await api.metrics()).get(f"bot_{name}", [])
    return samples[0][1] if samples else 0.0


async def breaker_transitions(api: BotApi, name: str) -> dict[tuple[str, str], float]:
    """``(from, to) -> count`` of breaker ``name``'s transitions, from the bot's /metrics."""
    samples = (await api.metrics()).get("bot_breaker_transitions_total", [])
    return {(labels["from"], labels["to"]): value for labels, value in samples if labels["breaker"] == name}


async def settle(ledger: Ledger, api: BotApi, *, timeout: float) -> float:
    """Wait until every message is settled, the queue is empty and Gemini's breaker is closed;
    return the seconds it took."""
    started = time.monotonic()
    still = await ledger.wait_settled(timeout=timeout)
    assert not still, [ledger.describe(a) for a in still[:10]]
    await api.wait_queue_empty(timeout=10)
    await api.wait_breaker("gemini", "closed", timeout=10)
    return time.monotonic() - started


# --- 503 storm ----------------------------------------------------------------------------------

# The acknowledgement's worst case by design: three attempts with full-jitter waits (<= 0.5 s, then
# <= 1 s) before the message is queued; later messages meet the open breaker and are acked at once.
ACK_P99_BOUND = 2.5


async def run_503_storm(
    emulators: Emulators,
    bot_env: dict[str, str],
    spawn_bot: SpawnBot,
    *,
    channels: int,
    users: int,
    count: int,
    spacing: float,
    storm: float,
    ack_p99_bound: float,
) -> dict[str, float]:
    """A total Gemini outage under traffic: quick acks, the breaker opens, a half-open probe
    closes it after heal, the queue drains. Returns the measured figures."""
    world = build_world(emulators, channels=channels, users=users)
    env = {**bot_env, "BREAKER_FAIL_MAX": "3", "BREAKER_RESET_SECONDS": "1"}
    ledger = Ledger(emulators.discord, prefix="s")
    async with started_bot(spawn_bot, emulators, env) as api:
        async with Watch(api) as watch:
            emulators.gemini.faults.add("503")
            storm_started = time.monotonic()
            asked = await traffic(ledger, world, count, spacing=spacing)
            # Everyone who asks during the outage hears soon that the message is queued.
            await ledger.wait_for(lambda: replied(asked), timeout=10)
            during = ledger.tally()
            assert during.seen[Seen.QUEUED.value] == count, [ledger.describe(a) for a in asked]
            assert during.ack_ms["p99"] < ack_p99_bound * 1000, during.ack_ms
            await asyncio.sleep(max(0.0, storm - (time.monotonic() - storm_started)))
            assert watch.saw("gemini", "open"), watch.states
            assert watch.max_pending > 0

            emulators.gemini.faults.clear()
            healed = time.monotonic()
            await settle(ledger, api, timeout=30)
            heal_to_empty = time.monotonic() - healed
        transitions = await breaker_transitions(api, "gemini")
        assert transitions.get(("half_open", "closed"), 0) >= 1, transitions
        tally = assert_promise_kept(ledger, [api.proc])
        assert tally.seen[Seen.ANSWERED_AFTER_QUEUE.value] == count, tally
        assert await api.proc.terminate() == 0
    figures = {
        "messages": count,
        "ack_p99_ms": round(during.ack_ms["p99"]),
        "heal_to_empty_s": round(heal_to_empty, 2),
        "after_queue_p50_ms": round(tally.after_queue_ms["p50"]),
    }
    print(f"503 storm figures: {figures}")
    return figures


@pytest.mark.timeout(30)
async def test_a_short_gemini_503_storm_queues_with_quick_acks_and_drains_after_heal(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Fast subset: 1.5 s of 503s, 10 messages in 4 channels: each acked (p99 < 2.5 s), the breaker
    opens; after heal a half-open probe closes it and every message is answered once, in order."""
    figures = await run_503_storm(
        emulators, bot_env, spawn_bot, channels=4, users=3, count=10, spacing=0.05, storm=1.5,
        ack_p99_bound=ACK_P99_BOUND,
    )
    assert figures["heal_to_empty_s"] < 10


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_gemini_503_storm_across_many_channels_acks_fast_then_drains_after_heal(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """8 s of 503s, 48 messages from 6 users in 12 channels: each acked (p99 < 2.5 s), the breaker
    opens; after heal the half-open probe succeeds and the queue drains within 15 s."""
    figures = await run_503_storm(
        emulators, bot_env, spawn_bot, channels=12, users=6, count=48, spacing=0.15, storm=8.0,
        ack_p99_bound=ACK_P99_BOUND,
    )
    assert figures["heal_to_empty_s"] < 15


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_a_long_gemini_outage_gives_up_on_nobody_while_the_breaker_probes(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """A 12 s Gemini outage with a breaker that probes every second and 3 attempts per message:
    the outage is Gemini's, not any message's, so no message is dead-lettered; after heal every
    one of them is answered, once, in order."""
    world = build_world(emulators, channels=3, users=2)
    env = {
        **bot_env, "RETRY_MAX_ATTEMPTS": "1", "BREAKER_FAIL_MAX": "2", "BREAKER_RESET_SECONDS": "1",
        "QUEUE_MAX_ATTEMPTS": "3",
    }
    ledger = Ledger(emulators.discord, prefix="o")
    async with started_bot(spawn_bot, emulators, env) as api:
        emulators.gemini.faults.add("503")
        asked = await traffic(ledger, world, 6, spacing=0.1, text="long outage")
        await ledger.wait_for(lambda: all(a.acks for a in asked), timeout=10)
        await asyncio.sleep(12)
        probes = generate_requests(emulators)
        assert len(probes) > len(asked) + 5, "the breaker did not probe during the outage"
        emulators.gemini.faults.clear()
        await ledger.wait_settled(timeout=20)
        given_up = [ledger.describe(a) for a in asked if a.seen is Seen.TOLD_WHY]
        assert not given_up, given_up
        await settle(ledger, api, timeout=10)
        assert_promise_kept(ledger, [api.proc])
        assert await api.proc.terminate() == 0


# --- timeouts (hangs) ---------------------------------------------------------------------------


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_gemini_hangs_past_the_timeout_are_answered_or_queued_and_nothing_is_dropped(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """30% of Gemini calls hang for 4 s of traffic, then all of them for 4 s. With a 1 s Gemini
    timeout and a 2 s processing timeout, every user hears within 6 s (an answer or "queued"),
    some are answered directly, the breaker opens while every call hangs, and after heal every
    message is answered once, in order: no processing or mutex timeout drops one."""
    gemini = emulators.gemini
    world = build_world(emulators, channels=4, users=4)
    env = {
        **bot_env,
        "GEMINI_TIMEOUT_SECONDS": "1",
        # Three 1 s attempts do not fit in 2 s: the processing timeout cuts the last one short.
        "PROCESSING_TIMEOUT_SECONDS": "2",
        "MUTEX_ACQUIRE_TIMEOUT_SECONDS": "1",
        "RETRY_MAX_ATTEMPTS": "3",
        "BREAKER_FAIL_MAX": "4",
        "BREAKER_RESET_SECONDS": "1",
    }
    ledger = Ledger(emulators.discord, prefix="h")
    async with started_bot(spawn_bot, emulators, env) as api:
        async with Watch(api) as watch:
            partial = gemini.faults.add("hang", probability=0.3)
            first = await traffic(ledger, world, 16, spacing=0.25)
            await ledger.wait_for(lambda: replied(first), timeout=8)
            assert_heard_within(ledger, first, 6.0)
            assert partial.hits > 0
            assert ledger.tally().seen[Seen.ANSWERED_DIRECT.value] > 0

            gemini.faults.remove(partial.id)
            total = gemini.faults.add("hang")
            second = await traffic(ledger, world, 12, spacing=0.33)
            await ledger.wait_for(lambda: replied(second), timeout=8)
            assert_heard_within(ledger, second, 6.0)
            assert watch.saw("gemini", "open"), watch.states
            assert total.hits > 0

            gemini.faults.clear()
            await settle(ledger, api, timeout=40)
        tally = assert_promise_kept(ledger, [api.proc])
        assert tally.seen[Seen.TOLD_WHY.value] == 0, tally  # a hang is transient: nobody is turned away
        assert tally.seen[Seen.ANSWERED_AFTER_QUEUE.value] >= len(second), tally
        assert await api.proc.terminate() == 0
    print(f"hang figures: {tally.as_dict()}")


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_two_busy_conversations_under_gemini_timeouts_are_answered_in_order(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Half of Gemini's calls take 1.5 s against a 1 s timeout while two users each fire 10
    messages into one conversation within 2 s: messages wait for the conversation's lock, time
    out on it (1 s) and are queued behind the others. Every message is still answered exactly
    once, in the order it was asked, and nobody is turned away."""
    gemini = emulators.gemini
    world = build_world(emulators, channels=2, users=2)
    env = {
        **bot_env,
        "GEMINI_TIMEOUT_SECONDS": "1",
        "PROCESSING_TIMEOUT_SECONDS": "3",
        "MUTEX_ACQUIRE_TIMEOUT_SECONDS": "1",
        "RETRY_MAX_ATTEMPTS": "2",
        "BREAKER_FAIL_MAX": "50",  # the lock and the queue are under test, not the breaker
    }
    ledger = Ledger(emulators.discord, prefix="b")
    async with started_bot(spawn_bot, emulators, env) as api:
        slow = gemini.faults.add("latency", probability=0.5, seconds=1.5)
        asked = await traffic(ledger, world, 20, spacing=0.1, text="busy")
        await ledger.wait_for(lambda: replied(asked), timeout=10)
        assert_heard_within(ledger, asked, 6.0)
        busy = [a for a in asked if a.acks and "still working on earlier messages" in a.acks[0].content]
        assert busy, "no message waited behind another in its conversation"
        assert slow.hits > 0
        assert await metric(api, "mutex_timeouts_total") > 0, "no wait for a conversation's lock timed out"
        await settle(ledger, api, timeout=60)  # Gemini stays slow while the queue drains
        gemini.faults.clear()
        tally = assert_promise_kept(ledger, [api.proc])
        assert tally.seen[Seen.TOLD_WHY.value] == 0, tally
        assert await api.proc.terminate() == 0
    print(f"busy conversations: {len(busy)} queued behind others; {tally.as_dict()}")


# --- a flaky mix ---------------------------------------------------------------------------------

FLAKY_KINDS = ("500", "502", "504", "drop", "malformed_json")


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_a_flaky_gemini_mix_of_5xx_html_drops_and_broken_json_loses_nothing(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Under traffic in 6 channels (5 messages a second), one Gemini call in every 0.4 s fails, in
    turn in five ways (500, a 502 HTML page, 504, a dropped connection, a truncated JSON body). Each is
    transient: users get answers (most of them directly, thanks to retries) or "queued" and the
    answer later; nobody is turned away or apologised to, and the log holds no error."""
    gemini = emulators.gemini
    world = build_world(emulators, channels=6, users=4)
    env = {**bot_env, "BREAKER_FAIL_MAX": "8", "BREAKER_RESET_SECONDS": "1"}
    ledger = Ledger(emulators.discord, prefix="f")
    async with started_bot(spawn_bot, emulators, env) as api:
        faults: list[Fault] = []

        async def inject() -> None:
            """One failure every 0.4 s, the kinds in turn: the next call meets it."""
            for n in range(15):
                faults.append(gemini.faults.add(FLAKY_KINDS[n % len(FLAKY_KINDS)], count=1))
                await asyncio.sleep(0.4)

        injector = asyncio.create_task(inject())
        asked = await traffic(ledger, world, 30, spacing=0.2, text="flaky")
        await injector
        await ledger.wait_for(lambda: replied(asked), timeout=10)
        assert_heard_within(ledger, asked, 5.0)
        hits = {kind: sum(f.hits for f in faults if f.kind == kind) for kind in FLAKY_KINDS}
        assert min(hits.values()) >= 2, hits  # each kind met at least twice
        gemini.faults.clear()
        await settle(ledger, api, timeout=30)
        tally = assert_promise_kept(ledger, [api.proc])
        assert tally.seen[Seen.TOLD_WHY.value] == 0, tally
        assert tally.seen[Seen.ANSWERED_DIRECT.value] > tally.sent // 2, tally
        assert await api.proc.terminate() == 0
    print(f"flaky figures: hits {hits}; {tally.as_dict()}")


# --- 429 storm ----------------------------------------------------------------------------------

SHORT_DELAY = 0.6  # under RETRY_HINT_CAP_SECONDS (2 in the test settings): retried in place
LONG_DELAY = 4.0  # over the cap: the message is queued and tried again after the delay
DELAY_SLACK = 0.05  # clocks: the bot schedules by wall time, the emulator stamps monotonic


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_gemini_429_storm_retries_short_delays_in_place_and_queues_long_ones(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """A burst of 8 messages meets 8 429s with retryDelay 0.6 s: each is retried after the delay
    and answered directly (no "queued"). Then 6 messages meet 429s with retryDelay 4 s (over the
    2 s cap): each is acked as queued and answered later. The emulator's request log shows that
    no retry came sooner than the delay its 429 asked for."""
    gemini = emulators.gemini
    world = build_world(emulators, channels=8, users=4)
    # The breaker stays closed through the short storm: it is the retry policy under test here.
    env = {**bot_env, "RETRY_MAX_ATTEMPTS": "3", "BREAKER_FAIL_MAX": "20"}
    ledger = Ledger(emulators.discord, prefix="r")
    async with started_bot(spawn_bot, emulators, env) as api:
        gemini.faults.add("429", count=8, retry_delay=f"{SHORT_DELAY}s")
        short = await asyncio.gather(
            *(ledger.ask(world.channels[n], world.users[n % 4], "short storm") for n in range(8))
        )
        await ledger.wait_for(lambda: all(a.answers for a in short), timeout=15)
        assert all(a.seen is Seen.ANSWERED_DIRECT and not a.acks for a in short), [
            ledger.describe(a) for a in short
        ]

        gemini.faults.add("429", count=6, retry_delay=f"{LONG_DELAY:g}s")
        long = await traffic(ledger, world, 6, spacing=0.1, text="long storm")
        await ledger.wait_for(lambda: all(a.acks for a in long), timeout=5)
        assert not any(a.answers for a in long)
        await settle(ledger, api, timeout=20)
        assert all(a.seen is Seen.ANSWERED_AFTER_QUEUE for a in long), [ledger.describe(a) for a in long]

        requests = generate_requests(emulators)
        for asked, delay in [*((a, SHORT_DELAY) for a in short), *((a, LONG_DELAY) for a in long)]:
            mine = requests_about(requests, asked)
            outcomes = [r.outcome for r in mine]
            # Usually [429, ok]; under load a retry may meet a 429 meant for a slower first call.
            assert outcomes[0] == "fault:429" and outcomes[-1] == "ok", (asked.marker, outcomes)
            assert set(outcomes[:-1]) == {"fault:429"}, (asked.marker, outcomes)
            for before, after in itertools.pairwise(mine):
                waited = after.time - before.time
                assert waited >= delay - DELAY_SLACK, f"{asked.marker}: {waited:.3f} s < {delay} s"
        tally = assert_promise_kept(ledger, [api.proc])
        assert await api.proc.terminate() == 0
    print(f"429 figures: {tally.as_dict()}")


# --- daily quota --------------------------------------------------------------------------------


def assert_told_when(second: list[Asked], world: World, when: str) -> None:
    """The first message of each conversation met the quota and says when; later ones wait behind it."""
    heads = {a.channel_id: a for a in reversed(second)}
    assert len(heads) == len(world.channels)
    for asked in heads.values():
        ack = asked.acks[0].content
        assert "daily quota is used up; it resets in about" in ack and when in ack, ack


# The real API's hint beside a per-day violation is 22-47 s; 2 s keeps the scenario short while
# its traffic still runs well past the hint (a bot that trusted it would ask the primary again).
QUOTA_HINT = 2.0


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_daily_quota_falls_back_to_another_model_and_leaves_the_exhausted_one_until_midnight(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """The primary model's daily quota runs out, and each 429 says "retry in 2s" as the real API
    does: the fallback model answers directly, and the bot does not ask the primary again, not even
    after the hint has long passed (its quota resets at midnight Pacific). The breaker stays closed."""
    gemini = emulators.gemini
    world = build_world(emulators, channels=4, users=3)
    env = {**bot_env, "GEMINI_FALLBACK_MODELS": FALLBACK}
    ledger = Ledger(emulators.discord, prefix="d")
    async with started_bot(spawn_bot, emulators, env) as api:
        gemini.faults.add("quota_daily", PRIMARY, retry_delay=f"{QUOTA_HINT:g}s")
        started = time.monotonic()
        first = await traffic(ledger, world, 8, spacing=0.2, text="primary is out")
        await ledger.wait_for(lambda: all(a.answers for a in first), timeout=10)
        await asyncio.sleep(2 * QUOTA_HINT)  # well past the hint
        second = await traffic(ledger, world, 8, spacing=0.2, text="still out")
        await ledger.wait_for(lambda: all(a.answers for a in second), timeout=10)
        asked = first + second
        assert all(a.seen is Seen.ANSWERED_DIRECT for a in asked), [ledger.describe(a) for a in asked]
        requests = generate_requests(emulators, started)
        assert {r.outcome for r in requests if r.model == PRIMARY} == {"fault:quota_daily"}
        assert {r.model for r in requests if r.outcome == "ok"} == {FALLBACK}
        # Once the bot knows the primary is exhausted (it turned to the fallback), it stops asking
        # the primary; only calls already in flight then may have met the quota too.
        turned = min(r.time for r in requests if r.model == FALLBACK)
        asked_again = [r for r in requests if r.model == PRIMARY and r.time > turned]
        assert not asked_again, f"the exhausted model was asked {len(asked_again)} more times"
        assert (await api.breakers())["gemini"] == "closed"
        exhausted = (await api.get("/api/health/external/gemini")).get("exhausted_models", {})
        assert exhausted.get(PRIMARY, 0) > 60, exhausted  # until midnight, not the hint
        tally = assert_promise_kept(ledger, [api.proc])
        assert await api.proc.terminate() == 0
    print(f"quota figures: {tally.as_dict()}")


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_daily_quota_exhausted_for_hours_tells_when_and_an_admin_reset_answers_everything(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Every model's daily quota is used up until Pacific midnight (hours away): the breaker is held
    open, each user is told in how many hours the bot expects to answer. Gemini gets more quota
    and an operator resets the breaker over the HTTP API: every queued message is answered at once,
    not hours later when the quota would have reset (the reset makes the waiting items due)."""
    gemini = emulators.gemini
    world = build_world(emulators, channels=4, users=3)
    ledger = Ledger(emulators.discord, prefix="d")
    async with started_bot(spawn_bot, emulators, bot_env) as api:
        gemini.faults.add("quota_daily")
        asked = await traffic(ledger, world, 8, spacing=0.1, text="quota is out")
        await ledger.wait_for(lambda: all(a.acks for a in asked), timeout=10)
        assert_told_when(asked, world, " h.")
        for head in {a.channel_id: a for a in reversed(asked)}.values():
            assert "expect to be able to answer in about" in head.acks[0].content
        circuits = await api.get("/api/health/circuits")
        [row] = [b for b in circuits["breakers"] if b["name"] == "gemini"]
        assert row["state"] == "open", row

        gemini.faults.clear()
        status, body = await api.post("/api/admin/circuit/reset/gemini")
        assert status == 200, body
        await settle(ledger, api, timeout=8)
        assert_promise_kept(ledger, [api.proc])
        assert all(a.seen is Seen.ANSWERED_AFTER_QUEUE for a in asked), [ledger.describe(a) for a in asked]
        assert await api.proc.terminate() == 0
