"""The recovery scripts (scripts/*.sh) run as an operator would: against a live bot child on the
sandbox emulators, in the failure each one exists for, and against a bot that is down.

Scripts run with ``asyncio.create_subprocess_exec`` so the in-process emulators keep serving
the bot while a script waits for it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.integration.conftest import SpawnBot
from tests.integration.harness import REPO_ROOT, BotProcess, Emulators

SCRIPTS_DIR = REPO_ROOT / "scripts"
SCRIPTS = (
    "gemini-recovery.sh",
    "discord-recovery.sh",
    "datastore-recovery.sh",
    "validate-recovery.sh",
    "memory-recovery.sh",
    "collect-recovery-metrics.sh",
    "config-recovery.sh",
    "response-time-recovery.sh",
    "load-test-recovery.sh",
)
SCRIPT_TIMEOUT = 60.0
EXIT_FAILING, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_USAGE, EXIT_DEFAULTS, EXIT_IN_USE = 1, 2, 3, 4, 5, 6


@dataclass
class Result:
    """A finished script: exit code and both streams."""

    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"exit {self.returncode}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def script_env(url: str = "http://127.0.0.1:9", token: str | None = None, **extra: str) -> dict[str, str]:
    """The operator's shell: no bot settings or BOT_ variables of the developer, the test's python."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BOT_", "ADMIN_", "DISCORD_", "GEMINI_", "DATA_DIR"))
    }
    env.update(BOT_API_URL=url, BOT_PYTHON=sys.executable, BOT_HTTP_TIMEOUT="20")
    if token is not None:
        env["BOT_ADMIN_TOKEN"] = token
    env.update(extra)
    return env


