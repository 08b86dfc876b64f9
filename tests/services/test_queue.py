"""The durable degradation queue in SqliteStore, against real SQLite files."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from resilience.degradation import DurableQueue, ItemKind, ItemState
from services.storage import QueueItemNotFoundError, SqliteStore

IN, OUT = ItemKind.INBOUND, ItemKind.OUTBOUND
T0 = 1_700_000_000.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A started store on a fresh file."""
    s = SqliteStore(tmp_path / "queue.sqlite3")
    await s.start()
    yield s
    await s.stop()


def test_store_satisfies_the_durable_queue_protocol() -> None:
    queue: DurableQueue = SqliteStore(Path("unused.sqlite3"))  # mypy checks the structure
    names = ("enqueue", "claim", "complete", "fail", "dead_letter", "expire", "position", "stats", "purge")
    for name in names:
        assert callable(getattr(queue, name))


async def test_enqueue_returns_a_pending_item_with_its_payload(store: SqliteStore) -> None:
    item = await store.enqueue(IN, "c1", {"text": "hi", "n": [1, 2]}, now=T0, dedup_key="m1")
    assert item.state is ItemState.PENDING and item.kind is IN and item.attempts == 0
    assert item.payload == {"text": "hi", "n": [1, 2]} and item.created_at == T0 == item.next_attempt_at
    assert await store.get(item.id) == item
    assert await store.get(item.id + 100) is None


async def test_same_dedup_key_is_never_queued_twice(store: SqliteStore) -> None:
    first = await store.enqueue(IN, "c1", {"v": 1}, now=T0, dedup_key="msg-42")
    again = await store.enqueue(IN, "c1", {"v": 2}, now=T0 + 5, dedup_key="msg-42")
    assert again == first
    no_key = [await store.enqueue(IN, "c1", {}, now=T0) for _ in range(2)]
    assert no_key[0].id != no_key[1].id
    assert len(await store.list()) == 3


async def test_claim_takes_only_the_head_of_each_conversation_across_kinds(store: SqliteStore) -> None:
    a1 = await store.enqueue(OUT, "a", {"n": 1}, now=T0)
    a2 = await store.enqueue(IN, "a", {"n": 2}, now=T0)
    b1 = await store.enqueue(IN, "b", {"n": 1}, now=T0)
    claimed = await store.claim(now=T0 + 1, lease_seconds=30)
    assert [i.id for i in claimed] == [a1.id, b1.id]
    assert all(i.state is ItemState.CLAIMED and i.lease_until == T0 + 31 for i in claimed)
    # a conversation with a live claim yields nothing, even its later items
    assert await store.claim(now=T0 + 2, lease_seconds=30) == []
    await store.complete(a1.id)
    assert [i.id for i in await store.claim(now=T0 + 3, lease_seconds=30)] == [a2.id]


async def test_kind_filter_does_not_skip_ahead_of_a_head_of_the_other_kind(store: SqliteStore) -> None:
    out = await store.enqueue(OUT, "a", {}, now=T0)
    await store.enqueue(IN, "a", {}, now=T0)
    assert await store.claim(now=T0, lease_seconds=30, kind=IN) == []
    assert [i.id for i in await store.claim(now=T0, lease_seconds=30, kind=OUT)] == [out.id]


async def test_claim_respects_limit_and_oldest_first(store: SqliteStore) -> None:
    items = [await store.enqueue(IN, f"c{i}", {}, now=T0 + i) for i in range(5)]
    claimed = await store.claim(now=T0 + 10, lease_seconds=5, limit=2)
    assert [i.id for i in claimed] == [items[0].id, items[1].id]


async def test_expired_lease_returns_the_item_to_pending_for_another_worker(store: SqliteStore) -> None:
    item = await store.enqueue(IN, "c", {}, now=T0)
    await store.claim(now=T0, lease_seconds=10)
    assert await store.claim(now=T0 + 9.9, lease_seconds=10) == []
    again = await store.claim(now=T0 + 10, lease_seconds=10)
    assert [i.id for i in again] == [item.id] and again[0].lease_until == T0 + 20
    assert again[0].attempts == 0


async def test_fail_adds_an_attempt_and_next_attempt_time_is_respected(store: SqliteStore) -> None:
    item = await store.enqueue(IN, "c", {}, now=T0)
    later = await store.enqueue(IN, "c", {}, now=T0)
    await store.claim(now=T0, lease_seconds=30)
    failed = await store.fail(item.id, "503 overloaded", next_attempt_at=T0 + 60)
    assert failed.state is ItemState.PENDING and failed.attempts == 1
    assert failed.last_error == "503 overloaded" and failed.lease_until is None
    # not due yet, and the conversation stays in order: the later item waits behind it
    assert await store.claim(now=T0 + 59, lease_seconds=30) == []
    assert [i.id for i in await store.claim(now=T0 + 60, lease_seconds=30)] == [item.id]
    assert (await store.fail(item.id, "again", next_attempt_at=T0 + 61)).attempts == 2
    assert (await store.get(later.id)).state is ItemState.PENDING  # type: ignore[union-attr]


