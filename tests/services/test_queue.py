"""The durable degradation queue, against a real SQLite file and a real PostgreSQL database (each
test that takes ``store`` or ``open_store`` runs once per backend)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilience.breakers import Breaker
from resilience.clock import FakeClock
from resilience.degradation import DurableQueue, ItemKind, ItemState
from resilience.errors import CallTimeoutError, CircuitOpenError
from services.pg_storage import PostgresStore
from services.storage import QueueItemNotFoundError, SqliteStore
from tests.pg import PostgresServer
from tests.services.conftest import OpenStore, Store, write_lock_held

IN, OUT = ItemKind.INBOUND, ItemKind.OUTBOUND
T0 = 1_700_000_000.0


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    """A started store on a fresh database."""
    async with open_store() as s:
        yield s


def test_both_stores_satisfy_the_durable_queue_protocol() -> None:
    names = ("enqueue", "claim", "complete", "fail", "dead_letter", "expire", "position", "stats", "purge")
    queues: list[DurableQueue] = [SqliteStore(Path("unused.sqlite3")), PostgresStore("postgresql://unused/x")]
    for queue in queues:
        for name in names:
            assert callable(getattr(queue, name))


async def test_enqueue_returns_a_pending_item_with_its_payload(store: Store) -> None:
    item = await store.enqueue(IN, "c1", {"text": "hi", "n": [1, 2]}, now=T0, dedup_key="m1")
    assert item.state is ItemState.PENDING and item.kind is IN and item.attempts == 0
    assert item.payload == {"text": "hi", "n": [1, 2]} and item.created_at == T0 == item.next_attempt_at
    assert await store.get(item.id) == item
    assert await store.get(item.id + 100) is None


async def test_same_dedup_key_is_never_queued_twice(store: Store) -> None:
    first = await store.enqueue(IN, "c1", {"v": 1}, now=T0, dedup_key="msg-42")
    again = await store.enqueue(IN, "c1", {"v": 2}, now=T0 + 5, dedup_key="msg-42")
    assert again == first
    no_key = [await store.enqueue(IN, "c1", {}, now=T0) for _ in range(2)]
    assert no_key[0].id != no_key[1].id
    assert len(await store.list()) == 3


async def test_claim_takes_only_the_head_of_each_conversation_across_kinds(store: Store) -> None:
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


async def test_kind_filter_does_not_skip_ahead_of_a_head_of_the_other_kind(store: Store) -> None:
    out = await store.enqueue(OUT, "a", {}, now=T0)
    await store.enqueue(IN, "a", {}, now=T0)
    assert await store.claim(now=T0, lease_seconds=30, kind=IN) == []
    assert [i.id for i in await store.claim(now=T0, lease_seconds=30, kind=OUT)] == [out.id]


async def test_claim_respects_limit_and_oldest_first(store: Store) -> None:
    items = [await store.enqueue(IN, f"c{i}", {}, now=T0 + i) for i in range(5)]
    claimed = await store.claim(now=T0 + 10, lease_seconds=5, limit=2)
    assert [i.id for i in claimed] == [items[0].id, items[1].id]


async def test_expired_lease_returns_the_item_to_pending_for_another_worker(store: Store) -> None:
    item = await store.enqueue(IN, "c", {}, now=T0)
    await store.claim(now=T0, lease_seconds=10)
    assert await store.claim(now=T0 + 9.9, lease_seconds=10) == []
    again = await store.claim(now=T0 + 10, lease_seconds=10)
    assert [i.id for i in again] == [item.id] and again[0].lease_until == T0 + 20
    assert again[0].attempts == 0


async def test_fail_adds_an_attempt_and_next_attempt_time_is_respected(store: Store) -> None:
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


async def test_dead_letter_removes_the_item_from_the_line(store: Store) -> None:
    item = await store.enqueue(IN, "c", {}, now=T0)
    nxt = await store.enqueue(IN, "c", {}, now=T0)
    await store.claim(now=T0, lease_seconds=30)
    dead = await store.dead_letter(item.id, "too many attempts")
    assert dead.state is ItemState.DEAD and dead.last_error == "too many attempts"
    assert [i.id for i in await store.claim(now=T0, lease_seconds=30)] == [nxt.id]


async def test_unknown_item_ids_raise_not_found(store: Store) -> None:
    with pytest.raises(QueueItemNotFoundError):
        await store.complete(999)
    with pytest.raises(QueueItemNotFoundError):
        await store.fail(999, "x", next_attempt_at=T0)


async def test_expire_marks_old_pending_items_and_returns_them(store: Store) -> None:
    old = await store.enqueue(IN, "a", {}, now=T0)
    young = await store.enqueue(IN, "b", {}, now=T0 + 500)
    crashed = await store.enqueue(OUT, "c", {}, now=T0)
    await store.claim(now=T0, lease_seconds=10, kind=OUT)  # its worker dies; the lease runs out
    expired = await store.expire(now=T0 + 600, max_age=300)
    assert [i.id for i in expired] == [old.id, crashed.id]
    assert all(i.state is ItemState.EXPIRED for i in expired)
    assert (await store.get(young.id)).state is ItemState.PENDING  # type: ignore[union-attr]
    assert await store.expire(now=T0 + 600, max_age=300) == []


async def test_position_counts_pending_items_in_order(store: Store) -> None:
    a = await store.enqueue(IN, "a", {}, now=T0)
    b = await store.enqueue(OUT, "b", {}, now=T0)
    c = await store.enqueue(IN, "c", {}, now=T0)
    assert [await store.position(i.id) for i in (a, b, c)] == [1, 2, 3]
    await store.claim(now=T0, lease_seconds=30, limit=1)
    assert [await store.position(i.id) for i in (a, b, c)] == [0, 1, 2]
    assert await store.position(12345) == 0


async def test_stats_report_depth_by_kind_and_state_and_oldest_pending_age(store: Store) -> None:
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


async def test_purge_deletes_only_the_given_terminal_state(store: Store) -> None:
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


async def test_queue_survives_a_restart(open_store: OpenStore) -> None:
    async with open_store() as s:
        item = await s.enqueue(IN, "c", {"text": "hello"}, now=T0, dedup_key="m")
        await s.claim(now=T0, lease_seconds=10)
    async with open_store() as s:
        got = await s.claim(now=T0 + 10, lease_seconds=10)
        assert [(i.id, i.payload) for i in got] == [(item.id, {"text": "hello"})]


async def test_two_connections_claiming_concurrently_never_get_the_same_item(open_store: OpenStore) -> None:
    async with open_store() as one, open_store() as two:
        for i in range(60):
            await one.enqueue(IN, f"c{i}", {"i": i}, now=T0)
        seen: list[int] = []

        async def worker(s: Store) -> None:
            for _ in range(40):
                got = await s.claim(now=T0, lease_seconds=300, limit=3)
                seen.extend(i.id for i in got)
                for i in got:
                    await s.complete(i.id)

        await asyncio.gather(worker(one), worker(two))
        assert len(seen) == 60 and len(set(seen)) == 60
        assert (await one.stats(now=T0)).pending() == 0


# -- model-based: random operation sequences against a plain-Python model of the semantics ------

LEASE = 20.0
_op = st.one_of(
    st.tuples(st.just("enqueue"), st.sampled_from([IN, OUT]), st.sampled_from("ab"),
              st.sampled_from([None, "k0", "k1", "k2"])),
    st.tuples(st.just("claim"), st.sampled_from([None, IN, OUT]), st.integers(1, 3)),
    st.tuples(st.sampled_from(["complete", "fail", "dead_letter"]), st.integers(1, 12), st.integers(0, 30)),
    st.tuples(st.just("expire"), st.integers(5, 60)),
    st.tuples(st.just("advance"), st.integers(0, 25)),
)


class QueueModel:
    """The queue's documented semantics, with no SQL: the reference the store must match."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.next_id = 1

    def enqueue(self, kind: ItemKind, key: str, dedup: str | None, now: float) -> int:
        for item_id, row in self.rows.items():
            if dedup is not None and row["dedup_key"] == dedup:
                return item_id
        self.rows[self.next_id] = {
            "kind": kind, "conversation_key": key, "state": ItemState.PENDING, "attempts": 0,
            "created_at": now, "next_attempt_at": now, "lease_until": None, "dedup_key": dedup,
        }
        self.next_id += 1
        return self.next_id - 1

    def reap(self, now: float) -> None:
        for row in self.rows.values():
            if row["state"] is ItemState.CLAIMED and row["lease_until"] <= now:
                row["state"], row["lease_until"] = ItemState.PENDING, None

    def claim(self, kind: ItemKind | None, limit: int, now: float) -> list[int]:
        self.reap(now)
        heads: dict[str, int] = {}
        for item_id in sorted(self.rows):
            row = self.rows[item_id]
            if row["state"] in (ItemState.PENDING, ItemState.CLAIMED):
                heads.setdefault(row["conversation_key"], item_id)
        due = sorted(
            i for i in heads.values()
            if self.rows[i]["state"] is ItemState.PENDING and self.rows[i]["next_attempt_at"] <= now
            and (kind is None or self.rows[i]["kind"] is kind)
        )[:limit]
        for i in due:
            self.rows[i]["state"], self.rows[i]["lease_until"] = ItemState.CLAIMED, now + LEASE
        return due

    def expire(self, max_age: float, now: float) -> list[int]:
        self.reap(now)
        gone = [i for i, r in sorted(self.rows.items())
                if r["state"] is ItemState.PENDING and r["created_at"] < now - max_age]
        for i in gone:
            self.rows[i]["state"] = ItemState.EXPIRED
        return gone


