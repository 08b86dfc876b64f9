"""Fixtures of the services tests. The storage suite runs against both backends: fixtures that hide
which one a test got.

``open_store(**options)`` makes an unstarted store on this test's database, the same database at
each call (two calls are two processes' stores, or a store before and after a restart): a SQLite
file under ``tmp_path``, or a fresh PostgreSQL database (``tests/pg.py``). A test that asks for
``open_store`` (or a ``store`` fixture built on it) runs once per backend, ``[sqlite]`` and
``[postgres]``. Options one backend does not have (SQLite's ``synchronous``, ``busy_timeout_ms``)
are dropped for the other.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from resilience.clock import FakeClock
from sandbox.gemini import GeminiEmulator
from services.pg_storage import PostgresStore
from services.storage import SqliteStore
from tests.services.test_gemini_service import Harness

Store = SqliteStore | PostgresStore
OpenStore = Callable[..., Store]
_SQLITE_ONLY = ("synchronous", "busy_timeout_ms", "quarantine_corrupt")
_POSTGRES_ONLY = ("pool_size", "register", "process_name", "connect_timeout", "migrations_dir")


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    """Which storage backend this run of the test uses."""
    return str(request.param)


@pytest.fixture
def open_store(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> OpenStore:
    """A factory of unstarted stores, all on this test's one database."""
    if backend == "postgres":
        url = request.getfixturevalue("pg_url")

        def postgres(**options: Any) -> PostgresStore:
            return PostgresStore(url, **{k: v for k, v in options.items() if k not in _SQLITE_ONLY})

        return postgres
    path = tmp_path / "bot.sqlite3"

    def sqlite(**options: Any) -> SqliteStore:
        return SqliteStore(path, **{k: v for k, v in options.items() if k not in _POSTGRES_ONLY})

    return sqlite


async def fetch(store: Store, sql: str) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` (no parameters; plain SQL both dialects read) from the store's database,
    on a connection of its own, as an operator would look."""
    if isinstance(store, PostgresStore):
        conn = await asyncpg.connect(store.url)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        return [tuple(r) for r in db.execute(sql).fetchall()]


async def execute(store: Store, sql: str) -> None:
    """Run ``sql`` behind the store's back (committed), as an operator or a damaged disk would."""
    if isinstance(store, PostgresStore):
        conn = await asyncpg.connect(store.url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()
        return
    with contextlib.closing(sqlite3.connect(store.path)) as db:
        db.execute(sql)
        db.commit()


@contextlib.asynccontextmanager
async def write_lock_held(store: Store) -> AsyncIterator[None]:
    """Another connection holds the write lock of the store's tables until the block ends."""
    if isinstance(store, PostgresStore):
        conn = await asyncpg.connect(store.url)
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.execute(
                "LOCK TABLE queue, processed, turns, token_usage, events IN EXCLUSIVE MODE"
            )
            try:
                yield
            finally:
                await tx.rollback()
        finally:
            await conn.close()
        return
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()


async def open_transactions(store: Store) -> int:
    """Transactions the store left open on its connections (0 is the only good answer)."""
    if isinstance(store, PostgresStore):
        rows = await fetch(
            store,
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()",
        )
        return int(rows[0][0])
    return int(store._db is not None and store._db.in_transaction)


# -- Gemini: the emulator and services pointed at it -----------------------------------------------


@pytest.fixture
async def emu() -> AsyncIterator[GeminiEmulator]:
    """A started Gemini emulator on a loopback port."""
    async with GeminiEmulator() as emulator:
        yield emulator


@pytest.fixture
async def harness(emu: GeminiEmulator, fake_clock: FakeClock) -> AsyncIterator[Harness]:
    """Makes GeminiServices pointed at ``emu``; stops them after the test."""
    h = Harness(emu, fake_clock)
    yield h
    for service in h.services:
        await service.stop()
