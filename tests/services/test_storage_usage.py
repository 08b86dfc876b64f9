"""Token usage: one row per UTC day, user, guild and model, written in the transaction that finishes
the answer (no write of its own), read back for quotas and reports. Real SQLite files and PostgreSQL
databases (a test on ``store`` runs on both)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from resilience.degradation import ItemKind, ItemState
from services.storage import (
    MIGRATIONS,
    SCHEMA_VERSION,
    QueueItemNotFoundError,
    SqliteStore,
    UsageRecord,
    UsageRow,
    UsageTotals,
    usage_day,
)
from tests.services.conftest import OpenStore, Store, fetch

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
DAY = usage_day(T0)


@pytest.fixture
async def store(open_store: OpenStore) -> AsyncIterator[Store]:
    async with open_store(synchronous="NORMAL") as s:
        yield s


def usage(
    user: int, guild: int | None = 1, model: str = "gemini-2.5-flash", day: int = DAY, **tokens: int
) -> UsageRecord:
    counts = {"prompt": 100, "output": 20, "thought": 0, "cached": 0} | tokens
    return UsageRecord(day=day, user_id=user, guild_id=guild, model=model, **counts)


async def rows(store: Store) -> list[tuple[int, ...]]:
    return await fetch(store, "SELECT * FROM token_usage ORDER BY day, user_id, guild_id, model")


def test_the_utc_day_is_the_quota_window() -> None:
    assert usage_day(T0) == 19675 and usage_day(19676 * 86400.0) == 19676
    assert usage_day(19676 * 86400.0 - 0.001) == 19675


async def test_finishing_an_item_records_its_usage_in_the_same_transaction(store: Store) -> None:
    item = await store.enqueue(ItemKind.INBOUND, "k", {"content": "q"}, now=T0)
    await store.finish(item.id, key="k", turns=[("user", "q", 1), ("model", "a", None)], now=T0,
                       usage=usage(7, thought=5, cached=40))
    assert await rows(store) == [(DAY, 7, 1, "gemini-2.5-flash", 1, 100, 20, 5, 40)]
    assert (await store.get(item.id)).state is ItemState.DONE  # type: ignore[union-attr]
    # A finish that fails (the item is gone) rolls its usage back with it: nothing is half-written.
    with pytest.raises(QueueItemNotFoundError):
        await store.finish(999, usage=usage(8))
    assert [r[1] for r in await rows(store)] == [7]


async def test_usage_adds_up_per_day_user_guild_and_model(store: Store) -> None:
    await store.append_turns("k", [("user", "q", 1)], usage=usage(7))
    await store.append_turns("k", [], usage=usage(7, prompt=10, output=1))  # usage without turns
    await store.record_usage(usage(7, guild=None))  # a DM
    await store.record_usage(usage(7, model="gemini-2.0-flash"))
    await store.record_usage(usage(8, guild=2, thought=9))
    await store.record_usage(usage(7, day=DAY - 1))
    assert await rows(store) == [
        (DAY - 1, 7, 1, "gemini-2.5-flash", 1, 100, 20, 0, 0),
        (DAY, 7, 0, "gemini-2.5-flash", 1, 100, 20, 0, 0),
        (DAY, 7, 1, "gemini-2.0-flash", 1, 100, 20, 0, 0),
        (DAY, 7, 1, "gemini-2.5-flash", 2, 110, 21, 0, 0),
        (DAY, 8, 2, "gemini-2.5-flash", 1, 100, 20, 9, 0),
    ]
    assert [t.text for t in await store.history("k")] == ["q"]

    users, guilds = await store.usage_by_owner(DAY)
    assert users == {7: 120 + 131 + 120, 8: 129} and guilds == {0: 120, 1: 251, 2: 129}
    assert await store.usage_totals(DAY, DAY, user_id=7) == UsageTotals(4, 310, 61, 0, 0)
    assert await store.usage_totals(DAY - 1, DAY, user_id=7) == UsageTotals(5, 410, 81, 0, 0)
    assert await store.usage_totals(DAY, DAY, guild_id=1) == UsageTotals(3, 210, 41, 0, 0)
    assert (await store.usage_totals(DAY, DAY)).counted == 371 + 129
    assert list(await store.usage_by_model(DAY, DAY)) == ["gemini-2.5-flash", "gemini-2.0-flash"]
    assert await store.usage_top(DAY, DAY, by="user", limit=1) == [UsageRow(7, UsageTotals(4, 310, 61, 0, 0))]
    assert [r.owner_id for r in await store.usage_top(DAY, DAY, by="guild")] == [1, 2, 0]
    assert [r.owner_id for r in await store.usage_top(DAY, DAY, by="user", guild_id=2)] == [8]
    assert await store.usage_totals(DAY + 1, DAY + 1) == UsageTotals()
    with pytest.raises(ValueError):
        await store.usage_top(DAY, DAY, by="model")


async def test_housekeeping_deletes_usage_past_its_retention(store: Store) -> None:
    for back in (0, 10, 500):
        await store.record_usage(usage(7, day=DAY - back))
    done = await store.housekeeping(
        now=T0, queue_retention=0, history_retention=3600, processed_retention=0, usage_retention=30 * 86400.0
    )
    assert done.usage_rows == 1 and done.as_dict()["usage_rows"] == 1
    assert [r[0] for r in await rows(store)] == [DAY - 10, DAY]
    for back in (399, 401):
        await store.record_usage(usage(7, day=DAY - back))
    default = await store.housekeeping(
        now=T0, queue_retention=0, history_retention=3600, processed_retention=0
    )
    assert default.usage_rows == 1  # 400 days by default
    assert [r[0] for r in await rows(store)] == [DAY - 399, DAY - 10, DAY]


async def test_a_database_of_schema_2_gains_the_usage_table_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version in (1, 2):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        conn.execute(
            "INSERT INTO turns (conversation_key, role, text, created_at) VALUES ('k', 'user', 'kept', ?)",
            (T0,),
        )
    conn.close()
    async with SqliteStore(path) as s:
        assert await s.schema_version() == SCHEMA_VERSION >= 5
        assert [t.text for t in await s.history("k")] == ["kept"]
        await s.record_usage(usage(7))
        assert (await s.usage_totals(DAY, DAY)).calls == 1
