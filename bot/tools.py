"""The functions Gemini may call in a conversation: Discord look-ups, small actions, moderation.

``builtin_tools`` are registered on ``app.tools`` (``services.tools.ToolRegistry``; a plugin adds its
own with ``app.tools.register(tool)``). For one answer ``for_answer`` picks what is offered, and the
``AnswerTools`` it returns is the ``FunctionCaller`` that ``GeminiService`` runs its loop with:

- what is on: the ``functions`` setting of the place (tool names or the levels ``read``, ``write``,
  ``admin``; ``TOOLS_DEFAULT`` where the server set nothing);
- ``admin`` tools are offered only where the server's managers named them in their own setting (never
  through ``TOOLS_DEFAULT``) and only when the asker may manage the server (Manage Server or
  Administrator, read from the member cache; unknown means no). A call of a tool that was not offered
  is refused without running anything;
- ``destructive`` admin tools are only proposed: the call posts a message with Confirm and Cancel
  buttons for the asker and returns at once; the action runs when the asker clicks Confirm (checked
  again then: still a manager, the tool still on). The buttons carry the action in their
  ``custom_id`` and one ``discord.ui.DynamicItem`` handles them, so a click after a restart works;
- at most once: before a ``write`` or ``admin`` call runs, ``(question, tool, arguments)`` is recorded
  as processed in storage (the table of processed message ids, one committed insert, SQLite or
  PostgreSQL); a call whose record exists is not run again, so an answer retried after a failure, a
  requeue or ``kill -9`` never reacts, pins, creates a thread or deletes twice. A crash between the
  record and the action loses the action (the model is told it was already done): at most once,
  not exactly once. A confirmation click is recorded the same way (by the confirmation message).
  ``read`` calls run again on a retry: they change nothing;
- logs: one ``tool.call`` line per call (tool, outcome, seconds: ``services.tools``) and one
  ``tool.requested`` line with the arguments and result only with ``TOOLS_LOG_PAYLOADS=true``.

Google's own tools (Search grounding, URL context, code execution) and functions are not sent
together: Gemini 2.5 refuses built-in tools with function calling in one request, so where a server
turned a Google tool on, that answer is offered no functions (``tools.functions_skipped``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import discord
import structlog
from google.genai import types

from bot.settings import Effective, scope_chain
from resilience.errors import classify
from services.tools import FunctionCall, Safety, Tool, ToolError, check_arguments

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.tools")

CONFIRM_PREFIX = "gembot:tool:"
CONFIRM_TEMPLATE = (
    r"gembot:tool:(?P<act>ok|no):(?P<user>\d{1,20}):(?P<name>[a-z][a-z0-9_]{0,63}):(?P<args>\{.*\})"
)
MAX_CUSTOM_ID = 100
"""Discord's limit on a button's ``custom_id``; an action that does not fit is refused."""
MAX_LISTED = 50
"""Channels, roles or messages one look-up returns at most."""
MESSAGE_CHARS = 300
"""Characters of one message a look-up returns at most."""


@dataclass
class ToolContext:
    """Where and for whom a tool runs: one answer's channel, server, asker and question."""

    app: Application
    channel: Any
    guild: discord.Guild | None
    invoker_id: int
    question_id: int
    manager: bool
    confirmed: bool = False
    """True when a person clicked Confirm: the destructive tool does its work."""

    def member(self, user_id: int | None = None) -> discord.Member | None:
        return self.guild.get_member(user_id or self.invoker_id) if self.guild is not None else None

    def need_guild(self) -> discord.Guild:
        if self.guild is None:
            raise ToolError("this works in a server only, not in a DM")
        return self.guild


def is_manager(guild: discord.Guild | None, user_id: int, author: Any = None) -> bool:
    """Whether ``user_id`` may manage ``guild`` (Manage Server or Administrator): from ``author`` (the
    question's ``discord.Member``, as the gateway delivered it with the message), else the member
    cache; unknown is no."""
    if guild is None:
        return False
    known = isinstance(author, discord.Member) and author.id == user_id
    member = author if known else guild.get_member(user_id)
    if member is None:
        return False
    perms = member.guild_permissions
    return bool(perms.administrator or perms.manage_guild)


def enabled(app: Application, settings: Effective, *, manager: bool) -> list[Tool]:
    """The registered tools ``settings.functions`` turns on for an asker (``manager`` or not)."""
    chosen = set(settings.functions)
    out = []
    for tool in app.tools:
        if tool.name not in chosen and tool.safety.value not in chosen:
            continue
        if tool.safety is Safety.ADMIN and not (manager and settings.functions_by_guild):
            continue  # never offered: not a manager, or only the bot's default names it
        out.append(tool)
    return out


