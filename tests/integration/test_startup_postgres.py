"""A bot on PostgreSQL that cannot use its database stops at start-up with one sentence (exit 3,
a service did not start), never a traceback, never the database's password."""

from __future__ import annotations

from services.pg_storage import migration_files
from tests.integration.conftest import SpawnBot
from tests.pg import PostgresServer, free_port

LATEST = migration_files()[-1][0]  # the newest schema version this build ships


def with_password(url: str) -> str:
    return url.replace("postgresql://bot@", "postgresql://bot:pw-very-secret@")


async def test_a_database_of_a_newer_bot_stops_the_start_with_its_sentence(
    spawn_bot: SpawnBot, bot_env: dict[str, str], pg_url: str, pg_server: PostgresServer
) -> None:
    pg_server.execute(pg_url, f"INSERT INTO schema_version (version) VALUES ({LATEST + 1})")
    proc = spawn_bot(env={**bot_env, "DATABASE_URL": with_password(pg_url)})
    code = await proc.wait_exit(20)
    output = proc.output("stderr") + proc.output("stdout")
    assert code == 3, output
    sentence = (
        f"has schema version {LATEST + 1}, this build supports up to {LATEST}; "
        "upgrade the bot or restore an older"
    )
    assert sentence in output
    assert "Traceback" not in output and "pw-very-secret" not in output


async def test_an_unreachable_database_stops_the_start_naming_where_it_is(
    spawn_bot: SpawnBot, bot_env: dict[str, str]
) -> None:
    url = f"postgresql://bot:pw-very-secret@127.0.0.1:{free_port()}/bot"
    proc = spawn_bot(env={**bot_env, "DATABASE_URL": url})
    code = await proc.wait_exit(30)
    output = proc.output("stderr") + proc.output("stdout")
    assert code == 3, output
    assert "cannot reach PostgreSQL at 127.0.0.1:" in output
    assert "Traceback" not in output and "pw-very-secret" not in output
