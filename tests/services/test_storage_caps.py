"""Caps on waiting work: acceptance of new inbound work over a per-user, per-guild or total cap.

Real SQLite files and PostgreSQL databases (each test on ``store`` or ``open_store`` runs on both);
the caps are ``QueueCaps`` passed by the caller, the refusal a ``QueueFullError``
with the cap's scope and limit. Outbound items (answers and notices of accepted work) are never
refused, and a refusal stores nothing: not the item, not the message id.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from resilience.breakers import Breaker, BreakerState
from resilience.clock import FakeClock
from resilience.degradation import ItemKind, ItemState, QueueCaps
from resilience.errors import QueueFullError
from services import storage
from services.storage import MIGRATIONS, SCHEMA_VERSION, SqliteStore
from tests.services.conftest import OpenStore, Store

IN, OUT = ItemKind.INBOUND, ItemKind.OUTBOUND
T0 = 1_700_000_000.0
LEASE = 60.0
USER_CAP = QueueCaps(max_pending_per_user=3)


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    """A started store on a fresh database (each backend)."""
    async with open_store() as s:
        yield s


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """A started SQLite store, for SQLite's own query plans and kept count."""
    async with SqliteStore(tmp_path / "bot.sqlite3") as s:
        yield s


def message(author: int, guild: int | None = 1, **extra: Any) -> dict[str, Any]:
    """A queue payload as the pipeline writes it (``Inbound.payload``)."""
    return {"message_id": 0, "channel_id": 5, "guild_id": guild, "author_id": author, "content": "hi"} | extra


async def accept(
    store: Store,
    message_id: int,
    author: int,
    guild: int | None = 1,
    *,
    caps: QueueCaps | None = USER_CAP,
    key: str | None = None,
    claim: bool = False,
):  # type: ignore[no-untyped-def]
    """Accept a message of ``author`` in ``guild``, pending (as in maintenance) unless ``claim``."""
    return await store.accept(
        message_id,
        IN,
        key or f"c{message_id}",
        message(author, guild),
        now=T0,
        lease_seconds=LEASE,
        claim=claim,
        caps=caps,
    )


async def test_a_user_at_the_pending_cap_is_refused_and_nothing_of_the_message_is_stored(
    store: Store,
) -> None:
    for mid in (1, 2, 3):
        assert await accept(store, mid, author=7) is not None
    with pytest.raises(QueueFullError) as info:
        await accept(store, 4, author=7)
    assert (info.value.scope, info.value.limit, info.value.owner) == ("user", 3, 7)
    assert len(await store.list()) == 3
    assert not await store.is_processed(4)  # a later replay of the event may still be accepted
    assert await accept(store, 5, author=8) is not None  # other users are not held back


async def test_a_refused_user_is_accepted_again_once_an_earlier_one_is_answered(store: Store) -> None:
    for mid in (1, 2, 3):
        await accept(store, mid, author=7)
    with pytest.raises(QueueFullError):
        await accept(store, 4, author=7)
    (first,) = await store.claim(now=T0, lease_seconds=LEASE, limit=1)
    await store.complete(first.id)
    assert await accept(store, 4, author=7) is not None


async def test_only_pending_inbound_items_count_against_the_user_cap(store: Store) -> None:
    caps = QueueCaps(max_pending_per_user=1)
    claimed = await accept(store, 1, author=7, caps=caps, claim=True)  # being answered live now
    assert claimed is not None and claimed.state is ItemState.CLAIMED
    # an answer of the user's waiting for Discord is outbound: not counted either
    await store.enqueue(OUT, "c9", message(7, chunks=["an answer"]), now=T0)
    assert await accept(store, 2, author=7, caps=caps) is not None  # pending: the one that counts
    with pytest.raises(QueueFullError):
        await accept(store, 3, author=7, caps=caps)


async def test_a_guild_at_the_pending_cap_is_refused_whoever_writes(store: Store) -> None:
    caps = QueueCaps(max_pending_per_user=5, max_pending_per_guild=4)
    for mid in range(1, 5):
        await accept(store, mid, author=mid, guild=9, caps=caps)  # four users, one guild
    with pytest.raises(QueueFullError) as info:
        await accept(store, 5, author=5, guild=9, caps=caps)
    assert (info.value.scope, info.value.limit, info.value.owner) == ("guild", 4, 9)
    assert await accept(store, 6, author=5, guild=10, caps=caps) is not None  # another guild
    assert await accept(store, 7, author=5, guild=None, caps=caps) is not None  # a DM has no guild


