"""``python -m bot check`` with DATABASE_URL: it asks PostgreSQL for its schema without changing
anything, refuses a schema of a newer bot, warns when it cannot ask, and never shows the password."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.cli import main
from services.config import SETTING_NAMES
from services.pg_storage import migration_files
from tests.pg import PostgresServer, free_port

LATEST = migration_files()[-1][0]  # the newest schema version this build ships


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def with_password(url: str) -> str:
    """The same URL with a password in it (the test server trusts loopback and ignores it)."""
    return url.replace("postgresql://bot@", "postgresql://bot:pw-very-secret@")


def test_check_reports_the_schema_version_and_hides_the_password(
    clean_env: pytest.MonkeyPatch, pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DATABASE_URL", with_password(pg_url))
    assert main(["check"]) == 0
    captured = capsys.readouterr()
    assert "Storage: PostgreSQL at 127.0.0.1:" in captured.out and f"schema version {LATEST}" in captured.out
    assert "pw-very-secret" not in captured.out + captured.err


def test_check_of_an_empty_database_says_the_bot_will_create_its_tables_and_creates_nothing(
    clean_env: pytest.MonkeyPatch, pg_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    url = pg_server.new_database(migrated=False)
    clean_env.setenv("DATABASE_URL", url)
    assert main(["check"]) == 0
    assert "empty: the bot creates its tables" in capsys.readouterr().out
    assert pg_server.fetch(url, "SELECT to_regclass('schema_version') IS NULL") == [(True,)]


def test_check_refuses_the_database_of_a_newer_bot(
    clean_env: pytest.MonkeyPatch, pg_url: str, pg_server: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    pg_server.execute(pg_url, f"INSERT INTO schema_version (version) VALUES ({LATEST + 1})")
    clean_env.setenv("DATABASE_URL", pg_url)
    assert main(["check"]) == 1
    assert f"has schema version {LATEST + 1}, this build supports up to {LATEST}" in capsys.readouterr().err


def test_check_warns_when_the_database_cannot_be_reached(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DATABASE_URL", f"postgresql://bot:pw-very-secret@127.0.0.1:{free_port()}/bot")
    assert main(["check"]) == 0  # it may be down now; the configuration is not wrong
    captured = capsys.readouterr()
    assert "warning: DATABASE_URL: cannot reach PostgreSQL at 127.0.0.1:" in captured.out
    assert "pw-very-secret" not in captured.out + captured.err
