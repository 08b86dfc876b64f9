"""Housekeeping: finished queue items, old turns and old processed ids go after their retention,
in short bounded transactions; live items never go. Real SQLite files and PostgreSQL databases (a
test on ``store`` or ``open_store`` runs on both), explicit times."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from resilience.degradation import ItemKind, ItemState
from services import storage
from services.pg_storage import PostgresStore
from services.storage import MIGRATIONS, Housekeeping, SqliteStore
from tests.services.conftest import OpenStore, Store

IN, OUT = ItemKind.INBOUND, ItemKind.OUTBOUND
T0 = 1_700_000_000.0
HOUR, DAY = 3600.0, 86400.0
LEASE = 60.0


async def housekeep(store: Store, now: float, **overrides: Any) -> Housekeeping:
    """``housekeeping`` with the default retentions: 7 days for finished items and processed ids,
    30 days for turns."""
    retention = {"queue_retention": 7 * DAY, "history_retention": 30 * DAY, "processed_retention": 7 * DAY}
    return await store.housekeeping(now=now, **(retention | overrides))


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    """A started store on a fresh database (each backend)."""
    async with open_store() as s:
        yield s


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A started SQLite store, for SQLite's own query plans."""
    async with SqliteStore(tmp_path / "bot.sqlite3") as s:
        yield s


async def states(store: Store) -> dict[int, ItemState]:
    return {item.id: item.state for item in await store.list(limit=10_000)}


async def test_finished_items_go_after_their_retention_and_live_items_never(store: Store) -> None:
    dead = await store.enqueue(IN, "a", {}, now=T0)
    await store.dead_letter(dead.id, "gave up", now=T0)
    done = await store.enqueue(IN, "b", {}, now=T0)
    await store.complete(done.id, now=T0)
    stale = await store.enqueue(IN, "c", {}, now=T0)
    (expired,) = await store.expire(now=T0 + DAY + 1, max_age=DAY)
    assert expired.id == stale.id
    pending = await store.enqueue(IN, "d", {}, now=T0)  # as old as the others, still waiting
    claimed = await store.enqueue(OUT, "e", {}, now=T0)
    await store.claim(now=T0, lease_seconds=100 * DAY, kind=OUT)
    recent_dead = await store.enqueue(IN, "f", {}, now=T0 + 6 * DAY)
    await store.dead_letter(recent_dead.id, "gave up", now=T0 + 6 * DAY)

    report = await housekeep(store, T0 + 8 * DAY + 2)
    assert report == Housekeeping(done_items=1, dead_items=1, expired_items=1)
    assert report.total == 3 and not report.more
    assert await states(store) == {
        pending.id: ItemState.PENDING,
        claimed.id: ItemState.CLAIMED,
        recent_dead.id: ItemState.DEAD,  # dead for 2 days of its 7
    }
    later = await housekeep(store, T0 + 400 * DAY)
    assert later.dead_items == 1 and set(await states(store)) == {pending.id, claimed.id}


async def test_retention_counts_from_when_an_item_ended_not_when_it_was_queued(store: Store) -> None:
    """A message that waited 5 days before it was dead-lettered is still kept 7 days for operators."""
    item = await store.enqueue(IN, "a", {}, now=T0)
    await store.dead_letter(item.id, "gave up", now=T0 + 5 * DAY)
    assert (await housekeep(store, T0 + 8 * DAY)).dead_items == 0
    assert (await housekeep(store, T0 + 12 * DAY + 1)).dead_items == 1


async def test_done_items_go_at_once_by_default_or_after_their_own_retention(store: Store) -> None:
    answered = await store.accept(1, IN, "a", {}, now=T0, lease_seconds=LEASE)
    delivered = await store.enqueue(OUT, "b", {}, now=T0)
    assert answered is not None
    await store.finish(answered.id, key="a", turns=[("user", "q", 1)], now=T0 + DAY)
    await store.complete(delivered.id, now=T0 + DAY)
    kept = await housekeep(store, T0 + DAY + 30 * 60, done_retention=HOUR)
    assert kept.done_items == 0
    gone = await housekeep(store, T0 + DAY + 2 * HOUR, done_retention=HOUR)
    assert gone.done_items == 2
    again = await store.enqueue(IN, "c", {}, now=T0)
    await store.complete(again.id, now=T0 + 3 * DAY)
    assert (await housekeep(store, T0 + 3 * DAY + 1)).done_items == 1


async def test_old_turns_and_processed_ids_go_after_their_retention(store: Store) -> None:
    await store.append_turns("old", [("user", "q1", 1), ("model", "a1", None)], now=T0)
    await store.append_turns("mixed", [("user", "q2", 2), ("model", "a2", None)], now=T0)
    await store.append_turns("mixed", [("user", "q3", 3), ("model", "a3", None)], now=T0 + 20 * DAY)
    await store.mark_processed(10, now=T0)
    await store.mark_processed(11, now=T0 + 25 * DAY)

    report = await housekeep(store, T0 + 31 * DAY)
    assert (report.turns, report.processed_ids) == (4, 1)
    assert await store.history("old") == []
    assert [t.text for t in await store.history("mixed")] == ["q3", "a3"]
    assert not await store.is_processed(10) and await store.is_processed(11)


