"""Plugins and guarded self-modification through Discord: real discord.py against the emulators.

The plugin ``ping`` lives in a plugins package of the test's own (``PLUGINS_DIR``), with a test
that a proposal must pass; the Gemini emulator edits files deterministically (``replace "A" with
"B"``, ``prepend line "X"``: ``sandbox.responder.edit_file``). ``/remind`` is the repository's
plugin, on a stepped clock that the test moves.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from resilience.degradation import ItemState
from sandbox.discord_emu import InteractionRecord, SentMessage
from tests.clocks import SteppedClock
from tests.integration.harness import Emulators, running_emulators
from tests.integration.test_pipeline import Live, live_bot

PING = '''"""Answers /pingx."""

import discord
from discord import app_commands
from discord.ext import commands


def answer() -> str:
    return "pong v1"


class Ping(commands.Cog):
    @app_commands.command(name="pingx", description="Ping the plugin")
    async def pingx(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(answer(), ephemeral=True)


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Ping())
'''

PING_TEST = """from {package}.ping import answer


def test_it_answers_pong() -> None:
    assert answer().startswith("pong")
"""


@dataclass
class World:
    emus: Emulators
    folder: Path
    data: Path
    owner: int

    @property
    def ping(self) -> Path:
        return self.folder / "ping.py"

    def settings(self, **more: str) -> dict[str, str]:
        return {
            "PLUGINS_DIR": str(self.folder),
            "PLUGINS": "*",
            "ADMIN_USER_IDS": str(self.owner),
            "SELF_MODIFY": "1",
            "COMMAND_SYNC_INTERVAL_SECONDS": "0",
            **more,
        }


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    """Fresh emulators with an owner (``ADMIN_USER_IDS``), and a plugins package holding ``ping``."""
    folder = tmp_path / "src" / f"plg_{uuid.uuid4().hex[:10]}"
    (folder / "tests").mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "tests" / "__init__.py").write_text("")
    (folder / "ping.py").write_text(PING)
    (folder / "tests" / "test_ping.py").write_text(PING_TEST.format(package=folder.name))
    async with running_emulators(heartbeat_interval=1.0) as emus:
        owner = emus.discord.world.add_member("owner", "carol")
        yield World(emus, folder, tmp_path / "data", owner)


@pytest.fixture
async def live(world: World) -> AsyncIterator[Live]:
    async with live_bot(world.emus, world.data, **world.settings()) as bot:
        await bot.bot.tree.sync()
        yield bot


async def run(live: Live, name: str, options: dict[str, Any] | None = None, **kw: Any) -> InteractionRecord:
    """Run a command and wait for what the user sees (a follow-up, or a direct response)."""
    record = await live.discord.send_interaction(name, options, **kw)
    await live.discord.wait_until(lambda: bool(record.followups) or record.callback_type == 4, 30)
    return record


async def said(live: Live, name: str, options: dict[str, Any] | None = None, **kw: Any) -> str:
    return "\n".join((await run(live, name, options, **kw)).texts())


async def test_a_plugin_reload_with_a_syntax_error_keeps_the_old_version_answering(
    live: Live, world: World
) -> None:
    assert await said(live, "pingx") == "pong v1"
    world.ping.write_text(PING.replace("pong v1", "pong v2").replace("def answer()", "def answer(:"))
    text = await said(live, "admin", {"plugin": {"reload": {"name": "ping"}}}, user="owner")
    assert "failed to load" in text and "SyntaxError" in text and "still loaded and working" in text
    assert await said(live, "pingx") == "pong v1"
    world.ping.write_text(PING.replace("pong v1", "pong v3"))
    assert "is reloaded" in await said(live, "admin", {"plugin": {"reload": {"name": "ping"}}}, user="owner")
    assert await said(live, "pingx") == "pong v3"
    listing = await said(live, "admin", {"plugin": {"list": {}}}, user="owner")
    assert "`ping` (folder): loaded" in listing


async def test_plugin_commands_are_for_owners_only(live: Live) -> None:
    text = await said(live, "admin", {"plugin": {"unload": {"name": "ping"}}}, user="normal")
    assert "owner" in text.lower()
    assert await said(live, "pingx") == "pong v1"


async def test_unload_removes_the_plugins_command_and_load_brings_it_back(live: Live) -> None:
    assert "is unloaded" in await said(live, "admin", {"plugin": {"unload": {"name": "ping"}}}, user="owner")
    assert live.bot.tree.get_command("pingx") is None
    assert "is loaded" in await said(live, "admin", {"plugin": {"load": {"name": "ping"}}}, user="owner")
    assert await said(live, "pingx") == "pong v1"
    await live.discord.wait_until(lambda: live.bot.command_syncer.syncs >= 2, 10)


async def test_a_proposal_importing_os_is_refused(live: Live, world: World) -> None:
    text = await said(
        live, "admin", {"propose": {"plugin": "ping", "change": 'prepend line "import os"'}}, user="owner"
    )
    assert "Refused" in text and "imports os" in text and "Nothing was changed" in text
    assert world.ping.read_text() == PING


async def test_a_proposal_that_breaks_the_plugins_test_is_never_applied(live: Live, world: World) -> None:
    record = await run(
        live,
        "admin",
        {"propose": {"plugin": "ping", "change": 'replace "pong v1" with "pang"'}},
        user="owner",
    )
    [shown] = record.followups
    assert "the plugin's tests failed" in shown.content
    assert not shown.payload.get("components")  # no Apply button to press
    assert world.ping.read_text() == PING
    assert await said(live, "pingx") == "pong v1"


async def test_an_applied_proposal_changes_the_plugin_and_revert_restores_it(
    live: Live, world: World
) -> None:
    record = await run(
        live,
        "admin",
        {"propose": {"plugin": "ping", "change": 'replace "pong v1" with "pong v2"'}},
        user="owner",
    )
    [shown] = record.followups
    assert '+    return "pong v2"' in shown.content
    buttons = {c["label"]: c["custom_id"] for row in shown.payload["components"] for c in row["components"]}
    assert world.ping.read_text() == PING  # nothing is written before Apply

    refused = await live.discord.click_button(record.channel_id, shown.id, buttons["Apply"], user="normal")
    await live.discord.wait_until(lambda: bool(refused.followups), 10)
    assert world.ping.read_text() == PING

    click = await live.discord.click_button(record.channel_id, shown.id, buttons["Apply"], user="owner")
    await live.discord.wait_until(lambda: bool(click.followups), 30)
    assert "Applied proposal" in click.texts()[-1]
    assert await said(live, "pingx") == "pong v2"

    text = await said(live, "admin", {"plugin": {"revert": {"name": "ping"}}}, user="owner")
    assert "as it was before" in text
    assert world.ping.read_text() == PING
    assert await said(live, "pingx") == "pong v1"


async def test_proposals_are_refused_while_self_modification_is_off(world: World) -> None:
    async with live_bot(world.emus, world.data, **world.settings(SELF_MODIFY="0")) as live:
        await live.bot.tree.sync()
        text = await said(
            live, "admin", {"propose": {"plugin": "ping", "change": 'replace "v1" with "v2"'}}, user="owner"
        )
    assert "self-modification is off" in text.lower()


# -- /remind -------------------------------------------------------------------------------------


def reminders_shown(live: Live) -> list[SentMessage]:
    return [m for m in live.sent() if "Reminder: stretch" in m.content]


async def settled(live: Live) -> bool:
    """Whether the queue has nothing waiting or being sent: the drain has settled every notice (a
    bounded look, 10 s at most)."""
    for _ in range(200):
        storage = live.app.storage
        if not await storage.list(ItemState.PENDING) and not await storage.list(ItemState.CLAIMED):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_reminders_survive_a_restart_and_fire_once(tmp_path: Path) -> None:
    clock = SteppedClock()
    data = tmp_path / "data"
    settings = {"PLUGINS": "remind"}
    async with running_emulators(heartbeat_interval=1.0) as emus:
        async with live_bot(emus, data, clock=clock, **settings) as live:
            await live.bot.tree.sync()
            text = await said(live, "remind", {"me": {"when": "10m", "what": "stretch"}})
            assert "in 10 minutes" in text
        clock.advance(601)  # due while the bot was down
        async with live_bot(emus, data, clock=clock, **settings) as live:
            cog: Any = live.bot.get_cog("Reminders")
            cog.wake()
            await live.discord.wait_until(lambda: bool(reminders_shown(live)), 10)
            [shown] = reminders_shown(live)
            assert shown.content.startswith(f"<@{emus.discord.users['normal']}>")
            assert shown.pings == {f"user:{emus.discord.users['normal']}"}
            # Looked at again, nothing is due, and the delivered notice left nothing in the queue.
            assert await cog.desk.fire_due() == 0
            assert await settled(live)
            assert len(reminders_shown(live)) == 1
        async with live_bot(emus, data, clock=clock, **settings) as live:
            cog = live.bot.get_cog("Reminders")
            assert await cog.desk.fire_due() == 0  # after a restart too
            assert len(reminders_shown(live)) == 1
            assert "no reminders waiting" in await said(live, "remind", {"list": {}})


async def test_a_plugin_gives_gemini_a_function_and_takes_it_away_when_unloaded(tmp_path: Path) -> None:
    """The remind plugin registers ``set_reminder`` in ``app.tools``: Gemini calls it, the reminder is
    stored for the asker; unloaded, the function is no longer offered."""
    async with running_emulators(heartbeat_interval=1.0) as emus:
        async with live_bot(emus, tmp_path / "data", PLUGINS="remind", TOOLS_DEFAULT="write") as live:
            asked = await live.say('use tools: set_reminder{"when": "10m", "what": "stretch"}')
            [reply] = await live.wait_replies(asked["id"], timeout=15)
            assert "I'll remind you in 10 minutes" in reply.content
            [stored] = await live.app.storage.user_reminders(emus.discord.users["normal"])
            assert stored.text == "stretch"
            await live.app.plugins.unload("remind")
            assert live.app.tools.get("set_reminder") is None


async def test_apply_works_on_a_proposal_shown_before_a_restart(world: World) -> None:
    """The buttons' custom_id names the proposal, and the proposal is kept in DATA_DIR: a bot
    started after the one that showed it applies it."""
    async with live_bot(world.emus, world.data, **world.settings()) as live:
        await live.bot.tree.sync()
        record = await run(
            live,
            "admin",
            {"propose": {"plugin": "ping", "change": 'replace "pong v1" with "pong v2"'}},
            user="owner",
        )
        [shown] = record.followups
    apply = next(c["custom_id"] for row in shown.payload["components"] for c in row["components"])
    async with live_bot(world.emus, world.data, **world.settings()) as live:
        click = await live.discord.click_button(record.channel_id, shown.id, apply, user="owner")
        await live.discord.wait_until(lambda: bool(click.followups), 30)
        assert "Applied proposal" in click.texts()[-1]
        assert await said(live, "pingx") == "pong v2"
        again = await live.discord.click_button(record.channel_id, shown.id, apply, user="owner")
        await live.discord.wait_until(lambda: bool(again.followups), 30)
        assert "is applied, not ready" in again.texts()[-1]
