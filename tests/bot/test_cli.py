"""Tests for the command line: ``check``, ``run``, the dispatcher, and ``python -m bot`` as a process."""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bot.cli import main
from sandbox.gemini import GeminiEmulator
from services.config import SETTING_NAMES

REPO = Path(__file__).resolve().parents[2]
GOOD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4OQ.GAbCdE.abcdefghijklmnopqrstuvwxyz0123456789AB"
GEMINI_KEY = "AIzaSyD-fake-key-0123456789abcdefghijk"
ADMIN_TOKEN = "admin-token-0123456789-secret"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No bot setting in the environment and a cwd without .env, so the developer's own never leaks in."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_check_prints_the_modes_and_settings_and_exits_0(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "Discord: sandbox" in out and "Gemini: sandbox" in out
    for name in SETTING_NAMES:
        assert name in out


def dead_url() -> str:
    """A loopback URL nothing answers: its port is bound, never listening, so connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_check_output_never_contains_a_secret(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DISCORD_TOKEN", GOOD_TOKEN)
    clean_env.setenv("GEMINI_API_KEY", GEMINI_KEY)
    clean_env.setenv("GEMINI_BASE_URL", dead_url())  # the model check fails at once, on loopback
    clean_env.setenv("ADMIN_API_TOKEN", ADMIN_TOKEN)
    assert main(["check"]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Discord: live" in text and "Gemini: live" in text
    assert f"<set, {len(GOOD_TOKEN)} chars>" in text
    assert "could not check" in text
    for secret in (GOOD_TOKEN, GEMINI_KEY, ADMIN_TOKEN):
        assert secret not in text


@pytest.fixture
async def gemini() -> AsyncIterator[GeminiEmulator]:
    """The Gemini emulator on loopback, taking ``GEMINI_KEY``."""
    async with GeminiEmulator(api_key=GEMINI_KEY) as emulator:
        yield emulator


def point_at(env: pytest.MonkeyPatch, gemini: GeminiEmulator, model: str, fallback: str = "") -> None:
    env.setenv("GEMINI_API_KEY", GEMINI_KEY)
    env.setenv("GEMINI_BASE_URL", gemini.base_url)
    env.setenv("GEMINI_MODEL", model)
    env.setenv("GEMINI_FALLBACK_MODELS", fallback)


async def test_check_asks_gemini_about_each_model_once_and_exits_1_naming_the_missing_ones(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], gemini: GeminiEmulator
) -> None:
    point_at(clean_env, gemini, "gemini-flash-latest", "gemini-2.5-pro,gemini-1.5-flash")
    assert await asyncio.to_thread(main, ["check"]) == 1  # check runs its own event loop
    captured = capsys.readouterr()
    assert "Gemini model gemini-2.5-pro: found" in captured.out
    assert "error: GEMINI_MODEL: Gemini has no model 'gemini-flash-latest' on API version v1" in captured.err
    assert "'-latest' aliases exist on v1beta only" in captured.err
    assert "error: GEMINI_FALLBACK_MODELS: Gemini has no model 'gemini-1.5-flash'" in captured.err
    assert "Configuration OK." not in captured.out
    assert sorted((r.action, r.model) for r in gemini.requests) == [
        ("get", "gemini-1.5-flash"), ("get", "gemini-2.5-pro"), ("get", "gemini-flash-latest")]


async def test_check_exits_0_when_gemini_has_every_configured_model(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], gemini: GeminiEmulator
) -> None:
    point_at(clean_env, gemini, "gemini-2.5-flash", "gemini-2.5-flash-lite")
    assert await asyncio.to_thread(main, ["check"]) == 0
    out = capsys.readouterr().out
    assert "Gemini model gemini-2.5-flash: found" in out
    assert "Gemini model gemini-2.5-flash-lite: found" in out
    assert "Configuration OK." in out


async def test_check_when_gemini_cannot_be_reached_warns_could_not_check_and_does_not_call_it_missing(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], gemini: GeminiEmulator
) -> None:
    point_at(clean_env, gemini, "gemini-2.5-flash")
    gemini.faults.add("503")
    assert await asyncio.to_thread(main, ["check"]) == 0
    out = capsys.readouterr().out
    assert "warning: GEMINI_MODEL: gemini-2.5-flash: could not check: unavailable (ServerError (503))" in out
    clean_env.setenv("GEMINI_BASE_URL", dead_url())
    assert await asyncio.to_thread(main, ["check"]) == 0
    captured = capsys.readouterr()
    assert "gemini-2.5-flash: could not check: connection" in captured.out
    assert "error" not in captured.err and "Configuration OK." in captured.out


def test_check_on_a_bad_config_lists_every_problem_and_exits_1(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DISCORD_TOKEN", "not-a-bot-token-secret")
    clean_env.setenv("HTTP_PORT", "70000")
    assert main(["check"]) == 1
    captured = capsys.readouterr()
    assert "DISCORD_TOKEN" in captured.err and "HTTP_PORT" in captured.err
    assert "not the bot token from the Bot page" in captured.err
    assert "not-a-bot-token-secret" not in captured.out + captured.err


def test_check_reads_the_env_file_option(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env_file = tmp_path / "custom.env"
    env_file.write_text("GEMINI_MODEL=gemini-custom\nHTTP_HOST=0.0.0.0\nADMIN_API_TOKEN=admin-token-0123456789\n")
    assert main(["--env-file", str(env_file), "check"]) == 0
    out = capsys.readouterr().out
    assert "gemini-custom" in out
    assert "warning: HTTP_HOST" in out


def test_run_with_a_discord_token_but_no_gemini_key_says_how_to_fix_it(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Live Discord needs live Gemini: one sentence naming the missing key, exit 1, nothing started."""
    clean_env.setenv("DISCORD_TOKEN", GOOD_TOKEN)
    assert main(["run"]) == 1
    err = capsys.readouterr().err
    assert "GEMINI_API_KEY" in err and "aistudio.google.com" in err
    assert GOOD_TOKEN not in err


