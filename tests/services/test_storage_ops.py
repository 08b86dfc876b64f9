"""Storage for operations (migration 3): incidents, per-day availability kept by triggers, alert states.

A real SQLite file or PostgreSQL database each time (a test on ``store`` runs on both); the
availability counts come from the queue's own transitions.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from resilience.degradation import ItemKind, ItemState
from services.storage import (
    DAY,
    INCIDENTS_MAX,
    MIGRATIONS,
    AlertRecord,
    IncidentRecord,
    SqliteStore,
)
from tests.services.conftest import OpenStore, Store, execute

IN, OUT = ItemKind.INBOUND, ItemKind.OUTBOUND
DAY0 = 19_700 * DAY  # midnight UTC of some day
LEASE = 60.0


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    async with open_store(synchronous="NORMAL") as s:
        yield s


async def accept(store: Store, message_id: int, at: float, *, claim: bool = True):  # type: ignore[no-untyped-def]
    item = await store.accept(
        message_id, IN, f"c{message_id}", {"message_id": message_id}, now=at, lease_seconds=LEASE, claim=claim
    )
    assert item is not None
    return item


# --- availability ------------------------------------------------------------------------------


async def test_availability_counts_accepted_and_answered_in_time_per_day_of_acceptance(
    store: Store,
) -> None:
    """Answered within 30 s counts in time; later counts as answered only; dead-lettered, never; a
    late answer counts for the day the message was accepted."""
    fast = await accept(store, 1, DAY0 + 100)
    slow = await accept(store, 2, DAY0 + 200)
    dead = await accept(store, 3, DAY0 + 300)
    late = await accept(store, 4, DAY0 + DAY - 10)  # accepted just before midnight
    await store.finish(fast.id, now=DAY0 + 100 + 29.9)
    await store.finish(slow.id, now=DAY0 + 200 + 45)
    await store.dead_letter(dead.id, "gave up", now=DAY0 + 400)
    await store.complete(late.id, now=DAY0 + DAY + 5)  # answered 15 s later, the next day
    [day] = await store.availability(now=DAY0 + DAY + 100, days=2)
    assert day.day == int(DAY0 // DAY)
    assert (day.accepted, day.answered, day.answered_in_time, day.settled) == (4, 3, 2, 4)


async def test_a_message_waiting_less_than_30_s_is_not_settled_but_one_waiting_longer_is_a_miss(
    store: Store,
) -> None:
    await accept(store, 1, DAY0 + 1000)
    await accept(store, 2, DAY0 + 1100, claim=False)
    [day] = await store.availability(now=DAY0 + 1110)
    assert (day.accepted, day.settled, day.answered_in_time) == (2, 1, 0)


async def test_notices_and_other_outbound_items_are_not_accepted_messages(store: Store) -> None:
    """A notice or an alert queued for delivery is neither accepted nor answered for availability."""
    note = await store.enqueue(OUT, "alerts", {"chunks": ["x"], "notice": True}, now=DAY0 + 5)
    [claimed] = await store.claim(now=DAY0 + 5, lease_seconds=LEASE)
    assert claimed.id == note.id
    await store.finish(note.id, now=DAY0 + 6)
    assert await store.availability(now=DAY0 + 10) == []
    # An accepted message whose answer was staged as outbound still counts when finished.
    item = await accept(store, 9, DAY0 + 20)
    await store.update_payload(item.id, {"message_id": 9, "chunks": ["a", "b"]}, kind=OUT)
    await store.finish(item.id, now=DAY0 + 25)
    [day] = await store.availability(now=DAY0 + 100)
    assert (day.accepted, day.answered, day.answered_in_time) == (1, 1, 1)


async def test_a_damaged_payload_does_not_stop_an_item_from_finishing(store: Store) -> None:
    item = await accept(store, 1, DAY0)
    # Write a non-JSON payload behind the store's back, as a damaged file would hold.
    await execute(store, f"UPDATE queue SET payload = 'not json' WHERE id = {item.id}")
    await store.finish(item.id, now=DAY0 + 1)
    [day] = await store.availability(now=DAY0 + 100)
    assert day.answered_in_time == 1


async def test_housekeeping_deleting_done_items_keeps_the_counts(store: Store) -> None:
    item = await accept(store, 1, DAY0)
    await store.finish(item.id, now=DAY0 + 1)
    await store.housekeeping(now=DAY0 + 10, queue_retention=0, history_retention=0, processed_retention=0)
    assert await store.list(ItemState.DONE) == []
    [day] = await store.availability(now=DAY0 + 100)
    assert (day.accepted, day.answered_in_time) == (1, 1)


async def test_the_migration_upgrades_a_version_2_database_with_its_queue(tmp_path: Path) -> None:
    """A database made by the previous version keeps its items; counting starts with migration 3."""
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version, statements in enumerate(MIGRATIONS[:2], start=1):
        for statement in statements:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    conn.execute(
        "INSERT INTO queue (kind, conversation_key, payload, state, created_at, next_attempt_at) "
        "VALUES ('inbound', 'c', '{}', 'pending', ?, ?)",
        (DAY0, DAY0),
    )
    conn.commit()
    conn.close()
    store = SqliteStore(path)
    await store.start()
    try:
        assert await store.schema_version() == len(MIGRATIONS) >= 3
        [old] = await store.list(ItemState.PENDING)
        [claimed] = await store.claim(now=DAY0 + 1, lease_seconds=LEASE)
        await store.finish(claimed.id, now=DAY0 + 2)
        [day] = await store.availability(now=DAY0 + 100)
        assert (day.accepted, day.answered) == (0, 1)  # accepted before the counting began
        assert old.id == claimed.id
    finally:
        await store.stop()


# --- incidents ---------------------------------------------------------------------------------


async def test_incidents_are_inserted_updated_listed_newest_first_and_bounded(store: Store) -> None:
    first = IncidentRecord("breaker", "gemini", "Boom (503)", started_at=DAY0)
    first_id = await store.save_incident(first)
    second = IncidentRecord("degraded", "degraded", "queue", started_at=DAY0 + 50)
    second_id = await store.save_incident(second)
    ended = IncidentRecord(
        "breaker", "gemini", "Boom (503)", started_at=DAY0, ended_at=DAY0 + 90, settled_at=DAY0 + 100,
        queued=4, answered_after=4, dead_lettered=0, id=first_id,
    )
    assert await store.save_incident(ended) == first_id
    rows = await store.incidents()
    assert [r.id for r in rows] == [second_id, first_id]
    assert rows[1] == ended
    assert [r.id for r in await store.incidents(since=DAY0 + 10)] == [second_id]
    for n in range(INCIDENTS_MAX):
        await store.save_incident(IncidentRecord("breaker", "storage", "x", started_at=DAY0 + 100 + n))
    rows = await store.incidents(limit=INCIDENTS_MAX + 10)
    assert len(rows) == INCIDENTS_MAX and first_id not in {r.id for r in rows}


async def test_open_incidents_of_a_dead_process_are_closed_at_start(open_store: OpenStore) -> None:
    async with open_store() as dead:  # the process that recorded them, then died
        open_id = await dead.save_incident(IncidentRecord("breaker", "gemini", "x", started_at=DAY0))
        done = IncidentRecord("breaker", "gemini", "x", started_at=DAY0 - 500, ended_at=DAY0 - 400,
                              settled_at=DAY0 - 300, note=None)
        await dead.save_incident(done)
    store = open_store()
    await store.start()
    assert await store.close_open_incidents(now=DAY0 + 60, note="process restarted") == 1
    rows = {r.id: r for r in await store.incidents()}
    assert rows[open_id].ended_at == DAY0 + 60 and rows[open_id].note == "process restarted"
    await store.stop()


# --- alert states ------------------------------------------------------------------------------


async def test_alert_states_are_replaced_and_deleted_in_one_call(store: Store) -> None:
    a = AlertRecord("breaker_open:gemini", "open 90 s", DAY0, DAY0 + 1, None)
    b = AlertRecord("queue_age", "oldest 400 s", DAY0, None, None)
    await store.save_alert_states([a, b])
    a2 = AlertRecord("breaker_open:gemini", "open 90 s", DAY0, DAY0 + 1, DAY0 + 30)
    await store.save_alert_states([a2], delete=["queue_age"])
    assert await store.alert_states() == [a2]


async def test_recent_inbound_lists_accepted_messages_of_any_state_newest_first(store: Store) -> None:
    """What a process taking over shards reads back: inbound payloads since a time, any state."""
    items = [await accept(store, n, DAY0 + n) for n in (1, 2, 3)]
    await store.accept(
        "out", OUT, "c9", {"message_id": 9}, now=DAY0 + 4, lease_seconds=LEASE, claim=False
    )
    await store.finish(items[0].id, now=DAY0 + 5)  # answered: still listed
    assert [p["message_id"] for p in await store.recent_inbound(DAY0 + 2, 10)] == [3, 2]
    assert [p["message_id"] for p in await store.recent_inbound(DAY0, 10)] == [3, 2, 1]
    assert [p["message_id"] for p in await store.recent_inbound(DAY0, 1)] == [3]