async def _replay(store: Store, ops: list[tuple[Any, ...]]) -> None:
    model, now = QueueModel(), T0
    async with store:
        for op in ops:
            name = op[0]
            if name == "enqueue":
                item = await store.enqueue(op[1], op[2], {}, now=now, dedup_key=op[3])
                assert item.id == model.enqueue(op[1], op[2], op[3], now)
            elif name == "claim":
                got = await store.claim(now=now, lease_seconds=LEASE, kind=op[1], limit=op[2])
                assert [i.id for i in got] == model.claim(op[1], op[2], now)
            elif name in ("complete", "fail", "dead_letter"):
                item_id, row = op[1], model.rows.get(op[1])
                if row is None:
                    with pytest.raises(QueueItemNotFoundError):
                        await store.complete(item_id)
                    continue
                if name == "complete":
                    await store.complete(item_id)
                    row["state"] = ItemState.DONE
                elif name == "fail":
                    await store.fail(item_id, "x", next_attempt_at=now + op[2])
                    row.update(state=ItemState.PENDING, attempts=row["attempts"] + 1)
                    row["next_attempt_at"] = now + op[2]
                else:
                    await store.dead_letter(item_id, "x")
                    row["state"] = ItemState.DEAD
                row["lease_until"] = None
            elif name == "expire":
                got = await store.expire(now=now, max_age=op[1])
                assert [i.id for i in got] == model.expire(op[1], now)
            else:
                now += op[1]
            actual = {
                i.id: (i.kind, i.conversation_key, i.state, i.attempts, i.next_attempt_at, i.lease_until)
                for i in await store.list(limit=1000)
            }
            expected = {
                i: (r["kind"], r["conversation_key"], r["state"], r["attempts"], r["next_attempt_at"],
                    r["lease_until"])
                for i, r in model.rows.items()
            }
            assert actual == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=30))
