"""``/memory show|on|off|forget``: a user's own semantic memory (``bot.memory``), and a server's forget.

Everything answers privately. ``on``/``off`` is the user's opt-in (off keeps what is stored, so
``on`` again brings it back; ``forget`` deletes it). ``forget`` deletes everything the user said
that is remembered, in their own memory and in servers' memories alike, or one memory by the
number ``show`` gives it; ``forget server:True`` deletes this server's memory (its managers only).
Forgetting deletes the rows, vectors and all, and nothing said before it is stored afterwards.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import discord
from discord import app_commands

if TYPE_CHECKING:
    from bot.app import Application

Check = Callable[[discord.Interaction, str], None]


class CommandHost(Protocol):
    """What ``/memory`` needs of the slash commands (``bot.commands.SlashCommands``): the
    application, their ``run`` frame (defer, check, timeout, one sentence per failure) and the
    managers' check. A protocol, so this module does not import the commands that import it."""

    app: Application

    async def run(
        self,
        interaction: discord.Interaction,
        body: Callable[[], Awaitable[None]],
        *,
        ephemeral: bool = True,
        limit: float | None = None,
        check: Check | None = None,
    ) -> None: ...

    def require_guild_manager(self, interaction: discord.Interaction, command: str) -> None: ...

SHOWN = 10
NOT_HERE = "it has no memory store."
SHOWN_CHARS = 120


def unavailable_text(reason: str) -> str:
    return f"Semantic memory isn't available on this bot: {reason}"


def show_text(enabled: bool, server: bool | None, shown: list[tuple[int, float, str]], total: int) -> str:
    """What ``/memory show`` says: the switches, then the newest memories with their numbers."""
    mine = "on" if enabled else "off (`/memory on` turns it on)"
    lines = [f"Your memory is {mine}."]
    if server is not None:
        state = "on" if server else "off"
        lines.append(f"This server's memory is {state} (its managers' `memory` setting).")
    if not total:
        lines.append("I remember nothing you said.")
        return "\n".join(lines)
    lines.append(f"I remember {total} thing{'s' if total != 1 else ''} you said; the newest:")
    for number, said_at, text in shown:
        day = dt.datetime.fromtimestamp(said_at, dt.UTC).strftime("%Y-%m-%d")
        flat = " ".join(text.split())
        flat = flat if len(flat) <= SHOWN_CHARS else flat[: SHOWN_CHARS - 1] + "…"
        lines.append(f"`{number}` {day}: {discord.utils.escape_markdown(flat)}")
    lines.append("`/memory forget` deletes all of it; `/memory forget item:<number>` one of them.")
    return "\n".join(lines)


def memory_group(commands: CommandHost) -> app_commands.Group:
    """The ``/memory`` group, wired to ``commands`` (its ``run`` frame and the application)."""
    app = commands.app
    group = app_commands.Group(name="memory", description="What I remember of what you said (opt-in)")

    async def say(interaction: discord.Interaction, text: str) -> None:
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())

    async def show(interaction: discord.Interaction) -> None:
        store = app.memory.store
        if store is None:
            await say(interaction, unavailable_text(NOT_HERE))
            return
        memories, total = await store.list_user(interaction.user.id, SHOWN)
        server = None
        if interaction.guild_id is not None:
            server = app.effective(interaction.guild_id).memory
        shown = [(m.id, m.said_at, m.text) for m in memories]
        await say(interaction, show_text(store.user_enabled(interaction.user.id), server, shown, total))

    async def switch(interaction: discord.Interaction, enabled: bool) -> None:
        store = app.memory.store
        if store is None:
            await say(interaction, unavailable_text(NOT_HERE))
            return
        await store.set_user_enabled(interaction.user.id, enabled)
        if enabled:
            text = (
                "Your memory is on: I'll remember what you say to me and recall it when it helps. "
                "`/memory show` lists it, `/memory forget` deletes it."
            )
        else:
            text = (
                "Your memory is off: I won't remember or recall anything for you. What I remember stays "
                "until you `/memory forget` it."
            )
        await say(interaction, text)

    async def forget(interaction: discord.Interaction, item: int | None, server: bool) -> None:
        store = app.memory.store
        if store is None:
            await say(interaction, unavailable_text(NOT_HERE))
            return
        if server:
            assert interaction.guild_id is not None  # checked by the manager check
            count = await store.forget_guild(interaction.guild_id)
            plural = "s" if count != 1 else ""
            await say(interaction, f"I forgot this server's memory ({count} thing{plural}).")
            return
        count = await store.forget_user(interaction.user.id, item)
        if item is not None and not count:
            await say(interaction, f"I have no memory `{item}` of yours: `/memory show` lists them.")
            return
        plural = "s" if count != 1 else ""
        what = f"memory `{item}`" if item is not None else f"everything you said ({count} thing{plural})"
        await say(interaction, f"I forgot {what}.")

    def forget_check(server: bool) -> Check:
        def check(interaction: discord.Interaction, command: str) -> None:
            if server:
                commands.require_guild_manager(interaction, command)

        return check

    @group.command(name="show", description="What I remember of what you said")
    async def show_cmd(interaction: discord.Interaction) -> None:
        await commands.run(interaction, lambda: show(interaction))

    @group.command(name="on", description="Remember what you say to me and recall it when it helps")
    async def on_cmd(interaction: discord.Interaction) -> None:
        await commands.run(interaction, lambda: switch(interaction, True))

    @group.command(name="off", description="Stop remembering and recalling (what is stored stays)")
    async def off_cmd(interaction: discord.Interaction) -> None:
        await commands.run(interaction, lambda: switch(interaction, False))

    @group.command(name="forget", description="Delete what I remember of what you said")
    @app_commands.describe(item="Only this one (its number in /memory show)", server="This server's memory")
    async def forget_cmd(
        interaction: discord.Interaction, item: int | None = None, server: bool = False
    ) -> None:
        await commands.run(
            interaction, lambda: forget(interaction, item, server), check=forget_check(server)
        )

    return group
