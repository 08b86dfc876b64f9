"""Chaos: the real bot process while Discord misbehaves (REST 503s and 429s, gateway drops, silence).

Each scenario starts ``python -m bot run`` against the sandbox emulators, sets up a Discord
fault, drives steady traffic from several users in several channels, checks what users saw
and what the bot's breakers and queue did during the fault, heals, and then checks the
promise: every message answered (or told why) exactly once, in order per conversation, and a
clean log. ``make chaos`` runs the ``chaos``-marked scenarios; ``make test`` runs one fast
REST scenario and one fast gateway scenario.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence

import pytest

from bot.texts import ACK_MARK
from rehearsal.ledger import Asked, Ledger
from sandbox.discord_emu import RecordedRequest
from tests.chaos.support import Watch, assert_promise_kept, started_bot
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators

USERS = ("normal", "ana", "ben", "cleo")
SAMPLE_SECONDS = 0.05


def add_users(emulators: Emulators) -> list[str]:
    """The scenario's users (must run before the bot starts, so its member cache has them)."""
    world = emulators.discord.world
    for key in USERS[1:]:
        if key not in world.users:
            world.add_member(key, key.capitalize())
    return list(USERS)


def conversations(emulators: Emulators, extra: int = 0) -> list[int]:
    """#general, #random, the thread, a DM, and ``extra`` new text channels (before the bot starts)."""
    discord = emulators.discord
    channels = [discord.channels["general"], discord.channels["random"], discord.thread_id,
                discord.dm_channel("normal")]
    channels += [discord.world.add_text_channel(f"chaos-{n}") for n in range(extra)]
    return channels


async def steady_traffic(
    ledger: Ledger, channels: Sequence[int], users: Sequence[str], *, per_channel: int, gap: float
) -> list[Asked]:
    """Each channel gets ``per_channel`` questions ``gap`` seconds apart, from rotating users, all at once."""
    rotation = itertools.cycle(users)

    async def one_channel(channel: int, offset: float) -> list[Asked]:
        await asyncio.sleep(offset)
        asked = []
        for n in range(per_channel):
            # a DM has one author: the user it belongs to
            author = "normal" if channel == ledger.discord.dm_channel("normal") else next(rotation)
            asked.append(await ledger.ask(channel, author, f"question {n}"))
            await asyncio.sleep(gap)
        return asked

    stagger = gap / max(1, len(channels))
    batches = await asyncio.gather(*(one_channel(c, i * stagger) for i, c in enumerate(channels)))
    return [a for batch in batches for a in batch]


def content_of(request: RecordedRequest) -> str:
    body = request.json if isinstance(request.json, dict) else {}
    return str(body.get("content") or "")


def nonce_of(request: RecordedRequest) -> str | None:
    body = request.json if isinstance(request.json, dict) else {}
    return None if body.get("nonce") is None else str(body["nonce"])


def answers_hit_by(emulators: Emulators, ledger: Ledger, status: int) -> list[Asked]:
    """The questions whose *answer* send got ``status`` from the emulator at least once."""
    hit: dict[int, Asked] = {}
    for request in emulators.discord.requests_for("send"):
        if request.status == status:
            hit.update((a.message_id, a) for a in waiting_on(ledger, request))
    return list(hit.values())


def waiting_on(ledger: Ledger, request: RecordedRequest) -> list[Asked]:
    """The questions whose answer is the body of ``request`` (none for an acknowledgement)."""
    content = content_of(request)
    if content.startswith(ACK_MARK):
        return []
    return [a for a in ledger.asked.values() if a.marker in content]


# Log events the faults legitimately cause, at warning level or above. None are error level:
# a Discord outage is an expected condition. discord.py's own 429 warnings are warnings too.
ALLOWED: tuple[str, ...] = ()


# --- 1. REST degradation: every third send fails with 503 ----------------------------------------


