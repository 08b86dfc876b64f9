"""The pipeline's storage operations: acceptance, ordering checks, requeue, finish, restart release."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from resilience.degradation import ItemKind, ItemState, QueueItem
from resilience.errors import CallTimeoutError
from services.storage import (
    CLAIM_RELEASED,
    LEASE_RAN_OUT,
    QueueItemNotFoundError,
    SqliteStore,
    StorageBusyError,
    claim_abandoned,
)
from tests.services.conftest import OpenStore, Store, open_transactions, write_lock_held

IN, OUT = ItemKind.INBOUND, ItemKind.OUTBOUND
T0 = 1_700_000_000.0
LEASE = 60.0


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    """A started store on a fresh database (each backend)."""
    async with open_store() as s:
        yield s


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A started SQLite store, for what only SQLite has (its database thread)."""
    async with SqliteStore(tmp_path / "bot.sqlite3") as s:
        yield s


async def accept(store: Store, message_id: int, key: str = "c1", *, claim: bool = True):  # type: ignore[no-untyped-def]
    return await store.accept(
        message_id, IN, key, {"m": message_id}, now=T0, lease_seconds=LEASE, claim=claim
    )


async def test_accept_claims_a_message_for_the_caller_and_marks_it_processed(store: Store) -> None:
    item = await accept(store, 1)
    assert item is not None and item.state is ItemState.CLAIMED
    assert item.lease_until == T0 + LEASE and item.dedup_key == "msg:1"
    assert await store.is_processed(1)


async def test_accepting_the_same_message_twice_returns_none_and_stores_nothing(store: Store) -> None:
    assert await accept(store, 1) is not None
    assert await accept(store, 1) is None
    assert len(await store.list()) == 1


async def test_a_message_behind_a_pending_one_waits_pending(store: Store) -> None:
    first = await accept(store, 1, claim=False)
    second = await accept(store, 2)
    other_conversation = await accept(store, 3, key="c2")
    assert first is not None and second is not None and other_conversation is not None
    assert (first.state, second.state, other_conversation.state) == (
        ItemState.PENDING,
        ItemState.PENDING,
        ItemState.CLAIMED,
    )


async def test_history_if_next_refuses_while_an_older_item_is_pending_or_claimed(store: Store) -> None:
    older = await accept(store, 1)  # claimed (e.g. by the drain)
    newer = await accept(store, 2)
    assert older is not None and newer is not None
    assert await store.history_if_next("c1", newer.id) is None
    assert await store.history_if_next("c1", older.id) == []
    await store.finish(older.id, key="c1", turns=[("user", "q1", 1), ("model", "a1", None)])
    history = await store.history_if_next("c1", newer.id)
    assert history is not None and [(t.role, t.text) for t in history] == [("user", "q1"), ("model", "a1")]


async def accept_with_history(  # type: ignore[no-untyped-def]
    store: Store, message_id: int, key: str = "c1"
):
    return await store.accept_with_history(
        message_id, IN, key, {"m": message_id}, now=T0, lease_seconds=LEASE
    )


async def test_accept_with_history_returns_the_history_when_the_item_is_next(store: Store) -> None:
    """Claimed and next in its conversation: the history comes back from the acceptance itself,
    bounded like ``history``, and the item is stored and marked processed like ``accept`` does."""
    first = await accept(store, 1)
    assert first is not None
    await store.finish(first.id, key="c1", turns=[("user", "q1", 1), ("model", "a1", None)])
    accepted = await accept_with_history(store, 2)
    assert accepted is not None
    item, history = accepted
    assert item.state is ItemState.CLAIMED and item.lease_until == T0 + LEASE and item.dedup_key == "msg:2"
    assert history is not None and [(t.role, t.text) for t in history] == [("user", "q1"), ("model", "a1")]
    assert history == await store.history_if_next("c1", item.id)
    assert await store.is_processed(2) and await store.get(item.id) == item
    assert await accept_with_history(store, 2) is None  # a replay


async def test_accept_with_history_gives_none_when_an_older_item_is_pending_or_claimed(
    store: Store,
) -> None:
    """Not next: no history (the caller asks history_if_next under the mutex), in both cases."""
    older = await accept(store, 1)  # claimed, being answered
    accepted = await accept_with_history(store, 2)
    assert older is not None and accepted is not None
    assert accepted[0].state is ItemState.CLAIMED and accepted[1] is None
    await store.finish(older.id, key="c1")
    queued = await accept(store, 3, key="c2", claim=False)  # a backlog in another conversation
    behind = await accept_with_history(store, 4, key="c2")
    assert queued is not None and behind is not None
    assert behind[0].state is ItemState.PENDING and behind[1] is None
    fresh = await accept_with_history(store, 5, key="c3")
    assert fresh is not None and fresh[1] == []  # next in an empty conversation: empty history


