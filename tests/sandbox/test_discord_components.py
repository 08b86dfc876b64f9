"""Message components in the Discord emulator, against a real discord.py client.

Buttons sent on messages and changed by edits, Discord's refusals of malformed components, a
member's click as a MESSAGE_COMPONENT interaction (type 3) and its responses (6: deferred update,
7: update message, 4: a message), edits that attach files, and a click on a button drawn by an
earlier client reaching a fresh client's persistent view (fixed ``custom_id``, ``add_view``).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator

import discord
import pytest

from bot.views import REGENERATE_ID, STOP_ID, AnswerButtons, regenerate_buttons, stop_buttons
from sandbox.discord_emu import DiscordEmulator
from sandbox.faults import FaultPlan
from tests.integration.harness import pointed_at
from tests.sandbox.test_discord_emulator import make_bot, running


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    """A started emulator with a 0.1 s heartbeat, discord.py pointed at it."""
    async with DiscordEmulator(faults=FaultPlan(), heartbeat_interval=0.1) as emulator:
        with pointed_at(emulator):
            yield emulator


async def test_buttons_go_out_with_a_message_and_an_edit_replaces_or_removes_them(
    emu: DiscordEmulator,
) -> None:
    async with running(emu) as r:
        channel = r.bot.get_channel(emu.channels["general"])
        assert isinstance(channel, discord.TextChannel)
        sent = await channel.send("writing...", view=stop_buttons())
        [recorded] = emu.sent_messages(channel.id)
        assert recorded.custom_ids == [STOP_ID]
        assert recorded.components[0]["components"][0]["label"] == "Stop"
        await channel.get_partial_message(sent.id).edit(content="written", view=regenerate_buttons())
        assert recorded.custom_ids == [REGENERATE_ID] and recorded.content == "written"
        await channel.get_partial_message(sent.id).edit(content="plain", view=None)
        assert recorded.custom_ids == []
        # a drawn view is not kept by discord.py (it would be, per message, for ever)
        assert not r.bot._connection._view_store.is_message_tracked(sent.id)


async def test_malformed_components_are_refused_like_discord(emu: DiscordEmulator) -> None:
    async with running(emu) as r:
        http = r.bot.http
        channel = emu.channels["general"]
        button = {"type": 2, "style": 1, "label": "x", "custom_id": "a"}
        bad = [
            [button],  # a button outside an action row
            [{"type": 1, "components": [button, button]}],  # the same custom_id twice
            [{"type": 1, "components": [{**button, "custom_id": "x" * 101}]}],
            [{"type": 1, "components": []}],
            [{"type": 1, "components": [button]}] * 6,
        ]
        for components in bad:
            route = discord.http.Route("POST", "/channels/{channel_id}/messages", channel_id=channel)
            with pytest.raises(discord.HTTPException) as info:
                await http.request(route, json={"content": "hi", "components": components})
            assert (info.value.status, info.value.code) == (400, 50035)
        assert emu.sent_messages(channel) == []


async def test_a_click_is_a_component_interaction_that_the_persistent_view_of_a_fresh_client_handles(
    emu: DiscordEmulator,
) -> None:
    """One client draws a Stop button and leaves; a new client (a restarted bot) adds the
    persistent view at start-up and gets the click on the old message, with who clicked and the
    message; its deferred update (6) changes nothing, a refusal (4) is private."""
    async with running(emu) as first:
        channel = first.bot.get_channel(emu.channels["general"])
        assert isinstance(channel, discord.TextChannel)
        message = await channel.send("being written", view=stop_buttons())

    clicks: list[tuple[str, int, int | None]] = []

    async def on_stop(interaction: discord.Interaction) -> None:
        clicks.append(("stop", interaction.user.id, interaction.message.id if interaction.message else None))
        await interaction.response.defer()

    async def on_regenerate(interaction: discord.Interaction) -> None:
        clicks.append(("regenerate", interaction.user.id, None))
        await interaction.response.send_message("no", ephemeral=True)

    bot = make_bot()

    async def setup_hook() -> None:
        bot.add_view(AnswerButtons(on_stop=on_stop, on_regenerate=on_regenerate))

    bot.setup_hook = setup_hook  # type: ignore[method-assign]
    async with running(emu, bot):
        record = await emu.click_button(emu.channels["general"], message.id, STOP_ID, user="normal")
        await emu.wait_until(lambda: record.acknowledged, timeout=3)
        assert clicks == [("stop", emu.users["normal"], message.id)]
        assert record.callback_type == 6 and not record.ephemeral
        assert record.payload["type"] == 3 and record.payload["data"]["custom_id"] == STOP_ID
        assert emu.sent_messages(emu.channels["general"])[0].content == "being written"
        with pytest.raises(KeyError):  # the message shows no Regenerate button: nobody can click one
            await emu.click_button(emu.channels["general"], message.id, REGENERATE_ID)


async def test_update_message_responses_and_member_permissions_in_the_channel(emu: DiscordEmulator) -> None:
    """A response of type 7 edits the clicked message at once; the click carries the member's
    permissions in that channel (an administrator may manage messages, a member may not)."""
    seen: dict[str, bool] = {}

    async def on_stop(interaction: discord.Interaction) -> None:
        seen[interaction.user.name] = interaction.permissions.manage_messages
        await interaction.response.edit_message(content="stopped", view=None)

    async def ignore(interaction: discord.Interaction) -> None:
        await interaction.response.defer()

    bot = make_bot()

    async def setup_hook() -> None:
        bot.add_view(AnswerButtons(on_stop=on_stop, on_regenerate=ignore))

    bot.setup_hook = setup_hook  # type: ignore[method-assign]
    async with running(emu, bot) as r:
        channel = r.bot.get_channel(emu.channels["general"])
        assert isinstance(channel, discord.TextChannel)
        one = await channel.send("a", view=stop_buttons())
        two = await channel.send("b", view=stop_buttons())
        first = await emu.click_button(channel.id, one.id, STOP_ID, user="normal")
        second = await emu.click_button(channel.id, two.id, STOP_ID, user="admin")
        await emu.wait_until(lambda: first.acknowledged and second.acknowledged, timeout=3)
        assert first.callback_type == 7
        assert [(m.content, m.custom_ids) for m in emu.sent_messages(channel.id)] == [("stopped", [])] * 2
        assert seen == {"bob": False, "alice": True}


async def test_an_edit_can_attach_files_and_the_attachments_become_exactly_those_listed(
    emu: DiscordEmulator,
) -> None:
    async with running(emu) as r:
        channel = r.bot.get_channel(emu.channels["general"])
        assert isinstance(channel, discord.TextChannel)
        sent = await channel.send("an answer")
        for _ in range(2):  # an edit resent after a lost response attaches its file once
            await channel.get_partial_message(sent.id).edit(
                content="an answer, with a file",
                attachments=[discord.File(io.BytesIO(b"# all"), "answer.md")],
            )
        [recorded] = emu.sent_messages(channel.id)
        assert recorded.files == {"answer.md": b"# all"} and recorded.attachments == ["answer.md"]
        fetched = await channel.fetch_message(sent.id)
        assert [a.filename for a in fetched.attachments] == ["answer.md"]
        assert await fetched.attachments[0].read() == b"# all"
        await channel.get_partial_message(sent.id).edit(content="no file now", attachments=[])
        assert recorded.files == {} and (await channel.fetch_message(sent.id)).attachments == []


async def test_a_component_response_to_a_slash_command_is_refused(emu: DiscordEmulator) -> None:
    """6 and 7 update a component's message: a slash command has none (400 50035)."""
    async with running(emu) as r:
        record = await emu.send_interaction("ask", {"prompt": "x"})
        route = discord.http.Route(
            "POST", "/interactions/{id}/{token}/callback", id=record.id, token=record.token
        )
        with pytest.raises(discord.HTTPException) as info:
            await r.bot.http.request(route, json={"type": 6})
        assert (info.value.status, info.value.code) == (400, 50035)
        await asyncio.sleep(0)