@pytest.mark.timeout(30)
async def test_every_third_send_503_each_user_still_gets_exactly_one_answer(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str]
) -> None:
    """Fast: while every third Discord send fails with 503 (three times: a resend that failed
    again would wait seconds of back-off), every question in four conversations is answered
    exactly once and in order; the answers whose send failed went through the outbound queue and
    arrived later; failures one in three never trip the ``discord.send`` breaker."""
    users = add_users(emulators)
    channels = conversations(emulators)
    ledger = Ledger(emulators.discord)
    async with started_bot(spawn_bot, emulators, bot_env) as api:
        emulators.discord.faults.add("503", "send", every=3, count=3)
        async with Watch(api, 0.1, ready=True) as watch:
            await steady_traffic(ledger, channels, users, per_channel=3, gap=0.1)
            unsettled = await ledger.wait_settled(20)
        assert not unsettled, [ledger.describe(a) for a in unsettled[:10]]
        emulators.discord.faults.clear()
        await api.wait_queue_empty(10)
        assert await api.proc.terminate() == 0
    tally = assert_promise_kept(ledger, [api.proc], allow=ALLOWED)
    failed = [r for r in emulators.discord.requests_for("send") if r.status == 503]
    assert len(failed) == 3, f"the fault hit {len(failed)} sends"
    redelivered = answers_hit_by(emulators, ledger, 503)
    assert redelivered, "no answer send was hit by a 503: the outbound queue was never exercised"
    for asked in redelivered:
        assert len(asked.answers) == 1, ledger.describe(asked)
    assert tally.seen["answered_direct"] + tally.seen["answered_after_queue"] == tally.sent
    assert not watch.saw("discord.send", "open"), watch.states
    print(f"\n{tally.as_dict()} redelivered={len(redelivered)}")


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_rest_degradation_every_third_send_and_a_send_outage_under_steady_traffic(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str]
) -> None:
    """Six conversations, four users, ~20 messages a second for a few seconds; every third send
    fails 503 throughout, every seventh of the others is posted but its response is lost (the
    connection drops), and for 2 s in the middle every send fails. The hard outage opens
    ``discord.send`` (the drain then holds the outbound queue), the 1-in-3 phase alone does not;
    an answer resent after a lost response carries the same nonce, so Discord returns the one
    already posted. After healing the breaker closes, the queue empties, and every question has
    exactly one answer, in order per conversation."""
    users = add_users(emulators)
    channels = conversations(emulators, extra=2)
    ledger = Ledger(emulators.discord)
    async with started_bot(spawn_bot, emulators, bot_env) as api:
        faults = emulators.discord.faults
        faults.add("503", "send", every=3)
        faults.add("drop", "send", every=7, after=True)
        async with Watch(api, SAMPLE_SECONDS, ready=True) as watch:
            traffic = asyncio.create_task(steady_traffic(ledger, channels, users, per_channel=8, gap=0.3))
            await asyncio.sleep(1.0)
            outage = faults.add("503", "send", duration=2.0)
            await api.wait_breaker("discord.send", "open", timeout=5)
            await traffic
            await asyncio.sleep(max(0.0, (outage.until or 0) - time.monotonic()))
            open_pending = watch.max_pending
            faults.clear()
            unsettled = await ledger.wait_settled(60)
        assert not unsettled, [ledger.describe(a) for a in unsettled[:10]]
        await api.wait_breaker("discord.send", "closed", timeout=10)
        await api.wait_queue_empty(10)
        assert await api.proc.terminate() == 0
    tally = assert_promise_kept(ledger, [api.proc], allow=ALLOWED)
    assert tally.sent == len(channels) * 8
    assert tally.seen["answered_direct"] + tally.seen["answered_after_queue"] == tally.sent
    assert open_pending > 0, "nothing was queued while Discord refused every send"
    redelivered = answers_hit_by(emulators, ledger, 503)
    assert len(redelivered) >= 3, f"only {len(redelivered)} answers were hit by a 503"
    sends = emulators.discord.requests_for("send")
    # answers only: discord.py gives every other send (acknowledgements) a random nonce of its own
    lost_responses = [r for r in sends if r.fault == "drop" and waiting_on(ledger, r)]
    assert lost_responses, "no answer was posted with its response lost"
    for request in lost_responses:
        resends = [r for r in sends if r.time > request.time and nonce_of(r) == nonce_of(request)]
        assert resends, f"the answer with nonce {nonce_of(request)} was never resent"
    print(f"\n{tally.as_dict()} redelivered={len(redelivered)} lost_responses={len(lost_responses)} "
          f"max_pending={open_pending} {watch.states}")


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_send_outage_longer_than_the_attempt_budget_loses_no_answer(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str]
) -> None:
    """Every Discord send fails for 15 s while eight questions arrive in four conversations
    (QUEUE_MAX_ATTEMPTS=3, so the queue's back-off gives up within that time). Discord being down
    is no fault of an answer: once it is back, every question must have its answer, once; none
    may be dead-lettered into a notice that cannot be delivered either."""
    users = add_users(emulators)
    channels = conversations(emulators)
    ledger = Ledger(emulators.discord)
    env = {**bot_env, "QUEUE_MAX_ATTEMPTS": "3"}
    async with started_bot(spawn_bot, emulators, env) as api:
        outage = emulators.discord.faults.add("503", "send")
        await steady_traffic(ledger, channels, users, per_channel=2, gap=0.2)
        await api.wait_breaker("discord.send", "open", timeout=5)
        await asyncio.sleep(15)
        emulators.discord.faults.remove(outage.id)
        unsettled = await ledger.wait_settled(10)
        assert await api.proc.terminate() == 0
    assert not unsettled, f"{len(unsettled)} of {len(ledger.asked)} never heard back: " + "; ".join(
        ledger.describe(a) for a in unsettled[:4]
    )
    assert_promise_kept(ledger, [api.proc], allow=ALLOWED)


