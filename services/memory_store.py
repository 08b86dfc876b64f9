"""Semantic memory's storage: texts with their embeddings in SQLite, recalled by cosine similarity.

Why not sqlite-vec: this Python's ``sqlite3`` is built without loadable extensions
(``sqlite3.Connection`` has no ``enable_load_extension``), so neither ``sqlite3`` nor ``aiosqlite``
can load the ``vec0`` extension here. Vectors are therefore stored as float32 BLOBs and recall is a
brute-force cosine in Python over a bounded set: each owner (a user, a server) keeps at most
``max_items`` memories (the oldest go first), so one recall scores at most two owners' worth
(2,000 by default, 256 floats each: about 25 ms of CPU on the 2-core development machine, in a
worker thread so the event loop does not stall). With sqlite-vec loadable, the ``vector`` column
would move to a ``vec0`` table; the interface here would not change.

The store is a file of its own (``DATA_DIR/memory.sqlite3``, owner-only, WAL), with its own
migrations (``services/migrations/memory/NNNN_name.sql``), so semantic memory can be dropped or
moved without touching the queue's database. On PostgreSQL (``DATABASE_URL``) the same interface
(``MemoryBackend``) is ``services.pg_memory_store.PgMemoryStore``, in the bot's database.

Forgetting deletes the rows, vectors and all, and records when: a memory said before a user's (or
a server's) last "forget" is never stored afterwards, even if its embedding was still on its way.
"""

from __future__ import annotations

import asyncio
import operator
import os
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Self

import aiosqlite

from resilience.clock import Clock, SystemClock
from services.datadir import make_private_dir
from services.storage import StorageError
from services.storage import migration_files as versioned_files

MIGRATIONS_DIR = Path(__file__).with_name("migrations") / "memory"
FILE_MODE = 0o600
DEFAULT_MAX_ITEMS = 1000
Scope = Literal["user", "guild"]


class MemoryStoreError(StorageError):
    """The memory database is unusable (its migrations are broken, it is newer than this build)."""


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[int, Path]]:
    """The memory store's versioned SQL files, in order (``services.storage.migration_files``)."""
    return versioned_files(directory)


def statements(sql: str) -> list[str]:
    """The statements of a migration file (``;`` at a line's end ends one; ``--`` lines are comments)."""
    lines = [line for line in sql.splitlines() if not line.lstrip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";\n") if s.strip().rstrip(";").strip()]


def pack(vector: Sequence[float]) -> bytes:
    """A vector as a float32 BLOB."""
    return array("f", vector).tobytes()


def unpack(blob: bytes) -> array[float]:
    """A float32 BLOB as a vector."""
    out = array("f")
    out.frombytes(blob)
    return out


@dataclass(frozen=True, slots=True)
class Memory:
    """One remembered text: who said it, where, when; ``score`` is its similarity to a query."""

    id: int
    scope: Scope
    owner_id: int
    author_id: int
    guild_id: int | None
    text: str
    answer: str
    said_at: float
    score: float = 0.0


def top_k(query: Sequence[float], rows: Iterable[tuple[Any, ...]], k: int, min_score: float) -> list[Memory]:
    """The ``k`` rows most similar to ``query`` (cosine of normalised vectors: their dot product) at
    ``min_score`` or more, best first. A row is (id, scope, owner, author, guild, text, answer,
    said_at, vector blob); a vector of another length is skipped."""
    q = array("f", query)
    scored = []
    for row in rows:
        vector = unpack(row[8])
        if len(vector) != len(q):
            continue
        score = sum(map(operator.mul, q, vector))
        if score >= min_score:
            scored.append((score, row))
    scored.sort(key=lambda pair: (-pair[0], -pair[1][0]))
    return [memory_from_row(row, score) for score, row in scored[:k]]


def memory_from_row(row: Sequence[Any], score: float = 0.0) -> Memory:
    """A ``Memory`` from a row (id, scope, owner, author, guild, text, answer, said_at, ...)."""
    return Memory(
        int(row[0]), row[1], int(row[2]), int(row[3]), None if row[4] is None else int(row[4]), str(row[5]),
        str(row[6]), float(row[7]), score,
    )