def for_answer(
    app: Application,
    settings: Effective,
    *,
    channel: Any,
    author_id: int,
    question_id: int,
    author: Any = None,
) -> AnswerTools | None:
    """The ``FunctionCaller`` for one answer, or None when no function is on there. ``author`` is the
    question's author as Discord sent it (a ``discord.Member`` with roles on a live message)."""
    if not settings.functions:
        return None
    if settings.tools:
        log.info("tools.functions_skipped", reason="google_tools_on", google_tools=list(settings.tools))
        return None
    guild = getattr(channel, "guild", None)
    manager = is_manager(guild, author_id, author)
    offered = enabled(app, settings, manager=manager)
    if not offered:
        return None
    context = ToolContext(app, channel, guild, author_id, question_id, manager)
    return AnswerTools(app, offered, context)


def _key(question_id: int, name: str, args: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return f"tool:{question_id}:{name}:{digest}"


class AnswerTools:
    """The functions offered for one answer, and how each call runs (see the module's docstring)."""

    def __init__(self, app: Application, offered: Sequence[Tool], context: ToolContext) -> None:
        self.app = app
        self.context = context
        self.offered = {tool.name: tool for tool in offered}
        self.max_rounds = app.config.tools_max_rounds
        self.seconds = app.config.tools_total_seconds

    def declarations(self) -> list[types.FunctionDeclarationDict]:
        return [tool.declaration() for tool in self.offered.values()]

    async def call(self, call: FunctionCall) -> dict[str, Any]:
        result = await self._call(call)
        if self.app.config.tools_log_payloads:
            log.info("tool.requested", tool=call.name, arguments=call.args, result=result)
        return result

    async def _call(self, call: FunctionCall) -> dict[str, Any]:
        tool = self.offered.get(call.name)
        registry = self.app.tools
        if tool is None:
            registry.observe(call.name, "not_offered", 0.0)
            return {"error": f"there is no function {call.name[:64]!r} here"}
        problem = check_arguments(tool.parameters, call.args)
        if problem is not None:  # before anything is recorded or proposed
            registry.observe(tool.name, "invalid", 0.0)
            return {"error": f"{tool.name}: {problem}"}
        if tool.safety is not Safety.READ:
            try:
                key = _key(self.context.question_id, tool.name, call.args)
                fresh = await self.app.storage.mark_processed(key)
            except Exception as exc:
                # Not recorded, not done: a write we could not record could be done twice later.
                log.warning("tool.not_recorded", tool=tool.name, category=classify(exc).category.value)
                registry.observe(tool.name, "not_recorded", 0.0)
                return {"error": f"{tool.name} was not done: I could not record it (storage is failing)"}
            if not fresh:
                registry.observe(tool.name, "repeated", 0.0)
                return {"result": f"{tool.name} with these arguments was already done for this question "
                        "(before a retry); it was not done again"}
        if tool.destructive:
            return await self._propose(tool, call.args)
        return await registry.run(tool, call.args, self.context)

    async def _propose(self, tool: Tool, args: dict[str, Any]) -> dict[str, Any]:
        """Post Confirm and Cancel buttons for the asker; the action waits for the click."""
        ctx = self.context
        payload = json.dumps(args, separators=(",", ":"), sort_keys=True)
        confirm = f"{CONFIRM_PREFIX}ok:{ctx.invoker_id}:{tool.name}:{payload}"
        if len(confirm) > MAX_CUSTOM_ID:
            self.app.tools.observe(tool.name, "refused", 0.0)
            return {"error": f"{tool.name}: these arguments are too long to ask for a confirmation"}
        shown = payload[:300].replace("`", "'")
        text = (f"<@{ctx.invoker_id}>, Gemini wants to run **{tool.name}** ({tool.description}) with "
                f"`{shown}`. Only you can confirm it; nothing happens until you do.")
        try:
            reference = discord.MessageReference(
                message_id=ctx.question_id, channel_id=ctx.channel.id, fail_if_not_exists=False
            )
            await self.app.discord_io.send(
                ctx.channel, text, view=confirm_buttons(ctx.invoker_id, tool.name, payload),
                mention_user=discord.Object(ctx.invoker_id), reply_to=reference,
            )
        except Exception as exc:
            self.app.tools.observe(tool.name, "error", 0.0)
            category = classify(exc).category.value
            return {"error": f"{tool.name}: I could not ask for a confirmation ({category})"}
        self.app.tools.observe(tool.name, "proposed", 0.0)
        return {"result": f"asked <@{ctx.invoker_id}> to confirm {tool.name} with a button; it is not done "
                "until they click Confirm"}


# -- the confirmation buttons ------------------------------------------------------------------


def confirm_buttons(invoker_id: int, name: str, payload: str) -> discord.ui.View:
    """The view of a confirmation message: Confirm and Cancel (drawn only; ``ToolConfirmation``
    handles the clicks, whichever process drew them)."""
    view = discord.ui.View(timeout=None)
    for act, label, style in (("ok", "Confirm", discord.ButtonStyle.danger),
                              ("no", "Cancel", discord.ButtonStyle.secondary)):
        view.add_item(discord.ui.Button(
            label=label, style=style, custom_id=f"{CONFIRM_PREFIX}{act}:{invoker_id}:{name}:{payload}"
        ))
    view.stop()
    return view


class ToolConfirmation(discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=CONFIRM_TEMPLATE):
    """A click on Confirm or Cancel of a proposed destructive call (``bot.add_dynamic_items``)."""

    def __init__(self, act: str, user: int, name: str, args: str) -> None:
        super().__init__(discord.ui.Button(custom_id=f"{CONFIRM_PREFIX}{act}:{user}:{name}:{args}"))
        self.act, self.user, self.name, self.args = act, user, name, args

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> ToolConfirmation:
        return cls(match["act"], int(match["user"]), match["name"], match["args"])

    async def callback(self, interaction: discord.Interaction) -> None:
        app: Application | None = getattr(interaction.client, "app", None)
        if app is None:
            return
        await confirm_clicked(app, interaction, self.act, self.user, self.name, self.args)


async def confirm_clicked(
    app: Application, interaction: discord.Interaction, act: str, user: int, name: str, args: str
) -> None:
    """Run (Confirm) or drop (Cancel) a proposed call, for its asker only, at most once."""
    if interaction.user.id != user:
        await interaction.response.send_message("Only the person who asked can confirm this.", ephemeral=True)
        return
    message = interaction.message
    if act == "no":
        await interaction.response.edit_message(content=f"Cancelled: {name} was not run.", view=None)
        return
    channel = interaction.channel
    guild = interaction.guild
    tool = app.tools.get(name)
    settings = app.effective(guild.id if guild else None, scope_chain(channel))
    manager = is_manager(guild, user, interaction.user)
    if tool is None or tool not in enabled(app, settings, manager=manager):
        await interaction.response.edit_message(
            content=f"{name} is not available here any more (or you may no longer manage this server).",
            view=None,
        )
        return
    try:
        arguments = json.loads(args)
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict) or message is None:
        await interaction.response.edit_message(content=f"{name}: the request was damaged.", view=None)
        return
    await interaction.response.defer()
    try:
        fresh = await app.storage.mark_processed(f"toolconfirm:{message.id}")
    except Exception as exc:
        log.warning("tool.not_recorded", tool=name, category=classify(exc).category.value)
        await _settle(message, f"{name} was not run: I could not record it; click Confirm again later.", name)
        return
    if not fresh:
        return  # a second click, or one a dead process took: done (or being done) once already
    reference = message.reference
    question = reference.message_id if reference is not None and reference.message_id else message.id
    context = ToolContext(app, channel, guild, user, question, manager, confirmed=True)
    result = await app.tools.run(tool, arguments, context)
    done = result.get("result", "") if "result" in result else ""
    text = f"Done: {name} {done}".strip() if "error" not in result else f"{name} failed: {result['error']}"
    await _settle(message, text, name, keep_buttons=False)