# --- 2. 429s with retry_after on send -----------------------------------------------------------


def channel_of(request: RecordedRequest) -> int | None:
    parts = request.path.split("/")
    return int(parts[parts.index("channels") + 1]) if "channels" in parts else None


def retry_of(request: RecordedRequest, later: Sequence[RecordedRequest]) -> RecordedRequest | None:
    """discord.py's retry of a rate-limited request: the next one to the same path with the same body."""
    for candidate in later:
        same = candidate.path == request.path and candidate.json == request.json
        if same and candidate.time > request.time:
            return candidate
    return None


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_send_429_per_route_retry_after_is_honoured_and_nothing_is_answered_twice(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str]
) -> None:
    """Under steady traffic in five conversations, every other send (four times) answers 429
    with ``retry_after`` 1 s for its route. discord.py waits and retries the same request: the
    emulator sees the retry no sooner than ``retry_after`` after the 429 and meanwhile no other
    send to that channel (its bucket), while other channels' answers keep flowing; the waiting
    answers arrive after the delay, each exactly once; rate limits never trip ``discord.send``."""
    retry_after = 1.0
    users = add_users(emulators)
    channels = conversations(emulators, extra=1)
    ledger = Ledger(emulators.discord)
    discord = emulators.discord
    async with started_bot(spawn_bot, emulators, bot_env) as api:
        discord.faults.add("429", "send", every=2, count=4, retry_after=retry_after)
        async with Watch(api, SAMPLE_SECONDS, ready=True) as watch:
            await steady_traffic(ledger, channels, users, per_channel=5, gap=0.25)
            unsettled = await ledger.wait_settled(30)
        assert not unsettled, [ledger.describe(a) for a in unsettled[:10]]
        await api.wait_queue_empty(10)
        assert await api.proc.terminate() == 0
    tally = assert_promise_kept(ledger, [api.proc], allow=ALLOWED)
    assert tally.seen["answered_direct"] + tally.seen["answered_after_queue"] == tally.sent

    rest = list(discord.requests)
    limited = [r for r in rest if r.status == 429]
    assert len(limited) == 4, [(r.route, r.status) for r in rest]
    served_elsewhere = 0
    for hit in limited:
        retry = retry_of(hit, rest)
        assert retry is not None, f"the 429 on {hit.path} was never retried"
        waited = retry.time - hit.time
        assert waited >= retry_after - 0.01, f"retried after {waited:.3f} s < retry_after {retry_after}"
        window = [r for r in rest if r.route == "send" and hit.time < r.time < hit.time + retry_after - 0.01]
        same_bucket = [r for r in window if channel_of(r) == channel_of(hit)]
        assert not same_bucket, f"{len(same_bucket)} sends to the rate-limited channel inside retry_after"
        served_elsewhere += len(window)
        for asked in waiting_on(ledger, hit):
            assert asked.answers[0].at >= hit.time + retry_after - 0.01, ledger.describe(asked)
    # a per-route limit holds one bucket only: other channels' answers kept flowing
    assert served_elsewhere > 0, "no other channel was served during any per-route limit"
    assert not watch.saw("discord.send", "open"), watch.states
    print(f"\n{tally.as_dict()} sends_to_other_channels_meanwhile={served_elsewhere}")


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_send_global_429_holds_every_request_for_retry_after(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str]
) -> None:
    """After some steady traffic, an answer's send gets a *global* 429 with ``retry_after`` 1.5 s,
    and questions then arrive in three other channels. discord.py holds every REST request that
    starts during the limit: the emulator sees no request at all (any route, any channel) until
    ``retry_after`` has passed; then the limited answer is retried and the others go out, each
    exactly once."""
    retry_after = 1.5
    users = add_users(emulators)
    channels = conversations(emulators)
    ledger = Ledger(emulators.discord)
    discord = emulators.discord
    async with started_bot(spawn_bot, emulators, bot_env) as api:
        await steady_traffic(ledger, channels, users, per_channel=3, gap=0.2)
        assert not await ledger.wait_settled(15)
        discord.faults.add("429", "send", count=1, retry_after=retry_after, global_=True)
        first = await ledger.ask(channels[0], "ana", "answered into a global rate limit")
        await discord.wait_until(lambda: any(r.status == 429 for r in discord.requests), timeout=10)
        hit = next(r for r in discord.requests if r.status == 429)
        await asyncio.sleep(0.1)  # discord.py has read the 429 by now: new requests wait for it
        # (the last conversation is the DM with "normal")
        askers = [(channels[1], "ben"), (channels[2], "cleo"), (channels[3], "normal")]
        later = [await ledger.ask(c, who, "asked during the global limit") for c, who in askers]
        unsettled = await ledger.wait_settled(20)
        assert not unsettled, [ledger.describe(a) for a in unsettled[:10]]
        assert await api.proc.terminate() == 0
    tally = assert_promise_kept(ledger, [api.proc], allow=ALLOWED)
    assert tally.seen["answered_direct"] + tally.seen["answered_after_queue"] == tally.sent
    rest = list(discord.requests)
    retry = retry_of(hit, rest)
    assert retry is not None and retry.time - hit.time >= retry_after - 0.01, "the 429 was not waited out"
    window = [r for r in rest if hit.time + 0.1 < r.time < hit.time + retry_after - 0.01]
    assert not window, f"{[(r.route, round(r.time - hit.time, 3)) for r in window]} during a global limit"
    assert waiting_on(ledger, hit) == [first]
    for asked in [first, *later]:
        assert len(asked.answers) == 1, ledger.describe(asked)
        assert asked.answers[0].at >= hit.time + retry_after - 0.01, ledger.describe(asked)
    print(f"\n{tally.as_dict()}")


