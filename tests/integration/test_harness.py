"""The integration harness itself: emulators, the child's environment, BotProcess.

The bot's runtime is not needed here: a stand-in script (a real discord.py bot that answers
mentions through the real google-genai client, configured only from the environment like
``python -m bot run``) plays the child. One test runs the real ``python -m bot check``.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

from sandbox import responder
from tests.integration.conftest import SpawnBot
from tests.integration.harness import (
    SANDBOX_DISCORD_TOKEN,
    BotProcess,
    BotProcessError,
    Emulators,
    bot_environment,
)

STANDIN_BOT = r'''
"""Stand-in for `python -m bot --env-file FILE run`: a bare discord.py bot answering via Gemini."""
import argparse
import asyncio
import os
import signal

import discord
import structlog
import yarl
from discord.ext import commands
from google import genai
from google.genai import types

from services.logging import configure_logging


async def serve() -> None:
    log = structlog.get_logger("standin")
    discord.http.Route.BASE = os.environ["DISCORD_API_BASE"]
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(os.environ["DISCORD_GATEWAY_URL"])
    gemini = genai.Client(api_key=os.environ["GEMINI_API_KEY"], http_options=types.HttpOptions(
        base_url=os.environ["GEMINI_BASE_URL"], timeout=5_000,
        retry_options=types.HttpRetryOptions(attempts=1)))
    intents = discord.Intents.default()
    intents.message_content = True
    bot = commands.Bot(command_prefix=commands.when_mentioned, intents=intents, guild_ready_timeout=0.05)

    @bot.event
    async def on_message(message: discord.Message) -> None:
        if message.author.bot or bot.user not in message.mentions:
            return
        prompt = message.content.replace(bot.user.mention, "").strip()
        answer = await gemini.aio.models.generate_content(model="gemini-2.5-flash", contents=prompt)
        await message.reply(f"[pid {os.getpid()}] {answer.text}",
                            allowed_mentions=discord.AllowedMentions.none())
        log.info("standin.replied", message_id=message.id)

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with bot:
        await bot.login(os.environ["DISCORD_TOKEN"])
        connection = asyncio.create_task(bot.connect())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({connection, stopping}, return_when=asyncio.FIRST_COMPLETED)
        log.info("standin.stopping", data_dir=os.environ["DATA_DIR"])
        await bot.close()
        stopping.cancel()
        await connection
    await gemini.aio.aclose()
    log.info("standin.stopped")


parser = argparse.ArgumentParser()
parser.add_argument("--env-file", required=True)
parser.add_argument("command", choices=["run"])
args = parser.parse_args()
if os.path.exists(args.env_file):
    raise SystemExit("the harness must point --env-file at a file that does not exist")
configure_logging(os.environ["LOG_LEVEL"], os.environ["LOG_FORMAT"],
                  secrets=[os.environ["DISCORD_TOKEN"], os.environ["GEMINI_API_KEY"]])
asyncio.run(serve())
'''


@pytest.fixture
def standin(tmp_path: Path) -> tuple[str, ...]:
    """The ``program`` that runs the stand-in bot script."""
    script = tmp_path / "standin_bot.py"
    script.write_text(STANDIN_BOT)
    return (sys.executable, str(script))


def py(code: str) -> tuple[str, ...]:
    """A ``program`` running a line of Python (it ignores the ``--env-file``/``run`` arguments)."""
    return (sys.executable, "-c", code)


async def ask(emulators: Emulators, text: str, count: int) -> str:
    """A user mentions the bot in #general; return the content of the bot's ``count``-th message."""
    general = emulators.discord.channels["general"]
    await emulators.discord.send_user_message(general, "normal", text, mentions_bot=True)
    sent = await emulators.discord.wait_for_bot_message(general, count=count, timeout=5)
    return sent[count - 1].content


