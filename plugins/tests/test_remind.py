"""The /remind plugin's logic against a real SQLite store, on a fake clock.

These are also the tests a self-modification proposal to ``plugins/remind.py`` must pass
(bot/selfmod.py runs them in a subprocess on a copy of the plugins folder).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from plugins.remind import ReminderDesk, parse_duration, reminder_text
from resilience.clock import FakeClock
from resilience.degradation import ItemKind, QueueItem
from services.storage import SqliteStore


@dataclass
class App:
    """What the plugin uses of the application: storage, clock and the durable notice path."""

    storage: SqliteStore
    clock: FakeClock
    notices: int = 0

    async def queue_notice(self, *, dedup_key: str, text: str, **where: Any) -> QueueItem:
        self.notices += 1
        payload = {"chunks": [text], **where}
        return await self.storage.enqueue(
            ItemKind.OUTBOUND, f"notice:{dedup_key}", payload, now=self.clock.time(), dedup_key=dedup_key
        )


@pytest.fixture
async def app(tmp_path: Path) -> AsyncIterator[App]:
    """A started SQLite store in ``tmp_path`` and a fake clock it shares with the plugin."""
    clock = FakeClock()
    store = SqliteStore(tmp_path / "bot.sqlite3", clock=clock)
    await store.start()
    try:
        yield App(store, clock)
    finally:
        await store.stop()


def test_durations_are_read_in_several_spellings() -> None:
    assert parse_duration("10m") == 600
    assert parse_duration("1h 30m") == parse_duration("1h30m") == 5400
    assert parse_duration("2 days") == 2 * 86400
    assert parse_duration("1w") == 7 * 86400


@pytest.mark.parametrize("text", ["", "soon", "0s", "400d", "10", "5 parsecs"])
def test_what_is_not_a_duration_is_refused(text: str) -> None:
    assert parse_duration(text) is None


def test_the_reminder_pings_its_owner() -> None:
    assert reminder_text(42, "tea") == "<@42> \u23f0 Reminder: tea"


async def test_a_reminder_fires_when_due_and_only_once(app: App) -> None:
    desk = ReminderDesk(app)
    said = await desk.add(user_id=7, channel_id=100, guild_id=None, source_id=555, when="10m", text="stretch")
    assert "in 10 minutes" in said and "#1" in said
    assert await desk.fire_due() == 0
    app.clock.advance(599)
    assert await desk.fire_due() == 0
    app.clock.advance(2)
    assert await desk.fire_due() == 1
    assert await desk.fire_due() == 0  # fired: never again
    [item] = await app.storage.list()
    assert item.payload["chunks"] == ["<@7> \u23f0 Reminder: stretch"]


async def test_a_reminder_handed_over_twice_is_queued_once(app: App) -> None:
    """A crash between queueing the delivery and marking the reminder fired: the next pass finds
    the queued delivery by its dedup key instead of adding another."""
    desk = ReminderDesk(app)
    await desk.add(user_id=7, channel_id=100, guild_id=None, source_id=555, when="1m", text="tea")
    app.clock.advance(61)
    [reminder] = await app.storage.due_reminders(now=app.clock.time())
    await app.queue_notice(dedup_key=f"reminder:{reminder.id}", text="tea")  # the first pass, then the crash
    assert await desk.fire_due() == 1
    assert len(await app.storage.list()) == 1


async def test_reminders_are_listed_and_cancelled_by_their_owner_only(app: App) -> None:
    desk = ReminderDesk(app)
    await desk.add(user_id=7, channel_id=100, guild_id=1, source_id=1, when="1h", text="one")
    await desk.add(user_id=8, channel_id=100, guild_id=1, source_id=2, when="2h", text="two")
    assert "#1 in 1 hour: one" in await desk.listing(7)
    assert "no reminder #2" in await desk.cancel(7, 2)
    assert "cancelled" in await desk.cancel(8, 2)
    assert await desk.listing(8) == "You have no reminders waiting."


async def test_the_loop_sleeps_until_the_next_reminder_at_most_its_poll(app: App) -> None:
    desk = ReminderDesk(app)
    assert await desk.seconds_to_next() == 30.0
    await desk.add(user_id=7, channel_id=100, guild_id=None, source_id=1, when="5s", text="x")
    assert await desk.seconds_to_next() == 5.0