# --- 3. Gateway drop with RESUME ----------------------------------------------------------------


async def redeliver(emulators: Emulators, asked: Sequence[Asked]) -> None:
    """Discord delivers at least once: dispatch these MESSAGE_CREATEs again, as a replay would."""
    for a in asked:
        await emulators.discord.redeliver_message(a.channel_id, a.message_id)


@pytest.mark.timeout(30)
async def test_gateway_close_mid_traffic_resumes_and_replays_each_message_once(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str]
) -> None:
    """Fast: the gateway closes with 4000 instead of delivering a user's message; discord.py
    RESUMEs (no new IDENTIFY), the emulator replays what it missed, and every message, the
    held-back one and those sent while the bot was away included, is answered exactly once,
    also after three of them are delivered a second time."""
    users = add_users(emulators)
    channels = conversations(emulators)[:3]
    ledger = Ledger(emulators.discord)
    discord = emulators.discord
    async with started_bot(spawn_bot, emulators, bot_env) as api:
        identified, resumed = discord.identify_count, discord.resume_count
        first = await steady_traffic(ledger, channels, users, per_channel=1, gap=0.05)
        discord.faults.add("close", "gateway", count=1, code=4000)
        held = await ledger.ask(channels[0], "ana", "sent as the gateway closes")
        away = []  # sent before the RESUME: they wait in the session's buffer and are replayed
        for n in range(6):
            asked = await ledger.ask(channels[n % 3], users[n % 4], "sent while the bot is away")
            if discord.resume_count > resumed:
                break
            away.append(asked)
        await discord.wait_until(lambda: discord.resume_count > resumed, timeout=5)
        after = await steady_traffic(ledger, channels, users, per_channel=1, gap=0.05)
        unsettled = await ledger.wait_settled(15)
        assert not unsettled, [ledger.describe(a) for a in unsettled[:10]]
        await redeliver(emulators, [first[0], held, after[-1]])
        await asyncio.sleep(1.2)  # a drain pass and more: a repeat, if answered, would show by now
        assert await api.proc.terminate() == 0
    tally = assert_promise_kept(ledger, [api.proc], allow=ALLOWED)
    assert discord.identify_count == identified, "the bot identified again instead of resuming"
    assert discord.resume_count == resumed + 1
    assert away, "the bot was back before a message could be sent while it was away"
    for asked in [held, *away]:
        assert len(asked.answers) == 1, ledger.describe(asked)
    print(f"\n{tally.as_dict()} replayed={1 + len(away)}")


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_gateway_drops_of_every_kind_under_steady_traffic_resume_and_answer_once(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str]
) -> None:
    """Five conversations with steady traffic for ~4 s while the gateway goes away three ways:
    a close with 4000 instead of a dispatch, a TCP cut with no close frame, and an op 7
    RECONNECT. Each time discord.py RESUMEs (the IDENTIFY count never moves), the emulator
    replays what the bot missed, and every message is answered exactly once, in order; the
    whole burst delivered a second time afterwards (Discord's at-least-once) changes nothing."""
    users = add_users(emulators)
    channels = conversations(emulators, extra=1)
    ledger = Ledger(emulators.discord)
    discord = emulators.discord
    async with started_bot(spawn_bot, emulators, bot_env) as api:
        identified, resumed = discord.identify_count, discord.resume_count

        async def drops() -> list[Asked]:
            """Drop the gateway three ways (each once the bot is back from the one before); right
            after each drop, before the bot can be back, a user asks: only a replay delivers that."""
            away = []
            for n, drop in enumerate(("close", "cut", "reconnect")):
                await asyncio.sleep(0.8)
                before = discord.resume_count
                if drop == "close":
                    discord.faults.add("close", "gateway", count=1, code=4000)  # hits the next dispatch
                elif drop == "cut":
                    discord.cut_gateway()
                else:
                    await discord.send_reconnect()
                away.append(await ledger.ask(channels[n], users[n], f"asked right after the {drop}"))
                assert discord.resume_count == before, "resumed before the next dispatch"
                await discord.wait_until(lambda: discord.resume_count > before, timeout=10)  # noqa: B023
            return away

        dropper = asyncio.create_task(drops())
        await steady_traffic(ledger, channels, users, per_channel=12, gap=0.3)
        away = await dropper
        unsettled = await ledger.wait_settled(30)
        assert not unsettled, [ledger.describe(a) for a in unsettled[:10]]
        await redeliver(emulators, list(ledger.asked.values()))
        await asyncio.sleep(1.5)  # more than a drain pass: a repeat, if answered, would show by now
        await api.wait_queue_empty(10)
        ready = await api.get("/ready")
        assert ready["ready"], ready
        assert await api.proc.terminate() == 0
    tally = assert_promise_kept(ledger, [api.proc], allow=ALLOWED)
    assert tally.sent == len(channels) * 12 + 3
    for asked in away:
        assert len(asked.answers) == 1, ledger.describe(asked)
    assert tally.seen["answered_direct"] + tally.seen["answered_after_queue"] == tally.sent
    assert discord.identify_count == identified, "the bot identified again instead of resuming"
    assert discord.resume_count == resumed + 3
    print(f"\n{tally.as_dict()}")