@pytest.mark.parametrize("argv", [["nope"], []])
def test_an_unknown_or_missing_subcommand_is_a_usage_error(
    argv: list[str], clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_the_datastore_subcommand_is_registered_from_its_module_and_dispatched(
    clean_env: pytest.MonkeyPatch,
) -> None:
    calls: list[argparse.Namespace] = []

    def datastore(args: argparse.Namespace) -> int:
        calls.append(args)
        return 7

    def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
        sub = subparsers.add_parser("datastore")
        sub.add_argument("action")
        sub.set_defaults(func=datastore)

    fake = types.ModuleType("bot.datastore_cli")
    fake.register = register  # type: ignore[attr-defined]
    clean_env.setitem(sys.modules, "bot.datastore_cli", fake)
    assert main(["datastore", "verify"]) == 7
    assert calls[0].action == "verify"


def test_the_cli_works_without_the_datastore_module(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setitem(sys.modules, "bot.datastore_cli", None)  # makes the import fail as if absent
    assert main(["check"]) == 0
    with pytest.raises(SystemExit):
        main(["datastore"])
    assert "invalid choice" in capsys.readouterr().err


def run_module(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``python -m bot`` with exactly ``env`` in ``cwd`` (a directory without a .env)."""
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env={"PYTHONPATH": str(REPO), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_python_m_bot_check_exits_0_on_a_good_config(tmp_path: Path) -> None:
    env = {"GEMINI_API_KEY": GEMINI_KEY, "GEMINI_BASE_URL": dead_url(), "LOG_FORMAT": "json"}
    result = run_module(["check"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Gemini: live" in result.stdout
    assert GEMINI_KEY not in result.stdout + result.stderr


def test_python_m_bot_check_exits_1_with_the_names_and_no_traceback_on_a_bad_config(tmp_path: Path) -> None:
    env = {"DISCORD_TOKEN": "oauth-secret-xyz", "BREAKER_FAIL_MAX": "0", "LOG_LEVEL": "chatty"}
    result = run_module(["check"], env, tmp_path)
    assert result.returncode == 1
    for name in ("DISCORD_TOKEN", "BREAKER_FAIL_MAX", "LOG_LEVEL"):
        assert name in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "oauth-secret-xyz" not in result.stderr + result.stdout


def test_python_m_bot_check_refuses_backup_keep_0_naming_the_setting(tmp_path: Path) -> None:
    """BACKUP_KEEP=0 used to pass `check` and then crash start-up in the DataStore with a traceback."""
    result = run_module(["check"], {"BACKUP_KEEP": "0"}, tmp_path)
    assert result.returncode == 1, result.stdout
    assert "BACKUP_KEEP: 0 is out of range" in result.stderr
    assert "set it to a whole number between 1 and 10000" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_python_m_bot_check_warns_about_an_env_file_and_data_dir_other_users_can_read(tmp_path: Path) -> None:
    """Both still pass (exit 0): a warning with the chmod that fixes it, and the modes are left alone."""
    env_file = tmp_path / "bot.env"
    env_file.write_text("LOG_LEVEL=INFO\n")
    env_file.chmod(0o644)
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    result = run_module(["--env-file", str(env_file), "check"], {"DATA_DIR": str(data)}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"warning: {env_file}: can be read by other users of this machine (mode 0644)" in result.stdout
    assert f"fix: chmod 600 {env_file}" in result.stdout
    assert f"warning: DATA_DIR: {data} is open to other users of this machine (mode 0755)" in result.stdout
    assert env_file.stat().st_mode & 0o777 == 0o644 and data.stat().st_mode & 0o777 == 0o755
