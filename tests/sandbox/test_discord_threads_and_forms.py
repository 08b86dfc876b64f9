"""The Discord emulator's categories, forums, threads, autocomplete and modals against a real, unpatched
discord.py bot: what discord.py makes of them, and what the emulator refuses as Discord does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import discord
import pytest
from discord import app_commands

from sandbox.discord_emu import DiscordEmulator
from sandbox.discord_state import CREATE_PUBLIC_THREADS
from sandbox.faults import FaultPlan
from tests.integration.harness import pointed_at
from tests.sandbox.test_discord_emulator import make_bot, running


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    """A started emulator with a category holding ``study`` and the forum ``help``."""
    async with DiscordEmulator(faults=FaultPlan(), heartbeat_interval=0.1) as emulator:
        world = emulator.world
        category = world.add_category("Courses")
        world.add_text_channel("study", category=category)
        world.add_forum_channel("help", category=category)
        with pointed_at(emulator):
            yield emulator


async def test_discord_py_sees_the_category_the_forum_and_a_forum_post(emu: DiscordEmulator) -> None:
    got: list[discord.Message] = []
    bot = make_bot()

    async def on_message(message: discord.Message) -> None:
        got.append(message)

    bot.add_listener(on_message)
    async with running(emu, bot) as run:
        guild = run.bot.get_guild(emu.guild_id)
        assert guild is not None
        category, study, forum = (guild.get_channel(emu.channels[n]) for n in ("Courses", "study", "help"))
        assert isinstance(category, discord.CategoryChannel) and isinstance(forum, discord.ForumChannel)
        assert (
            isinstance(study, discord.TextChannel) and study.category_id == category.id == forum.category_id
        )
        post = await emu.create_forum_post(forum.id, title="Loops?", content="how do loops work")
        await emu.wait_until(lambda: bool(got))
    [message] = got
    assert isinstance(message.channel, discord.Thread) and message.channel.parent_id == forum.id
    assert message.id == message.channel.id == int(post["id"])  # a post's thread has its first message's id
    assert message.channel.name == "Loops?" and message.channel.category_id == category.id


async def test_a_thread_started_from_a_message_has_its_id_and_discord_refuses_a_second_or_no_permission(
    emu: DiscordEmulator,
) -> None:
    study = emu.channels["study"]
    async with running(emu) as run:
        posted = await emu.send_user_message(study, content="a question")
        channel = run.bot.get_channel(study)
        assert isinstance(channel, discord.TextChannel)
        message = await channel.fetch_message(int(posted["id"]))
        thread = await message.create_thread(name="A question")
        assert thread.id == message.id and thread.parent_id == study and thread.name == "A question"
        await emu.wait_until(lambda: run.bot.get_channel(thread.id) is not None)  # THREAD_CREATE
        with pytest.raises(discord.HTTPException) as twice:
            await message.create_thread(name="Again")
        assert (twice.value.status, twice.value.code) == (400, 160004)
        with pytest.raises(discord.HTTPException) as long_name:
            other = await channel.fetch_message(int((await emu.send_user_message(study, content="x"))["id"]))
            await other.create_thread(name="n" * 101)
        assert (long_name.value.status, long_name.value.code) == (400, 50035)
        emu.world.set_overwrite(study, emu.world.bot_role_id, deny=CREATE_PUBLIC_THREADS)
        third = await channel.fetch_message(int((await emu.send_user_message(study, content="y"))["id"]))
        with pytest.raises(discord.Forbidden) as refused:
            await third.create_thread(name="Not allowed")
        assert refused.value.code == 50013
    assert emu.world.channel_data[thread.id]["parent_id"] == str(study)


async def test_autocomplete_sends_the_focused_option_and_records_the_choices(emu: DiscordEmulator) -> None:
    bot = make_bot()
    seen: list[str] = []

    @bot.tree.command(name="pick", description="Pick a fruit")
    async def pick(interaction: discord.Interaction, fruit: str) -> None:
        await interaction.response.send_message(fruit)

    @pick.autocomplete("fruit")
    async def fruits(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        seen.append(current)
        names = ["apple", "apricot", "banana"] if current != "many" else [f"f{n}" for n in range(30)]
        return [
            app_commands.Choice(name=n, value=n) for n in names if n.startswith(current) or current == "many"
        ]

    async with running(emu, bot):
        record = await emu.send_interaction("pick", {"fruit": "ap"}, focused="fruit")
        await emu.wait_until(lambda: record.choices is not None)
        too_many = await emu.send_interaction("pick", {"fruit": "many"}, focused="fruit")
        await emu.wait_until(lambda: any(r.status == 400 for r in emu.requests_for("interaction")))
    assert seen == ["ap", "many"] and record.callback_type == 8
    assert record.choices == [{"name": "apple", "value": "apple"}, {"name": "apricot", "value": "apricot"}]
    assert too_many.choices is None  # more than 25: Discord refuses it (400 50035), nothing recorded


class _Form(discord.ui.Modal, title="Tell me"):
    story: discord.ui.TextInput[Any] = discord.ui.TextInput(
        label="Your story", style=discord.TextStyle.paragraph, max_length=4000
    )

    def __init__(self, done: list[str]) -> None:
        super().__init__(timeout=60)
        self.done = done

    async def on_submit(self, interaction: discord.Interaction) -> None:  # type: ignore[override]
        self.done.append(self.story.value)
        await interaction.response.send_message("thanks", ephemeral=True)


async def test_a_modal_is_shown_then_submitted_and_its_values_reach_discord_py(emu: DiscordEmulator) -> None:
    bot = make_bot()
    submitted: list[str] = []

    @bot.tree.command(name="tell", description="Open a form")
    async def tell(interaction: discord.Interaction) -> None:
        await interaction.response.send_modal(_Form(submitted))

    async with running(emu, bot):
        record = await emu.send_interaction("tell", user="admin")
        await emu.wait_until(lambda: record.modal is not None)
        modal = record.modal or {}
        assert modal["title"] == "Tell me" and record.callback_type == 9
        [row] = modal["components"]
        field = row["components"][0] if row["type"] == 1 else row["component"]
        with pytest.raises(ValueError, match="longer than its max_length"):
            await emu.submit_modal(record, {field["custom_id"]: "x" * 4001})  # Discord's client stops it
        answer = await emu.submit_modal(record, {field["custom_id"]: "once upon a time"})
        await emu.wait_until(lambda: answer.callback_type is not None)
    assert submitted == ["once upon a time"]
    assert answer.callback_type == 4 and answer.ephemeral and answer.texts() == ["thanks"]
    assert answer.user_id == emu.users["admin"]