async def test_accept_with_history_is_bounded_like_history(open_store: OpenStore) -> None:
    """The character bound applies to the history read at acceptance too."""
    async with open_store(history_max_messages=3, history_max_chars=10) as s:
        await s.append_turns("c1", [("user", "aaaa", 1), ("model", "bbbb", None), ("user", "cccc", 2)])
        accepted = await accept_with_history(s, 9)
        assert accepted is not None and accepted[1] is not None
        assert [t.text for t in accepted[1]] == ["bbbb", "cccc"] == [t.text for t in await s.history("c1")]


async def test_finish_marks_done_and_stores_the_exchange_in_one_step(store: Store) -> None:
    item = await accept(store, 1)
    assert item is not None
    await store.finish(item.id, key="c1", turns=[("user", "q", 1), ("model", "a", None)])
    done = await store.get(item.id)
    assert done is not None and done.state is ItemState.DONE
    assert [t.text for t in await store.history("c1")] == ["q", "a"]
    with pytest.raises(QueueItemNotFoundError):
        await store.finish(999, key="c1", turns=[("user", "x", None)])
    assert [t.text for t in await store.history("c1")] == ["q", "a"]  # the failed finish stored nothing


async def test_requeue_keeps_the_id_counts_attempts_only_when_asked_and_can_change_kind(
    store: Store,
) -> None:
    item = await accept(store, 1)
    assert item is not None
    uncounted = await store.requeue(
        item.id, error="breaker open", next_attempt_at=T0 + 5, count_attempt=False
    )
    assert (uncounted.id, uncounted.state, uncounted.attempts) == (item.id, ItemState.PENDING, 0)
    [claimed] = await store.claim(now=T0 + 5, lease_seconds=LEASE)
    counted = await store.requeue(
        claimed.id, error="send failed", next_attempt_at=T0 + 10, kind=OUT, payload={"chunks": ["a"]}
    )
    assert (counted.id, counted.kind, counted.attempts, counted.payload) == (
        item.id,
        OUT,
        1,
        {"chunks": ["a"]},
    )
    assert await store.claim(now=T0 + 9, lease_seconds=LEASE) == []


async def test_release_claims_hands_a_dead_process_claims_back_at_once(open_store: OpenStore) -> None:
    async with open_store() as dead:  # a process that claimed two messages, then ended
        a = await accept(dead, 1)
        b = await accept(dead, 2, key="c2")
    assert a is not None and b is not None
    async with open_store() as store:
        assert await store.release_claims() == 2
        claimed = await store.claim(now=T0, lease_seconds=LEASE)  # long before the leases would expire
        assert sorted(i.id for i in claimed) == [a.id, b.id]


async def test_acceptance_survives_a_restart(open_store: OpenStore) -> None:
    async with open_store() as first:
        assert await accept(first, 1) is not None
    async with open_store() as second:
        assert await accept(second, 1) is None  # processed before the restart
        assert await second.release_claims() == 1


# -- acceptance and finish run as one call on the database thread: waits, timeouts, cancels -----


async def test_an_accept_that_times_out_on_the_write_lock_is_never_committed_later(
    open_store: OpenStore,
) -> None:
    """Another writer holds the lock past the statement timeout: CallTimeoutError, and once the lock
    is free the abandoned acceptance does not land behind the caller's back (nor block the next)."""
    async with open_store(statement_timeout=0.05, busy_timeout_ms=5000) as s:
        async with write_lock_held(s):
            with pytest.raises(CallTimeoutError):
                await accept(s, 1)
        started = time.monotonic()
        item = await accept(s, 1)  # not a replay: the timed-out acceptance was rolled back
        assert item is not None and item.state is ItemState.CLAIMED
        assert time.monotonic() - started < 1.0  # the abandoned wait stopped; it did not run to 5 s
        assert len(await s.list()) == 1
        assert await open_transactions(s) == 0


async def test_an_accept_waiting_longer_than_busy_timeout_raises_storage_busy(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    async with SqliteStore(path, statement_timeout=2.0, busy_timeout_ms=40) as s:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StorageBusyError):
                await accept(s, 1)
            with pytest.raises(StorageBusyError):
                await s.finish(1, key="c1", turns=[("user", "q", 1)])
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert await accept(s, 1) is not None and s.health()["consecutive_failures"] == 0


