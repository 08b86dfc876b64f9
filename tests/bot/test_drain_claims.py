"""Which queued questions the drain must look for in the channel first: ``claim_abandoned``.

Only an item whose claim ended without its holder recording the outcome (a dead process's
claim released at start-up, a lease that ran out) may have been answered already; an item
never claimed, or put back by its live holder, was not. Real ``SqliteStore`` on a temp file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from resilience.degradation import ItemKind, ItemState, QueueItem
from services.storage import CLAIM_RELEASED, LEASE_RAN_OUT, SqliteStore, claim_abandoned

T0 = 1_700_000_000.0
LEASE = 60.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A started store on a fresh file."""
    s = SqliteStore(tmp_path / "bot.sqlite3")
    await s.start()
    yield s
    await s.stop()


async def accept(store: SqliteStore, message_id: int, key: str = "c1", *, claim: bool = True) -> QueueItem:
    item = await store.accept(
        message_id, ItemKind.INBOUND, key, {"m": message_id}, now=T0, lease_seconds=LEASE, claim=claim
    )
    assert item is not None
    return item


async def claimed(store: SqliteStore, now: float = T0) -> dict[int, QueueItem]:
    return {item.id: item for item in await store.claim(now=now, lease_seconds=LEASE)}


async def test_a_claim_released_at_start_up_is_abandoned_until_its_next_holder_puts_it_back(
    store: SqliteStore,
) -> None:
    """A dead process's claim: abandoned when claimed again; requeued by the live holder, not any more."""
    item = await accept(store, 1)
    assert not claim_abandoned(item)
    await store.release_claims()
    [again] = (await claimed(store)).values()
    assert again.id == item.id and again.last_error == CLAIM_RELEASED and claim_abandoned(again)
    await store.requeue(item.id, error="timeout", next_attempt_at=T0, count_attempt=True)
    [third] = (await claimed(store)).values()
    assert third.last_error == "timeout" and not claim_abandoned(third)


async def test_a_claim_whose_lease_ran_out_is_abandoned(store: SqliteStore) -> None:
    """The holder outlived its lease (it may have posted the answer and failed to record it)."""
    item = await accept(store, 1)
    assert await claimed(store, T0 + LEASE - 1) == {}  # still leased
    [reaped] = (await claimed(store, T0 + LEASE)).values()
    assert reaped.id == item.id and reaped.last_error == LEASE_RAN_OUT and claim_abandoned(reaped)


async def test_items_never_claimed_or_put_back_by_their_holder_are_not_abandoned(store: SqliteStore) -> None:
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
