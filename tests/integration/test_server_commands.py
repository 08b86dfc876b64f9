"""``/server``: a guild's managers run their own guild, and only it; real discord.py against the emulator.

The emulated world has two guilds. In the first (``general``, ``random``, a thread) ``manager``
has a role with Manage Server and ``admin`` the Administrator role; in the second
(``elsewhere``) ``boss`` has the Administrator role and ``manager`` is a plain member. Each test
checks what every user saw (the emulator's record) and what the bot keeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot import texts
from bot.texts import ACK_MARK
from resilience.degradation import ItemState
from sandbox.discord_emu import ChannelRef
from sandbox.discord_state import ADMINISTRATOR, MANAGE_GUILD
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot
from tests.integration.test_slash_commands import only_text, run


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    """The bot in two guilds, with ``/server`` synced globally (see the module docstring)."""
    async with running_emulators(heartbeat_interval=1.0) as emus:
        world = emus.discord.world
        world.add_member("manager", "mia", roles=[world.add_role("Manager", MANAGE_GUILD)])
        other = world.add_guild("Elsewhere", owner="boss")
        world.add_text_channel("elsewhere", guild_id=other)
        world.add_member("boss", "bea", roles=[world.add_role("Boss", ADMINISTRATOR, guild_id=other)])
        async with live_bot(emus, tmp_path / "data") as bot:
            bot.bot.install_commands()
            await bot.bot.tree.sync()
            yield bot


def guild_of(live: Live, channel: str) -> int:
    guild = live.discord.world.channel_guild(live.discord.channels[channel])
    assert guild is not None
    return guild


async def held_by_the_drain(live: Live, count: int) -> None:
    """Wait until ``count`` pending questions were looked at by the drain and held for maintenance."""
    async with asyncio.timeout(10):
        while True:
            pending = await live.app.storage.list(ItemState.PENDING, 100)
            if sum(item.last_error == "guild maintenance" for item in pending) >= count:
                return
            await asyncio.sleep(0.02)


SERVER_COMMANDS: list[dict[str, Any]] = [
    {"maintenance": {"on": {}}},
    {"maintenance": {"off": {}}},
    {"maintenance": {"status": {}}},
    {"channels": {"list": {}}},
    {"channels": {"add": {"channel": "random"}}},
    {"channels": {"remove": {"channel": "random"}}},
    {"tools": {"status": {}}},
    {"tools": {"on": {"tool": "google_search"}}},
    {"tools": {"off": {"tool": "code_execution"}}},
]


def resolve(live: Live, options: dict[str, Any]) -> dict[str, Any]:
    """Channel names in the options become channel option values."""
    resolved: dict[str, Any] = {}
    for key, value in options.items():
        if isinstance(value, dict):
            value = resolve(live, value)
        elif key == "channel":
            value = ChannelRef(live.discord.channels[value])
        resolved[key] = value
    return resolved


def command_id(options: dict[str, Any]) -> str:
    return " ".join([*options, *next(iter(options.values()))])


# -- guild maintenance ---------------------------------------------------------------------------


async def test_a_guilds_maintenance_holds_only_that_guild_and_answers_its_questions_after(live: Live) -> None:
    on = await run(live, "server", {"maintenance": {"on": {"message": "Moving house."}}}, user="manager")
    assert only_text(on).startswith("Maintenance mode is on for this server. Members here see: Moving house.")

    # This guild: the notice, and the message is saved (a mention, and an /ask).
    asked = await live.say("question from the first guild")
    [ack] = await live.wait_replies(asked["id"])
    assert ack.content.startswith(ACK_MARK) and "Moving house." in ack.content
    slash = await run(live, "ask", {"prompt": "slash question from the first guild"})
    assert "Moving house." in only_text(slash)

    # Another guild: answered at once, as usual.
    elsewhere = live.discord.channels["elsewhere"]
    other = await live.say("hello from the other guild", channel=elsewhere)
    [answer] = await live.wait_replies(other["id"], channel=elsewhere)
    assert answer.content.startswith("Echo") and "hello from the other guild" in answer.content
    assert live.app.maintenance() is None and live.app.maintenance(guild_of(live, "elsewhere")) is None

    # The drain looked at the conversation's first saved question and held it (the second waits
    # behind it): still no answer.
    await held_by_the_drain(live, 1)
    assert (await live.app.storage.stats(now=live.app.clock.time())).pending() == 2
    assert live.replies_to(asked["id"]) == [ack]
    assert not any("slash question" in m.content for m in live.sent())

    off = await run(live, "server", {"maintenance": {"off": {}}}, user="manager")
    assert only_text(off).startswith("Maintenance mode is off for this server.")
    [late] = await live.wait_replies(asked["id"], answers_only=True)
    assert late.content.startswith("You asked earlier") and "question from the first guild" in late.content
    await live.discord.wait_until(lambda: any("slash question" in m.content for m in live.sent()), 10)


async def test_guild_maintenance_status_names_the_notice_and_the_bot_wide_maintenance(live: Live) -> None:
    off = await run(live, "server", {"maintenance": {"status": {}}}, user="admin")
    assert only_text(off) == "Maintenance mode is off for this server."
    await run(live, "server", {"maintenance": {"on": {}}}, user="admin")
    await live.bot.operations.maintenance_on("Everyone waits.", by="test")  # the owners' own switch
    status = only_text(await run(live, "server", {"maintenance": {"status": {}}}, user="manager"))
    assert status.startswith("Maintenance mode is on for this server.")
    assert "owners have also turned maintenance on for every server" in status


async def test_status_shows_a_guilds_maintenance_in_that_guild_only(live: Live) -> None:
    await run(live, "server", {"maintenance": {"on": {"message": "Moving house."}}}, user="manager")
    [here] = (await run(live, "status")).followups[0].embeds
    fields = {f["name"]: f["value"] for f in here["fields"]}
    assert fields["This server"] == "maintenance (set by this server's managers): Moving house."
    assert fields["Mode"].startswith("normal")  # the bot as a whole is not in maintenance
    [there] = (await run(live, "status", channel_id=live.discord.channels["elsewhere"])).followups[0].embeds
    assert "This server" not in {f["name"] for f in there["fields"]}


async def test_a_manager_cannot_act_on_another_guild(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    elsewhere = live.discord.channels["elsewhere"]
    refused = await run(live, "server", {"maintenance": {"on": {}}}, user="manager", channel_id=elsewhere)
    [refusal] = refused.followups
    assert refusal.ephemeral and refusal.content == texts.managers_only()
    assert live.app.maintenance(guild_of(live, "elsewhere")) is None
    [line] = [line for line in capsys.readouterr().out.splitlines() if "command.refused" in line]
    assert str(live.discord.users["manager"]) in line and "manage_guild" in line

    # That guild's own Administrator may; the first guild is untouched by it.
    on = await run(live, "server", {"maintenance": {"on": {}}}, user="boss", channel_id=elsewhere)
    assert only_text(on).startswith("Maintenance mode is on for this server.")
    assert live.app.maintenance(guild_of(live, "elsewhere")) is not None
    assert live.app.maintenance(guild_of(live, "general")) is None
    asked = await live.say("still answered here?")
    [answer] = await live.wait_replies(asked["id"])
    assert answer.content.startswith("Echo") and "still answered here?" in answer.content


@pytest.mark.parametrize("options", SERVER_COMMANDS, ids=command_id)
async def test_a_member_without_manage_server_is_refused_every_server_command(
    live: Live, options: dict[str, Any]
) -> None:
    record = await run(live, "server", resolve(live, options), user="normal")
    [refusal] = record.followups
    assert refusal.ephemeral and refusal.content == texts.managers_only()
    assert live.app.maintenance(guild_of(live, "general")) is None
    assert live.app.chat_channels(guild_of(live, "general")) == frozenset()


async def test_server_commands_in_a_dm_are_refused(live: Live) -> None:
    dm = live.discord.dm_channel("manager")
    record = await run(live, "server", {"maintenance": {"on": {}}}, user="manager", channel_id=dm)
    assert record.ephemeral and only_text(record) == texts.server_only()


# -- chat channels --------------------------------------------------------------------------------


async def test_a_manager_lists_adds_and_removes_the_guilds_chat_channels(live: Live) -> None:
    random = live.discord.channels["random"]
    empty = await run(live, "server", {"channels": {"list": {}}}, user="manager")
    assert only_text(empty).startswith("No chat channels")

    add = resolve(live, {"channels": {"add": {"channel": "random"}}})
    added = await run(live, "server", add, user="manager")
    assert only_text(added).startswith(f"I now answer every message in <#{random}>.")
    assert f"<#{random}>" in only_text(await run(live, "server", {"channels": {"list": {}}}, user="manager"))
    chatted = await live.say("no mention needed here", channel=random, mention=False)
    [answer] = await live.wait_replies(chatted["id"], channel=random)
    assert "no mention needed here" in answer.content

    removed = await run(
        live, "server", resolve(live, {"channels": {"remove": {"channel": "random"}}}), user="manager"
    )
    assert only_text(removed).startswith(f"In <#{random}> I answer only mentions and replies now.")
    ignored = await live.say("not for the bot any more", channel=random, mention=False)
    probe = await live.say("probe", channel=random)
    await live.wait_replies(probe["id"], channel=random)
    assert live.replies_to(ignored["id"], channel=random) == []
    stored = await live.app.datastore.get("guild_settings")
    assert stored["guilds"][str(guild_of(live, "random"))]["chat_channels"] == []


async def test_a_chat_channel_must_be_a_text_channel_or_thread(live: Live) -> None:
    voice = live.discord.world.add_text_channel("voice")
    live.discord.world.channel_data[voice]["type"] = 2  # what Discord resolves for a voice channel
    record = await run(live, "server", {"channels": {"add": {"channel": ChannelRef(voice)}}}, user="manager")
    assert only_text(record) == "Pick a text channel or a thread: I can only chat there."
    assert live.app.chat_channels(guild_of(live, "general")) == frozenset()
