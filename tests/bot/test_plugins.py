"""The plugin host over a real ``commands.Bot`` (no gateway needed to load extensions), and the
rate-limited command sync.

Each test's plugins live in a package of its own under ``tmp_path`` (a unique name, so the
imports of one test never meet another's).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import pytest
from discord.ext import commands

from bot.plugins import (
    ENTRY_POINT_GROUP,
    CommandSyncer,
    PluginError,
    PluginHost,
    PluginLoadError,
    PluginStateError,
    UnknownPluginError,
)
from resilience.clock import FakeClock

PLUGIN = """
from discord.ext import commands


class Hello(commands.Cog):
    def version(self) -> str:
        return "{version}"


async def setup(bot):
    await bot.add_cog(Hello())
"""


@dataclass
class Plugins:
    """A plugins folder, the host over it and the bot it loads into."""

    folder: Path
    host: PluginHost
    bot: commands.Bot

    def write(self, name: str, text: str) -> None:
        (self.folder / f"{name}.py").write_text(text)

    def hello(self) -> str:
        cog: Any = self.bot.get_cog("Hello")
        assert cog is not None, "the Hello cog is not loaded"
        return str(cog.version())


@pytest.fixture
async def plugins(tmp_path: Path) -> AsyncIterator[Plugins]:
    """An empty plugins package ``plg_<random>`` in ``tmp_path``, a host and a bot; all unloaded after."""
    folder = tmp_path / f"plg_{uuid.uuid4().hex[:10]}"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    bot = commands.Bot(command_prefix="!", intents=discord.Intents.none())
    host = PluginHost(folder=folder, clock=FakeClock(), load_timeout=5.0, entry_points=lambda: [])
    host.attach(bot)
    try:
        yield Plugins(folder, host, bot)
    finally:
        await host.stop()
        for name in [m for m in sys.modules if m.startswith(folder.name)]:
            del sys.modules[name]


async def test_plugins_in_the_folder_load_at_start(plugins: Plugins) -> None:
    plugins.write("hello", PLUGIN.format(version="v1"))
    await plugins.host.start()
    assert plugins.host.loaded() == ["hello"]
    assert plugins.hello() == "v1"
    assert plugins.host.health()["ok"]


async def test_a_reload_with_a_syntax_error_keeps_the_old_version_working(plugins: Plugins) -> None:
    plugins.write("hello", PLUGIN.format(version="v1"))
    await plugins.host.start()
    plugins.write("hello", PLUGIN.format(version="v2").replace("def version", "def version(:"))
    with pytest.raises(PluginLoadError, match="SyntaxError"):
        await plugins.host.reload("hello")
    assert plugins.hello() == "v1"
    assert plugins.host.get("hello").state == "loaded"
    plugins.write("hello", PLUGIN.format(version="v3"))  # same size, same second: no stale bytecode
    await plugins.host.reload("hello")
    assert plugins.hello() == "v3"


async def test_a_reload_whose_setup_fails_keeps_the_old_version(plugins: Plugins) -> None:
    plugins.write("hello", PLUGIN.format(version="v1"))
    await plugins.host.start()
    plugins.write("hello", PLUGIN.format(version="v2") + "\n    raise RuntimeError('broken setup')\n")
    with pytest.raises(PluginLoadError, match="broken setup"):
        await plugins.host.reload("hello")
    assert plugins.hello() == "v1"


async def test_a_broken_plugin_is_skipped_and_reported(plugins: Plugins) -> None:
    plugins.write("hello", PLUGIN.format(version="v1"))
    plugins.write("broken", "import no_such_module_anywhere\n")
    await plugins.host.start()
    assert plugins.host.loaded() == ["hello"]
    broken = plugins.host.get("broken")
    assert broken.state == "failed" and "no_such_module_anywhere" in (broken.error or "")
    assert plugins.host.health()["failed"] == {"broken": broken.error}


async def test_a_required_plugin_that_fails_fails_the_start(plugins: Plugins) -> None:
    plugins.write("broken", "async def setup(bot):\n    raise RuntimeError('no')\n")
    plugins.host.required = frozenset({"broken"})
    with pytest.raises(PluginLoadError, match="broken"):
        await plugins.host.start()
    plugins.host.required = frozenset({"absent"})
    with pytest.raises(UnknownPluginError):
        await plugins.host.start()


async def test_a_plugin_whose_setup_hangs_is_cut_off_and_leaves_nothing(plugins: Plugins) -> None:
    plugins.write(
        "slow",
        "import asyncio\nfrom discord.ext import commands\n\n\nclass Slow(commands.Cog):\n    pass\n\n\n"
        "async def setup(bot):\n    await bot.add_cog(Slow())\n    await asyncio.sleep(3600)\n",
    )
    plugins.host.load_timeout = 0.2
    with pytest.raises(PluginLoadError, match="took over"):
        await plugins.host.load("slow")
    assert plugins.bot.get_cog("Slow") is None
    assert f"{plugins.folder.name}.slow" not in sys.modules


async def test_unload_and_load_again(plugins: Plugins) -> None:
    plugins.write("hello", PLUGIN.format(version="v1"))
    changes: list[str] = []
    plugins.host.attach(plugins.bot, on_change=lambda: changes.append("changed"))
    await plugins.host.start()
    assert changes == []  # the start-up syncs its commands itself
    await plugins.host.unload("hello")
    assert plugins.bot.get_cog("Hello") is None
    with pytest.raises(PluginStateError):
        await plugins.host.unload("hello")
    await plugins.host.load("hello")
    assert plugins.hello() == "v1" and changes == ["changed", "changed"]
    with pytest.raises(UnknownPluginError):
        await plugins.host.load("nothing")


async def test_syncs_after_changes_are_spaced_by_the_interval() -> None:
    clock = FakeClock()
    synced: list[float] = []
    gate = asyncio.Event()

    async def sync() -> None:
        synced.append(clock.monotonic())
        gate.set()

    syncer = CommandSyncer(sync, interval=30.0, clock=clock)
    syncer.request()
    await asyncio.wait_for(gate.wait(), 5)
    gate.clear()
    syncer.request()  # 0 s after the first: waits for its turn (FakeClock.sleep moves the time)
    syncer.request()  # folded into the one waiting
    await asyncio.wait_for(gate.wait(), 5)
    await syncer.close()
    assert synced == [1000.0, 1030.0]


async def test_installed_plugins_load_from_their_entry_points(plugins: Plugins, tmp_path: Path) -> None:
    """An entry point of the group ``gemini_bot.plugins`` names a module anywhere on the path."""
    package = tmp_path / "site" / f"ep_{uuid.uuid4().hex[:10]}"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "hello_ext.py").write_text(PLUGIN.format(version="installed"))
    sys.path.append(str(package.parent))
    try:
        plugins.host.entry_points = lambda: [
            importlib.metadata.EntryPoint("hello", f"{package.name}.hello_ext", ENTRY_POINT_GROUP)
        ]
        await plugins.host.start()
        assert plugins.hello() == "installed"
        assert plugins.host.get("hello").source == "entry point"
    finally:
        await plugins.host.stop()
        sys.path.remove(str(package.parent))
        for name in [m for m in sys.modules if m.startswith(package.name)]:
            del sys.modules[name]


async def test_an_unusable_plugins_folder_is_reported_and_fails_only_a_start_that_needs_it(
    plugins: Plugins, tmp_path: Path
) -> None:
    plugins.host.folder = tmp_path / "nowhere"
    await plugins.host.start()
    assert "does not exist" in plugins.host.health()["problem"]
    plugins.host.required = frozenset({"hello"})
    with pytest.raises(PluginError, match="does not exist"):
        await plugins.host.start()