async def test_a_bot_child_answers_survives_kill_9_and_restarts_and_stops_on_sigterm(
    emulators: Emulators, spawn_bot: SpawnBot, standin: tuple[str, ...]
):
    """Start -> ready -> a reply; SIGKILL -> restart -> ready again -> a reply from the new pid;
    SIGTERM -> exit 0 with JSON logs captured and clean."""
    first = spawn_bot(program=standin)
    await first.wait_ready(emulators, timeout=10)
    assert emulators.discord.identify_count == 1
    assert await ask(emulators, "hello", 1) == f"[pid {first.pid}] {responder.CANNED['hello']}"
    replied = await first.wait_for_log(lambda line: line.get("event") == "standin.replied", timeout=5)
    assert replied["level"] == "info" and replied["logger"] == "standin"

    assert first.kill() == -9
    assert not first.running and first.kill() == -9  # idempotent
    await emulators.discord.wait_until(lambda: not emulators.discord.connected, timeout=5)

    second = spawn_bot(program=standin)
    assert second.stdout_path != first.stdout_path
    await second.wait_ready(emulators, timeout=10)
    assert emulators.discord.identify_count == 2
    assert await ask(emulators, "hi", 2) == f"[pid {second.pid}] {responder.CANNED['hi']}"

    assert await second.terminate(timeout=5) == 0
    events = [line.get("event") for line in second.logs()]
    assert events.count("standin.replied") == 1
    assert events.index("standin.stopping") < events.index("standin.stopped")
    stopping = next(line for line in second.logs() if line.get("event") == "standin.stopping")
    assert stopping["level"] == "info" and stopping["data_dir"] == str(Path(second.cwd) / "data")
    second.assert_clean_logs()
    assert "standin.replied" in first.output("stderr")  # the killed child's log outlived it


async def test_wait_ready_fails_fast_with_the_output_when_the_child_exits_first(
    emulators: Emulators, spawn_bot: SpawnBot
):
    proc = spawn_bot(program=py("import sys; print('config broken', file=sys.stderr); sys.exit(3)"))
    with pytest.raises(BotProcessError) as caught:
        await proc.wait_ready(emulators, timeout=10)
    assert caught.value.returncode == 3
    assert "config broken" in caught.value.tail and "exited before it was ready" in str(caught.value)


async def test_wait_ready_times_out_when_the_child_never_logs_in(emulators: Emulators, spawn_bot: SpawnBot):
    proc = spawn_bot(program=py("import time; time.sleep(30)"))
    with pytest.raises(BotProcessError, match=r"not ready within 0\.2 s"):
        await proc.wait_ready(emulators, timeout=0.2)
    assert proc.running  # a timeout leaves the child to the test (the fixture kills it)


