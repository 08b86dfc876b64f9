"""Guarded self-modification: the checks on a patch, the plugin's tests in a subprocess, apply with
an atomic reload, and revert. Gemini is the sandbox's responder (deterministic file edits), called
directly; the Discord side is in tests/integration/test_plugins.py.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.ext import commands

from bot.plugins import PluginHost
from bot.selfmod import (
    ProposalBook,
    SelfModifier,
    SelfModifyDisabledError,
    SelfModifyError,
    check_source,
    extract_code,
)
from resilience.clock import FakeClock
from sandbox.responder import reply

PLUGIN = '''"""A plugin that answers ping."""

from discord.ext import commands


def answer() -> str:
    return "pong v1"


class Ping(commands.Cog):
    def answer(self) -> str:
        return answer()


async def setup(bot):
    await bot.add_cog(Ping())
'''

PLUGIN_TEST = """from {package}.ping import answer


def test_it_answers_pong() -> None:
    assert answer().startswith("pong")
"""


async def sandbox_gemini(prompt: str) -> str:
    """The Gemini emulator's answer to ``prompt`` (its file edits are deterministic)."""
    return reply({"contents": [{"role": "user", "parts": [{"text": prompt}]}]})


@dataclass
class Setup:
    folder: Path
    host: PluginHost
    bot: commands.Bot
    selfmod: SelfModifier

    @property
    def file(self) -> Path:
        return self.folder / "ping.py"

    def answer(self) -> str:
        cog: Any = self.bot.get_cog("Ping")
        return str(cog.answer())


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    """A plugins package with ``ping`` and its test, loaded in a bot; self-modification on."""
    folder = tmp_path / "src" / f"plg_{uuid.uuid4().hex[:10]}"
    (folder / "tests").mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "tests" / "__init__.py").write_text("")
    (folder / "ping.py").write_text(PLUGIN)
    (folder / "tests" / "test_ping.py").write_text(PLUGIN_TEST.format(package=folder.name))
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.none())
    host = PluginHost(folder=folder, clock=FakeClock(), entry_points=lambda: [])
    host.attach(bot)
    await host.start()
    selfmod = SelfModifier(
        host,
        ProposalBook(tmp_path / "data" / "self_modify.json"),
        ask=sandbox_gemini,
        clock=FakeClock(),
        enabled=True,
        test_timeout=60.0,
    )
    try:
        yield Setup(folder, host, bot, selfmod)
    finally:
        await host.stop()
        for name in [m for m in sys.modules if m.startswith(folder.name)]:
            del sys.modules[name]


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("import os\n", "imports os"),
        ("from os import path\n", "imports from os"),
        ("import subprocess\n", "imports subprocess"),
        ("eval('1')\n", "uses eval"),
        ("exec('x = 1')\n", "uses exec"),
        ("compile('1', 'f', 'eval')\n", "uses compile"),
        ("__import__('os')\n", "uses __import__"),
        ("open('/etc/passwd')\n", "uses open"),
        ("import asyncio\nasyncio.create_subprocess_exec('ls')\n", "create_subprocess_exec"),
        ("x = ().__class__\n", "private attribute __class__"),
        ("import discord\nx = discord.utils.os\n", "uses .os"),
        ("import asyncio\nasyncio.get_running_loop().subprocess_exec\n", "uses .get_running_loop"),
        ("s = '{0.__globals__}'.format(len)\n", "a string with a dunder"),
        ("from . import other\n", "relative import"),
        ("def f(:\n", "does not parse"),
        ("x = 1\n" * 20_000, "bytes, over"),
    ],
)
def test_a_patch_that_reaches_outside_the_plugin_api_is_refused(source: str, why: str) -> None:
    problems = check_source(source)
    assert any(why in p for p in problems), problems


def test_a_discord_tasks_loop_is_allowed() -> None:
    assert (
        check_source(
            "from discord.ext import tasks\n\n\n@tasks.loop(seconds=5)\nasync def tick():\n    pass\n"
        )
        == []
    )


def test_the_example_plugin_passes_the_checks() -> None:
    assert check_source((Path(__file__).parents[2] / "plugins" / "remind.py").read_text()) == []
    assert check_source(PLUGIN) == []


def test_the_code_is_taken_from_the_answers_fence() -> None:
    assert extract_code("Here:\n```python\nx = 1\n```\nDone.") == "x = 1\n"
    assert extract_code("x = 2") == "x = 2\n"


async def test_a_proposal_importing_os_is_refused_and_nothing_changes(setup: Setup) -> None:
    proposal = await setup.selfmod.propose("ping", 'prepend line "import os"', by="owner")
    assert proposal.state == "refused" and "imports os" in proposal.reason
    assert setup.file.read_text() == PLUGIN
    with pytest.raises(SelfModifyError, match="refused, not ready"):
        await setup.selfmod.apply(proposal.id, by="owner")


async def test_a_proposal_that_breaks_the_plugins_test_is_never_applied(setup: Setup) -> None:
    proposal = await setup.selfmod.propose("ping", 'replace "pong v1" with "pang"', by="owner")
    assert proposal.state == "refused" and proposal.reason == "the plugin's tests failed"
    assert "1 failed" in proposal.tests
    with pytest.raises(SelfModifyError):
        await setup.selfmod.apply(proposal.id, by="owner")
    assert setup.file.read_text() == PLUGIN and setup.answer() == "pong v1"


async def test_an_applied_proposal_changes_the_running_plugin_and_revert_restores_it(setup: Setup) -> None:
    proposal = await setup.selfmod.propose("ping", 'replace "pong v1" with "pong v2"', by="owner")
    assert proposal.state == "ready", proposal.reason
    assert '-    return "pong v1"' in proposal.diff and '+    return "pong v2"' in proposal.diff
    assert setup.file.read_text() == PLUGIN  # nothing is written before Apply
    done = await setup.selfmod.apply(proposal.id, by="owner")
    assert done.state == "applied" and done.decided_by == "owner"
    assert setup.answer() == "pong v2"
    # Recorded on disk: who, when, the diff; a second process (a restart) can revert it.
    book = ProposalBook(setup.selfmod.book.path)
    assert book.get(proposal.id).previous_source == PLUGIN
    await setup.selfmod.revert("ping", by="owner")
    assert setup.file.read_text() == PLUGIN and setup.answer() == "pong v1"
    with pytest.raises(SelfModifyError, match="no applied change"):
        await setup.selfmod.revert("ping", by="owner")


async def test_apply_refuses_when_the_file_changed_since_the_proposal(setup: Setup) -> None:
    proposal = await setup.selfmod.propose("ping", 'replace "pong v1" with "pong v2"', by="owner")
    setup.file.write_text(PLUGIN.replace("v1", "v9"))
    with pytest.raises(SelfModifyError, match="changed since"):
        await setup.selfmod.apply(proposal.id, by="owner")


async def test_a_core_file_or_an_unknown_plugin_is_refused(setup: Setup, tmp_path: Path) -> None:
    setup.host.folder = Path(__file__).parents[2] / "bot"
    with pytest.raises(SelfModifyError):
        setup.selfmod.plugin_file("client")
    setup.host.folder = setup.folder
    with pytest.raises(Exception, match="no plugin called"):
        await setup.selfmod.propose("nothing", "anything", by="owner")


async def test_self_modification_is_off_unless_enabled(setup: Setup) -> None:
    setup.selfmod.enabled = False
    with pytest.raises(SelfModifyDisabledError):
        await setup.selfmod.propose("ping", 'replace "pong" with "pang"', by="owner")