async def run(
    name: str, *args: str, env: Mapping[str, str], cwd: Path | None = None, timeout: float = SCRIPT_TIMEOUT
) -> Result:
    """Run scripts/NAME without blocking the loop (the emulators live on it)."""
    proc = await asyncio.create_subprocess_exec(
        str(SCRIPTS_DIR / name),
        *args,
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{name} {' '.join(args)} did not finish within {timeout} s") from None
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def run_sync(name: str, *args: str, env: Mapping[str, str], cwd: Path | None = None) -> Result:
    """Run scripts/NAME when no emulator needs the loop."""
    done = subprocess.run(
        [str(SCRIPTS_DIR / name), *args],
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT,
    )
    return Result(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback URL where nothing listens: the port is bound (so nobody else takes it) but not listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@dataclass
class LiveBot:
    """A bot child with its HTTP API, the emulators it talks to, and the operator's environment."""

    proc: BotProcess
    emulators: Emulators
    url: str
    token: str
    data_dir: Path
    session: aiohttp.ClientSession

    def env(self, **extra: str) -> dict[str, str]:
        return script_env(self.url, self.token, **extra)

    async def get(self, path: str) -> Any:
        async with self.session.get(self.url + path) as resp:
            return await resp.json()

    async def get_auth(self, path: str) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.session.get(self.url + path, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()

    async def post(self, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with self.session.post(self.url + path, json=body or {}, headers=headers) as resp:
            return resp.status, await resp.json()

    async def wait_ready(self, timeout: float = 10.0) -> None:
        """Poll GET /ready until it answers 200 (the gateway session is up, every service runs)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            async with self.session.get(self.url + "/ready") as resp:
                if resp.status == 200:
                    return
                reasons = await resp.json()
            if asyncio.get_running_loop().time() >= deadline:
                raise AssertionError(f"/ready did not answer 200 within {timeout} s: {reasons}")
            await asyncio.sleep(0.05)

    async def breaker(self, name: str) -> str:
        rows = (await self.get("/api/health/circuits"))["breakers"]
        return next(r["state"] for r in rows if r["name"] == name)


@pytest.fixture
async def live(spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str]) -> AsyncIterator[LiveBot]:
    """A running bot whose GET /ready answers 200, and the URL of its HTTP API, read from its log.

    Its healer is off: these tests break things for the operator's scripts to find and repair, and
    the healer would race them to it (its own tests: tests/integration/test_healing.py)."""
    bot_env["HEAL_ENABLED"] = "false"
    proc = spawn_bot()
    await proc.wait_ready(emulators)
    line = await proc.wait_for_log(lambda r: r.get("event") == "http_api.listening", timeout=10)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        bot = LiveBot(
            proc,
            emulators,
            f"http://127.0.0.1:{line['port']}",
            bot_env["ADMIN_API_TOKEN"],
            Path(bot_env["DATA_DIR"]),
            session,
        )
        await bot.wait_ready()  # the emulator sees IDENTIFY before discord.py has handled READY
        yield bot


# --- every script: --help and bad usage ----------------------------------------------------------


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_documents_usage_and_exit_codes(name: str) -> None:
    """--help exits 0 and documents the usage, the environment and the exit codes."""
    result = run_sync(name, "--help", env=script_env())
    assert result.returncode == 0, result
    assert result.stdout.startswith(f"Usage: {name}"), result
    assert "Exit codes:" in result.stdout and "\n  0  " in result.stdout and "\n  1  " in result.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_option_is_bad_usage(name: str) -> None:
    """An unknown option exits 4 with one line naming it, before touching anything."""
    result = run_sync(name, "--no-such-option", env=script_env(token="t"))
    assert result.returncode == EXIT_USAGE, result
    assert result.stderr.strip().splitlines() == [
        f"{name}: unknown argument '--no-such-option' (see --help)"
    ], result


# --- the bot is down ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "gemini-recovery.sh",
        "discord-recovery.sh",
        "memory-recovery.sh",
        "validate-recovery.sh",
        "response-time-recovery.sh",
        "load-test-recovery.sh",
    ],
)
def test_unreachable_bot_exits_2_with_the_reason(name: str, dead_url: str) -> None:
    """With nothing listening at BOT_API_URL the script says so in one line and exits 2."""
    result = run_sync(name, env=script_env(dead_url, token="t"))
    assert result.returncode == EXIT_UNREACHABLE, result
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"{name}: bot unreachable at {dead_url}"), result


@pytest.mark.parametrize(
    "name",
    [
        "gemini-recovery.sh",
        "discord-recovery.sh",
        "memory-recovery.sh",
        "response-time-recovery.sh",
        "load-test-recovery.sh",
    ],
)
def test_admin_scripts_without_a_token_exit_3(name: str, dead_url: str) -> None:
    """Scripts that act need BOT_ADMIN_TOKEN and say so before calling anything."""
    result = run_sync(name, env=script_env(dead_url))
    assert result.returncode == EXIT_AUTH, result
    assert "BOT_ADMIN_TOKEN is not set" in result.stderr, result


def test_collect_metrics_while_the_bot_is_down_keeps_the_log_and_says_so(
    dead_url: str, tmp_path: Path
) -> None:
    """The snapshot folder still holds the log tail and a list of what is missing; exit 2."""
    log = tmp_path / "bot.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    result = run_sync(
        "collect-recovery-metrics.sh",
        "--out",
        str(tmp_path),
        "--log",
        str(log),
        "--lines",
        "5",
        env=script_env(dead_url),
    )
    assert result.returncode == EXIT_UNREACHABLE, result
    folder = Path(result.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path and folder.name.startswith("recovery-")
    assert (folder / "log-tail.txt").read_text() == "".join(f"line {i}\n" for i in range(95, 100))
    missing = (folder / "MISSING.txt").read_text()
    assert "status.json: bot unreachable" in missing and "metrics.txt" in missing
    assert not (folder / "status.json").exists()
    assert "bot unreachable" in result.stderr


# --- offline: DataStore and configuration -----------------------------------------------------------


def _datastore(tmp_path: Path) -> Path:
    """A data directory with every DataStore file written (and its .bak) by the real CLI."""
    data = tmp_path / "data"
    env = {**script_env(), "PYTHONPATH": str(REPO_ROOT)}
    # Exit 2 here says the files were written from the defaults, which is what a fresh store holds.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "bot",
            "--env-file",
            str(tmp_path / "absent.env"),
            "datastore",
            "recover",
            "--data-dir",
            str(data),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        timeout=30,
    )
    assert (data / "maintenance.json").is_file() and (data / "maintenance.json.bak").is_file()
    return data


def test_datastore_offline_restores_a_corrupt_file_from_its_bak(tmp_path: Path) -> None:
    """--offline: a truncated file is found, restored from .bak, and validated; exit 0."""
    data = _datastore(tmp_path)
    good = json.loads((data / "maintenance.json").read_text())
    (data / "maintenance.json").write_text('{"enabled": tr')
    result = run_sync(
        "datastore-recovery.sh", "--offline", "--data-dir", str(data), env=script_env(), cwd=tmp_path
    )
    assert result.returncode == 0, result
    assert "maintenance      INVALID" in result.stdout and "served from bak" in result.stdout
    assert "OK: every DataStore file is valid (recovered: maintenance)" in result.stdout
    assert json.loads((data / "maintenance.json").read_text()) == good


def test_datastore_offline_with_nothing_valid_left_exits_5(tmp_path: Path) -> None:
    """A corrupt file with no valid .bak or backup comes back as the defaults: valid, but exit 5
    says its data is lost."""
    data = _datastore(tmp_path)
    (data / "breakers.json").write_text("{not json")
    (data / "breakers.json.bak").write_text("{not json either")
    result = run_sync(
        "datastore-recovery.sh",
        "--offline",
        "--data-dir",
        str(data),
        "breakers",
        env=script_env(),
        cwd=tmp_path,
    )
    assert result.returncode == EXIT_DEFAULTS, result
    assert result.stderr.strip().endswith(
        "recovered breakers to the defaults: no valid file, .bak or backup was left"
    )
    assert "validate:   breakers         OK" in result.stdout


def test_datastore_never_goes_offline_on_its_own_when_the_bot_does_not_answer(
    tmp_path: Path, dead_url: str
) -> None:
    """A bot that does not answer may be running at another URL: without --offline the script
    exits 2, says how to go offline, and leaves the files alone."""
    data = _datastore(tmp_path)
    (data / "admins.json").write_text("[]")  # valid JSON, wrong shape
    result = run_sync(
        "datastore-recovery.sh", "--data-dir", str(data), env=script_env(dead_url), cwd=tmp_path
    )
    assert result.returncode == EXIT_UNREACHABLE, result
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"datastore-recovery.sh: bot unreachable at {dead_url} (")
    assert line.endswith("; if the bot is stopped, run again with --offline")
    assert (data / "admins.json").read_text() == "[]"
    assert not (data / "quarantine").exists()


def test_datastore_unknown_name_is_bad_usage(tmp_path: Path) -> None:
    """An unknown file name exits 4 and lists the valid names."""
    result = run_sync(
        "datastore-recovery.sh",
        "--offline",
        "--data-dir",
        str(tmp_path),
        "nope",
        env=script_env(),
        cwd=tmp_path,
    )
    assert result.returncode == EXIT_USAGE, result
    assert "unknown file 'nope'; valid names: maintenance" in result.stderr


def test_config_recovery_accepts_a_valid_configuration(tmp_path: Path) -> None:
    """A valid env file: python -m bot check passes and the script exits 0."""
    env_file = tmp_path / "ok.env"
    env_file.write_text("LOG_LEVEL=DEBUG\n")
    result = run_sync("config-recovery.sh", "--env-file", str(env_file), env=script_env(), cwd=tmp_path)
    assert result.returncode == 0, result
    assert "Configuration OK." in result.stdout and "OK: the configuration is valid" in result.stdout


def test_config_recovery_reports_every_problem_and_points_at_the_example(tmp_path: Path) -> None:
    """A bad env file: exit 1, the problems on stderr, a one-line reason, and with --restore-example the
    way back to .env.example and the settings it does not know. The token is never printed."""
    env_file = tmp_path / "bad.env"
    env_file.write_text(
        "GEMINI_TIMEOUT_SECONDS=abc\nHTTP_PORT=99999\nGEMINI_MODLE=x\nADMIN_API_TOKEN=s3cret-token-value\n"
    )
    result = run_sync(
        "config-recovery.sh", "--env-file", str(env_file), "--restore-example", env=script_env(), cwd=tmp_path
    )
    assert result.returncode == EXIT_FAILING, result
    assert "GEMINI_TIMEOUT_SECONDS" in result.stderr and "HTTP_PORT" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("config-recovery.sh: bad configuration: ")
    assert "(and 1 more)" in result.stderr
    assert f"cp {REPO_ROOT / '.env.example'} {env_file}" in result.stdout
    assert "does not know (typos?): GEMINI_MODLE" in result.stdout
    assert "s3cret-token-value" not in result.stdout + result.stderr


# --- live: each script in the failure it exists for ---------------------------------------------------
# A bot takes ~3 s to start, so each test below takes one bot through a few related failures.


async def test_gemini_recovery_recovers_when_gemini_answers_and_fails_truthfully_while_it_is_down(
    live: LiveBot,
) -> None:
    """The gemini breaker held open by an operator while Gemini is fine: the script tests Gemini,
    resets the breaker, wakes the queue and exits 0 with the breaker closed. Then Gemini answers
    503 to everything: exit 1 naming the category, and the breaker is open again."""
    status, _ = await live.post("/api/admin/circuit/open/gemini")
    assert status == 200
    assert await live.breaker("gemini") == "open"
    result = await run("gemini-recovery.sh", "--wait", "10", env=live.env())
    assert result.returncode == 0, result
    assert "check: gemini breaker is open" in result.stdout
    assert "act: gemini breaker reset" in result.stdout
    assert "OK: Gemini answers" in result.stdout
    assert await live.breaker("gemini") == "closed"
    assert live.token not in result.stdout + result.stderr

    await live.post("/api/admin/circuit/open/gemini")
    live.emulators.gemini.faults.add("503")
    result = await run("gemini-recovery.sh", "--wait", "5", "--reopen-seconds", "30", env=live.env())
    assert result.returncode == EXIT_FAILING, result
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("gemini-recovery.sh: Gemini still failing: unavailable"), result
    assert await live.breaker("gemini") == "open"


async def test_datastore_recovery_online_restores_a_corrupt_file_and_a_wrong_token_exits_3(
    live: LiveBot,
) -> None:
    """A file corrupted under the running bot: found by the API's validate, recovered from its .bak,
    validated; exit 0. A refused token is exit 3 with one line, and no token appears in the output."""
    await live.post("/api/admin/maintenance/disable")  # writes maintenance.json (and its .bak)
    await live.post("/api/admin/maintenance/disable")
    path = live.data_dir / "maintenance.json"
    path.write_text("{broken")
    result = await run("datastore-recovery.sh", env=live.env())
    assert result.returncode == 0, result
    assert "check: maintenance      INVALID" in result.stdout
    assert "act: maintenance served from bak" in result.stdout
    assert "recovered: maintenance" in result.stdout
    assert json.loads(path.read_text())["enabled"] is False
    status, body = await live.post("/api/admin/datastore/validate")
    assert status == 200 and body["ok"] is True

    result = await run("datastore-recovery.sh", env=script_env(live.url, "wrong-token-123"))
    assert result.returncode == EXIT_AUTH, result
    assert result.stderr.strip().splitlines() == [
        "datastore-recovery.sh: POST /api/admin/datastore/validate refused (HTTP 401): "
        "the admin token was not accepted"
    ]
    assert "wrong-token-123" not in result.stdout + result.stderr
    assert live.token not in result.stdout + result.stderr


async def test_datastore_recovery_never_touches_the_files_of_a_running_bot_behind_a_wrong_url(
    live: LiveBot, dead_url: str
) -> None:
    """The reproduced incident: BOT_API_URL is wrong while the bot runs. Without --offline the
    script exits 2 and touches nothing; with --offline the bot's lock on DATA_DIR refuses it:
    exit 6 naming the directory and the bot's pid, and the files are as they were."""
    path = live.data_dir / "maintenance.json"
    path.write_text("{broken")

    def datastore_files() -> dict[str, bytes]:  # not the SQLite files: the running bot writes those
        return {p.name: p.read_bytes() for p in live.data_dir.glob("*.json*")}

    before = datastore_files()
    assert "maintenance.json" in before and "admins.json.bak" in before

    result = await run("datastore-recovery.sh", env=script_env(dead_url, live.token))
    assert result.returncode == EXIT_UNREACHABLE, result
    assert "run again with --offline" in result.stderr

    result = await run(
        "datastore-recovery.sh", "--offline", "--data-dir", str(live.data_dir), env=script_env(dead_url)
    )
    assert result.returncode == EXIT_IN_USE, result
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(
        f"datastore-recovery.sh: DATA_DIR {live.data_dir} is in use by process {live.proc.pid}, a running bot"
    ), result
    assert datastore_files() == before
    assert not (live.data_dir / "quarantine").exists()
    assert live.proc.running

    result = await run("datastore-recovery.sh", "maintenance", env=live.env())  # online: the right way
    assert result.returncode == 0, result


async def test_validate_recovery_and_discord_recovery(live: LiveBot) -> None:
    """Maintenance on: validate-recovery exits 1 and its table says why; maintenance off: exit 0.
    A discord.* breaker open: discord-recovery reconnects the gateway (--force), resets the
    breaker and exits 0 once ready, and the bot really opened a new gateway session."""
    await live.post("/api/admin/maintenance/enable", {"message": "back soon"})
    result = await run("validate-recovery.sh", "--sample", "0", env=live.env())
    assert result.returncode == EXIT_FAILING, result
    assert "mode       FAIL  maintenance" in result.stdout
    assert "not recovered: " in result.stderr
    await live.post("/api/admin/maintenance/disable")
    result = await run("validate-recovery.sh", "--sample", "0", env=live.env())
    assert result.returncode == 0, result
    assert "breakers   PASS  all" in result.stdout and "status     PASS  healthy" in result.stdout

    await live.post("/api/admin/circuit/open/discord.send")
    discord = live.emulators.discord
    sessions = discord.resume_count + discord.identify_count
    result = await run("discord-recovery.sh", "--force", "--wait", "15", env=live.env())
    assert result.returncode == 0, result
    assert "act: breaker discord.send reset" in result.stdout
    assert await live.breaker("discord.send") == "closed"
    assert discord.resume_count + discord.identify_count > sessions


async def test_memory_recovery_and_collect_metrics(live: LiveBot, tmp_path: Path) -> None:
    """memory-recovery runs gc and reports memory before and after; a limit the bot cannot meet
    (1 MiB) is exit 1. collect-recovery-metrics writes every snapshot: each JSON file parses and
    the metrics are Prometheus text."""
    result = await run("memory-recovery.sh", env=live.env())
    assert result.returncode == 0, result
    for line in ("check: rss", "act: gc collected", "validate: rss"):
        assert line in result.stdout, result
    result = await run("memory-recovery.sh", "--max-rss-mb", "1", env=live.env())
    assert result.returncode == EXIT_FAILING, result
    assert "memory still high" in result.stderr

    result = await run("collect-recovery-metrics.sh", "--out", str(tmp_path), env=live.env())
    assert result.returncode == 0, result
    folder = Path(result.stdout.strip().splitlines()[-1])
    for name in (
        "status",
        "circuits",
        "degradation",
        "services",
        "memory",
        "performance",
        "gemini",
        "discord",
    ):
        json.loads((folder / f"{name}.json").read_text())
    assert json.loads((folder / "circuits.json").read_text())["breakers"]
    assert "# TYPE" in (folder / "metrics.txt").read_text()
    assert not (folder / "MISSING.txt").exists()


# --- response time and load ---------------------------------------------------------------------------


async def say_until(live: LiveBot, done: asyncio.Future[Any], *, every: float = 0.3, most: int = 100) -> int:
    """A user writes to the bot (a DM: no guild limit) every ``every`` s until ``done`` (at most ``most``
    messages); return how many were sent."""
    discord = live.emulators.discord
    dm = discord.dm_channel("normal")
    sent = 0
    while not done.done() and sent < most:
        await discord.send_user_message(dm, author="normal", content=f"question {sent}")
        sent += 1
        await asyncio.wait({done}, timeout=every)
    return sent


async def test_response_time_recovery_finds_slow_gemini_sheds_load_and_validates(live: LiveBot) -> None:
    """Gemini answers in 1.5 s: message p95 is over a 1,000 ms threshold. The script names the
    slow step (gemini.attempt), tightens the rate limits to half and queues new messages; the
    messages after that are acknowledged at once, so their p95 is under the threshold: exit 0.
    --restore puts the configured limits back. With nothing slow, it changes nothing."""
    env = live.env()
    result = await run("response-time-recovery.sh", "--threshold-ms", "1000", "--min-samples", "3", env=env)
    assert result.returncode == EXIT_FAILING and "no messages handled yet" in result.stderr, result

    live.emulators.gemini.faults.add("latency", seconds=1.5)
    discord = live.emulators.discord
    # Four conversations at once (one conversation would queue behind its own lock).
    for channel in (discord.channels["general"], discord.channels["random"], discord.thread_id):
        await discord.send_user_message(channel, author="normal", content="slow one", mentions_bot=True)
    await discord.send_user_message(discord.dm_channel("admin"), author="admin", content="slow one")
    async with asyncio.timeout(20):  # the four slow answers
        while (await live.get_auth("/api/traces?route=message&limit=0"))["latency"]["count"] < 4:
            await asyncio.sleep(0.1)

    script = asyncio.ensure_future(
        run(
            "response-time-recovery.sh",
            "--threshold-ms", "1000", "--queue-new", "--min-samples", "3", "--wait", "20",
            env=env,
        )
    )
    sent = await say_until(live, script, every=0.3, most=60)
    result = await script
    assert result.returncode == 0, result
    out = result.stdout
    assert "check: message p95 " in out and "threshold 1000 ms" in out
    lead = "cause: time in the 3 slowest messages: "
    [where] = [line for line in out.splitlines() if line.startswith(lead)]
    assert "gemini.generate " in where and "gemini.attempt " in where, out
    assert "act: load shed: rate limits 500/user, 5000/server a minute (configured 1000, 10000);" in out
    assert "new messages queued" in out
    assert "OK: message p95 " in out and sent >= 3
    assert live.token not in out + result.stderr
    status = await live.get_auth("/api/admin/load")
    assert status["shedding"] and status["queue_new_messages"] and status["user_per_minute"] == 500

    result = await run("response-time-recovery.sh", "--restore", env=env)
    assert result.returncode == 0, result
    assert "OK: load restored: rate limits 1000/user, 10000/server a minute" in result.stdout
    assert "new messages answered live" in result.stdout
    assert not (await live.get_auth("/api/admin/load"))["shedding"]

    live.emulators.gemini.faults.clear()
    result = await run("response-time-recovery.sh", "--threshold-ms", "60000", "--min-samples", "3", env=env)
    assert result.returncode == 0, result
    assert "nothing to do" in result.stdout and "act:" not in result.stdout


async def test_load_test_recovery_reports_percentiles_and_fails_on_errors(live: LiveBot) -> None:
    """20 requests, 4 at a time, against the sandbox: p50/p95/p99 and no error: exit 0. With Gemini
    answering 503: the errors by category and exit 1."""
    result = await run("load-test-recovery.sh", "--requests", "20", "--concurrency", "4", env=live.env())
    assert result.returncode == 0, result
    out = result.stdout
    assert "check: gemini breaker is closed" in out
    assert "report: 20 requests in " in out and "20 answered, 0 errors, 0 unfinished" in out
    assert "report: latency p50 " in out and ", p95 " in out and ", p99 " in out
    assert out.strip().splitlines()[-1].startswith("OK: 20 requests, p95 ")
    assert live.token not in out + result.stderr

    live.emulators.gemini.faults.add("503", count=3)  # every attempt of one request (3 by default)
    result = await run("load-test-recovery.sh", "--requests", "1", "--max-error-rate", "0.1", env=live.env())
    assert result.returncode == EXIT_FAILING, result
    assert "report: errors unavailable: 1" in result.stdout
    assert result.stderr.strip().endswith("1 of 1 requests failed (allowed: a share of 0.1)")


async def test_load_test_recovery_refuses_a_live_bot_without_yes(dead_url: str) -> None:
    """A bot that talks to the real services answers the load test 409 unless confirmed: the
    script exits 4 and says to rerun with --yes (the refusal itself is the bot's: see
    tests/bot/test_load_operations.py). The peer here stands in for such a bot."""
    seen: list[dict[str, Any]] = []

    async def circuits(request: web.Request) -> web.Response:
        return web.json_response({"breakers": [{"name": "gemini", "state": "closed"}]})

    async def load(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if body.get("confirm") is not True:
            return web.json_response(
                {"error": "refused", "message": "this is a live bot (Gemini or Discord beyond this machine)"},
                status=409,
            )
        return web.json_response(
            {"requests": 1, "concurrency": 1, "ok": 1, "errors": 0, "errors_by_category": {}, "unfinished": 0,
             "duration": 0.1, "per_second": 10.0, "live": True,
             "latency": {"count": 1, "p50": 0.1, "p95": 0.1, "p99": 0.1, "max": 0.1}}
        )

    app = web.Application()
    app.router.add_get("/api/health/circuits", circuits)
    app.router.add_post("/api/test/load", load)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        result = await run("load-test-recovery.sh", "--requests", "1", env=script_env(url, "t"))
        assert result.returncode == EXIT_USAGE, result
        assert "refused: this is a live bot" in result.stderr and "rerun with --yes" in result.stderr
        result = await run("load-test-recovery.sh", "--requests", "1", "--yes", env=script_env(url, "t"))
        assert result.returncode == 0, result
        assert "(live bot)" in result.stdout
    finally:
        await runner.cleanup()
    assert [b["confirm"] for b in seen] == [False, True]
