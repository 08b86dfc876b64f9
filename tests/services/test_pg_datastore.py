"""The DataStore's documents in PostgreSQL (``PgDataStore``): JSONB rows with a version, shared by
every process on the database, each change told to the others. A real PostgreSQL (tests/pg.py)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from resilience.breakers import Breaker, BreakerState
from resilience.clock import FakeClock
from services.datadir import DataDirLockedError
from services.datastore import SOURCE_DEFAULTS, SOURCE_ROW, DataStoreValidationError, PgDataStore
from services.pg_storage import PostgresStore
from tests.pg import PostgresServer


class Process:
    """One bot process's store and shared state, on its own data directory."""

    def __init__(self, url: str, data_dir: Path, **store_options: Any) -> None:
        self.storage = PostgresStore(url, **store_options)
        self.state = PgDataStore(self.storage, data_dir)
        self.heard: list[str] = []
        self.changed = asyncio.Event()

        async def hear(name: str) -> None:
            self.heard.append(name)
            self.changed.set()

        self.state.add_listener(hear)

    async def __aenter__(self) -> Process:
        await self.storage.start()
        await self.state.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.state.stop()
        await self.storage.stop()


@pytest.fixture
async def one(pg_url: str, tmp_path: Path) -> AsyncIterator[Process]:
    async with Process(pg_url, tmp_path / "one") as p:
        yield p


@pytest.fixture
async def two(pg_url: str, tmp_path: Path) -> AsyncIterator[Process]:
    async with Process(pg_url, tmp_path / "two") as p:
        yield p


def rows(server: PostgresServer, url: str, sql: str) -> list[tuple[Any, ...]]:
    return server.fetch(url, sql)


async def test_documents_start_at_their_defaults_as_version_1(one: Process, pg_server: PostgresServer,
                                                              pg_url: str) -> None:
    assert one.state.cached("maintenance") == {"enabled": False, "message": None, "since": None, "by": None}
    assert one.state.versions() == {"maintenance": 1, "guild_settings": 1, "admins": 1, "breakers": 1}
    assert one.state.health()["ok"] and one.state.alerts() == []
    stored = rows(pg_server, pg_url, "SELECT name, version FROM shared_state ORDER BY name")
    assert stored == [("admins", 1), ("breakers", 1), ("guild_settings", 1), ("maintenance", 1)]


async def test_a_change_in_one_process_reaches_the_other_within_a_second(one: Process, two: Process) -> None:
    started = time.monotonic()
    saved = await one.state.update(
        "maintenance", lambda d: {"enabled": True, "message": "back soon", "since": 1.0, "by": "ops"}
    )
    await asyncio.wait_for(two.changed.wait(), 1.0)
    assert time.monotonic() - started < 1.0
    assert two.heard == ["maintenance"] and two.state.cached("maintenance") == saved
    assert two.state.versions()["maintenance"] == one.state.versions()["maintenance"] == 2
    assert one.heard == []  # its own change: applied where it was made


async def test_concurrent_updates_from_two_processes_lose_nothing(one: Process, two: Process) -> None:
    """Read-modify-write under the row's lock: 20 additions from each process, all kept."""

    def adder(channel: int) -> Any:
        def add(data: dict[str, Any]) -> None:
            entry = data["guilds"].setdefault("1", {})
            entry["chat_channels"] = sorted({*entry.get("chat_channels", []), channel})

        return add

    await asyncio.gather(
        *(one.state.update("guild_settings", adder(c)) for c in range(1, 21)),
        *(two.state.update("guild_settings", adder(c)) for c in range(21, 41)),
    )
    final = await one.state.recover("guild_settings")  # read the row as it is now
    assert final.source == SOURCE_ROW
    assert one.state.cached("guild_settings")["guilds"]["1"]["chat_channels"] == list(range(1, 41))  # type: ignore[index]
    assert one.state.versions()["guild_settings"] == 41


async def test_a_refused_change_writes_nothing_and_is_no_failure_of_the_database(
    pg_url: str, tmp_path: Path
) -> None:
    breaker = Breaker("storage", FakeClock(), fail_max=1, reset_timeout=5.0)
    async with Process(pg_url, tmp_path / "p", breaker=breaker) as p:
        with pytest.raises(DataStoreValidationError):
            await p.state.update("maintenance", lambda d: {"enabled": "yes"})

        def refuse(data: dict[str, Any]) -> None:
            raise LookupError("no such guild")

        with pytest.raises(LookupError):
            await p.state.update("guild_settings", refuse)
        assert breaker.state is BreakerState.CLOSED
        assert p.state.versions() == {"maintenance": 1, "guild_settings": 1, "admins": 1, "breakers": 1}


async def test_a_row_edited_into_nonsense_is_recovered_from_its_history_else_the_defaults(
    one: Process, pg_server: PostgresServer, pg_url: str
) -> None:
    await one.state.save("admins", {"user_ids": [42]})
    await one.state.save("admins", {"user_ids": [42, 43]})
    nonsense = "UPDATE shared_state SET data = '{\"user_ids\": \"everyone\"}' WHERE name = 'admins'"
    pg_server.execute(pg_url, nonsense)
    [report] = await one.state.validate("admins")
    assert not report.ok and report.problems
    recovered = await one.state.recover("admins")
    assert (recovered.source, recovered.alert) == ("history:2", False)
    assert one.state.cached("admins") == {"user_ids": [42]}  # the newest valid version it replaced
    assert [b.path.name for b in await one.state.list_backups("admins")][:2] == ["admins@3", "admins@2"]
    pg_server.execute(
        pg_url,
        "UPDATE shared_state SET data = '[]' WHERE name = 'breakers'; "
        "UPDATE shared_state_history SET data = '[]' WHERE name = 'breakers'",
    )
    fallen = await one.state.recover("breakers")
    assert (fallen.source, fallen.alert) == (SOURCE_DEFAULTS, True)
    assert one.state.cached("breakers") == {"overrides": {}} and one.state.alerts() == ["breakers"]
    assert not one.state.health()["ok"]


async def test_only_the_newest_versions_are_kept_in_the_history(one: Process, pg_server: PostgresServer,
                                                                pg_url: str) -> None:
    for n in range(15):
        await one.state.save("admins", {"user_ids": [n + 1]})
    sql = "SELECT version FROM shared_state_history WHERE name = 'admins' ORDER BY version"
    # keep_history = 10: the row is version 16, the history the ten versions it replaced last.
    assert [v for (v,) in rows(pg_server, pg_url, sql)] == list(range(6, 16))


async def test_after_a_lost_session_the_changes_made_meanwhile_are_read_again(
    one: Process, two: Process, pg_url: str
) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        session = two.storage._session
        assert session is not None
        await conn.execute("SELECT pg_terminate_backend($1)", session.get_server_pid())
        # While two listens to nothing, one changes a document behind its back.
        await conn.execute(
            "UPDATE shared_state SET data = $1::jsonb, version = version + 1 WHERE name = 'breakers'",
            json.dumps({"overrides": {"gemini": {"state": "open", "until": None, "reason": "ops"}}}),
        )
    finally:
        await conn.close()
    await asyncio.wait_for(two.changed.wait(), 5)
    assert two.heard == ["breakers"]
    assert two.state.cached("breakers")["overrides"]["gemini"]["reason"] == "ops"  # type: ignore[index]


async def test_one_process_per_data_directory(one: Process, pg_url: str, tmp_path: Path) -> None:
    with pytest.raises(DataDirLockedError):
        async with Process(pg_url, tmp_path / "one"):
            pass