async def test_the_user_cap_is_reported_before_the_guild_cap(store: Store) -> None:
    caps = QueueCaps(max_pending_per_user=2, max_pending_per_guild=2)
    await accept(store, 1, author=7, caps=caps)
    await accept(store, 2, author=7, caps=caps)
    with pytest.raises(QueueFullError) as info:
        await accept(store, 3, author=7, caps=caps)
    assert info.value.scope == "user"  # the sentence the user gets can say it is about them


async def test_the_total_cap_counts_pending_and_claimed_items_of_both_kinds(store: Store) -> None:
    caps = QueueCaps(max_items=3)
    await accept(store, 1, author=1, caps=caps, claim=True)  # claimed
    await accept(store, 2, author=2, caps=caps)  # pending
    await store.enqueue(OUT, "c9", message(3), now=T0)  # an answer waiting for Discord
    with pytest.raises(QueueFullError) as info:
        await accept(store, 4, author=4, caps=caps)
    assert (info.value.scope, info.value.limit, info.value.owner) == ("queue", 3, None)
    with pytest.raises(QueueFullError):
        await store.enqueue(IN, "c4", message(4), now=T0, caps=caps)


async def test_outbound_items_of_accepted_work_are_never_refused(store: Store) -> None:
    caps = QueueCaps(max_items=1, max_pending_per_user=1, max_pending_per_guild=1)
    await accept(store, 1, author=7, caps=caps)
    for n in range(3):  # answers and notices for an accepted message must go out
        item = await store.enqueue(OUT, "c1", message(7, notice=True), now=T0, dedup_key=f"n{n}", caps=caps)
        assert item.kind is OUT and item.state is ItemState.PENDING
    assert len(await store.list(ItemState.PENDING)) == 4


async def test_a_replay_is_ignored_not_refused_even_at_the_cap(store: Store) -> None:
    caps = QueueCaps(max_pending_per_user=1)
    await accept(store, 1, author=7, caps=caps)
    assert await accept(store, 1, author=7, caps=caps) is None  # the event came again: seen before
    first = await store.enqueue(IN, "c", message(8), now=T0, dedup_key="d1", caps=caps)
    assert await store.enqueue(IN, "c", message(8), now=T0, dedup_key="d1", caps=caps) == first


async def test_accept_with_history_enforces_the_caps_too(store: Store) -> None:
    caps = QueueCaps(max_pending_per_user=1)
    await accept(store, 1, author=7, caps=caps)
    with pytest.raises(QueueFullError):
        await store.accept_with_history(2, IN, "c2", message(7), now=T0, lease_seconds=LEASE, caps=caps)
    accepted = await store.accept_with_history(
        3, IN, "c3", message(8), now=T0, lease_seconds=LEASE, caps=caps
    )
    assert accepted is not None and accepted[0].state is ItemState.CLAIMED
    assert not await store.is_processed(2)


async def test_without_caps_nothing_is_refused(store: Store) -> None:
    for mid in range(1, 30):
        assert await accept(store, mid, author=7, caps=None) is not None


async def test_a_refusal_is_no_storage_failure_for_the_breaker_or_health(open_store: OpenStore) -> None:
    breaker = Breaker("storage", FakeClock(), fail_max=1, reset_timeout=5.0)
    caps = QueueCaps(max_pending_per_user=1)
    async with open_store(breaker=breaker) as s:
        await accept(s, 1, author=7, caps=caps)
        for mid in (2, 3):
            with pytest.raises(QueueFullError):
                await accept(s, mid, author=7, caps=caps)
        assert breaker.state is BreakerState.CLOSED
        assert s.health()["ok"] and s.health()["consecutive_failures"] == 0