def record_batches(store: Store) -> list[dict[str, int]]:
    """What each housekeeping transaction of ``store`` returns, from now on."""
    batches: list[dict[str, int]] = []
    run = store._run

    async def recording(operation: str, body: Any, *, write: bool = True) -> Any:
        result = await run(operation, body, write=write)
        if operation == "housekeeping":
            batches.append(result)
        return result

    store._run = recording  # type: ignore[method-assign]
    return batches


async def _dead_items(store: Store, n: int) -> None:
    for i in range(n):
        item = await store.enqueue(IN, f"c{i}", {"i": i}, now=T0)
        await store.dead_letter(item.id, "gave up", now=T0)


async def test_each_transaction_deletes_a_bounded_number_of_rows_and_a_call_says_when_more_is_due(
    open_store: OpenStore,
) -> None:
    async with open_store() as s:
        batches = record_batches(s)
        await _dead_items(s, 45)
        await s.append_turns("c", [("user", f"q{i}", i) for i in range(15)], now=T0)
        first = await housekeep(s, T0 + 100 * DAY, batch_rows=10, max_batches=3)
        assert (first.dead_items, first.turns, first.more) == (30, 0, True)
        assert [sum(b.values()) for b in batches] == [10, 10, 10]
        batches.clear()
        rest = await housekeep(s, T0 + 100 * DAY, batch_rows=10, max_batches=10)
        assert (rest.dead_items, rest.turns, rest.more) == (15, 15, False)
        assert all(sum(b.values()) <= 10 for b in batches) and len(batches) == 4
        assert await s.list() == []


async def test_other_writers_go_between_housekeeping_transactions(store: Store) -> None:
    """A message accepted during a long housekeeping run waits for one batch, not for the run (on
    PostgreSQL for none: its batches of one row each make the run last long enough to tell)."""
    await _dead_items(store, 200)
    batch_rows = 1 if isinstance(store, PostgresStore) else 10
    run = asyncio.ensure_future(
        housekeep(store, T0 + 100 * DAY, batch_rows=batch_rows, max_batches=1000)
    )
    await asyncio.sleep(0)  # housekeeping takes the store for its first batch
    accepted = await store.accept(1, IN, "live", {}, now=T0, lease_seconds=LEASE)
    assert accepted is not None and not run.done()
    # The store serves waiters in turn: this read comes after a batch or two, not after all 20.
    assert len(await store.list(ItemState.DEAD, limit=1000)) >= 150
    report = await run
    assert report.dead_items == 200 and await store.get(accepted.id) is not None


async def test_housekeeping_refuses_negative_retentions_and_empty_batches(store: Store) -> None:
    with pytest.raises(ValueError, match="history_retention"):
        await housekeep(store, T0, history_retention=-1)
    with pytest.raises(ValueError, match="batch_rows"):
        await housekeep(store, T0, batch_rows=0)


async def test_a_database_from_before_housekeeping_prunes_its_old_rows_after_the_migration(
    tmp_path: Path,
) -> None:
    """Finished rows of schema 1 have no end time: they count from their creation."""
    path = tmp_path / "bot.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        for n, (state, created) in enumerate(
            [("dead", T0), ("expired", T0), ("done", T0), ("dead", T0 + 28 * DAY), ("pending", T0)]
        ):
            conn.execute(
                "INSERT INTO queue (kind, conversation_key, payload, state, created_at, next_attempt_at) "
                "VALUES ('inbound', ?, ?, ?, ?, ?)",
                (f"c{n}", json.dumps({"n": n}), state, created, created),
            )
        conn.execute(
            "INSERT INTO turns (conversation_key, role, text, created_at) VALUES ('c', 'user', 'old', ?)",
            (T0,),
        )
    conn.close()
    async with SqliteStore(path) as s:
        report = await housekeep(s, T0 + 31 * DAY)
        assert report == Housekeeping(done_items=1, dead_items=1, expired_items=1, turns=1)
        assert sorted(i.state.value for i in await s.list()) == ["dead", "pending"]


@pytest.mark.parametrize(
    ("sql", "args", "index"),
    [
        (storage._PRUNE_FINISHED_SQL, {"state": "dead", "cutoff": T0, "limit": 5}, "queue_finished"),
        (storage._PRUNE_TURNS_SQL, {"cutoff": T0, "limit": 5}, "turns_by_time"),
        (storage._PRUNE_PROCESSED_SQL, {"cutoff": T0, "limit": 5}, "processed_by_time"),
    ],
)
async def test_each_deletion_finds_its_rows_through_an_index(
    sqlite_store: SqliteStore, sql: str, args: dict[str, Any], index: str
) -> None:
    """No full scan of a big table while the write lock is held."""
    store = sqlite_store
    await store.stop()
    with sqlite3.connect(store.path) as conn:
        plan = " | ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", args))
    conn.close()
    assert f"INDEX {index}" in plan and "SCAN" not in plan.replace("LIST SUBQUERY", ""), plan
