"""The store on both backends: history bounds, processed ids, events, timeouts, breaker routing; and
SQLite's own migrations, WAL and quarantine (tests/services/test_pg_storage.py has PostgreSQL's)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from resilience.errors import CallTimeoutError, Category, classify
from services.pg_storage import PostgresStore
from services.storage import (
    SCHEMA_VERSION,
    TRUNCATION_MARK,
    SchemaTooNewError,
    SqliteStore,
    StorageBusyError,
    StoreNotStartedError,
)
from tests.services.conftest import OpenStore, Store, fetch, open_transactions, write_lock_held

NOW = 1_700_000_000.0


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    """A started store on a fresh database with small history bounds (5 messages, 100 chars)."""
    async with open_store(history_max_messages=5, history_max_chars=100, events_max=10) as s:
        yield s


def _versions(path: Path) -> list[int]:
    with sqlite3.connect(path) as conn:
        return [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY version")]


async def test_migrations_run_once_and_are_idempotent_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    for _ in range(3):
        async with SqliteStore(path) as s:
            assert await s.schema_version() == SCHEMA_VERSION
            await s.append_turn("c", "user", "hi", now=NOW)
    assert _versions(path) == list(range(1, SCHEMA_VERSION + 1))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 3


async def test_database_from_a_newer_version_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    async with SqliteStore(path):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    s = SqliteStore(path)
    with pytest.raises(SchemaTooNewError) as info:
        await s.start()
    assert info.value.found == SCHEMA_VERSION + 1 and info.value.supported == SCHEMA_VERSION
    assert s.health()["open"] is False


async def test_service_protocol_start_stop_health(open_store: OpenStore) -> None:
    s = open_store()
    assert s.name == "storage" and s.depends_on == ()
    assert s.health()["ok"] is False
    with pytest.raises(StoreNotStartedError):
        await s.history("c")
    await s.start()
    await s.start()  # idempotent
    assert s.health()["ok"] is True
    await s.stop()
    await s.stop()  # safe twice
    assert s.health()["ok"] is False


async def test_history_keeps_newest_turns_within_the_message_bound(store: Store) -> None:
    for i in range(8):
        await store.append_turn("c", "user" if i % 2 == 0 else "model", f"t{i}", message_id=i, now=NOW + i)
    turns = await store.history("c")
    assert [t.text for t in turns] == ["t3", "t4", "t5", "t6", "t7"]
    assert turns[-1].message_id == "7" and turns[-1].role == "model"
    assert await store.history("other") == []


async def test_history_prunes_old_rows_so_the_table_stays_bounded(store: Store) -> None:
    for i in range(30):
        await store.append_turn("c", "user", f"t{i}", now=NOW + i)
    assert await fetch(store, "SELECT COUNT(*) FROM turns") == [(5,)]


async def test_history_keeps_only_the_newest_turns_that_fit_the_char_bound(store: Store) -> None:
    await store.append_turn("c", "user", "a" * 40, now=NOW)
    await store.append_turn("c", "model", "b" * 40, now=NOW + 1)
    await store.append_turn("c", "user", "c" * 40, now=NOW + 2)
    turns = await store.history("c")
    assert [t.text[0] for t in turns] == ["b", "c"]
    assert sum(len(t.text) for t in turns) <= 100


async def test_one_huge_turn_is_truncated_and_does_not_poison_later_history(store: Store) -> None:
    await store.append_turn("c", "model", "x" * 50_000, now=NOW)
    turns = await store.history("c")
    assert len(turns) == 1 and len(turns[0].text) == 100 and turns[0].text.endswith(TRUNCATION_MARK)
    await store.append_turn("c", "user", "short question", now=NOW + 1)
    turns = await store.history("c")
    assert [t.text for t in turns] == ["short question"]  # the huge turn no longer fits beside it


async def test_forget_deletes_one_conversation_only(store: Store) -> None:
    await store.append_turn("a", "user", "1", now=NOW)
    await store.append_turn("b", "user", "2", now=NOW)
    assert await store.forget("a") == 1
    assert await store.history("a") == []
    assert [t.text for t in await store.history("b")] == ["2"]


async def test_prune_history_drops_idle_turns(store: Store) -> None:
    await store.append_turn("a", "user", "old", now=NOW)
    await store.append_turn("b", "user", "new", now=NOW + 1000)
    assert await store.prune_history(500, now=NOW + 1000) == 1
    assert await store.history("a") == [] and len(await store.history("b")) == 1


async def test_append_turn_rejects_unknown_roles(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.append_turn("c", "system", "x", now=NOW)


async def test_mark_processed_is_true_once_then_false_and_survives_restart(open_store: OpenStore) -> None:
    async with open_store() as s:
        assert await s.mark_processed(123, now=NOW) is True
        assert await s.mark_processed("123", now=NOW + 1) is False
        assert await s.is_processed(123) and not await s.is_processed(124)
    async with open_store() as s:
        assert await s.is_processed("123")
        assert await s.mark_processed(123, now=NOW + 2) is False


async def test_prune_processed_forgets_only_old_ids(store: Store) -> None:
    await store.mark_processed(1, now=NOW)
    await store.mark_processed(2, now=NOW + 100)
    assert await store.prune_processed(50, now=NOW + 100) == 1
    assert not await store.is_processed(1) and await store.is_processed(2)


async def test_events_are_bounded_and_newest_first(store: Store) -> None:
    for i in range(25):
        await store.record_event("error" if i % 2 else "trace", {"i": i}, now=NOW + i)
    events = await store.recent_events(limit=100)
    assert len(events) == 10  # events_max
    assert [e.data["i"] for e in events] == list(range(24, 14, -1))
    errors = await store.recent_events("error", limit=3)
    assert [e.data["i"] for e in errors] == [23, 21, 19] and all(e.kind == "error" for e in errors)


async def test_a_slow_statement_raises_call_timeout_and_the_store_stays_usable(open_store: OpenStore) -> None:
    s = open_store(statement_timeout=0.03)
    async with s:

        async def slow(db: Any) -> Any:
            if isinstance(s, PostgresStore):
                return await db.fetchval("SELECT pg_sleep(5)")
            sql = (
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 1000000000) "
                "SELECT COUNT(*) FROM c"
            )
            async with db.execute(sql) as cur:
                return await cur.fetchone()

        with pytest.raises(CallTimeoutError) as info:
            await s._run("slow", slow)  # the only way to get a statement slow enough on purpose
        assert info.value.operation == "storage.slow"
        assert s.health()["ok"] is False
        s.statement_timeout = 5.0  # 30 ms is too short for anything on a loaded machine
        await s.append_turn("c", "user", "after", now=NOW)  # interrupted and rolled back: usable again
        assert [t.text for t in await s.history("c")] == ["after"]
        assert s.health()["ok"] is True


async def test_a_writer_holding_the_lock_makes_writes_time_out_not_hang(open_store: OpenStore) -> None:
    s = open_store(statement_timeout=0.05, busy_timeout_ms=5000)
    async with s:
        async with write_lock_held(s):
            with pytest.raises(CallTimeoutError):
                await s.mark_processed(1, now=NOW)
        assert await s.mark_processed(1, now=NOW) is True  # the timed-out write left no transaction open
        assert await open_transactions(s) == 0


async def test_busy_timeout_shorter_than_statement_timeout_raises_storage_busy(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    s = SqliteStore(path, statement_timeout=2.0, busy_timeout_ms=40)
    async with s:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(StorageBusyError) as raised:
                await s.mark_processed(1, now=NOW)
            # Another writer's lock goes away: a transient timeout to retry, not a bug.
            verdict = classify(raised.value)
            assert verdict.category is Category.TIMEOUT and verdict.retryable
        finally:
            other.execute("ROLLBACK")
            other.close()


class RecordingBreaker:
    """A stand-in with the breaker's ``call`` signature that records which operations ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.open = False

    async def call(self, fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float | None = None) -> Any:
        if self.open:
            raise RuntimeError("open")
        self.calls.append(args[0])
        return await fn(*args)


