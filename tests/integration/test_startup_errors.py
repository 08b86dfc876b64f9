"""Start-up failures end in one clear sentence and a non-zero exit code, never a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators

WRONG_TOKEN = "V1JPTkctVE9LRU4tRk9SLVRFU1Q.d3Jv.bmctdG9rZW4tbm90LWEtc2VjcmV0LWF0LWFsbA"


async def _failed(proc, timeout: float = 15.0) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    code = await proc.wait_exit(timeout)
    return code, proc.output("stderr") + proc.output("stdout")


async def test_a_wrong_discord_token_is_one_sentence_and_exit_2(
    spawn_bot: SpawnBot, bot_env: dict[str, str]
) -> None:
    proc = spawn_bot(env={**bot_env, "DISCORD_TOKEN": WRONG_TOKEN})
    code, output = await _failed(proc)
    assert code == 2
    assert "Discord rejected DISCORD_TOKEN" in output
    assert "Traceback" not in output
    assert WRONG_TOKEN not in output


async def test_an_unreachable_gateway_is_one_sentence_and_exit_4(
    spawn_bot: SpawnBot, bot_env: dict[str, str]
) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proc = spawn_bot(env={**bot_env, "DISCORD_GATEWAY_URL": f"ws://127.0.0.1:{dead}/gateway"})
    code, output = await _failed(proc, timeout=30.0)
    assert code == 4, output
    assert "cannot reach" in output
    assert "Traceback" not in output


async def test_a_service_that_cannot_start_names_itself_and_exits_3(
    spawn_bot: SpawnBot, bot_env: dict[str, str], tmp_path: Path, emulators: Emulators
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the data directory should be")
    proc = spawn_bot(env={**bot_env, "DATA_DIR": str(blocker)})
    code, output = await _failed(proc)
    assert code == 3, output
    assert "service did not start" in output and "Nothing was left running" in output
    assert "Traceback" not in output


async def test_a_bad_setting_lists_the_variable_and_exits_1(
    spawn_bot: SpawnBot, bot_env: dict[str, str]
) -> None:
    proc = spawn_bot(env={**bot_env, "HTTP_PORT": "not-a-port", "LOG_FORMAT": "xml", "BACKUP_KEEP": "0"})
    code, output = await _failed(proc)
    assert code == 1
    assert "HTTP_PORT" in output and "LOG_FORMAT" in output
    assert "BACKUP_KEEP: 0 is out of range" in output  # it used to crash the DataStore's start
    assert "Traceback" not in output


async def test_a_live_start_syncs_the_commands_and_prints_the_invite_banner(
    spawn_bot: SpawnBot, bot_env: dict[str, str], emulators: Emulators
) -> None:
    """With DISCORD_GUILD_ID set, the commands go to that guild at once; the banner has the invite URL."""
    discord = emulators.discord
    proc = spawn_bot(env=bot_env)
    await proc.wait_ready(emulators, timeout=20)
    guild_id = int(bot_env["DISCORD_GUILD_ID"])
    await discord.wait_until(lambda: bool(discord.commands.get(guild_id)), 10)
    names = {c["name"] for c in discord.commands[guild_id]}
    assert {"ask", "reset", "status", "help", "admin"} <= names
    await proc.wait_for_log(lambda r: r.get("event") == "bot.ready", timeout=10)
    await proc.terminate()
    out = proc.output("stdout")
    assert f"client_id={discord.application_id}" in out
    assert "permissions=274878024768" in out and "applications.commands" in out


async def test_a_second_bot_on_the_same_data_dir_names_the_directory_and_the_first_bots_pid(
    spawn_bot: SpawnBot, bot_env: dict[str, str], emulators: Emulators
) -> None:
    """The first bot holds DATA_DIR's lock: the second exits 3 before touching its files, and the
    first keeps running. The first bot created DATA_DIR private (mode 0700) and its lock 0600."""
    first = spawn_bot(env=bot_env)
    await first.wait_ready(emulators, timeout=20)
    data = Path(bot_env["DATA_DIR"])
    assert data.stat().st_mode & 0o777 == 0o700
    assert (data / ".bot.lock").stat().st_mode & 0o777 == 0o600
    second = spawn_bot(env=bot_env, name="second")
    code, output = await _failed(second)
    assert code == 3, output
    assert f"DATA_DIR {bot_env['DATA_DIR']} is in use by process {first.pid}" in output
    assert "the datastore service did not start" in output
    assert "Traceback" not in output
    assert first.running
