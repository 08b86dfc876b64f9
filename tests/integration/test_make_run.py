"""``make run`` with no tokens starts the sandbox and its terminal chat; driven here through a pty.

The child runs what a newcomer types, ``make run``, in the repository, on a pseudo-terminal
that is its controlling terminal (so Ctrl-C and Ctrl-D mean what they mean in a shell). It
gets nothing of the developer's setup: ``DISCORD_``/``GEMINI_``/``GOOGLE_``/``ADMIN_``
variables are removed and every bot setting is set *empty* in the environment. The
environment wins over ``.env`` and an empty value means "the default", so a developer's
``.env`` cannot point this test at the real Discord or Gemini (the Makefile takes no
``--env-file``). ``DATA_DIR`` is a temporary directory; the emulators listen on 127.0.0.1
port 0. Every wait has a deadline.
"""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from services.config import SETTING_NAMES
from tests.integration.harness import REPO_ROOT, STRIPPED_PREFIXES

pytestmark = pytest.mark.skipif(
    sys.platform == "win32" or shutil.which("make") is None, reason="needs a POSIX pty and make"
)

# `-o STAMP`: never (re)install dependencies from a test, even when pyproject.toml is newer.
MAKE_RUN = ["make", "--no-print-directory", "-o", ".venv/.installed-stamp", "run"]
BOT_RUN = [sys.executable, "-m", "rehearsal", "--env-file", "/nonexistent/.env", "run"]
# A new session whose controlling terminal is the pty (stdin), then the command: what a shell does.
TAKE_TERMINAL = (
    "import fcntl, os, sys, termios; os.setsid(); fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execvp(sys.argv[1], sys.argv[1:])"
)
CTRL_C = b"\x03"
CTRL_D = b"\x04"
TAIL_CHARS = 2500


def sandbox_env(data_dir: Path) -> dict[str, str]:
    """The child's environment: no tokens, no settings from the developer, ``DATA_DIR=data_dir``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(STRIPPED_PREFIXES) and k not in SETTING_NAMES
        # A surrounding `make test` must not hand its jobserver or level to this make.
        and k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")
    }
    env.update(dict.fromkeys(SETTING_NAMES, ""))  # masks every setting a .env may hold
    env["DATA_DIR"] = str(data_dir)
    env["HTTP_PORT"] = "0"  # the bot's own HTTP API, when it has one, must not take a fixed port
    # Gemini's breaker opens after 5 failures; with the default 30 s reset a heal that comes
    # after the drain's first retry (a loaded machine) would cost 30 s instead of 1.
    env["BREAKER_RESET_SECONDS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Terminal:
    """A command on a pseudo-terminal: type into it, expect its output, all with deadlines."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", TAKE_TERMINAL, *argv],
                cwd=REPO_ROOT,
                env=env,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                close_fds=True,
            )
        finally:
            os.close(slave)
        self.text = ""
        self._pos = 0  # expect() searches from here: each match consumes the output up to its end

    def _read(self, until: float) -> bool:
        """Read what the child wrote before ``until``; False once the child closed the terminal."""
        ready, _, _ = select.select([self.master], [], [], max(0.0, min(0.1, until - time.monotonic())))
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every process holding the pty's other side has exited
            return False
        self.text += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return bool(data)

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait for ``pattern`` (a regex) in the output not matched yet; fail with the tail on timeout."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.text, self._pos)
            if match is not None:
                self._pos = match.end()
                return match
            if time.monotonic() >= deadline or not self._read(deadline):
                raise AssertionError(
                    f"no {pattern!r} within {timeout:g} s (exit code {self.proc.poll()})\n"
                    f"--- terminal tail ---\n{self.text[-TAIL_CHARS:]}"
                )

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def press(self, key: bytes) -> None:
        os.write(self.master, key)

    def wait(self, timeout: float = 15.0) -> int:
        """The exit code, reading the output meanwhile so the child never blocks on a full pty."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(deadline)
        while self._read(time.monotonic() + 0.05):  # what is left in the pty after the exit
            pass
        if self.proc.poll() is None:
            tail = self.text[-TAIL_CHARS:]
            raise AssertionError(f"still running after {timeout:g} s\n--- terminal tail ---\n{tail}")
        return self.proc.returncode

    def close(self) -> None:
        """Kill whatever still runs (the whole session: make and the bot), then release the pty."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # setsid made the child its group's leader
            except ProcessLookupError:
                pass
            self.proc.wait(5)
        os.close(self.master)


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[list[Terminal]]:
    """Terminals a test opens (append to the list); each one's processes are killed in teardown."""
    opened: list[Terminal] = []
    yield opened
    for term in opened:
        term.close()


