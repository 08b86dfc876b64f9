"""The SQLite files on disk: owner-only permissions for the database, its WAL and shared memory.

The database holds conversation history, so nobody but the bot's user may read it. Each test
sets a permissive umask (022, the usual default) so that a file created without care would be
world-readable (0644).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.storage import SqliteStore

NOW = 1_700_000_000.0
SUFFIXES = ("", "-wal", "-shm")


@pytest.fixture(autouse=True)
def permissive_umask() -> Iterator[None]:
    """Run the test under umask 022 (files 0644 unless created owner-only), then restore it."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _modes(path: Path) -> dict[str, int]:
    """The permission bits of the database and of its sidecar files that exist."""
    return {
        suffix or "db": stat.S_IMODE(os.stat(f"{path}{suffix}").st_mode)
        for suffix in SUFFIXES
        if os.path.exists(f"{path}{suffix}")
    }


async def test_a_new_database_and_its_wal_and_shm_are_readable_by_the_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    async with SqliteStore(path) as store:
        await store.append_turn("c", "user", "a private question", now=NOW)
        # While open in WAL mode, all three files exist; SQLite gives the sidecars the db's mode.
        assert _modes(path) == {"db": 0o600, "-wal": 0o600, "-shm": 0o600}
    assert _modes(path)["db"] == 0o600


async def test_an_existing_world_readable_database_is_made_owner_only_at_start(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    older = sqlite3.connect(path)  # an install from before the fix, still holding its WAL open
    older.execute("PRAGMA journal_mode = WAL")
    older.execute("CREATE TABLE t (x)")
    older.commit()
    for suffix in SUFFIXES:
        os.chmod(f"{path}{suffix}", 0o644)
    try:
        async with SqliteStore(path):
            assert _modes(path) == {"db": 0o600, "-wal": 0o600, "-shm": 0o600}
    finally:
        older.close()


async def test_the_fresh_database_started_after_a_quarantine_is_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "bot.sqlite3"
    path.write_bytes(b"this is not sqlite at all, just some bytes of a broken disk")
    async with SqliteStore(path) as store:
        assert store.quarantined is not None
        assert _modes(path)["db"] == 0o600
