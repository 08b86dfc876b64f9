"""Catch-up after a reconnect that could not resume: the real bot against the Discord emulator.

Discord keeps a dropped gateway session resumable for a few minutes only; after that discord.py
IDENTIFIEs afresh and nothing said meanwhile is ever delivered (the emulator does the same:
``session_lifetime``). The bot then reads the channels it was active in and feeds what was
addressed to it through the normal intake, oldest first; intake's dedup by message id keeps
every message answered once.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from sandbox.discord_state import READ_MESSAGE_HISTORY
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot

HOUR = 3600.0


async def outage_past_the_session(live: Live) -> Any:
    """Cut the gateway and keep it unavailable until the bot's session has expired; returns the
    outage fault (remove it to let the bot back in)."""
    discord = live.discord
    outage = discord.faults.add("unavailable", "gateway")
    discord.cut_gateway()
    await discord.wait_until(lambda: discord.live_sessions == 0, timeout=5)
    return outage


async def back_by_identify(live: Live, outage: Any, identified: int) -> None:
    """End the outage and wait until the bot has IDENTIFIED afresh (discord.py waits 5 s first)."""
    discord = live.discord
    discord.faults.remove(outage.id)
    await discord.wait_until(lambda: discord.identify_count > identified and discord.connected, timeout=25)


def replies(live: Live, message: dict[str, Any]) -> list[Any]:
    return live.replies_to(message["id"], int(message["channel_id"]))


@pytest.mark.timeout(90)
async def test_messages_sent_while_the_session_expired_are_answered_once_after_the_new_identify(
    tmp_path: Path,
) -> None:
    """The bot was active in #general, #random and a DM; its connection drops and stays down past
    the session's lifetime. Meanwhile users mention it in #general, reply to it in #random and DM
    it; someone chats in #general without addressing it; and a question in #random dates from 90
    minutes ago (older than the one-hour bound). After the new IDENTIFY each missed message is
    answered exactly once, as a reply; the chatter and the stale question get nothing."""
    async with running_emulators(heartbeat_interval=1.0) as emus, live_bot(emus, tmp_path / "data") as live:
        discord, world = live.discord, live.discord.world
        discord.session_lifetime = 0.3
        general, random_ = discord.channels["general"], discord.channels["random"]
        dm = discord.dm_channel("normal")
        # Active before the drop: #general and the DM now, #random two hours ago (the world's clock).
        for text, channel, mention in (("hello here", general, True), ("hello by dm", dm, False)):
            first = await live.say(text, channel=channel, mention=mention)
            await live.wait_replies(first["id"], channel=channel)
        real = world.clock
        world.clock = lambda: real() - 2 * HOUR
        long_ago = await live.say("hello long ago", channel=random_)
        [answer_long_ago] = await live.wait_replies(long_ago["id"], channel=random_)

        outage = await outage_past_the_session(live)
        world.clock = lambda: real() - 1.5 * HOUR
        stale = await live.say("asked ninety minutes ago", channel=random_)
        world.clock = real
        missed = [
            await live.say("missed in general"),
            await discord.send_user_message(
                random_, "admin", "missed reply in random", reference_message_id=answer_long_ago.id
            ),
            await live.say("missed by dm", channel=dm, mention=False),
        ]
        chatter = await live.say("not for the bot", mention=False)
        before = {c: len(live.sent(c)) for c in (general, random_, dm)}
        await back_by_identify(live, outage, identified=1)

        for message in missed:
            await live.wait_replies(message["id"], channel=int(message["channel_id"]), timeout=15)
        await asyncio.sleep(1.0)  # a repeat, or an answer to what must be ignored, would show by now
        for message in missed:
            [answer] = replies(live, message)
            assert message["content"].split(">")[-1].strip() in answer.content
        assert replies(live, stale) == [] and replies(live, chatter) == []
        assert {c: len(live.sent(c)) - n for c, n in before.items()} == {general: 1, random_: 1, dm: 1}
        assert discord.resume_count == 0 and discord.expired_sessions == 1


@pytest.mark.timeout(90)
async def test_a_channel_whose_history_is_refused_is_skipped_and_the_others_are_caught_up(
    tmp_path: Path,
) -> None:
    """Read Message History is taken from the bot in #random while it is away: that channel's
    history read is refused (403 50001), so its missed message cannot be found, but the other
    channel is still caught up, and the ``discord.read`` breaker stays closed (one channel's
    permission says nothing about Discord)."""
    async with running_emulators(heartbeat_interval=1.0) as emus:
        async with live_bot(emus, tmp_path / "data", BREAKER_FAIL_MAX="1") as live:
            discord = live.discord
            discord.session_lifetime = 0.3
            general, random_ = discord.channels["general"], discord.channels["random"]
            for channel in (general, random_):
                first = await live.say("hello", channel=channel)
                await live.wait_replies(first["id"], channel=channel)
            outage = await outage_past_the_session(live)
            discord.world.set_overwrite(random_, discord.bot_user_id, deny=READ_MESSAGE_HISTORY)
            hidden = await live.say("missed where I cannot look", channel=random_)
            found = await live.say("missed where I can look", channel=general)
            started = time.monotonic()
            await back_by_identify(live, outage, identified=1)
            [answer] = await live.wait_replies(found["id"], timeout=15)
            assert "missed where I can look" in answer.content
            refused = [r for r in discord.requests_for("history") if r.time >= started]
            assert [r.status for r in refused if str(random_) in r.path] == [403]
            assert replies(live, hidden) == []
            assert live.app.board["discord.read"].state.value == "closed"