async def test_concurrent_acceptances_from_two_processes_never_pass_the_cap_together(
    open_store: OpenStore,
) -> None:
    """Two stores (two connections, as two bot processes would have) accept one user's messages at
    once: the count and the insert are one write transaction, so exactly the cap gets in."""
    caps = QueueCaps(max_pending_per_user=5, max_pending_per_guild=8)
    async with open_store() as one, open_store() as two:
        calls = [
            accept(one if mid % 2 else two, mid, author=7 if mid < 30 else mid, guild=1, caps=caps)
            for mid in range(1, 41)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        refused = [r for r in results if isinstance(r, QueueFullError)]
        assert not [r for r in results if isinstance(r, BaseException) and not isinstance(r, QueueFullError)]
        pending = await one.list(ItemState.PENDING, limit=100)
    by_author = [item.payload["author_id"] for item in pending]
    assert by_author.count(7) == 5 and len(pending) == 8 and len(refused) == 32


async def test_a_database_from_before_the_caps_counts_its_queued_messages_after_the_migration(
    tmp_path: Path,
) -> None:
    """Rows written by schema 1 (no author or guild columns) count against the caps at once."""
    path = tmp_path / "bot.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for statement in MIGRATIONS[0]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version (version) VALUES (1)")
        for n in range(3):
            conn.execute(
                "INSERT INTO queue (kind, conversation_key, payload, state, created_at, next_attempt_at) "
                "VALUES ('inbound', ?, ?, 'pending', ?, ?)",
                (f"c{n}", json.dumps(message(7, guild=9)), T0, T0),
            )
        conn.execute(  # a damaged payload must not stop the migration
            "INSERT INTO queue (kind, conversation_key, payload, state, created_at, next_attempt_at) "
            "VALUES ('inbound', 'c9', '{not json', 'pending', ?, ?)",
            (T0, T0),
        )
    conn.close()
    async with SqliteStore(path) as s:
        assert await s.schema_version() == SCHEMA_VERSION
        with pytest.raises(QueueFullError) as by_user:
            await accept(s, 10, author=7, caps=QueueCaps(max_pending_per_user=3))
        with pytest.raises(QueueFullError) as by_guild:
            await accept(s, 11, author=8, guild=9, caps=QueueCaps(max_pending_per_guild=3))
        with pytest.raises(QueueFullError) as by_total:  # the three and the damaged one are live
            await accept(s, 12, author=8, guild=8, caps=QueueCaps(max_items=4))
        assert (by_user.value.scope, by_guild.value.scope, by_total.value.scope) == ("user", "guild", "queue")
        assert await accept(s, 13, author=8, guild=8, caps=QueueCaps(max_items=5)) is not None


@pytest.mark.parametrize(
    ("sql", "index"),
    [
        (storage._PENDING_BY_AUTHOR_SQL, "queue_pending_by_author"),
        (storage._PENDING_BY_GUILD_SQL, "queue_pending_by_guild"),
    ],
)
async def test_each_cap_is_counted_through_an_index_not_a_scan_of_payloads(
    sqlite_store: SqliteStore, sql: str, index: str
) -> None:
    store = sqlite_store
    await store.stop()
    with sqlite3.connect(store.path) as conn:
        plan = " | ".join(r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", {"owner": 1, "cap": 5}))
    conn.close()
    assert f"INDEX {index}" in plan and "SCAN queue" not in plan, plan


def _live(path: Path) -> tuple[int, int]:
    """(the kept count of live items, the live items counted now)."""
    with sqlite3.connect(path) as conn:
        kept = conn.execute(storage._LIVE_ITEMS_SQL).fetchone()[0]
        live = "SELECT COUNT(*) FROM queue WHERE state IN ('pending', 'claimed')"
        counted = conn.execute(live).fetchone()[0]
    conn.close()
    return kept, counted


async def test_the_live_count_for_the_total_cap_follows_every_queue_operation(
    sqlite_store: SqliteStore,
) -> None:
    """The total cap reads a count kept by triggers (a backlog is not counted on every message):
    after each kind of change the kept count equals the live items counted in full."""
    store = sqlite_store
    path = store.path
    steps: list[tuple[str, Any]] = [
        ("accept claimed", lambda: accept(store, 1, author=1, caps=None, claim=True)),
        ("accept pending", lambda: accept(store, 2, author=2, caps=None)),
        ("enqueue", lambda: store.enqueue(OUT, "c3", message(3), now=T0)),
        ("accept_with_history", lambda: store.accept_with_history(
            4, IN, "c4", message(4), now=T0, lease_seconds=5
        )),
        ("claim", lambda: store.claim(now=T0, lease_seconds=5, limit=10)),
        ("requeue", lambda: store.requeue(1, error="x", next_attempt_at=T0)),
        ("complete", lambda: store.complete(3)),
        ("finish", lambda: store.finish(4, key="c4", turns=[("user", "q", 4)], now=T0)),
        ("release_claims", lambda: store.release_claims()),
        ("dead_letter", lambda: store.dead_letter(2, "gave up")),
        ("expire", lambda: store.expire(now=T0 + 100, max_age=10)),
        ("accept again", lambda: accept(store, 5, author=5, caps=None)),
        ("purge", lambda: store.purge(ItemState.DEAD)),
    ]
    seen = []
    for name, step in steps:
        await step()
        kept, counted = _live(path)
        assert kept == counted, f"after {name}: kept {kept}, counted {counted}"
        seen.append(counted)
    assert seen[:4] == [1, 2, 3, 4] and seen[-3:] == [0, 1, 1]
    with sqlite3.connect(path) as conn:  # an operator deleting a live row by hand
        conn.execute("DELETE FROM queue WHERE state = 'pending'")
    conn.close()
    assert _live(path) == (0, 0)
