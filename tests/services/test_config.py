"""Tests for services.config: defaults, parsing, validation messages, .env handling, redaction."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from resilience.breakers import BreakerBoard
from resilience.clock import FakeClock
from resilience.retries import RetryPolicy
from resilience.timeouts import AdaptiveTimeout
from services.config import _PARSERS, SETTING_NAMES, Config, ConfigError, ConfigProblem, load_config
from services.datastore import DataStore

REPO = Path(__file__).resolve().parents[2]

# Shaped like a real bot token (id.timestamp.hmac) but not one.
GOOD_TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4OQ.GAbCdE.abcdefghijklmnopqrstuvwxyz0123456789AB"
GEMINI_KEY = "AIzaSyD-fake-key-0123456789abcdefghijk"
ADMIN_TOKEN = "admin-token-0123456789-secret"


@pytest.fixture(autouse=True)
def empty_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test runs in an empty directory: the checkout's own ``data/`` (mode 0755, which
    ``load_config`` warns about) and a developer's ``.env`` never reach it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def load(**env: str) -> Config:
    """Load from exactly ``env``, with no .env file."""
    return load_config(environ=env, env_file=None)


def problems_of(**env: str) -> list[ConfigProblem]:
    """The problems ``load`` raises for ``env`` (fails the test if it raises none)."""
    with pytest.raises(ConfigError) as info:
        load(**env)
    return info.value.problems


def test_nothing_set_gives_the_documented_defaults_and_sandbox_modes() -> None:
    config = load()
    assert config == Config()
    assert config.gemini_model == "gemini-2.5-flash"
    assert config.gemini_timeout_seconds == 30
    assert config.mutex_acquire_timeout_seconds == 5
    assert config.user_rate_limit_per_minute == 6
    assert config.maintenance_queue_messages is True
    assert config.http_host == "127.0.0.1" and config.http_port == 3000
    assert config.data_dir == Path("data")
    assert config.discord_mode == "sandbox" and config.gemini_mode == "sandbox"
    assert config.secrets() == ()
    assert config.warnings == ()


def test_env_example_lists_every_setting_and_loads_to_the_defaults() -> None:
    example = REPO / ".env.example"
    text = example.read_text()
    for name in SETTING_NAMES:
        assert f"\n{name}=" in text, name
    assert load_config(environ={}, env_file=example) == Config()


def test_values_are_parsed_into_their_types() -> None:
    config = load(
        DISCORD_TOKEN=GOOD_TOKEN,
        DISCORD_GUILD_ID="123456789012345678",
        DISCORD_API_BASE="http://127.0.0.1:8080/api/v10/",
        DISCORD_GATEWAY_URL="ws://127.0.0.1:8081",
        GEMINI_API_KEY=GEMINI_KEY,
        GEMINI_FALLBACK_MODELS=" gemini-2.5-flash-lite , gemini-2.0-flash,",
        GEMINI_TIMEOUT_SECONDS="12.5",
        MAINTENANCE_QUEUE_MESSAGES="no",
        HTTP_PORT="0",
        ADMIN_USER_IDS="1, 22 ,333",
        LOG_LEVEL="debug",
        LOG_FORMAT="JSON",
        DATA_DIR="/tmp/bot-data",
    )
    assert config.discord_guild_id == 123456789012345678
    assert config.discord_api_base == "http://127.0.0.1:8080/api/v10"
    assert config.gemini_fallback_models == ("gemini-2.5-flash-lite", "gemini-2.0-flash")
    assert config.gemini_timeout_seconds == 12.5
    assert config.maintenance_queue_messages is False
    assert config.http_port == 0
    assert config.admin_user_ids == frozenset({1, 22, 333})
    assert config.log_level == "DEBUG" and config.log_format == "json"
    assert config.data_dir == Path("/tmp/bot-data")
    assert config.discord_mode == "live" and config.gemini_mode == "live"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("YES", True), ("False", False), ("0", False), ("no", False)],
)
def test_booleans_accept_true_false_1_0_yes_no(text: str, expected: bool) -> None:
    assert load(MAINTENANCE_QUEUE_MESSAGES=text).maintenance_queue_messages is expected


def test_empty_values_mean_not_set_and_take_the_default() -> None:
    assert load(GEMINI_MODEL="", HTTP_PORT="  ", DISCORD_TOKEN="") == Config()


def test_every_problem_is_reported_together_with_name_and_fix() -> None:
    problems = problems_of(
        HTTP_PORT="99999",
        USER_RATE_LIMIT_PER_MINUTE="six",
        GEMINI_TIMEOUT_SECONDS="nan",
        MAINTENANCE_QUEUE_MESSAGES="maybe",
        DISCORD_API_BASE="127.0.0.1:8080",
        DISCORD_GATEWAY_URL="http://127.0.0.1:8081",
        LOG_FORMAT="xml",
        LOG_LEVEL="loud",
        ADMIN_USER_IDS="123,bob",
        DISCORD_GUILD_ID="my-server",
    )
    names = [p.name for p in problems]
    assert sorted(names) == sorted(
        [
            "HTTP_PORT",
            "USER_RATE_LIMIT_PER_MINUTE",
            "GEMINI_TIMEOUT_SECONDS",
            "MAINTENANCE_QUEUE_MESSAGES",
            "DISCORD_API_BASE",
            "DISCORD_GATEWAY_URL",
            "LOG_FORMAT",
            "LOG_LEVEL",
            "ADMIN_USER_IDS",
            "DISCORD_GUILD_ID",
        ]
    )
    assert all(p.problem and p.fix for p in problems)
    by_name = {p.name: p for p in problems}
    assert "'bob'" in by_name["ADMIN_USER_IDS"].problem
    assert "0 and 65535" in by_name["HTTP_PORT"].fix
    assert "console, json" in by_name["LOG_FORMAT"].fix


def test_config_error_reads_as_one_multiline_message() -> None:
    with pytest.raises(ConfigError) as info:
        load(HTTP_PORT="x", LOG_FORMAT="xml")
    text = str(info.value)
    lines = text.splitlines()
    assert lines[0] == "The configuration has 2 problems:"
    assert any(line.strip().startswith("- HTTP_PORT:") for line in lines)
    assert any(line.strip().startswith("- LOG_FORMAT:") for line in lines)
    assert any(line.strip().startswith("fix:") for line in lines)


def test_a_client_secret_instead_of_the_bot_token_is_explained_without_its_value() -> None:
    client_secret = "Xy7_client-secret-value-1234567"
    (problem,) = problems_of(DISCORD_TOKEN=client_secret)
    assert problem.name == "DISCORD_TOKEN"
    assert "client secret or an OAuth token, not the bot token from the Bot page" in problem.problem
    assert "Bot page" in problem.problem and "Reset Token" in problem.fix
    assert client_secret not in str(ConfigError([problem]))


def test_a_bot_prefix_on_the_token_is_caught() -> None:
    (problem,) = problems_of(DISCORD_TOKEN=f"Bot {GOOD_TOKEN}")
    assert "Bot " in problem.problem
    assert GOOD_TOKEN not in str(problem)


def test_secret_values_never_appear_in_error_messages() -> None:
    bad_key = "AIza secret with spaces"
    short_admin = "tiny-secret"
    with pytest.raises(ConfigError) as info:
        load(GEMINI_API_KEY=bad_key, ADMIN_API_TOKEN=short_admin, DISCORD_TOKEN="oauth-secret-value")
    text = str(info.value)
    assert {p.name for p in info.value.problems} == {"GEMINI_API_KEY", "ADMIN_API_TOKEN", "DISCORD_TOKEN"}
    for secret in (bad_key, short_admin, "oauth-secret-value"):
        assert secret not in text
    assert "at least 16" in text


def test_dotenv_file_is_read_and_the_real_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(
        'GEMINI_MODEL=gemini-from-file\nHTTP_PORT=4000\nBOT_PERSONA="You are a pirate."\n'
        "# a comment\nLOG_FORMAT=json\n"
    )
    before = dict(os.environ)
    config = load_config(environ={"HTTP_PORT": "5000", "UNRELATED": "x"}, env_file=env_file)
    assert config.gemini_model == "gemini-from-file"
    assert config.bot_persona == "You are a pirate."
    assert config.log_format == "json"
    assert config.http_port == 5000  # the environment wins over the file
    assert dict(os.environ) == before  # the file never leaks into os.environ


def test_problems_in_the_dotenv_file_are_reported_like_environment_problems(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("HTTP_PORT=eighty\nBACKUP_KEEP=-1\n")
    with pytest.raises(ConfigError) as info:
        load_config(environ={}, env_file=env_file)
    assert {p.name for p in info.value.problems} == {"HTTP_PORT", "BACKUP_KEEP"}


def test_an_unknown_name_in_the_dotenv_file_is_a_warning(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("GEMINI_KEY=oops\n")
    env_file.chmod(0o600)
    config = load_config(environ={}, env_file=env_file)
    assert [w.name for w in config.warnings] == ["GEMINI_KEY"]


def test_a_missing_dotenv_file_is_fine(tmp_path: Path) -> None:
    assert load_config(environ={}, env_file=tmp_path / "absent.env") == Config()


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "bot.example.com", "::"])
def test_a_non_loopback_http_host_without_an_admin_token_is_an_error(host: str) -> None:
    """The API would be open to the network with its admin routes off and nothing to check callers."""
    [problem] = problems_of(HTTP_HOST=host)
    assert problem.name == "HTTP_HOST"
    assert host in problem.problem and "ADMIN_API_TOKEN" in problem.problem
    assert "ADMIN_API_TOKEN" in problem.fix and "127.0.0.1" in problem.fix


def test_the_http_host_error_is_listed_with_the_other_problems() -> None:
    names = [p.name for p in problems_of(HTTP_HOST="0.0.0.0", HTTP_PORT="eighty")]
    assert sorted(names) == ["HTTP_HOST", "HTTP_PORT"]


def test_a_non_loopback_http_host_with_an_invalid_admin_token_is_one_problem_about_the_token() -> None:
    assert [p.name for p in problems_of(HTTP_HOST="0.0.0.0", ADMIN_API_TOKEN="short")] == ["ADMIN_API_TOKEN"]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "bot.example.com"])
def test_a_non_loopback_http_host_with_an_admin_token_is_a_warning(host: str) -> None:
    config = load(HTTP_HOST=host, ADMIN_API_TOKEN=ADMIN_TOKEN)
    assert config.http_host == host
    assert [w.name for w in config.warnings] == ["HTTP_HOST"]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_a_loopback_http_host_gives_no_warning(host: str) -> None:
    assert load(HTTP_HOST=host).warnings == ()


def test_redacted_shows_every_setting_and_hides_the_secrets() -> None:
    config = load(DISCORD_TOKEN=GOOD_TOKEN, GEMINI_API_KEY=GEMINI_KEY, ADMIN_API_TOKEN=ADMIN_TOKEN)
    shown = config.redacted()
    assert set(shown) == set(SETTING_NAMES)
    assert shown["DISCORD_TOKEN"] == f"<set, {len(GOOD_TOKEN)} chars>"
    assert shown["GEMINI_API_KEY"] == f"<set, {len(GEMINI_KEY)} chars>"
    assert shown["ADMIN_API_TOKEN"] == f"<set, {len(ADMIN_TOKEN)} chars>"
    assert load().redacted()["DISCORD_TOKEN"] == "<not set>"
    dumped = repr(shown) + repr(config) + str(config)
    for secret in (GOOD_TOKEN, GEMINI_KEY, ADMIN_TOKEN):
        assert secret not in dumped


def test_secrets_lists_the_secret_values_that_are_set() -> None:
    config = load(GEMINI_API_KEY=GEMINI_KEY, ADMIN_API_TOKEN=ADMIN_TOKEN)
    assert set(config.secrets()) == {GEMINI_KEY, ADMIN_TOKEN}


def test_config_is_frozen() -> None:
    config = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.http_port = 1  # type: ignore[misc]


# --- ranges: each is the one check of what the code using the setting needs -------------------


@pytest.mark.parametrize("value", ["0", "-1"])
def test_backup_keep_below_1_is_refused_because_the_datastore_needs_one_backup(value: str) -> None:
    """The DataStore refuses keep_backups < 1 (it crashed start-up after `check` had passed)."""
    (problem,) = problems_of(BACKUP_KEEP=value)
    assert problem.name == "BACKUP_KEEP" and "out of range" in problem.problem
    assert "between 1 and 10000" in problem.fix
    assert load(BACKUP_KEEP="1").backup_keep == 1


def test_the_lowest_accepted_value_of_each_checked_setting_is_accepted_by_the_code_using_it(
    tmp_path: Path,
) -> None:
    """Config is the one range check: the lowest value each range lets through builds the
    object that uses it (the DataStore, breakers, retries, the adaptive timeout) without error."""
    low = {name: _PARSERS[name].low for name in _PARSERS if hasattr(_PARSERS[name], "low")}
    clock = FakeClock()
    DataStore(tmp_path, keep_backups=int(low["backup_keep"]))
    board = BreakerBoard(
        clock, fail_max=int(low["breaker_fail_max"]), reset_timeout=low["breaker_reset_seconds"]
    )
    board.add("gemini")
    RetryPolicy("gemini", max_attempts=int(low["retry_max_attempts"]), hint_cap=low["retry_hint_cap_seconds"])
    seconds = low["gemini_timeout_seconds"]
    AdaptiveTimeout(min(10.0, seconds), minimum=min(2.0, seconds), maximum=seconds, clock=clock)


# --- LOG_PAYLOADS --------------------------------------------------------------------------------


def test_log_payloads_is_off_by_default_and_parsed_as_a_boolean() -> None:
    assert load().log_payloads is False
    assert load(LOG_PAYLOADS="1").log_payloads is True
    (problem,) = problems_of(LOG_PAYLOADS="sometimes")
    assert problem.name == "LOG_PAYLOADS"


# --- file modes: warnings, never a chmod ---------------------------------------------------------


def test_an_env_file_other_users_can_read_is_a_warning_with_the_chmod_that_fixes_it(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("LOG_LEVEL=INFO\n")
    env_file.chmod(0o644)
    (warning,) = load_config(environ={}, env_file=env_file).warnings
    assert warning.name == str(env_file)
    assert "other users" in warning.problem and "0644" in warning.problem
    assert warning.fix == f"chmod 600 {env_file}"
    assert env_file.stat().st_mode & 0o777 == 0o644  # warned, not changed
    env_file.chmod(0o640)
    assert len(load_config(environ={}, env_file=env_file).warnings) == 1
    env_file.chmod(0o600)
    assert load_config(environ={}, env_file=env_file).warnings == ()


def test_an_existing_data_dir_open_to_other_users_is_a_warning_and_is_left_alone(tmp_path: Path) -> None:
    data = tmp_path / "data dir"
    data.mkdir()
    data.chmod(0o755)
    (warning,) = load(DATA_DIR=str(data)).warnings
    assert warning.name == "DATA_DIR"
    assert str(data) in warning.problem and "0755" in warning.problem
    assert warning.fix.startswith(f"chmod 700 '{data}'")
    assert data.stat().st_mode & 0o777 == 0o755
    data.chmod(0o700)
    assert load(DATA_DIR=str(data)).warnings == ()
    assert load(DATA_DIR=str(tmp_path / "absent")).warnings == ()  # the bot will create it 0700