async def test_every_public_operation_goes_through_the_breaker(open_store: OpenStore) -> None:
    breaker = RecordingBreaker()
    async with open_store(breaker=breaker) as s:
        await s.append_turn("c", "user", "x", now=NOW)
        await s.history("c")
        await s.mark_processed(1, now=NOW)
        await s.record_event("e", {}, now=NOW)
        assert breaker.calls == ["append_turns", "history", "mark_processed", "record_event"]
        breaker.open = True
        with pytest.raises(RuntimeError):
            await s.is_processed(1)


async def test_a_cancelled_operation_leaves_no_transaction_open(open_store: OpenStore) -> None:
    import asyncio

    async with open_store() as s:
        for delay_steps in range(6):  # cancel at several points inside the transaction
            task = asyncio.create_task(s.append_turn("c", "user", f"m{delay_steps}", now=NOW))
            for _ in range(delay_steps):
                await asyncio.sleep(0)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await s.append_turn("c", "user", "after", now=NOW)
        assert await open_transactions(s) == 0
        assert (await s.history("c"))[-1].text == "after"


async def test_stop_folds_the_wal_into_the_database_file(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    async with SqliteStore(path) as s:
        for i in range(20):
            await s.append_turn("c", "user", "x" * 500, now=NOW + i)
        assert Path(f"{path}-wal").stat().st_size > 0
    wal = Path(f"{path}-wal")
    assert not wal.exists() or wal.stat().st_size == 0


async def test_a_file_that_is_not_a_database_is_quarantined_and_a_fresh_one_started(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(b"this is not sqlite at all" * 100)
    async with SqliteStore(path) as s:
        health = s.health()
        assert health["ok"] is True and health["alert"] is True
        assert s.quarantined is not None and s.quarantined.read_bytes().startswith(b"this is not sqlite")
        await s.append_turn("c", "user", "fresh", now=NOW)
        assert [t.text for t in await s.history("c")] == ["fresh"]
        events = await s.recent_events("storage.quarantined")
        assert len(events) == 1 and events[0].data["path"] == str(s.quarantined)


async def test_a_damaged_page_fails_quick_check_and_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    async with SqliteStore(path, history_max_messages=10_000) as s:
        for i in range(300):
            await s.append_turn("c", "user", f"turn {i} " * 20, now=NOW + i)
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[5 * page : 6 * page] = b"\xff" * page  # one page of garbage in the middle of the table
    path.write_bytes(bytes(data))
    async with SqliteStore(path) as s:
        assert s.quarantined is not None and s.health()["alert"] is True
        assert await s.history("c") == []


async def test_quarantine_can_be_turned_off_so_the_error_reaches_the_caller(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(b"garbage" * 1000)
    with pytest.raises(sqlite3.DatabaseError):
        await SqliteStore(path, quarantine_corrupt=False).start()
    assert path.read_bytes().startswith(b"garbage")
