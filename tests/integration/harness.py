"""Run the whole bot as a child process against the in-process emulators.

The pieces, used by ``tests/integration/conftest.py`` and by chaos runs:

- :func:`running_emulators`: both emulators on ``127.0.0.1`` port 0, with a short gateway
  heartbeat, as an :class:`Emulators` pair.
- :func:`bot_environment`: the child's environment, built from ``os.environ`` with every
  bot setting and every real ``DISCORD_``/``GEMINI_``/``GOOGLE_``/``ADMIN_`` variable removed,
  then pointed at the emulators with test-sized timeouts.
- :class:`BotProcess`: ``python -m bot --env-file <absent> run`` (or any program) with its
  output in files; ``wait_ready``, ``kill`` (SIGKILL), ``terminate`` (SIGTERM), ``logs`` and
  ``assert_clean_logs``. Every wait is bounded.

The child never reads a developer's ``.env``: it runs in a temporary directory and its
``--env-file`` names a file that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import yarl

from sandbox.__main__ import SANDBOX_DISCORD_TOKEN, SANDBOX_GEMINI_KEY, bot_settings
from sandbox.discord_emu import DiscordEmulator
from sandbox.faults import FaultPlan
from sandbox.gemini import GeminiEmulator
from services.config import SETTING_NAMES

REPO_ROOT = Path(__file__).resolve().parents[2]

# Variables of the developer's shell that must never reach the child: a real token or key
# would point the test bot at real Discord/Gemini.
STRIPPED_PREFIXES = ("DISCORD_", "GEMINI_", "GOOGLE_", "ADMIN_")

# Test-sized settings (each within services.config's allowed range).
TEST_SETTINGS: dict[str, str] = {
    "HTTP_HOST": "127.0.0.1",
    "HTTP_PORT": "0",
    "LOG_FORMAT": "json",
    "LOG_LEVEL": "INFO",
    "GEMINI_TIMEOUT_SECONDS": "5",
    "PROCESSING_TIMEOUT_SECONDS": "10",
    "MUTEX_ACQUIRE_TIMEOUT_SECONDS": "2",
    "RETRY_HINT_CAP_SECONDS": "2",
    "BREAKER_RESET_SECONDS": "1",
    "SHUTDOWN_GRACE_SECONDS": "3",
    # Tests send bursts from one user; the cooldown and the queue caps have their own tests.
    "USER_RATE_LIMIT_PER_MINUTE": "1000",
    "GUILD_RATE_LIMIT_PER_MINUTE": "10000",
    "QUEUE_MAX_PENDING_PER_USER": "1000",
    "QUEUE_MAX_PENDING_PER_GUILD": "10000",
    # The scenarios written before streaming check answers sent whole (one send per chunk, what a
    # message shows when it is created); streamed answers have their own, which set it to true
    # (tests/integration/test_streaming.py).
    "STREAMING": "false",
    # No plugins: the scenarios written before plugins count the commands and the storage calls;
    # plugins have their own (tests/integration/test_plugins.py, which set PLUGINS).
    "PLUGINS": "none",
}

# Lines that fail assert_clean_logs whatever their level.
BAD_MARKERS = (
    "Traceback",
    "Task exception was never retrieved",
    "Task was destroyed but it is pending",
    "was never awaited",
    "Unclosed client session",
    "Unclosed connector",
)
BAD_LEVELS = frozenset({"error", "critical", "fatal", "exception"})
_STDLIB_BAD = re.compile(r"^(ERROR|CRITICAL):")  # logging.basicConfig's default format

POLL_INTERVAL = 0.02
TAIL_CHARS = 3000


# --- emulators -------------------------------------------------------------------------------


@dataclass
class Emulators:
    """The Discord and Gemini emulators a test's bot talks to."""

    discord: DiscordEmulator
    gemini: GeminiEmulator

    def settings(self) -> dict[str, str]:
        """The variables that point a bot at these emulators (URLs, token, key, guild, admin)."""
        return bot_settings(self.discord, self.gemini)