# --- 4. Silent gateway --------------------------------------------------------------------------


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_silent_gateway_is_noticed_resumed_and_what_was_said_meanwhile_is_answered_once(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str]
) -> None:
    """The gateway connection goes silent (no heartbeat ACKs, no events) while users keep talking.
    The healer notices the zombie connection (HEAL_GATEWAY_SILENCE_SECONDS, 45 s by default; else
    discord.py's heartbeat timeout, 60 s of nothing received), closes it and discord.py RESUMEs;
    the messages sent during the silence are replayed and answered
    exactly once, none before the RESUME (the bot never had them), none twice."""
    users = add_users(emulators)
    channels = conversations(emulators)
    ledger = Ledger(emulators.discord)
    discord = emulators.discord
    async with started_bot(spawn_bot, emulators, bot_env) as api:
        identified, resumed = discord.identify_count, discord.resume_count
        await steady_traffic(ledger, channels, users, per_channel=1, gap=0.05)
        assert not await ledger.wait_settled(10)
        discord.set_silent(True)
        silenced = time.monotonic()
        async with Watch(api, 0.5, ready=True) as watch:
            quiet = await steady_traffic(ledger, channels, users, per_channel=3, gap=1.0)
            await discord.wait_until(lambda: discord.resume_count > resumed, timeout=90)
            back = time.monotonic()
            unsettled = await ledger.wait_settled(20)
        assert not unsettled, [ledger.describe(a) for a in unsettled[:10]]
        await asyncio.sleep(1.2)  # a drain pass and more: a repeat, if answered, would show by now
        ready = await api.get("/ready")
        assert ready["ready"], ready
        assert await api.proc.terminate() == 0
    tally = assert_promise_kept(ledger, [api.proc], allow=ALLOWED)
    assert discord.identify_count == identified, "the bot identified again instead of resuming"
    assert discord.resume_count == resumed + 1
    for asked in quiet:
        assert len(asked.answers) == 1, ledger.describe(asked)
        assert asked.answers[0].at >= back - 0.1, f"answered before the RESUME: {ledger.describe(asked)}"
    noticed = back - silenced
    assert noticed < 75, f"the silent gateway went unnoticed for {noticed:.0f} s"
    print(f"\n{tally.as_dict()} silence noticed after {noticed:.1f} s; /ready not ready in "
          f"{len(watch.not_ready)} of {watch.samples} samples: {watch.not_ready[:3]}")
