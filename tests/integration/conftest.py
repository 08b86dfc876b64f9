"""Fixtures for integration tests that run the whole bot as a child process.

- ``emulators``: the Discord and Gemini emulators on loopback (short heartbeat), stopped after.
- ``bot_env``: the child's environment, pointed at them, with nothing of the developer's setup.
- ``spawn_bot``: starts ``python -m bot run`` children; every one is SIGKILLed in teardown.

See ``tests/integration/harness.py`` for :class:`BotProcess` (``wait_ready``, ``kill``,
``terminate``, ``logs``, ``assert_clean_logs``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.integration.harness import BotProcess, Emulators, bot_environment, running_emulators

SpawnBot = Callable[..., BotProcess]


@pytest.fixture
async def emulators() -> AsyncIterator[Emulators]:
    """Both emulators on 127.0.0.1 port 0 (gateway heartbeat 1 s), stopped cleanly after the test."""
    async with running_emulators() as emus:
        yield emus


@pytest.fixture
def bot_env(emulators: Emulators, tmp_path: Path) -> dict[str, str]:
    """Environment for a bot child: emulator URLs, token and key, ``DATA_DIR=tmp_path/data``,
    ``HTTP_PORT=0``, JSON logs, test-sized timeouts; no real ``DISCORD_``/``GEMINI_``/``ADMIN_``
    variables. Edit the returned dict (or pass ``env=`` to ``spawn_bot``) to change a setting.
    """
    return bot_environment(emulators, tmp_path / "data")


@pytest.fixture
def spawn_bot(emulators: Emulators, bot_env: dict[str, str], tmp_path: Path) -> Iterator[SpawnBot]:
    """``spawn_bot(args=("run",), *, env=None, program=None) -> BotProcess``: start a bot child.

    The child runs in ``tmp_path`` with ``--env-file`` naming an absent file, and its
    session count is noted, so ``await bot.wait_ready(emulators)`` waits for *its* login
    (also after a kill and restart). Every child is SIGKILLed and reaped in teardown,
    before the emulators stop.
    """
    started: list[BotProcess] = []

    def spawn(
        args: Sequence[str] = ("run",),
        *,
        env: Mapping[str, str] | None = None,
        program: Sequence[str] | None = None,
        name: str = "bot",
    ) -> BotProcess:
        proc = BotProcess(bot_env if env is None else env, args, tmp_path, program=program, name=name)
        started.append(proc)
        return proc.start(emulators)

    yield spawn
    for proc in started:
        proc.kill()
