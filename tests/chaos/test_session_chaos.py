"""Chaos: the gateway stays away longer than Discord keeps a session, with the real bot process.

Discord lets a dropped session be resumed for a few minutes only; after that discord.py must
IDENTIFY afresh and nothing said meanwhile is ever delivered (the emulator's ``session_lifetime``,
shortened here). The bot reads back what it missed (``bot/catchup.py``); the promise holds.
"""

from __future__ import annotations

import asyncio

import pytest

from rehearsal.ledger import Ledger
from tests.chaos.support import assert_promise_kept, started_bot
from tests.chaos.test_discord_chaos import ALLOWED, add_users, conversations, steady_traffic
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators


@pytest.mark.chaos
@pytest.mark.timeout(120)
async def test_an_outage_past_the_session_lifetime_is_caught_up_and_every_message_answered_once(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str]
) -> None:
    """Four conversations (#general, #random, the thread, a DM) talk to the bot; the gateway is cut
    and refuses connections until the session has expired, while users keep asking. discord.py
    tries to RESUME, gets op 9 and IDENTIFIEs; the bot catches up, and then traffic goes on. Every
    message, those sent while it was away included, is answered exactly once, in order, and the
    log is clean. Traffic pauses from the end of the outage until the catch-up has run: a message
    arriving live in that window could be answered before the missed ones of its conversation
    (README, known gaps)."""
    users = add_users(emulators)
    channels = conversations(emulators)
    ledger = Ledger(emulators.discord)
    discord = emulators.discord
    discord.session_lifetime = 0.5
    async with started_bot(spawn_bot, emulators, bot_env) as api:
        identified = discord.identify_count
        await steady_traffic(ledger, channels, users, per_channel=2, gap=0.1)
        assert not await ledger.wait_settled(10)
        outage = discord.faults.add("unavailable", "gateway")
        discord.cut_gateway()
        await discord.wait_until(lambda: discord.live_sessions == 0, timeout=5)
        away = await steady_traffic(ledger, channels, users, per_channel=3, gap=0.1)
        assert discord.identify_count == identified and not discord.connected, "the bot came back too soon"
        discord.faults.remove(outage.id)
        await discord.wait_until(lambda: discord.identify_count > identified, timeout=25)
        await discord.wait_connected(timeout=5)
        await api.proc.wait_for_log(lambda r: r.get("event") == "catchup.done", timeout=20)
        await steady_traffic(ledger, channels, users, per_channel=2, gap=0.1)
        unsettled = await ledger.wait_settled(20)
        assert not unsettled, [ledger.describe(a) for a in unsettled[:10]]
        await asyncio.sleep(1.2)  # a drain pass and more: a repeat, if answered, would show by now
        assert await api.proc.terminate() == 0
    tally = assert_promise_kept(ledger, [api.proc], allow=ALLOWED)
    assert discord.resume_count == 0 and discord.expired_sessions == 1
    for asked in away:
        assert len(asked.answers) == 1, ledger.describe(asked)
    print(f"\n{tally.as_dict()} caught up={len(away)}")