async def test_cancelled_accepts_and_finishes_are_all_or_nothing(store: Store) -> None:
    """Cancelled at several points: each acceptance either stored its item and processed id, or
    neither; each finish either marked done and stored the turns, or neither; no transaction is
    left open and the store keeps working."""
    for steps in range(8):
        task = asyncio.create_task(accept(store, 100 + steps, key=f"k{steps}"))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    items = {i.dedup_key: i for i in await store.list(limit=100)}
    for steps in range(8):
        assert await store.is_processed(100 + steps) == (f"msg:{100 + steps}" in items)
    claimed = await accept(store, 1)
    assert claimed is not None
    for steps in range(8):
        task = asyncio.create_task(store.finish(claimed.id, key="c1", turns=[("user", f"q{steps}", None)]))
        for _ in range(steps):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, QueueItemNotFoundError):
            await task
        state = (await store.get(claimed.id)).state  # type: ignore[union-attr]
        turns = [t.text for t in await store.history("c1")]
        assert (state is ItemState.DONE) == (f"q{steps}" in turns)
        if state is ItemState.DONE:
            break
    assert await open_transactions(store) == 0
    assert await accept(store, 2, key="c9") is not None


async def test_a_transaction_abandoned_while_its_body_runs_rolls_back_instead_of_committing(
    sqlite_store: Store,
) -> None:
    """The caller is cancelled while the thread is between statements (no statement to interrupt):
    the thread sees it before COMMIT and rolls back, so nothing lands after the caller gave up."""
    entered, go = threading.Event(), threading.Event()

    def body(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO processed (message_id, processed_at) VALUES ('late', 0)")
        entered.set()
        go.wait(2)

    store = sqlite_store
    task = asyncio.create_task(store._run("probe", store._in_thread(body), write=False))
    async with asyncio.timeout(2):
        while not entered.is_set():
            await asyncio.sleep(0.001)
    task.cancel()
    for _ in range(3):  # let the task handle the cancellation (it flags the thread) before the body ends
        await asyncio.sleep(0)
    go.set()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert not await store.is_processed("late")
    assert store._db is not None and not store._db.in_transaction


# -- claim_abandoned: which queued questions the drain must look for in the channel first ----------


async def claimed(store: Store, now: float = T0) -> dict[int, QueueItem]:
    return {item.id: item for item in await store.claim(now=now, lease_seconds=LEASE)}


async def test_a_claim_released_at_start_up_is_abandoned_until_its_next_holder_puts_it_back(
    open_store: OpenStore,
) -> None:
    """A dead process's claim: abandoned when claimed again; requeued by the live holder, not any more."""
    async with open_store() as dead:
        item = await accept(dead, 1)
    assert item is not None and not claim_abandoned(item)
    store = open_store()
    await store.start()
    await store.release_claims()
    [again] = (await claimed(store)).values()
    assert again.id == item.id and again.last_error == CLAIM_RELEASED and claim_abandoned(again)
    await store.requeue(item.id, error="timeout", next_attempt_at=T0, count_attempt=True)
    [third] = (await claimed(store)).values()
    assert third.last_error == "timeout" and not claim_abandoned(third)
    await store.stop()


async def test_a_claim_whose_lease_ran_out_is_abandoned(store: Store) -> None:
    """The holder outlived its lease (it may have posted the answer and failed to record it)."""
    item = await accept(store, 1)
    assert await claimed(store, T0 + LEASE - 1) == {}  # still leased
    [reaped] = (await claimed(store, T0 + LEASE)).values()
    assert reaped.id == item.id and reaped.last_error == LEASE_RAN_OUT and claim_abandoned(reaped)


async def test_items_never_claimed_or_put_back_by_their_holder_are_not_abandoned(store: Store) -> None:
    """Queued behind a backlog (never claimed), requeued, failed: none was answered by anyone."""
    pending = await accept(store, 1, claim=False)
    requeued = await accept(store, 2, key="c2")
    failed = await accept(store, 3, key="c3")
    await store.requeue(requeued.id, error="conversation busy", next_attempt_at=T0, count_attempt=False)
    await store.fail(failed.id, "503", next_attempt_at=T0)
    items = await claimed(store)
    assert sorted(items) == [pending.id, requeued.id, failed.id]
    assert [claim_abandoned(i) for i in items.values()] == [False, False, False]
    assert items[pending.id].state is ItemState.CLAIMED and items[pending.id].last_error is None