async def test_dead_letter_removes_the_item_from_the_line(store: SqliteStore) -> None:
    item = await store.enqueue(IN, "c", {}, now=T0)
    nxt = await store.enqueue(IN, "c", {}, now=T0)
    await store.claim(now=T0, lease_seconds=30)
    dead = await store.dead_letter(item.id, "too many attempts")
    assert dead.state is ItemState.DEAD and dead.last_error == "too many attempts"
    assert [i.id for i in await store.claim(now=T0, lease_seconds=30)] == [nxt.id]


async def test_unknown_item_ids_raise_not_found(store: SqliteStore) -> None:
    with pytest.raises(QueueItemNotFoundError):
        await store.complete(999)
    with pytest.raises(QueueItemNotFoundError):
        await store.fail(999, "x", next_attempt_at=T0)


async def test_expire_marks_old_pending_items_and_returns_them(store: SqliteStore) -> None:
    old = await store.enqueue(IN, "a", {}, now=T0)
    young = await store.enqueue(IN, "b", {}, now=T0 + 500)
    crashed = await store.enqueue(OUT, "c", {}, now=T0)
    await store.claim(now=T0, lease_seconds=10, kind=OUT)  # its worker dies; the lease runs out
    expired = await store.expire(now=T0 + 600, max_age=300)
    assert [i.id for i in expired] == [old.id, crashed.id]
    assert all(i.state is ItemState.EXPIRED for i in expired)
    assert (await store.get(young.id)).state is ItemState.PENDING  # type: ignore[union-attr]
    assert await store.expire(now=T0 + 600, max_age=300) == []


async def test_position_counts_pending_items_in_order(store: SqliteStore) -> None:
    a = await store.enqueue(IN, "a", {}, now=T0)
    b = await store.enqueue(OUT, "b", {}, now=T0)
    c = await store.enqueue(IN, "c", {}, now=T0)
    assert [await store.position(i.id) for i in (a, b, c)] == [1, 2, 3]
    await store.claim(now=T0, lease_seconds=30, limit=1)
    assert [await store.position(i.id) for i in (a, b, c)] == [0, 1, 2]
    assert await store.position(12345) == 0


async def test_stats_report_depth_by_kind_and_state_and_oldest_pending_age(store: SqliteStore) -> None:
    assert (await store.stats(now=T0)).oldest_pending_age is None
    a = await store.enqueue(IN, "a", {}, now=T0)
    await store.enqueue(IN, "b", {}, now=T0 + 10)
    await store.enqueue(OUT, "c", {}, now=T0 + 20)
    await store.claim(now=T0 + 30, lease_seconds=30, limit=1)
    await store.complete(a.id)
    stats = await store.stats(now=T0 + 40)
    assert stats.depth == {(IN, ItemState.DONE): 1, (IN, ItemState.PENDING): 1, (OUT, ItemState.PENDING): 1}
    assert stats.pending() == 2 and stats.pending(OUT) == 1
    assert stats.oldest_pending_age == 30


async def test_purge_deletes_only_the_given_terminal_state(store: SqliteStore) -> None:
    a = await store.enqueue(IN, "a", {}, now=T0)
    b = await store.enqueue(IN, "b", {}, now=T0)
    await store.enqueue(IN, "c", {}, now=T0 + 1000)
    await store.claim(now=T0, lease_seconds=30)
    await store.complete(a.id)
    await store.dead_letter(b.id, "x")
    assert await store.purge(ItemState.DONE) == 1
    assert [i.state for i in await store.list()] == [ItemState.DEAD, ItemState.PENDING]
    with pytest.raises(ValueError):
        await store.purge(ItemState.PENDING)
    assert [i.id for i in await store.list(ItemState.DEAD)] == [b.id]


async def test_queue_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    async with SqliteStore(path) as s:
        item = await s.enqueue(IN, "c", {"text": "hello"}, now=T0, dedup_key="m")
        await s.claim(now=T0, lease_seconds=10)
    async with SqliteStore(path) as s:
        got = await s.claim(now=T0 + 10, lease_seconds=10)
        assert [(i.id, i.payload) for i in got] == [(item.id, {"text": "hello"})]


async def test_two_connections_claiming_concurrently_never_get_the_same_item(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    async with SqliteStore(path) as one, SqliteStore(path) as two:
        for i in range(60):
            await one.enqueue(IN, f"c{i}", {"i": i}, now=T0)
        seen: list[int] = []

        async def worker(s: SqliteStore) -> None:
            for _ in range(40):
                got = await s.claim(now=T0, lease_seconds=300, limit=3)
                seen.extend(i.id for i in got)
                for i in got:
                    await s.complete(i.id)

        await asyncio.gather(worker(one), worker(two))
        assert len(seen) == 60 and len(set(seen)) == 60
        assert (await one.stats(now=T0)).pending() == 0