async def _settle(message: discord.Message, text: str, name: str, *, keep_buttons: bool = True) -> None:
    """Show what became of a proposed call on its confirmation message; never raises."""
    try:
        if keep_buttons:
            await message.edit(content=text[:1900])
        else:
            await message.edit(content=text[:1900], view=None)
    except Exception as exc:  # the outcome is in the log; the message keeps its old text
        log.info("tool.confirm_not_edited", tool=name, category=classify(exc).category.value)


# -- the built-in tools -----------------------------------------------------------------------


async def current_time(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    now = ctx.app.clock.time()
    return {"utc": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"), "unix": int(now)}


async def list_channels(ctx: ToolContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    guild = ctx.need_guild()
    member = ctx.member()
    visible = [
        c for c in guild.channels
        if (member is not None and c.permissions_for(member).view_channel)
        or (member is None and c.permissions_for(guild.default_role).view_channel)
    ]
    return [
        {"id": str(c.id), "name": c.name, "type": str(c.type),
         "category": c.category.name if c.category is not None else None}
        for c in sorted(visible, key=lambda c: (c.position, c.id))[:MAX_LISTED]
    ]


async def list_roles(ctx: ToolContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    guild = ctx.need_guild()
    return [
        {"id": str(r.id), "name": r.name, "members": len(r.members), "color": str(r.color)}
        for r in sorted(guild.roles, key=lambda r: -r.position)[:MAX_LISTED]
    ]


async def recent_messages(ctx: ToolContext, args: dict[str, Any]) -> list[dict[str, Any]]:
    count = int(args.get("count", 10))
    before = discord.Object(ctx.question_id)
    out = []
    async for message in ctx.channel.history(limit=count, before=before):
        out.append({
            "author": message.author.display_name,
            "bot": message.author.bot,
            "at": message.created_at.isoformat(timespec="seconds"),
            "text": message.content[:MESSAGE_CHARS],
        })
    return out[::-1]


_USER = re.compile(r"<@!?(\d{1,20})>|(\d{1,20})")


async def member_profile(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    guild = ctx.need_guild()
    found = _USER.fullmatch(str(args["user"]).strip())
    member = guild.get_member(int(found.group(1) or found.group(2))) if found else None
    if member is None:
        name = str(args["user"]).strip().lower()
        member = next((m for m in guild.members if name in (m.name.lower(), m.display_name.lower())), None)
    if member is None:
        raise ToolError("no member of this server by that name or id")
    return {
        "id": str(member.id),
        "username": member.name,
        "display_name": member.display_name,
        "bot": member.bot,
        "joined": member.joined_at.isoformat(timespec="seconds") if member.joined_at else None,
        "account_created": member.created_at.isoformat(timespec="seconds"),
        "roles": [r.name for r in member.roles if not r.is_default()],
    }


def _question(ctx: ToolContext) -> discord.PartialMessage:
    if not hasattr(ctx.channel, "get_partial_message"):
        raise ToolError("there is no message to act on here")
    return ctx.channel.get_partial_message(ctx.question_id)  # type: ignore[no-any-return]


async def react(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    emoji = str(args["emoji"]).strip()
    if not emoji or len(emoji) > 64:
        raise ToolError("give one emoji")
    await _question(ctx).add_reaction(emoji)
    return {"reacted": emoji}


async def create_thread(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    ctx.need_guild()
    name = " ".join(str(args["name"]).split())[:100] or "Discussion"
    thread = await _question(ctx).create_thread(name=name)
    return {"thread": f"<#{thread.id}>", "name": thread.name}


async def pin_message(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    ctx.need_guild()
    target = args.get("message_id")
    message = _question(ctx) if not target else ctx.channel.get_partial_message(int(str(target)))
    await message.pin()
    return {"pinned": str(message.id)}


async def delete_messages(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    ctx.need_guild()
    if not ctx.confirmed:
        raise ToolError("delete_messages runs only after a confirmation")
    count = int(args["count"])
    deleted = 0
    async for message in ctx.channel.history(limit=count, before=discord.Object(ctx.question_id)):
        await message.delete()
        deleted += 1
    return {"deleted": deleted}


COUNT = {"type": "integer", "minimum": 1, "maximum": 20}


def builtin_tools() -> list[Tool]:
    """The Discord tools every bot has (each off until a server's ``functions`` setting names it)."""
    obj = "object"
    return [
        Tool("current_time", "The current date and time in UTC.", current_time),
        Tool("list_channels", "The channels of this server the asker can see: id, name, type, category.",
             list_channels),
        Tool("list_roles", "The roles of this server: id, name, member count, colour.", list_roles),
        Tool("recent_messages", "The most recent messages of this conversation before the question "
             "(author, time, text), oldest first.", recent_messages,
             {"type": obj, "properties": {"count": {**COUNT, "description": "how many, 1 to 20"}}}),
        Tool("member_profile", "A member's public profile: names, when they joined, their roles.",
             member_profile,
             {"type": obj, "properties": {"user": {"type": "string", "description": "a mention, id or name"}},
              "required": ["user"]}),
        Tool("react", "Add an emoji reaction to the asker's message.", react,
             {"type": obj, "properties": {"emoji": {"type": "string"}}, "required": ["emoji"]},
             safety=Safety.WRITE),
        Tool("create_thread", "Start a public thread from the asker's message.", create_thread,
             {"type": obj, "properties": {"name": {"type": "string", "description": "the thread's name"}},
              "required": ["name"]}, safety=Safety.WRITE),
        Tool("pin_message", "Pin a message of this channel (the asker's message unless an id is given).",
             pin_message, {"type": obj, "properties": {"message_id": {"type": "string"}}},
             safety=Safety.WRITE),
        Tool("delete_messages", "Delete the most recent messages of this channel before the question "
             "(moderation; the asker must confirm with a button).", delete_messages,
             {"type": obj, "properties": {"count": COUNT}, "required": ["count"]},
             safety=Safety.ADMIN, destructive=True, timeout=20.0),
    ]