async def test_terminate_kills_a_child_that_ignores_sigterm_and_says_so(spawn_bot: SpawnBot):
    proc = spawn_bot(program=py(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('armed'); time.sleep(30)"))
    await proc.wait_for_log(lambda line: line.get("raw") == "armed", timeout=5)
    with pytest.raises(BotProcessError, match=r"did not exit within 0\.3 s of SIGTERM"):
        await proc.terminate(timeout=0.3)
    assert not proc.running and proc.returncode == -9


async def test_fixture_teardown_kills_children_left_running(emulators: Emulators, bot_env, tmp_path):
    """What spawn_bot's teardown does: kill() reaps a running child and is a no-op when unstarted."""
    proc = BotProcess(bot_env, cwd=tmp_path, program=py("import time; time.sleep(30)"))
    assert proc.kill() is None and proc.returncode is None
    proc.start(emulators)
    assert proc.running
    assert proc.kill() == -9 and not proc.running


LOG_LINES = r'''
import json, sys
print(json.dumps({"event": "bot.started", "level": "info"}))
print("plain text line")
print(json.dumps({"event": "gemini.failed", "level": "error", "code": 503}), file=sys.stderr)
print("Traceback (most recent call last):", file=sys.stderr)
print('  File "x.py", line 1, in <module>', file=sys.stderr)
print("ZeroDivisionError: division by zero", file=sys.stderr)
print("Task exception was never retrieved", file=sys.stderr)
print(json.dumps({"event": "bot.stopped", "level": "info"}), file=sys.stderr)
'''


async def test_logs_parse_json_lines_and_keep_other_lines_raw(spawn_bot: SpawnBot):
    proc = spawn_bot(program=py(LOG_LINES))
    assert await proc.wait_exit(timeout=5) == 0
    assert proc.logs("stdout") == [{"event": "bot.started", "level": "info"}, {"raw": "plain text line"}]
    stderr = proc.logs("stderr")
    assert stderr[0] == {"event": "gemini.failed", "level": "error", "code": 503}
    assert stderr[1] == {"raw": "Traceback (most recent call last):"}
    assert stderr[-1]["event"] == "bot.stopped"
    assert len(proc.logs()) == 2 + len(stderr)


async def test_assert_clean_logs_flags_errors_tracebacks_and_lost_task_exceptions_unless_allowed(
    spawn_bot: SpawnBot
):
    proc = spawn_bot(program=py(LOG_LINES))
    await proc.wait_exit(timeout=5)
    problems = proc.problems()
    assert len(problems) == 3
    assert '"gemini.failed"' in problems[0]
    assert problems[1].endswith("ZeroDivisionError: division by zero")  # the traceback is one record
    assert "never retrieved" in problems[2]
    with pytest.raises(AssertionError, match="3 problem"):
        proc.assert_clean_logs()
    proc.assert_clean_logs(allow=["gemini.failed", "ZeroDivisionError", re.compile(r"never retrieved$")])
    with pytest.raises(AssertionError, match="1 problem"):
        proc.assert_clean_logs(allow=["gemini.failed", "ZeroDivisionError"])


async def test_a_clean_child_passes_assert_clean_logs(spawn_bot: SpawnBot):
    proc = spawn_bot(program=py("import json; print(json.dumps({'event': 'ok', 'level': 'warning'}))"))
    assert await proc.wait_exit(timeout=5) == 0
    proc.assert_clean_logs()


# the child's environment


def test_bot_environment_drops_the_developers_real_credentials_and_settings(emulators: Emulators, tmp_path):
    developer = {
        "PATH": "/usr/bin", "HOME": "/home/dev",
        "DISCORD_TOKEN": "real-token", "DISCORD_SOMETHING_ELSE": "x", "GEMINI_API_KEY": "AIza-real",
        "GOOGLE_API_KEY": "AIza-real-2", "ADMIN_USER_IDS": "1", "ADMIN_API_TOKEN": "real-admin-token",
        "GEMINI_MODEL": "gemini-ultra-real", "BOT_PERSONA": "real persona", "DATA_DIR": "/real/data",
        "PYTHONPATH": "/elsewhere",
    }
    env = bot_environment(emulators, tmp_path / "data", base=developer, LOG_LEVEL="DEBUG")
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/home/dev"
    for gone in ("DISCORD_SOMETHING_ELSE", "GOOGLE_API_KEY", "GEMINI_MODEL", "BOT_PERSONA"):
        assert gone not in env
    assert "real" not in " ".join(v for k, v in env.items() if k not in ("PATH", "HOME"))
    assert env["DISCORD_TOKEN"] == SANDBOX_DISCORD_TOKEN == emulators.discord.token
    assert env["DISCORD_API_BASE"] == emulators.discord.api_base
    assert env["DISCORD_GATEWAY_URL"] == emulators.discord.gateway_url
    assert env["GEMINI_BASE_URL"] == emulators.gemini.base_url
    assert env["GEMINI_API_KEY"] == emulators.gemini.api_key
    assert env["ADMIN_USER_IDS"] == str(emulators.discord.users["admin"])
    assert len(env["ADMIN_API_TOKEN"]) >= 16
    assert env["DATA_DIR"] == str(tmp_path / "data")
    assert (env["HTTP_PORT"], env["LOG_FORMAT"], env["LOG_LEVEL"]) == ("0", "json", "DEBUG")
    assert Path(env["PYTHONPATH"], "bot", "cli.py").is_file()


async def test_the_real_cli_accepts_the_environment_and_ignores_a_dotenv_in_its_directory(
    emulators: Emulators, spawn_bot: SpawnBot, tmp_path: Path
):
    """`python -m bot check` in the child's directory: the emulators' settings, no `.env` leak."""
    (tmp_path / ".env").write_text("GEMINI_MODEL=leaked-from-dotenv\nBOT_PERSONA=leaked\n")
    proc = spawn_bot(("check",))
    assert await proc.wait_exit(timeout=20) == 0, proc.tail()
    shown = proc.output("stdout")
    assert "Configuration OK." in shown
    assert emulators.gemini.base_url in shown and emulators.discord.gateway_url in shown
    assert "leaked" not in shown
    assert SANDBOX_DISCORD_TOKEN not in shown  # the real CLI redacts it; the env carries it


async def test_the_real_bot_logs_in_answers_a_mention_and_stops_cleanly_on_sigterm(
    emulators: Emulators, spawn_bot: SpawnBot
):
    """The harness against `python -m bot run` itself (skipped while the runtime does not import)."""
    pytest.importorskip("bot.runner", reason="the bot's runtime is not importable yet")
    bot = spawn_bot()
    await bot.wait_ready(emulators, timeout=20)
    assert responder.CANNED["hello"] in await ask(emulators, "hello", 1)
    assert await bot.terminate(timeout=15) == 0
    bot.assert_clean_logs()
    assert os.path.isdir(bot.env["DATA_DIR"])