@contextlib.contextmanager
def pointed_at(emu: DiscordEmulator) -> Iterator[None]:
    """Point discord.py's REST base and gateway URL at ``emu`` for an in-process bot; restore them."""
    old_base, old_gateway = discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = emu.api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(emu.gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE = old_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway


@contextlib.asynccontextmanager
async def running_emulators(
    *,
    heartbeat_interval: float = 1.0,
    discord_faults: FaultPlan | None = None,
    gemini_faults: FaultPlan | None = None,
    seed: int = 0,
) -> AsyncIterator[Emulators]:
    """Start both emulators on ``127.0.0.1`` port 0; stop them (even on error) on exit.

    The Discord token is token-shaped (``sandbox.__main__.SANDBOX_DISCORD_TOKEN``) because the
    bot's configuration rejects anything else. A short ``heartbeat_interval`` makes a
    client that stopped answering notice within seconds.
    """
    async with (
        DiscordEmulator(
            token=SANDBOX_DISCORD_TOKEN, faults=discord_faults, heartbeat_interval=heartbeat_interval
        ) as discord,
        GeminiEmulator(api_key=SANDBOX_GEMINI_KEY, faults=gemini_faults, seed=seed) as gemini,
    ):
        yield Emulators(discord, gemini)


def bot_environment(
    emulators: Emulators,
    data_dir: Path,
    base: Mapping[str, str] | None = None,
    **overrides: str,
) -> dict[str, str]:
    """The environment for a bot child process pointed at ``emulators``.

    ``base`` (default ``os.environ``) loses every bot setting and every variable starting
    with one of :data:`STRIPPED_PREFIXES`; then come the emulator settings, ``DATA_DIR``,
    :data:`TEST_SETTINGS`, a fresh ``ADMIN_API_TOKEN``, ``PYTHONPATH`` (the repository) and
    unbuffered output; ``overrides`` (e.g. ``LOG_LEVEL="DEBUG"``) win over all of it.
    """
    source = os.environ if base is None else base
    settings = set(SETTING_NAMES)
    env = {k: v for k, v in source.items() if k not in settings and not k.startswith(STRIPPED_PREFIXES)}
    env.update(emulators.settings())
    env.update(TEST_SETTINGS)
    env["DATA_DIR"] = str(data_dir)
    env["ADMIN_API_TOKEN"] = secrets.token_urlsafe(24)
    env["PYTHONPATH"] = str(REPO_ROOT)
    env["PYTHONUNBUFFERED"] = "1"  # log lines reach the files as they happen
    env.update(overrides)
    return env


# --- the child process -----------------------------------------------------------------------


class BotProcessError(AssertionError):
    """The child did not do what a test waited for; ``tail`` holds the end of its output."""

    def __init__(self, message: str, *, returncode: int | None, tail: str) -> None:
        super().__init__(f"{message} (return code {returncode})\n--- output tail ---\n{tail}")
        self.returncode = returncode
        self.tail = tail


class BotProcess:
    """One bot child process: ``sys.executable -m bot --env-file <absent> *args`` in ``cwd``.

    ``program`` replaces ``(sys.executable, "-m", "bot")`` (the harness's own tests use a
    stand-in script); ``--env-file`` and ``args`` follow it either way. stdout and stderr go
    to ``cwd/proc-logs/<name>.<n>.{stdout,stderr}.log``. Call :meth:`start` once; a restart
    is a new ``BotProcess``. :meth:`kill` is safe to call at any time, any number of times.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        args: Sequence[str] = ("run",),
        cwd: Path | None = None,
        *,
        program: Sequence[str] | None = None,
        name: str = "bot",
    ) -> None:
        self.env = dict(env)
        self.args = tuple(args)
        if cwd is None and "DATA_DIR" not in env:
            raise ValueError("BotProcess needs cwd (or DATA_DIR in env, whose parent is then used)")
        self.cwd = Path(cwd) if cwd is not None else Path(self.env["DATA_DIR"]).parent
        self.program = tuple(program) if program is not None else (sys.executable, "-m", "bot")
        self.env_file = self.cwd / ".env.absent"
        logs = self.cwd / "proc-logs"
        logs.mkdir(parents=True, exist_ok=True)
        n = 0
        while (logs / f"{name}.{n}.stdout.log").exists():
            n += 1
        self.stdout_path = logs / f"{name}.{n}.stdout.log"
        self.stderr_path = logs / f"{name}.{n}.stderr.log"
        self.stdout_path.touch()
        self.stderr_path.touch()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sessions_at_start: int | None = None

    @property
    def command(self) -> list[str]:
        return [*self.program, "--env-file", str(self.env_file), *self.args]

    def start(self, emulators: Emulators | None = None) -> BotProcess:
        """Spawn the child (in its own session, so a terminal's Ctrl-C does not reach it).

        With ``emulators``, their IDENTIFY+RESUME count is noted first, so :meth:`wait_ready`
        waits for a session opened after this call (pass them when restarting a bot).
        """
        if self._proc is not None:
            raise RuntimeError("BotProcess.start() called twice; build a new BotProcess to restart")
        if self.env_file.exists():
            raise RuntimeError(f"{self.env_file} exists; the child must not read a dotenv file")
        if emulators is not None:
            self.note_sessions(emulators)
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self._proc = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        return self

    def note_sessions(self, emulators: Emulators) -> None:
        """Remember the emulator's IDENTIFY+RESUME count: wait_ready waits for one more."""
        self._sessions_at_start = emulators.discord.identify_count + emulators.discord.resume_count

    @property
    def pid(self) -> int:
        return self._started_proc().pid

    @property
    def returncode(self) -> int | None:
        """None while running (or never started); the exit code, or ``-signal``, after."""
        return None if self._proc is None else self._proc.poll()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _started_proc(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("BotProcess not started")
        return self._proc

    # -- waiting --------------------------------------------------------------------------

    async def wait_ready(self, emulators: Emulators, timeout: float = 15.0) -> None:
        """Wait until the Discord emulator saw a new IDENTIFY/RESUME and a client is connected.

        "New" means beyond the count noted by ``start(emulators)`` (the ``spawn_bot`` fixture
        passes them), or else at this method's first call. Raises :class:`BotProcessError` at
        once if the child exits first, and after ``timeout`` seconds otherwise.
        """
        discord = emulators.discord
        if self._sessions_at_start is None:
            self.note_sessions(emulators)
        assert self._sessions_at_start is not None
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise BotProcessError(
                    "the bot exited before it was ready", returncode=self.returncode, tail=self.tail()
                )
            if discord.identify_count + discord.resume_count > self._sessions_at_start and discord.connected:
                return
            if time.monotonic() >= deadline:
                raise BotProcessError(
                    f"the bot was not ready within {timeout} s", returncode=self.returncode, tail=self.tail()
                )
            await asyncio.sleep(POLL_INTERVAL)

    async def wait_for_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        """Wait until a log line (see :meth:`logs`) satisfies ``predicate``; return that line."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.logs():
                if predicate(line):
                    return line
            if time.monotonic() >= deadline:
                raise BotProcessError(
                    f"no matching log line within {timeout} s", returncode=self.returncode, tail=self.tail()
                )
            await asyncio.sleep(POLL_INTERVAL)

    # -- stopping -------------------------------------------------------------------------

    def kill(self) -> int | None:
        """SIGKILL the child (if running) and reap it; return its return code (``-9``)."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)  # SIGKILL cannot be ignored: this returns at once
        return self._proc.returncode

    async def terminate(self, timeout: float = 10.0) -> int:
        """SIGTERM the child and wait (without blocking the loop) for it to exit; return its code.

        The loop stays free so the in-process emulators can serve the child's shutdown
        (gateway close, last sends). After ``timeout`` the child is SIGKILLed and
        :class:`BotProcessError` is raised.
        """
        proc = self._started_proc()
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        return await self._wait_exit(timeout, "of SIGTERM")

    async def wait_exit(self, timeout: float = 10.0) -> int:
        """Wait (without blocking the loop) for the child to exit by itself; return its code.

        After ``timeout`` the child is SIGKILLed and :class:`BotProcessError` is raised.
        """
        return await self._wait_exit(timeout, "")

    async def _wait_exit(self, timeout: float, after: str) -> int:
        proc = self._started_proc()
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if time.monotonic() >= deadline:
                self.kill()
                raise BotProcessError(
                    f"the bot did not exit within {timeout} s {after}(killed)",
                    returncode=proc.returncode,
                    tail=self.tail(),
                )
            await asyncio.sleep(POLL_INTERVAL)
        return proc.returncode

    # -- output ---------------------------------------------------------------------------

    def output(self, stream: str = "stderr") -> str:
        """The raw text the child wrote to ``"stdout"`` or ``"stderr"`` so far."""
        path = self.stdout_path if stream == "stdout" else self.stderr_path
        return path.read_bytes().decode("utf-8", "replace")

    def tail(self, chars: int = TAIL_CHARS) -> str:
        """The end of both streams, for failure messages."""
        return f"[stdout]\n{self.output('stdout')[-chars:]}\n[stderr]\n{self.output('stderr')[-chars:]}"

    def _lines(self, stream: str) -> list[str]:
        text = self.output(stream)
        if self.running and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # a line still being written is not read yet
        return text.splitlines()

    def logs(self, stream: str | None = None) -> list[dict[str, Any]]:
        """Log lines of ``stream`` (default: stdout, then stderr), parsed.

        A line holding a JSON object is that object; any other line is ``{"raw": line}``.
        Only complete lines are returned while the child runs.
        """
        streams = (stream,) if stream else ("stdout", "stderr")
        return [_parse(line) for name in streams for line in self._lines(name) if line.strip()]

    def problems(self, allow: Iterable[str | re.Pattern[str]] = ()) -> list[str]:
        """Log records that :meth:`assert_clean_logs` rejects (see there), as text."""
        patterns = [re.compile(re.escape(a)) if isinstance(a, str) else a for a in allow]
        found = []
        for name in ("stdout", "stderr"):
            for record in _records(self._lines(name)):
                if _is_bad(record) and not any(p.search(record) for p in patterns):
                    found.append(f"[{name}] {record}")
        return found

    def assert_clean_logs(self, allow: Iterable[str | re.Pattern[str]] = ()) -> None:
        """Fail on a traceback, a never-retrieved task exception, an unclosed session, or a
        line at level error/critical, unless a pattern in ``allow`` matches the record.

        A string in ``allow`` matches as a substring, a compiled pattern with ``search``. A
        record is one JSON line, or a plain-text traceback block with its final line, so
        ``allow=["ZeroDivisionError"]`` can excuse a whole printed traceback.
        """
        found = self.problems(allow)
        if found:
            shown = "\n".join(found[:20])
            more = f"\n... and {len(found) - 20} more" if len(found) > 20 else ""
            raise AssertionError(f"{len(found)} problem(s) in the bot's logs:\n{shown}{more}")


def _parse(line: str) -> dict[str, Any]:
    if line.startswith("{"):
        try:
            value = json.loads(line)
        except ValueError:
            pass
        else:
            if isinstance(value, dict):
                return value
    return {"raw": line}


def _records(lines: Iterable[str]) -> list[str]:
    """Group lines into records: a plain-text traceback (through its final line) is one record."""
    records: list[str] = []
    in_traceback = False
    for line in lines:
        if not line.strip():
            continue
        continues = line.startswith((" ", "\t")) or line.startswith(
            ("During handling of the above exception", "The above exception was the direct cause")
        )
        if in_traceback and (continues or line.startswith("Traceback")):
            records[-1] += "\n" + line
            continue
        if in_traceback:
            records[-1] += "\n" + line  # the "SomeError: message" line closes the block
            in_traceback = False
            continue
        records.append(line)
        in_traceback = line.startswith("Traceback")
    return records


def _is_bad(record: str) -> bool:
    if any(marker in record for marker in BAD_MARKERS) or _STDLIB_BAD.match(record):
        return True
    parsed = _parse(record)
    level = parsed.get("level")
    return isinstance(level, str) and level.lower() in BAD_LEVELS