class MemoryBackend(Protocol):
    """What semantic memory needs of its storage: ``MemoryStore`` (SQLite) or
    ``services.pg_memory_store.PgMemoryStore`` (PostgreSQL)."""

    name: str
    depends_on: tuple[str, ...]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def health(self) -> dict[str, Any]: ...

    def user_enabled(self, user_id: int) -> bool: ...

    async def set_user_enabled(self, user_id: int, enabled: bool) -> None: ...

    async def add(
        self,
        scope: Scope,
        owner_id: int,
        *,
        author_id: int,
        guild_id: int | None,
        text: str,
        answer: str,
        model: str,
        vector: Sequence[float],
        said_at: float,
    ) -> int | None: ...

    async def recall(
        self,
        owners: Sequence[tuple[Scope, int]],
        query: Sequence[float],
        *,
        model: str,
        k: int,
        min_score: float,
    ) -> list[Memory]: ...

    async def list_user(self, user_id: int, limit: int = 10) -> tuple[list[Memory], int]: ...

    async def forget_user(self, user_id: int, memory_id: int | None = None) -> int: ...

    async def forget_guild(self, guild_id: int) -> int: ...

    async def count(self) -> int: ...


class MemoryStore:
    """The memory database; a registry service named ``"memory_store"``."""

    name = "memory_store"
    depends_on: tuple[str, ...] = ()

    def __init__(
        self,
        path: Path,
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
        clock: Clock | None = None,
        migrations_dir: Path = MIGRATIONS_DIR,
    ) -> None:
        self.path = path
        self.max_items = max_items
        self._clock = clock or SystemClock()
        self._migrations_dir = migrations_dir
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self.enabled_users: set[int] = set()
        self.last_error: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the file (owner-only, WAL), run pending migrations, load who turned memory on."""
        if self._db is not None:
            return
        make_private_dir(self.path.parent)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE))
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode = WAL")
            await db.execute("PRAGMA synchronous = NORMAL")
            await self._migrate(db)
            async with db.execute("SELECT user_id FROM memory_users WHERE enabled = 1") as cursor:
                self.enabled_users = {int(r[0]) for r in await cursor.fetchall()}
        except BaseException:
            await db.close()
            raise
        self._db = db

    async def stop(self) -> None:
        """Close the file; safe to call twice."""
        db, self._db = self._db, None
        if db is not None:
            async with self._lock:
                await db.close()

    def health(self) -> dict[str, Any]:
        return {"ok": self._db is not None, "path": str(self.path), "last_error": self.last_error}

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _migrate(self, db: aiosqlite.Connection) -> None:
        files = migration_files(self._migrations_dir)
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            async with db.execute("SELECT MAX(version) FROM schema_version") as cursor:
                row = await cursor.fetchone()
            current = int(row[0]) if row and row[0] is not None else 0
            if current > len(files):
                raise MemoryStoreError(
                    f"{self.path} has memory schema version {current}; this build knows {len(files)}"
                )
            for version, path in files[current:]:
                for statement in statements(path.read_text(encoding="utf-8")):
                    await db.execute(statement)
                await db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise

    async def schema_version(self) -> int:
        async with self._lock:
            async with self._conn().execute("SELECT MAX(version) FROM schema_version") as cursor:
                row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise MemoryStoreError("the memory store is not open")
        return self._db

    # -- choices ---------------------------------------------------------------------------

    def user_enabled(self, user_id: int) -> bool:
        """Whether ``user_id`` turned their memory on (memory only)."""
        return user_id in self.enabled_users

    async def set_user_enabled(self, user_id: int, enabled: bool) -> None:
        """Turn a user's memory on or off (off keeps what is stored; ``forget_user`` deletes it)."""
        now = self._clock.time()
        async with self._lock:
            await self._conn().execute(
                "INSERT INTO memory_users (user_id, enabled, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (user_id) DO UPDATE SET enabled = excluded.enabled, "
                "updated_at = excluded.updated_at",
                (user_id, int(enabled), now),
            )
        (self.enabled_users.add if enabled else self.enabled_users.discard)(user_id)

    # -- memories --------------------------------------------------------------------------

    async def add(
        self,
        scope: Scope,
        owner_id: int,
        *,
        author_id: int,
        guild_id: int | None,
        text: str,
        answer: str,
        model: str,
        vector: Sequence[float],
        said_at: float,
    ) -> int | None:
        """Store one memory; None when it was said before its author's (or its server's) last forget.
        Past ``max_items`` for the owner, the oldest are deleted in the same transaction."""
        async with self._lock:
            db = self._conn()
            await db.execute("BEGIN IMMEDIATE")
            try:
                async with db.execute(
                    "SELECT MAX(forgot_at) FROM (SELECT forgot_at FROM memory_users WHERE user_id = ? "
                    "UNION ALL SELECT forgot_at FROM memory_guilds WHERE guild_id = ? AND ? = 'guild')",
                    (author_id, owner_id, scope),
                ) as cursor:
                    row = await cursor.fetchone()
                if row is not None and row[0] is not None and said_at <= float(row[0]):
                    await db.execute("ROLLBACK")
                    return None
                cursor = await db.execute(
                    "INSERT INTO memories (scope, owner_id, author_id, guild_id, text, answer, model, "
                    "vector, said_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (scope, owner_id, author_id, guild_id, text, answer, model, pack(vector), said_at,
                     self._clock.time()),
                )
                new_id = cursor.lastrowid
                await db.execute(
                    "DELETE FROM memories WHERE scope = ? AND owner_id = ? AND id <= ("
                    "SELECT id FROM memories WHERE scope = ? AND owner_id = ? "
                    "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (scope, owner_id, scope, owner_id, self.max_items),
                )
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        return new_id

    async def recall(
        self,
        owners: Sequence[tuple[Scope, int]],
        query: Sequence[float],
        *,
        model: str,
        k: int,
        min_score: float,
    ) -> list[Memory]:
        """The ``k`` memories of ``owners`` most similar to ``query`` (embedded with ``model``)."""
        if not owners or k <= 0:
            return []
        where = " OR ".join("(scope = ? AND owner_id = ?)" for _ in owners)
        params: list[Any] = [model, *(value for owner in owners for value in owner)]
        async with self._lock:
            async with self._conn().execute(
                "SELECT id, scope, owner_id, author_id, guild_id, text, answer, said_at, vector "
                f"FROM memories WHERE model = ? AND ({where})",
                params,
            ) as cursor:
                rows = [tuple(row) for row in await cursor.fetchall()]
        return await asyncio.to_thread(top_k, query, rows, k, min_score)

    async def list_user(self, user_id: int, limit: int = 10) -> tuple[list[Memory], int]:
        """The newest memories ``user_id`` said (both scopes), and how many there are in all."""
        async with self._lock:
            db = self._conn()
            async with db.execute(
                "SELECT id, scope, owner_id, author_id, guild_id, text, answer, said_at FROM memories "
                "WHERE author_id = ? ORDER BY id DESC LIMIT ?",
                (user_id, limit),
            ) as cursor:
                rows = await cursor.fetchall()
            async with db.execute("SELECT COUNT(*) FROM memories WHERE author_id = ?", (user_id,)) as cursor:
                count = await cursor.fetchone()
        return [memory_from_row(row) for row in rows], int(count[0]) if count else 0

    async def forget_user(self, user_id: int, memory_id: int | None = None) -> int:
        """Delete what ``user_id`` said (one memory by id, or all of it, in both scopes); returns how
        many rows went. Forgetting all also refuses anything said before now that arrives later."""
        now = self._clock.time()
        async with self._lock:
            db = self._conn()
            await db.execute("BEGIN IMMEDIATE")
            try:
                if memory_id is None:
                    cursor = await db.execute("DELETE FROM memories WHERE author_id = ?", (user_id,))
                    await db.execute(
                        "INSERT INTO memory_users (user_id, forgot_at, updated_at) VALUES (?, ?, ?) "
                        "ON CONFLICT (user_id) DO UPDATE SET forgot_at = excluded.forgot_at, "
                        "updated_at = excluded.updated_at",
                        (user_id, now, now),
                    )
                else:
                    cursor = await db.execute(
                        "DELETE FROM memories WHERE author_id = ? AND id = ?", (user_id, memory_id)
                    )
                deleted = cursor.rowcount
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        return max(0, deleted)

    async def forget_guild(self, guild_id: int) -> int:
        """Delete a server's memory (its ``guild`` scope) and refuse what was said before now."""
        now = self._clock.time()
        async with self._lock:
            db = self._conn()
            await db.execute("BEGIN IMMEDIATE")
            try:
                cursor = await db.execute(
                    "DELETE FROM memories WHERE scope = 'guild' AND owner_id = ?", (guild_id,)
                )
                await db.execute(
                    "INSERT INTO memory_guilds (guild_id, forgot_at) VALUES (?, ?) "
                    "ON CONFLICT (guild_id) DO UPDATE SET forgot_at = excluded.forgot_at",
                    (guild_id, now),
                )
                deleted = cursor.rowcount
                await db.execute("COMMIT")
            except BaseException:
                await db.execute("ROLLBACK")
                raise
        return max(0, deleted)

    async def count(self) -> int:
        async with self._lock:
            async with self._conn().execute("SELECT COUNT(*) FROM memories") as cursor:
                row = await cursor.fetchone()
        return int(row[0]) if row else 0
