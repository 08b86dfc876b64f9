"""DATABASE_URL and DATABASE_POOL_SIZE: PostgreSQL instead of SQLite, the URL a secret."""

from __future__ import annotations

import pytest

from services.config import Config, ConfigError, load_config

URL = "postgresql://bot:pa55-w0rd-secret@db.internal:5433/gemini_bot"


def load(**environ: str) -> Config:
    return load_config(environ=environ, env_file=None)


def test_sqlite_is_the_default_and_a_url_selects_postgresql() -> None:
    assert Config().database_url is None and Config().database_pool_size == 10
    config = load(DATABASE_URL=URL, DATABASE_POOL_SIZE="4")
    assert config.database_url == URL and config.database_pool_size == 4
    assert load(DATABASE_URL="postgres://db/bot").database_url == "postgres://db/bot"


def test_the_url_is_a_secret_in_repr_check_output_and_the_log_redactor() -> None:
    config = load(DATABASE_URL=URL)
    assert URL not in repr(config) and "pa55" not in repr(config)
    assert config.redacted()["DATABASE_URL"] == f"<set, {len(URL)} chars>"
    # The password alone too: a driver's message may quote it without the rest of the URL.
    assert URL in config.secrets() and "pa55-w0rd-secret" in config.secrets()
    assert load().redacted()["DATABASE_URL"] == "<not set>"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("mysql://bot:pa55-w0rd-secret@db/bot", "is not a postgresql:// URL"),
        ("postgresql://bot:pa55-w0rd-secret@db:5432/", "names no database"),
        ("postgresql://bot:pa55-w0rd-secret@db:port/bot", "has a port that is not a number"),
    ],
)
def test_a_bad_url_is_reported_by_name_without_its_value(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(DATABASE_URL=value)
    [found] = info.value.problems
    assert found.name == "DATABASE_URL" and found.problem == problem
    assert "pa55" not in str(info.value)


@pytest.mark.parametrize("size", ["1", "101", "lots"])
def test_the_pool_size_has_a_range(size: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(DATABASE_POOL_SIZE=size)
    assert [p.name for p in info.value.problems] == ["DATABASE_POOL_SIZE"]
