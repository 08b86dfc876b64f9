"""Tests for the command line: ``check``, ``run``, the dispatcher, and ``python -m bot`` as a process."""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import pytest

from bot.cli import main
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


def test_check_output_never_contains_a_secret(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DISCORD_TOKEN", GOOD_TOKEN)
    clean_env.setenv("GEMINI_API_KEY", GEMINI_KEY)
    clean_env.setenv("ADMIN_API_TOKEN", ADMIN_TOKEN)
    assert main(["check"]) == 0
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "Discord: live" in text and "Gemini: live" in text
    assert f"<set, {len(GOOD_TOKEN)} chars>" in text
    for secret in (GOOD_TOKEN, GEMINI_KEY, ADMIN_TOKEN):
        assert secret not in text


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
    result = run_module(["check"], {"GEMINI_API_KEY": GEMINI_KEY, "LOG_FORMAT": "json"}, tmp_path)
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
