"""``python -m bot storage migrate-sqlite-to-postgres``: a single-process bot's SQLite store and
JSON files copied into a real PostgreSQL, in one transaction, once (idempotent), with a dry run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bot.cli import main
from resilience.degradation import ItemKind, ItemState
from services.datadir import DataDirLock
from services.datastore import DataStore
from services.pg_storage import PostgresStore
from services.storage import CLAIM_RELEASED, SqliteStore, UsageRecord
from tests.pg import PostgresServer, free_port

T0 = 1_700_000_000.0
DAY = int(T0 // 86400)
GUILDS = {"guilds": {"7": {"chat_channels": [70], "tools": {"google_search": True}}}}


async def _fill(path: Path) -> None:
    """A store as a bot leaves it: answered, waiting and in-flight messages, history, usage."""
    async with SqliteStore(path) as s:
        for n in range(1, 6):  # five messages in one conversation, accepted in order
            await s.accept(n, ItemKind.INBOUND, "chan:1", {"author_id": 5, "guild_id": 7, "content": f"q{n}"},
                           now=T0 + n, lease_seconds=60, claim=n == 1)
        await s.finish(1, key="chan:1", turns=[("user", "q1", 1), ("model", "a1\x00", None)], now=T0 + 9,
                       usage=UsageRecord(DAY, 5, 7, "gemini-2.5-flash", prompt=100, output=20))
        [second] = await s.claim(now=T0 + 10, lease_seconds=60)  # in flight when the bot stopped
        assert second.id == 2
        notice = {"notice": "queued", "chunks": ["x"]}
        await s.enqueue(ItemKind.OUTBOUND, "chan:2", notice, now=T0, dedup_key="n1")
        await s.record_attachment_refs("chan:1", 1, [{"name": "cat.png"}], keep=3, now=T0)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    asyncio.run(_fill(data / "bot.sqlite3"))
    files = DataStore(data)
    files.save("guild_settings", GUILDS)
    files.save("maintenance", {"enabled": True, "message": "moving house", "since": T0, "by": "ops"})
    return data


def migrate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data: Path, url: str, *extra: str) -> int:
    monkeypatch.setenv("DATA_DIR", str(data))
    monkeypatch.setenv("DATABASE_URL", url)
    return main(["--env-file", str(tmp_path / "absent.env"), "storage", "migrate-sqlite-to-postgres", *extra])


def test_a_dry_run_reports_what_it_would_copy_and_writes_nothing(
    sqlite_store: Path, pg_url: str, pg_server: PostgresServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    assert migrate(monkeypatch, tmp_path, sqlite_store, pg_url, "--dry-run") == 0
    out = capsys.readouterr().out
    assert "queue            would copy       6" in out and "turns            would copy       2" in out
    assert "Dry run: nothing was written" in out
    for table in ("queue", "turns", "processed", "token_usage", "sqlite_imports"):
        assert pg_server.fetch(pg_url, f"SELECT COUNT(*) FROM {table}") == [(0,)], table


def test_everything_is_copied_once_and_the_bot_on_postgresql_carries_on(
    sqlite_store: Path, pg_url: str, pg_server: PostgresServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    assert migrate(monkeypatch, tmp_path, sqlite_store, pg_url) == 0
    assert "Copied" in capsys.readouterr().out

    async def check() -> None:
        async with PostgresStore(pg_url) as pg:
            items = {i.dedup_key: i for i in await pg.list(limit=100)}
            assert [items[f"msg:{n}"].state for n in range(1, 6)] == [
                ItemState.DONE, ItemState.PENDING, ItemState.PENDING, ItemState.PENDING, ItemState.PENDING
            ]
            assert items["msg:2"].last_error == CLAIM_RELEASED  # it was in flight: look before answering
            assert items["msg:3"].payload == {"author_id": 5, "guild_id": 7, "content": "q3"}
            assert [t.text for t in await pg.history("chan:1")] == ["q1", "a1\ufffd"]
            assert all([await pg.is_processed(n) for n in range(1, 6)])
            assert (await pg.usage_totals(DAY, DAY, user_id=5)).counted == 120
            [day] = await pg.availability(now=T0 + 100)
            assert (day.accepted, day.answered) == (5, 1)  # as counted in SQLite, not counted again
            assert [r[2] for r in await pg.attachment_refs("chan:1", limit=3)] == [{"name": "cat.png"}]
            # The conversation is served in its order; the answered one goes with housekeeping.
            [head] = await pg.claim(now=T0 + 20, lease_seconds=60, kind=ItemKind.INBOUND)
            assert head.dedup_key == "msg:2"
            await pg.finish(head.id, now=T0 + 21)
            await pg.housekeeping(
                now=T0 + 30, queue_retention=0, history_retention=1e6, processed_retention=1e6
            )

    asyncio.run(check())
    shared = dict(pg_server.fetch(pg_url, "SELECT name, data::text FROM shared_state"))
    assert '"moving house"' in shared["maintenance"] and '"chat_channels": [70]' in shared["guild_settings"]

    # Again: nothing copied twice, not even what the bot has answered and deleted since.
    assert migrate(monkeypatch, tmp_path, sqlite_store, pg_url) == 0
    out = capsys.readouterr().out
    assert "Nothing new to copy" in out and "queue            copied       0, already there       6" in out
    gone = "SELECT COUNT(*) FROM queue WHERE dedup_key IN ('msg:1', 'msg:2')"
    assert pg_server.fetch(pg_url, gone) == [(0,)]
    assert pg_server.fetch(pg_url, "SELECT SUM(calls) FROM token_usage") == [(1,)]
    assert pg_server.fetch(pg_url, "SELECT accepted FROM availability") == [(5,)]


def test_state_already_changed_on_postgresql_wins_over_the_files(
    sqlite_store: Path, pg_url: str, pg_server: PostgresServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pg_server.execute(
        pg_url,
        "INSERT INTO shared_state (name, data, version, updated_at) VALUES "
        "('guild_settings', '{\"guilds\": {}}', 4, 0)",
    )
    assert migrate(monkeypatch, tmp_path, sqlite_store, pg_url) == 0
    row = "SELECT data::text, version FROM shared_state WHERE name = 'guild_settings'"
    assert pg_server.fetch(pg_url, row) == [('{"guilds": {}}', 4)]


def test_it_refuses_while_a_bot_holds_the_data_directory(
    sqlite_store: Path, pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with DataDirLock(sqlite_store):
        assert migrate(monkeypatch, tmp_path, sqlite_store, pg_url) == 3
    assert "stop the bot first" in capsys.readouterr().err


def test_without_a_database_or_a_store_it_says_what_is_missing(
    sqlite_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("DATA_DIR", str(sqlite_store))
    assert main(["--env-file", str(tmp_path / "absent.env"), "storage", "migrate-sqlite-to-postgres"]) == 1
    assert "DATABASE_URL is not set" in capsys.readouterr().err
    unreachable = f"postgresql://bot:pw-secret@127.0.0.1:{free_port()}/bot"
    assert migrate(monkeypatch, tmp_path, sqlite_store, unreachable) == 1
    err = capsys.readouterr().err
    assert "nothing was copied: cannot reach PostgreSQL at 127.0.0.1" in err and "pw-secret" not in err
    assert migrate(monkeypatch, tmp_path, tmp_path / "empty", unreachable) == 1
    assert "no SQLite store to copy" in capsys.readouterr().err