def assert_chat_not_drowned(term: Terminal, data_dir: Path) -> str:
    """The bot's log went to DATA_DIR/sandbox.log, not into the chat, and nothing crashed; the log."""
    assert "Traceback" not in term.text
    assert "bot.services_started" not in term.text and "[info" not in term.text
    log = (data_dir / "sandbox.log").read_text(encoding="utf-8")
    assert "bot.services_started" in log and "bot.stopped" in log
    return log


def test_make_run_without_tokens_chats_queues_through_a_gemini_outage_and_answers_late(tmp_path, terminal):
    """The newcomer's whole first session: banner, an answer, a 503 outage that queues the next
    question with an acknowledgement, a heal, the late answer, then :quit with exit code 0."""
    data_dir = tmp_path / "data"
    term = Terminal(MAKE_RUN, sandbox_env(data_dir))
    terminal.append(term)

    term.expect(r"SANDBOX: no DISCORD_TOKEN is set", timeout=30)  # a cold start imports a lot
    term.expect(r"Gemini: emulated")
    term.expect(r":help")
    term.expect(re.escape(f"Bot log: {data_dir / 'sandbox.log'}"))
    term.expect(r"put DISCORD_TOKEN and GEMINI_API_KEY in \.env")
    term.expect(r"sandbox chat as normal in #general", timeout=30)

    term.type("hello")
    term.expect(r"\[#general\] bot \(reply\): Hello! I am the sandbox Gemini")

    # Persistent until healed: every retry of the live call fails, so the message is queued.
    term.type(":fault gemini 503")
    term.expect(r"\(fault gemini #\d+ 503")
    term.type("what are you")
    term.expect(r"\[#general\] bot \(reply\): \u23f3 .*I saved your message .*will answer it here")
    term.type(":heal")
    term.expect(r"\(healed gemini, discord\)")
    term.expect(r"\[#general\] bot \(reply\): You asked earlier: > what are you", timeout=15)
    term.expect(r"I am a loopback emulator of the Gemini API")

    term.type(":quit")
    term.expect(r"Sandbox stopped\.")
    assert term.wait() == 0
    assert_chat_not_drowned(term, data_dir)


@pytest.mark.parametrize(
    ("key", "logged"), [(CTRL_D, "sandbox.quit"), (CTRL_C, "signal=SIGINT")], ids=["ctrl-d", "ctrl-c"]
)
def test_ctrl_d_and_ctrl_c_stop_the_bot_gracefully_and_exit_0(tmp_path, terminal, key, logged):
    """Ctrl-D (end of input) and Ctrl-C (SIGINT from the terminal) close the bot and the emulators.

    Run as `python -m bot run` rather than `make run`: make itself dies of the SIGINT the
    terminal sends it too, so its exit code says nothing about the bot's.
    """
    data_dir = tmp_path / "data"
    term = Terminal(BOT_RUN, sandbox_env(data_dir))
    terminal.append(term)
    term.expect(r"sandbox chat as normal in #general", timeout=30)
    term.type("hello")
    term.expect(r"bot \(reply\): Hello!")
    term.press(key)
    term.expect(r"Sandbox stopped\.")
    assert term.wait() == 0
    assert logged in assert_chat_not_drowned(term, data_dir)


