"""A chunk resent after its first copy was deleted, in-process against the Discord emulator.

Each chunk of an answer goes out with its own nonce and ``enforce_nonce``. When Discord posted a
chunk but its response was lost, the resend returns the message already posted; when that first
copy was deleted meanwhile (a moderator, the user), Discord does not post it again and answers 404
Unknown Message (10008). That chunk has been delivered (and removed by someone who may): the
rest of the answer must still arrive, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from resilience.degradation import ItemState
from tests.integration.harness import running_emulators
from tests.integration.test_drain import ShiftedClock, advance_while, shift_time
from tests.integration.test_pipeline import Live, live_bot

QUIET = 0.3  # seconds a test watches for something that must not happen


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[tuple[Live, ShiftedClock]]:
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as bot:
        yield bot, shift_time(bot)


async def states(live: Live) -> list[ItemState]:
    return [item.state for item in await live.app.storage.list()]


async def test_the_rest_of_an_answer_arrives_once_after_its_first_copy_was_deleted(
    live: tuple[Live, ShiftedClock],
) -> None:
    """A two-chunk answer: Discord posts the first chunk but the response is lost (the bot queues
    the whole answer), a moderator deletes that copy, and the resend of chunk 0 gets 10008. The
    bot takes that chunk as delivered and sends chunk 1: the channel ends with chunk 1 once, the
    deleted chunk is not posted again, and the item is done, not dead-lettered."""
    bot, clock = live
    bot.discord.faults.add("drop", "send", count=1, after=True)
    msg = await bot.say("reply with 2500 characters")
    [first] = await bot.discord.wait_for_bot_message(bot.general)
    await bot.discord.wait_until(lambda: bot.discord.requests_for("send")[0].status is None, 5)
    await bot.discord.delete_message(bot.general, first.id)
    for _ in range(40):  # skip the queue's back-off until the resend has been answered
        if await states(bot) in ([ItemState.DONE], [ItemState.DEAD]):
            break
        await advance_while(bot, clock, 1)
    assert await states(bot) == [ItemState.DONE]
    await asyncio.sleep(QUIET)
    sent = bot.sent()
    assert [m.deleted for m in sent] == [True, False]
    assert "lorem" in sent[0].content and len(sent[0].content) + len(sent[1].content) >= 2490
    nonces = [(r.status, r.json["nonce"]) for r in bot.discord.requests_for("send")]
    assert nonces == [(None, f"{msg['id']}.0"), (404, f"{msg['id']}.0"), (200, f"{msg['id']}.1")]
