"""Buttons on answers: Stop on an answer being written, Regenerate on one that is written.

Discord delivers a click as an interaction that carries the button's ``custom_id`` and the message;
a bot that restarted must still handle clicks on buttons an earlier process drew. So the ids are
fixed (``STOP_ID``, ``REGENERATE_ID``) and one persistent view, ``AnswerButtons`` (no timeout, every
button with its ``custom_id``), is added with ``bot.add_view`` at start-up: discord.py routes a click
on any message showing such a button to it (``ViewStore.dispatch_view`` falls back to the views
added without a message id). What the buttons do is passed in (``on_stop``, ``on_regenerate``:
``bot.streaming``), so this module depends on nothing of the bot's but its texts.

The buttons drawn on messages (``stop_buttons``, ``regenerate_buttons``) are views stopped at once:
discord.py keeps every dispatchable view that is not finished in memory, per message, for as long
as it may be clicked (``Message.edit`` and ``send`` call ``store_view``), which for an answer is
for ever. A stopped view is only drawn; its clicks still reach ``AnswerButtons``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import discord

from bot import texts

STOP_ID = "gembot:answer:stop"
REGENERATE_ID = "gembot:answer:regenerate"

Click = Callable[[discord.Interaction], Awaitable[None]]
"""What a click does, given the interaction (which it must answer within Discord's 3 s)."""


def _stop_button() -> discord.ui.Button[discord.ui.View]:
    return discord.ui.Button(
        label=texts.STOP_LABEL, style=discord.ButtonStyle.secondary, emoji="\u23f9", custom_id=STOP_ID
    )


def _regenerate_button() -> discord.ui.Button[discord.ui.View]:
    return discord.ui.Button(
        label=texts.REGENERATE_LABEL,
        style=discord.ButtonStyle.secondary,
        emoji="\U0001f501",
        custom_id=REGENERATE_ID,
    )


def _drawn(button: discord.ui.Button[discord.ui.View]) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(button)
    view.stop()  # drawn only: AnswerButtons handles the clicks (see the module's docstring)
    return view


def stop_buttons() -> discord.ui.View:
    """The components of a message being written: a Stop button."""
    return _drawn(_stop_button())


def regenerate_buttons() -> discord.ui.View:
    """The components of an answer's last message: a Regenerate button."""
    return _drawn(_regenerate_button())


class AnswerButtons(discord.ui.View):
    """The persistent view that handles every click on Stop and Regenerate, whichever process drew them.

    Build it in a running event loop (``setup_hook``) and pass it to ``bot.add_view``.
    """

    def __init__(self, *, on_stop: Click, on_regenerate: Click) -> None:
        super().__init__(timeout=None)
        self._on_stop = on_stop
        self._on_regenerate = on_regenerate
        stop, regenerate = _stop_button(), _regenerate_button()
        stop.callback = self._stop  # type: ignore[method-assign]
        regenerate.callback = self._regenerate  # type: ignore[method-assign]
        self.add_item(stop)
        self.add_item(regenerate)

    async def _stop(self, interaction: discord.Interaction) -> None:
        await self._on_stop(interaction)

    async def _regenerate(self, interaction: discord.Interaction) -> None:
        await self._on_regenerate(interaction)