def test_piped_stdin_is_read_line_by_line_and_its_answers_shown_before_exit(tmp_path):
    """Not a terminal (CI, a pipe): the lines are chatted in order, and the input's end waits for
    the bot's answers before stopping, so they are printed."""
    data_dir = tmp_path / "data"
    result = subprocess.run(
        BOT_RUN,
        cwd=REPO_ROOT,
        env=sandbox_env(data_dir),
        input="hello\n:channel dm\nwhat are you\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = result.stdout
    assert result.returncode == 0, result.stderr[-TAIL_CHARS:]
    first = out.index("[#general] bot (reply): Hello! I am the sandbox Gemini")
    second = out.index("[DM normal] bot (reply): I am a loopback emulator of the Gemini API")
    assert first < second < out.index("Sandbox stopped.")
    assert "Traceback" not in result.stderr and "[info" not in result.stderr


async def test_with_a_gemini_key_only_discord_is_emulated_and_the_banner_says_so(tmp_path):
    """GEMINI_API_KEY set: the sandbox points Discord at the emulator and leaves Gemini real."""
    from rehearsal.sandbox_mode import banner, sandbox_config
    from sandbox.__main__ import open_emulators
    from services.config import Config

    real = Config(gemini_api_key="AIza-not-a-real-key", data_dir=tmp_path / "data")
    async with open_emulators() as (discord, gemini):
        config = sandbox_config(real, discord, gemini, data_dir=tmp_path / "sandbox")
        emulated = sandbox_config(Config(), discord, gemini, data_dir=tmp_path / "sandbox")
        assert config.discord_api_base == discord.api_base
        assert config.discord_gateway_url == discord.gateway_url
        assert config.discord_token == discord.token and discord.users["admin"] in config.admin_user_ids
        assert (config.gemini_api_key, config.gemini_base_url) == ("AIza-not-a-real-key", None)
        assert (emulated.gemini_api_key, emulated.gemini_base_url) == (gemini.api_key, gemini.base_url)
    assert config.data_dir == tmp_path / "sandbox"
    assert "the real Gemini (gemini-2.5-flash)" in banner(real, tmp_path / "data" / "sandbox.log")
    assert "Gemini: emulated" in banner(Config(), tmp_path / "data" / "sandbox.log")


def test_an_unwritable_data_dir_is_one_clear_sentence_and_exit_1(tmp_path, capsys):
    from rehearsal.sandbox_mode import run_sandbox
    from services.config import Config

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    assert run_sandbox(Config(data_dir=not_a_dir)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write the sandbox log") and "DATA_DIR" in err


def test_python_m_bot_run_without_a_token_refuses_and_points_to_the_sandbox(tmp_path):
    """`python -m bot run` is the live bot only (Dockerfile, systemd): with no DISCORD_TOKEN it
    starts nothing and says how to get the sandbox, in one sentence and exit 1."""
    result = subprocess.run(
        [sys.executable, "-m", "bot", "--env-file", "/nonexistent/.env", "run"],
        cwd=REPO_ROOT,
        env=sandbox_env(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "DISCORD_TOKEN is not set" in result.stderr and "make run" in result.stderr
    assert "Traceback" not in result.stderr and "SANDBOX" not in result.stdout


def test_the_sandbox_log_rotates_so_a_long_session_cannot_fill_the_disk(tmp_path):
    """A chatty session (LOG_LEVEL=DEBUG) with a 4 KB rotation size: sandbox.log rotates into
    sandbox.log.1 ..., every file stays near the size, at most LOG_BACKUPS old files are kept."""
    result = subprocess.run(
        [sys.executable, "-c", (
            "import sys; from pathlib import Path; from services.config import Config; "
            "from rehearsal.sandbox_mode import run_sandbox; "
            "sys.exit(run_sandbox(Config(data_dir=Path(sys.argv[1]), log_level='DEBUG', http_port=0), "
            "log_max_bytes=4096))"
        ), str(tmp_path / "data")],
        cwd=REPO_ROOT,
        env=sandbox_env(tmp_path / "data"),
        input="hello\nwhat are you\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr[-TAIL_CHARS:]
    logs = sorted(p.name for p in (tmp_path / "data").glob("sandbox.log*"))
    assert logs == ["sandbox.log", "sandbox.log.1", "sandbox.log.2", "sandbox.log.3"], logs
    for name in logs:
        assert (tmp_path / "data" / name).stat().st_size <= 4096 + 8192  # one long line may overflow
