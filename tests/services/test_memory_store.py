"""The memory stores (SQLite's file, PostgreSQL's tables; float32 vectors, brute-force cosine) on a
FakeClock; no sleeps. Tests taking ``store`` run once per backend, on a real PostgreSQL for
``[postgres]`` (``tests/pg.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from resilience.clock import FakeClock
from sandbox.gemini_caches import bag_of_words
from services.memory_store import MemoryBackend, MemoryStore, MemoryStoreError, migration_files, statements
from services.pg_memory_store import PgMemoryStore
from services.pg_storage import PostgresStore
from services.pg_storage import migration_files as pg_migration_files

MODEL = "gemini-embedding-001"


def vec(text: str) -> list[float]:
    return bag_of_words(text, 256)


Opener = Callable[[], contextlib.AbstractAsyncContextManager[MemoryBackend]]


@pytest.fixture(params=["sqlite", "postgres"])
def open_memory(request: pytest.FixtureRequest, tmp_path: Path, fake_clock: FakeClock) -> Opener:
    """Opens a started memory store (at most 5 items per owner) on this test's one database."""

    @contextlib.asynccontextmanager
    async def sqlite() -> AsyncIterator[MemoryBackend]:
        async with MemoryStore(tmp_path / "memory.sqlite3", max_items=5, clock=fake_clock) as s:
            yield s

    @contextlib.asynccontextmanager
    async def postgres() -> AsyncIterator[MemoryBackend]:
        async with PostgresStore(url) as pg:
            s = PgMemoryStore(pg, max_items=5, clock=fake_clock)
            await s.start()
            yield s
            await s.stop()

    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        return postgres
    return sqlite


@pytest.fixture
async def store(open_memory: Opener) -> AsyncIterator[MemoryBackend]:
    async with open_memory() as s:
        yield s


async def add(
    store: MemoryBackend,
    text: str,
    *,
    author: int = 1,
    scope: str = "user",
    owner: int = 1,
    said_at: float | None = None,
) -> int | None:
    return await store.add(
        scope,  # type: ignore[arg-type]
        owner,
        author_id=author,
        guild_id=None,
        text=text,
        answer="ok",
        model=MODEL,
        vector=vec(text),
        said_at=said_at if said_at is not None else store._clock.time(),  # type: ignore[attr-defined]
    )


async def test_the_schema_version_follows_the_migration_files_and_the_file_is_owner_only(
    tmp_path: Path, fake_clock: FakeClock
) -> None:
    files = migration_files()
    assert [n for n, _ in files] == list(range(1, len(files) + 1))
    async with MemoryStore(tmp_path / "memory.sqlite3", clock=fake_clock) as store:
        assert await store.schema_version() == files[-1][0]
    assert (tmp_path / "memory.sqlite3").stat().st_mode & 0o077 == 0
    for _, path in files:
        assert statements(path.read_text())  # every file holds statements
    # PostgreSQL's memory tables come with the bot's schema (a migration of its own).
    assert any("memory" in path.name for _, path in pg_migration_files())


async def test_a_database_newer_than_the_build_is_refused(tmp_path: Path, fake_clock: FakeClock) -> None:
    path = tmp_path / "memory.sqlite3"
    async with MemoryStore(path, clock=fake_clock):
        pass
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (99)")
    with pytest.raises(MemoryStoreError, match="version 99"):
        await MemoryStore(path, clock=fake_clock).start()


async def test_recall_ranks_by_similarity_and_keeps_to_its_owners(store: MemoryBackend) -> None:
    await add(store, "My cat is called Zanzibar")
    await add(store, "I live in Lisbon")
    await add(store, "My cat is black", author=2, owner=2)  # another user's memory
    found = await store.recall([("user", 1)], vec("what is my cat called"), model=MODEL, k=3, min_score=0.3)
    assert [m.text for m in found] == ["My cat is called Zanzibar"]
    assert found[0].score == pytest.approx(0.8, abs=0.01)
    # Vectors of another model are never compared.
    assert await store.recall([("user", 1)], vec("my cat"), model="other", k=3, min_score=0.0) == []


async def test_an_owner_keeps_at_most_max_items_the_oldest_going_first(store: MemoryBackend) -> None:
    for n in range(7):
        await add(store, f"fact number {n}")
    memories, total = await store.list_user(1, limit=10)
    assert total == 5 and [m.text for m in memories] == [f"fact number {n}" for n in (6, 5, 4, 3, 2)]


async def test_forgetting_deletes_the_rows_and_refuses_what_was_said_before(
    store: MemoryBackend, fake_clock: FakeClock
) -> None:
    said = fake_clock.time()
    await add(store, "My cat is called Zanzibar", said_at=said)
    await add(store, "a server fact of mine", scope="guild", owner=77)
    await add(store, "someone else's", author=2, owner=2)
    fake_clock.advance(1)
    assert await store.forget_user(1) == 2
    assert await store.list_user(1) == ([], 0)
    assert await store.count() == 1  # the other user's stays
    # An embedding that was on its way when the user said forget is not stored afterwards.
    assert await add(store, "My cat is called Zanzibar", said_at=said) is None
    fake_clock.advance(1)
    assert await add(store, "said after the forget") is not None


async def test_forgetting_one_memory_or_a_servers_memory(store: MemoryBackend, fake_clock: FakeClock) -> None:
    first = await add(store, "first thing")
    await add(store, "second thing")
    await add(store, "in the server", scope="guild", owner=77, author=3)
    assert await store.forget_user(1, first) == 1
    assert await store.forget_user(2, first) == 0  # not theirs
    assert [m.text for m in (await store.list_user(1))[0]] == ["second thing"]
    said = fake_clock.time()
    fake_clock.advance(1)
    assert await store.forget_guild(77) == 1
    assert await add(store, "late server write", scope="guild", owner=77, author=3, said_at=said) is None
    assert await add(store, "late user write", author=3, owner=3, said_at=said) is not None  # the user's own


async def test_the_opt_in_survives_a_restart(open_memory: Opener) -> None:
    async with open_memory() as s:
        await s.set_user_enabled(5, True)
        await s.set_user_enabled(6, True)
        await s.set_user_enabled(6, False)
    async with open_memory() as s:
        assert s.user_enabled(5) and not s.user_enabled(6)


async def test_on_postgresql_an_opt_in_reaches_the_other_processes(
    pg_url: str, fake_clock: FakeClock
) -> None:
    async with PostgresStore(pg_url, process_name="a") as a, PostgresStore(pg_url, process_name="b") as b:
        first, second = PgMemoryStore(a, clock=fake_clock), PgMemoryStore(b, clock=fake_clock)
        await first.start()
        await second.start()
        await first.set_user_enabled(9, True)
        async with asyncio.timeout(5):
            while not second.user_enabled(9):
                await asyncio.sleep(0.01)
        await second.set_user_enabled(9, False)
        async with asyncio.timeout(5):
            while first.user_enabled(9):
                await asyncio.sleep(0.01)
