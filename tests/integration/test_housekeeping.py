"""The running bot keeps its database small: the drain's housekeeping deletes dead-lettered items
and conversation turns past their retention (``QUEUE_RETENTION_SECONDS``,
``HISTORY_RETENTION_SECONDS``), and never a live item. Hours pass by moving the application's
wall clock, never by sleeping."""

from __future__ import annotations

import asyncio
from pathlib import Path

from resilience.degradation import ItemState
from tests.integration.test_drain import shift_time, start, states


async def test_the_drain_deletes_dead_items_and_old_history_past_their_retention(tmp_path: Path) -> None:
    settings = {
        "QUEUE_RETENTION_SECONDS": "3600", "HISTORY_RETENTION_SECONDS": "7200",
        "QUEUE_MAX_ATTEMPTS": "1", "BREAKER_FAIL_MAX": "50", "RETRY_MAX_ATTEMPTS": "1",
    }
    async with start(tmp_path, **settings) as live:
        clock = shift_time(live)
        answered = await live.say("remember this")
        await live.wait_replies(answered["id"], answers_only=True)
        live.gemini.faults.add("500")
        dead = await live.say("this one fails")
        [told] = await live.wait_replies(dead["id"])  # dead-lettered at its first attempt
        assert "tried 1 time" in told.content, told.content
        live.gemini.faults.clear()
        assert ItemState.DEAD in await states(live)
        key = str(live.general)
        assert len(await live.app.storage.history(key)) == 2

        async def settle(seconds: float) -> None:
            """Move the clock, and wait until the drain has run its housekeeping at the new time."""
            clock.advance(seconds)
            now = clock.time()
            for _ in range(200):
                live.bot.drain.wake()
                await asyncio.sleep(0.02)
                if live.bot.drain.next_housekeeping > now:
                    return
            raise AssertionError("the drain did not run its housekeeping")

        await settle(1800)  # half the queue retention: the dead item stays
        assert await states(live) == [ItemState.DEAD]
        await settle(1900)  # past it: gone; the history (2 h) stays
        assert await states(live) == []
        assert len(await live.app.storage.history(key)) == 2
        await settle(3700)  # past the history retention
        assert await live.app.storage.history(key) == []
