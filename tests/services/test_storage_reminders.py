"""Reminders (plugins/remind.py) in both storage backends: stored, due in order, fired once, per
user, capped, and kept across a restart."""

from __future__ import annotations

import pytest

from resilience.degradation import ItemKind
from services.storage import REMINDERS_PER_USER, TooManyRemindersError
from tests.services.conftest import OpenStore

T0 = 1_700_000_000.0


async def test_reminders_are_due_in_order_fire_once_and_outlive_a_restart(open_store: OpenStore) -> None:
    async with open_store() as store:
        late = await store.add_reminder(
            user_id=7, channel_id=100, guild_id=1, source_id=11, text="late", due_at=T0 + 120, now=T0
        )
        early = await store.add_reminder(
            user_id=7, channel_id=100, guild_id=None, source_id=12, text="early", due_at=T0 + 60, now=T0
        )
        assert await store.next_reminder_at() == T0 + 60
        assert await store.due_reminders(now=T0 + 59) == []
    async with open_store() as store:  # a restart
        assert [r.id for r in await store.due_reminders(now=T0 + 200)] == [early.id, late.id]
        assert [r.text for r in await store.user_reminders(7)] == ["early", "late"]
        [due] = await store.due_reminders(now=T0 + 60)
        assert due.guild_id is None and due.source_id == 12 and due.channel_id == 100
        await store.reminder_fired(early.id, now=T0 + 61)
        await store.reminder_fired(early.id, now=T0 + 62)  # again: no change
        assert [r.id for r in await store.due_reminders(now=T0 + 200)] == [late.id]
        assert await store.next_reminder_at() == T0 + 120


async def test_a_reminder_is_cancelled_by_its_owner_only(open_store: OpenStore) -> None:
    async with open_store() as store:
        r = await store.add_reminder(
            user_id=7, channel_id=100, guild_id=1, source_id=11, text="x", due_at=T0 + 60, now=T0
        )
        assert not await store.cancel_reminder(r.id, 8)
        assert await store.cancel_reminder(r.id, 7)
        assert not await store.cancel_reminder(r.id, 7)
        assert await store.next_reminder_at() is None


async def test_a_user_has_at_most_so_many_reminders_waiting(open_store: OpenStore) -> None:
    async with open_store() as store:
        for i in range(REMINDERS_PER_USER):
            await store.add_reminder(
                user_id=7, channel_id=1, guild_id=None, source_id=i + 1, text="x", due_at=T0 + 60, now=T0
            )
        with pytest.raises(TooManyRemindersError):
            await store.add_reminder(
                user_id=7, channel_id=1, guild_id=None, source_id=99, text="x", due_at=T0 + 60, now=T0
            )
        await store.add_reminder(
            user_id=8, channel_id=1, guild_id=None, source_id=98, text="x", due_at=T0, now=T0
        )


async def test_the_delivery_of_a_reminder_is_queued_once_by_its_dedup_key(open_store: OpenStore) -> None:
    async with open_store() as store:
        first = await store.enqueue(
            ItemKind.OUTBOUND, "notice:reminder:1", {"chunks": ["x"]}, now=T0, dedup_key="reminder:1"
        )
        again = await store.enqueue(
            ItemKind.OUTBOUND, "notice:reminder:1", {"chunks": ["x"]}, now=T0, dedup_key="reminder:1"
        )
        assert first.id == again.id and len(await store.list()) == 1
