"""Semantic memory on PostgreSQL (``DATABASE_URL``): ``services.memory_store.MemoryStore``'s interface.

pgvector is not installed on these machines (``/usr/share/postgresql/15/extension`` has no
``vector``), so the schema (``services/migrations/postgres/0005_memory.sql``) keeps vectors as
float32 ``BYTEA`` and recall is the same brute-force cosine in the bot, over the same bounded set
(each owner's newest ``max_items``). Every operation is one transaction of the ``PostgresStore``
(its pool, breaker and statement timeout). Which users turned their memory on is kept in memory in
each process, read at start-up and told to the other processes (``LISTEN/NOTIFY``, ``memory.user``,
with the change's commit) when one changes it, so the hot path reads no row.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import asyncpg

from resilience.clock import Clock, SystemClock
from services.memory_store import DEFAULT_MAX_ITEMS, Memory, Scope, memory_from_row, pack, top_k
from services.pg_storage import PostgresStore

USER_CHANGED = "memory.user"
"""The notification another process gets when a user turns their memory on or off."""


class PgMemoryStore:
    """The memory tables of the bot's PostgreSQL database; a registry service named ``"memory_store"``."""

    name = "memory_store"
    depends_on: tuple[str, ...] = ("storage",)

    def __init__(
        self,
        postgres: PostgresStore,
        *,
        max_items: int = DEFAULT_MAX_ITEMS,
        clock: Clock | None = None,
    ) -> None:
        self.postgres = postgres
        self.max_items = max_items
        self._clock = clock or SystemClock()
        self.enabled_users: set[int] = set()
        self._started = False
        postgres.subscribe(USER_CHANGED, self._user_changed)
        postgres.subscribe("resync", self._resync)  # notifications were lost: read the choices again

    async def start(self) -> None:
        await self._load()
        self._started = True

    async def _load(self) -> None:
        async def body(conn: asyncpg.Connection) -> set[int]:
            rows = await conn.fetch("SELECT user_id FROM memory_users WHERE enabled")
            return {int(r[0]) for r in rows}

        self.enabled_users = await self.postgres.transaction("memory.load", body)

    async def _resync(self, payload: dict[str, Any]) -> None:
        await self._load()

    async def stop(self) -> None:
        self._started = False

    def health(self) -> dict[str, Any]:
        return {"ok": self._started, "backend": "postgres"}

    async def _user_changed(self, payload: dict[str, Any]) -> None:
        user_id = int(payload["user_id"])
        (self.enabled_users.add if payload.get("enabled") else self.enabled_users.discard)(user_id)

    # -- choices ---------------------------------------------------------------------------

    def user_enabled(self, user_id: int) -> bool:
        return user_id in self.enabled_users

    async def set_user_enabled(self, user_id: int, enabled: bool) -> None:
        now = self._clock.time()

        async def body(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO memory_users (user_id, enabled, updated_at) VALUES ($1, $2, $3) "
                "ON CONFLICT (user_id) DO UPDATE SET enabled = excluded.enabled, "
                "updated_at = excluded.updated_at",
                user_id, enabled, now,
            )
            await self.postgres.notify_in(conn, USER_CHANGED, {"user_id": user_id, "enabled": enabled})

        await self.postgres.transaction("memory.set_user", body)
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
        now = self._clock.time()

        async def body(conn: asyncpg.Connection) -> int | None:
            # One writer per owner at a time, so the bound holds (as SQLite's single writer does).
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"memory:{scope}:{owner_id}")
            forgot = await conn.fetchval(
                "SELECT MAX(forgot_at) FROM (SELECT forgot_at FROM memory_users WHERE user_id = $1 "
                "UNION ALL SELECT forgot_at FROM memory_guilds WHERE guild_id = $2 AND $3 = 'guild') AS f",
                author_id, owner_id, scope,
            )
            if forgot is not None and said_at <= float(forgot):
                return None
            new_id = await conn.fetchval(
                "INSERT INTO memories (scope, owner_id, author_id, guild_id, text, answer, model, vector, "
                "said_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING id",
                scope, owner_id, author_id, guild_id, text, answer, model, pack(vector), said_at, now,
            )
            await conn.execute(
                "DELETE FROM memories WHERE scope = $1 AND owner_id = $2 AND id <= (SELECT id FROM memories "
                "WHERE scope = $1 AND owner_id = $2 ORDER BY id DESC LIMIT 1 OFFSET $3)",
                scope, owner_id, self.max_items,
            )
            return int(new_id)

        return await self.postgres.transaction("memory.add", body)

    async def recall(
        self,
        owners: Sequence[tuple[Scope, int]],
        query: Sequence[float],
        *,
        model: str,
        k: int,
        min_score: float,
    ) -> list[Memory]:
        if not owners or k <= 0:
            return []
        scopes = [scope for scope, _ in owners]
        ids = [owner for _, owner in owners]

        async def body(conn: asyncpg.Connection) -> list[tuple[Any, ...]]:
            rows = await conn.fetch(
                "SELECT m.id, m.scope, m.owner_id, m.author_id, m.guild_id, m.text, m.answer, m.said_at, "
                "m.vector FROM memories m JOIN unnest($2::text[], $3::bigint[]) AS o(scope, owner_id) "
                "ON m.scope = o.scope AND m.owner_id = o.owner_id WHERE m.model = $1",
                model, scopes, ids,
            )
            return [tuple(r) for r in rows]

        rows = await self.postgres.transaction("memory.recall", body)
        return await asyncio.to_thread(top_k, query, rows, k, min_score)

    async def list_user(self, user_id: int, limit: int = 10) -> tuple[list[Memory], int]:
        async def body(conn: asyncpg.Connection) -> tuple[list[Memory], int]:
            rows = await conn.fetch(
                "SELECT id, scope, owner_id, author_id, guild_id, text, answer, said_at FROM memories "
                "WHERE author_id = $1 ORDER BY id DESC LIMIT $2",
                user_id, limit,
            )
            total = await conn.fetchval("SELECT COUNT(*) FROM memories WHERE author_id = $1", user_id)
            return [memory_from_row(tuple(r)) for r in rows], int(total)

        return await self.postgres.transaction("memory.list", body)

    async def forget_user(self, user_id: int, memory_id: int | None = None) -> int:
        now = self._clock.time()

        async def body(conn: asyncpg.Connection) -> int:
            if memory_id is not None:
                status = await conn.execute(
                    "DELETE FROM memories WHERE author_id = $1 AND id = $2", user_id, memory_id
                )
                return _count(status)
            status = await conn.execute("DELETE FROM memories WHERE author_id = $1", user_id)
            await conn.execute(
                "INSERT INTO memory_users (user_id, forgot_at, updated_at) VALUES ($1, $2, $2) "
                "ON CONFLICT (user_id) DO UPDATE SET forgot_at = excluded.forgot_at, "
                "updated_at = excluded.updated_at",
                user_id, now,
            )
            return _count(status)

        return await self.postgres.transaction("memory.forget", body)

    async def forget_guild(self, guild_id: int) -> int:
        now = self._clock.time()

        async def body(conn: asyncpg.Connection) -> int:
            status = await conn.execute(
                "DELETE FROM memories WHERE scope = 'guild' AND owner_id = $1", guild_id
            )
            await conn.execute(
                "INSERT INTO memory_guilds (guild_id, forgot_at) VALUES ($1, $2) "
                "ON CONFLICT (guild_id) DO UPDATE SET forgot_at = excluded.forgot_at",
                guild_id, now,
            )
            return _count(status)

        return await self.postgres.transaction("memory.forget_guild", body)

    async def count(self) -> int:
        async def body(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval("SELECT COUNT(*) FROM memories"))

        return await self.postgres.transaction("memory.count", body)


def _count(status: str) -> int:
    """Rows a ``DELETE n`` command status names."""
    return int(status.split()[-1])
