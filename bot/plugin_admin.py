"""``/admin plugin list|load|unload|reload|revert`` and ``/admin propose``: owners only, ephemeral.

Thin views over ``bot.plugins.PluginHost`` and ``bot.selfmod.SelfModifier``. A proposal ready to
apply is shown with its diff and two buttons, Apply and Reject, whose ``custom_id`` names the
proposal (``gembot:selfmod:<action>:<id>``): ``proposal_buttons`` is a discord.py ``DynamicItem``
added at start-up (``bot.add_dynamic_items``), so a click works after a restart too, and every
click is checked again (an owner, self-modification on).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import discord
import structlog
from discord import app_commands

from bot.commands import SlashCommands, followup
from bot.plugins import Plugin, PluginError, PluginHost
from bot.selfmod import Proposal, SelfModifier, SelfModifyError

log = structlog.get_logger("bot.plugin_admin")

BUTTON_ID = "gembot:selfmod:{action}:{id}"
BUTTON_TEMPLATE = r"gembot:selfmod:(?P<action>apply|reject):(?P<id>[0-9a-f]{1,32})"
DIFF_ROOM = 1400
PROPOSE_MARGIN = 120.0  # seconds for Gemini and the rest, besides the tests' own bound
FOLLOWUP_WINDOW = 14 * 60.0  # an interaction's token lasts 15 minutes


def plugin_commands(
    group: app_commands.Group, commands: SlashCommands, host: PluginHost, selfmod: SelfModifier
) -> None:
    """Add the plugin subgroup and ``propose`` to ``/admin`` (``group``)."""

    def admin(
        interaction: discord.Interaction, action: Callable[[str], Awaitable[str]], **kw: Any
    ) -> Awaitable[None]:
        async def body() -> None:
            await followup(interaction, _clip(await action(f"discord:{interaction.user.id}")))

        return commands.run(interaction, body, check=commands.require_owner, **kw)

    plugin = app_commands.Group(
        name="plugin", description="Plugins: list, load, unload, reload, revert", parent=group
    )

    async def complete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        if not commands.is_owner(interaction.user.id):
            return []
        names = [p.name for p in host.listing() if current.lower() in p.name.lower()]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]

    @plugin.command(name="list", description="Every plugin, loaded or not, and why one failed")
    async def plugin_list(interaction: discord.Interaction) -> None:
        async def act(by: str) -> str:
            return format_plugins(host.listing())

        await admin(interaction, act)

    async def lifecycle(
        interaction: discord.Interaction,
        name: str,
        action: Callable[[str], Awaitable[Plugin]],
        done: str,
        failed: str = "",
    ) -> None:
        """Load, unload or reload ``name`` for an owner; one sentence either way (``failed`` after a
        refusal's own)."""

        async def act(by: str) -> str:
            log.info("plugins.admin", action=action.__name__, plugin=name, by=by)
            try:
                await action(name)
            except PluginError as exc:
                return f"{_sentence(exc)}{failed}"
            return f"Plugin `{name}` is {done}."

        await admin(interaction, act)

    @plugin.command(name="load", description="Load a plugin")
    @app_commands.describe(name="The plugin")
    @app_commands.autocomplete(name=complete)
    async def plugin_load(interaction: discord.Interaction, name: str) -> None:
        await lifecycle(interaction, name, host.load, "loaded")

    @plugin.command(name="unload", description="Unload a plugin: its commands and listeners go")
    @app_commands.describe(name="The plugin")
    @app_commands.autocomplete(name=complete)
    async def plugin_unload(interaction: discord.Interaction, name: str) -> None:
        await lifecycle(interaction, name, host.unload, "unloaded")

    @plugin.command(
        name="reload", description="Reload a plugin from its code; if that fails, the old one stays"
    )
    @app_commands.describe(name="The plugin")
    @app_commands.autocomplete(name=complete)
    async def plugin_reload(interaction: discord.Interaction, name: str) -> None:
        kept = f" The previous version of `{name}` is still loaded and working."
        await lifecycle(interaction, name, host.reload, "reloaded", kept)

    @plugin.command(name="revert", description="Undo the last applied self-modification of a plugin")
    @app_commands.describe(name="The plugin")
    @app_commands.autocomplete(name=complete)
    async def plugin_revert(interaction: discord.Interaction, name: str) -> None:
        async def act(by: str) -> str:
            try:
                done = await selfmod.revert(name, by=by)
            except (SelfModifyError, PluginError) as exc:
                return _sentence(exc)
            return f"Reverted proposal `{done.id}`: `{done.path}` is as it was before, and reloaded."

        await admin(interaction, act)

    @group.command(
        name="propose", description="Ask Gemini to change a plugin; you see the diff (SELF_MODIFY=1)"
    )
    @app_commands.describe(plugin="The plugin to change", change="The change, in words")
    @app_commands.autocomplete(plugin=complete)
    async def propose(
        interaction: discord.Interaction, plugin: str, change: app_commands.Range[str, 1, 1000]
    ) -> None:
        async def body() -> None:
            by = f"discord:{interaction.user.id}"
            try:
                proposal = await selfmod.propose(plugin, change, by=by)
            except (SelfModifyError, PluginError) as exc:
                await followup(interaction, _sentence(exc))
                return
            text = format_proposal(proposal)
            if proposal.state == "ready":
                await interaction.followup.send(text, ephemeral=True, view=proposal_view(proposal.id))
            else:
                await followup(interaction, text)

        await commands.run(
            interaction,
            body,
            check=commands.require_owner,
            limit=min(FOLLOWUP_WINDOW, selfmod.test_timeout + PROPOSE_MARGIN),
        )


def proposal_view(proposal_id: str) -> discord.ui.View:
    """The Apply and Reject buttons drawn on a proposal (clicks go to ``ProposalButton``)."""
    view = discord.ui.View(timeout=None)
    view.add_item(
        discord.ui.Button(
            label="Apply",
            style=discord.ButtonStyle.success,
            custom_id=BUTTON_ID.format(action="apply", id=proposal_id),
        )
    )
    view.add_item(
        discord.ui.Button(
            label="Reject",
            style=discord.ButtonStyle.danger,
            custom_id=BUTTON_ID.format(action="reject", id=proposal_id),
        )
    )
    view.stop()  # drawn only: the dynamic item handles the clicks, also after a restart
    return view


def proposal_buttons(
    commands: SlashCommands, selfmod: SelfModifier
) -> type[discord.ui.DynamicItem[discord.ui.Button[Any]]]:
    """The dynamic item that handles clicks on Apply and Reject for ``bot.add_dynamic_items``."""

    class ProposalButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=BUTTON_TEMPLATE):
        def __init__(self, action: str, proposal_id: str) -> None:
            super().__init__(discord.ui.Button(custom_id=BUTTON_ID.format(action=action, id=proposal_id)))
            self.action = action
            self.proposal_id = proposal_id

        @classmethod
        async def from_custom_id(  # type: ignore[override]
            cls, interaction: discord.Interaction, item: discord.ui.Button[Any], match: re.Match[str]
        ) -> ProposalButton:
            return cls(match["action"], match["id"])

        async def callback(self, interaction: discord.Interaction) -> None:  # type: ignore[override]
            async def body() -> None:
                by = f"discord:{interaction.user.id}"
                try:
                    if self.action == "apply":
                        done = await selfmod.apply(self.proposal_id, by=by)
                        text = (
                            f"Applied proposal `{done.id}`: `{done.path}` is changed"
                            f" and `{done.plugin}` reloaded."
                        )
                    else:
                        done = await selfmod.reject(self.proposal_id, by=by)
                        text = f"Rejected proposal `{done.id}`; `{done.path}` is unchanged."
                except (SelfModifyError, PluginError) as exc:
                    text = _sentence(exc)
                await followup(interaction, text)

            await commands.run(interaction, body, check=commands.require_owner)

    return ProposalButton


def format_plugins(plugins: list[Plugin]) -> str:
    if not plugins:
        return "No plugins found."
    lines = []
    for p in plugins:
        line = f"`{p.name}` ({p.source}{', required' if p.required else ''}): {p.state}"
        if p.error:
            line += f" — {p.error}"
        lines.append(line)
    return "\n".join(lines)


def format_proposal(p: Proposal) -> str:
    change = p.change if len(p.change) <= 200 else p.change[:199] + "\u2026"
    head = f"Proposal `{p.id}` for `{p.path}`: {change}"
    diff = p.diff if len(p.diff) <= DIFF_ROOM else p.diff[:DIFF_ROOM] + "\n… (diff cut)"
    body = f"```diff\n{diff}```" if diff else "(no change)"
    if p.state == "ready":
        return f"{head}\nChecks passed and the plugin's tests pass.\n{body}\nApply it?"
    tail = f"\n```\n{p.tests[-300:]}```" if p.tests else ""
    return f"{head}\nRefused: {p.reason}. Nothing was changed.\n{body}{tail}"


def _sentence(exc: BaseException) -> str:
    text = str(exc)
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _clip(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