def test_random_operation_sequences_match_the_model(
    ops: list[tuple[Any, ...]], backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """FIFO per conversation, leases, attempts, dedup and expiry agree with ``QueueModel``."""
    store: Store
    if backend == "postgres":
        server: PostgresServer = request.getfixturevalue("pg_server")
        store = PostgresStore(server.reset(), register=False)
    else:
        store = SqliteStore(tmp_path / f"model-{uuid.uuid4().hex}.sqlite3")
    asyncio.run(_replay(store, ops))


async def test_unknown_item_ids_do_not_count_as_storage_failures_in_the_breaker(
    open_store: OpenStore,
) -> None:
    breaker = Breaker("storage", FakeClock(), fail_max=2, reset_timeout=5.0)
    async with open_store(breaker=breaker) as s:
        for _ in range(4):
            with pytest.raises(QueueItemNotFoundError):
                await s.complete(999)
        assert (await s.enqueue(IN, "c", {}, now=T0)).id == 1  # the breaker is still closed


async def test_storage_timeouts_open_the_real_breaker_and_it_then_rejects_fast(open_store: OpenStore) -> None:
    breaker = Breaker("storage", FakeClock(), fail_max=2, reset_timeout=5.0)
    async with open_store(statement_timeout=0.05, breaker=breaker) as s:
        async with write_lock_held(s):  # another writer holds the lock: every write times out
            for _ in range(2):
                with pytest.raises(CallTimeoutError):
                    await s.enqueue(IN, "c", {}, now=T0)
            with pytest.raises(CircuitOpenError):
                await s.enqueue(IN, "c", {}, now=T0)
