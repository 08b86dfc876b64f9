"""``/admin`` and ``/server``: the operators' slash commands, thin views over ``bot.operations.Operations``.

Two scopes, two groups, so the split is plain to see:

- ``/admin`` acts on the whole bot (breakers, bot-wide maintenance, the queue, the data files,
  the locks): only the bot's owners (``SlashCommands.require_owner``), wherever they ask.
- ``/server`` acts on the guild it is run in and no other (its own maintenance mode, its chat
  channels, the tools Google runs for its answers): only that guild's managers
  (``SlashCommands.require_guild_manager``).

Each subcommand runs in the ``SlashCommands`` frame with its check: the caller is checked on
every invocation and every reply is ephemeral. ``default_permissions`` only hides a group in
Discord's UI. The formatters turn an operation's result into the sentence the operator sees.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Literal

import discord
from discord import app_commands

from bot.commands import SlashCommands, followup, human, tokens
from bot.grounding import TOOL_LABELS
from bot.operations import (
    ChatChannels,
    CircuitStatus,
    ErrorsView,
    GuildMaintenanceStatus,
    GuildTools,
    InvalidRequestError,
    MaintenanceStatus,
    Operations,
    QueueStatus,
    UsageReport,
)

Action = Callable[[str], Awaitable[str]]
"""An operator's action: given who asks (``by``), the text to show them."""
GuildAction = Callable[[int, str], Awaitable[str]]
"""A guild manager's action: given the guild and who asks, the text to show them."""

ToolName = Literal["google_search", "url_context", "code_execution"]
"""The choices of ``/server tools on|off`` (``bot.grounding.TOOL_NAMES``)."""

# Where the bot can answer every message: text and announcement channels and their threads.
CHAT_CHANNEL_TYPES = frozenset({
    discord.ChannelType.text,
    discord.ChannelType.news,
    discord.ChannelType.public_thread,
    discord.ChannelType.private_thread,
    discord.ChannelType.news_thread,
})


def admin_group(commands: SlashCommands, ops: Operations) -> app_commands.Group:
    """``/admin``: circuit, maintenance, queue, datastore and mutex subgroups over ``Operations``.

    Every subcommand acts on the whole bot, so it is for the bot's owners only: the caller is
    checked on each invocation (a guild's Administrator is refused) and every reply is ephemeral.
    """
    group = app_commands.Group(
        name="admin",
        description="The bot's owners: breakers, maintenance, queue, data, locks, traces, usage",
        default_permissions=discord.Permissions(administrator=True),  # UI metadata only
    )

    def admin(interaction: discord.Interaction, action: Action) -> Awaitable[None]:
        """Run ``action(by)`` as an owner's command and show the text it returns."""
        return commands.run(interaction, _show(interaction, action), check=commands.require_owner)

    circuit = app_commands.Group(name="circuit", description="Circuit breakers", parent=group)

    @circuit.command(name="status", description="Every breaker's state")
    async def circuit_status(interaction: discord.Interaction) -> None:
        async def act(by: str) -> str:
            return format_circuit_status(await ops.circuit_status(by=by), commands.app.clock.time())

        await admin(interaction, act)

    @circuit.command(name="reset", description="Close a breaker (or all) and wake the queue")
    @app_commands.describe(name="Breaker name, or 'all'")
    async def circuit_reset(interaction: discord.Interaction, name: str) -> None:
        async def act(by: str) -> str:
            done = await ops.circuit_reset(name, by=by)
            return f"Closed: {', '.join(f'`{n}`' for n in done['reset'])}."

        await admin(interaction, act)

    @circuit.command(name="open", description="Hold a breaker open (until reset, or for a while)")
    @app_commands.describe(name="Breaker name", seconds="How long (default: until reset)", reason="Why")
    async def circuit_open(
        interaction: discord.Interaction, name: str, seconds: float | None = None, reason: str | None = None
    ) -> None:
        async def act(by: str) -> str:
            done = await ops.circuit_open(name, seconds, reason=reason, by=by)
            how_long = "until reset" if done["duration"] is None else f"for {human(done['duration'])}"
            return f"`{done['name']}` is {done['state']} {how_long} ({done['reason']})."

        await admin(interaction, act)

    maintenance = app_commands.Group(name="maintenance", description="Maintenance mode", parent=group)

    @maintenance.command(name="on", description="Turn maintenance mode on; messages are saved")
    @app_commands.describe(message="The notice users see")
    async def maintenance_on(interaction: discord.Interaction, message: str | None = None) -> None:
        async def act(by: str) -> str:
            return format_maintenance(await ops.maintenance_on(message, by=by))

        await admin(interaction, act)

    @maintenance.command(name="off", description="Turn maintenance mode off and answer what was saved")
    async def maintenance_off(interaction: discord.Interaction) -> None:
        async def act(by: str) -> str:
            return format_maintenance(await ops.maintenance_off(by=by))

        await admin(interaction, act)

    @maintenance.command(name="status", description="Whether maintenance mode is on")
    async def maintenance_status(interaction: discord.Interaction) -> None:
        async def act(by: str) -> str:
            return format_maintenance(await ops.maintenance_status(by=by))

        await admin(interaction, act)

    queue = app_commands.Group(name="queue", description="The queue of unanswered messages", parent=group)

    @queue.command(name="status", description="Queue depth and the oldest items")
    async def queue_status(interaction: discord.Interaction) -> None:
        async def act(by: str) -> str:
            return format_queue_status(await ops.queue_status(by=by))

        await admin(interaction, act)

    @queue.command(name="drain", description="Work through the queue now")
    async def queue_drain(interaction: discord.Interaction) -> None:
        async def act(by: str) -> str:
            done = await ops.queue_drain(by=by)
            text = f"Draining: {done['pending']} waiting."
            if done["blocked_by"]:
                text += f" Held back by open breakers: {', '.join(done['blocked_by'])}."
            return text

        await admin(interaction, act)

    @queue.command(name="purge", description="Delete dead-lettered or expired items")
    @app_commands.describe(state="Which items to delete")
    async def queue_purge(
        interaction: discord.Interaction, state: Literal["dead", "expired"] = "dead"
    ) -> None:
        async def act(by: str) -> str:
            done = await ops.queue_purge(state, by=by)
            return f"Deleted {done['purged']} {done['state']} item{'s' if done['purged'] != 1 else ''}."

        await admin(interaction, act)

    datastore = app_commands.Group(name="datastore", description="The JSON data files", parent=group)

    @datastore.command(name="validate", description="Check the data files on disk")
    @app_commands.describe(name="One file (default: all)")
    async def datastore_validate(interaction: discord.Interaction, name: str | None = None) -> None:
        async def act(by: str) -> str:
            done = await ops.datastore_validate(name, by=by)
            lines = [
                f"`{f['name']}`: " + ("ok" if f["ok"] else "; ".join(f["problems"]) or "invalid")
                for f in done["files"]
            ]
            return "\n".join(lines) or "No data files."

        await admin(interaction, act)

    @datastore.command(name="recover", description="Reload a data file from its best valid copy")
    @app_commands.describe(name="The file")
    async def datastore_recover(interaction: discord.Interaction, name: str) -> None:
        async def act(by: str) -> str:
            done = await ops.datastore_recover(name, by=by)
            text = f"`{done['name']}` recovered from {done['source']}."
            if done["problems"]:
                text += " Problems: " + "; ".join(done["problems"])
            return text

        await admin(interaction, act)

    @group.command(name="usage", description="Gemini tokens: the total, by model, top users and servers")
    @app_commands.describe(days="Over how many days, today included (default 1: today, UTC)")
    async def usage(interaction: discord.Interaction, days: app_commands.Range[int, 1, 366] = 1) -> None:
        async def act(by: str) -> str:
            return format_usage_report(await ops.usage_report(days=days, by=by))

        await admin(interaction, act)

    mutex = app_commands.Group(name="mutex", description="Conversation locks", parent=group)

    @mutex.command(name="status", description="Held conversation locks")
    async def mutex_status(interaction: discord.Interaction) -> None:
        async def act(by: str) -> str:
            done = await ops.mutex_status(by=by)
            lines = [
                f"`{lock['key']}` held by {lock['holder']} for {human(lock['held_for'])},"
                f" {lock['waiters']} waiting"
                for lock in done["locks"]
            ]
            return "\n".join(lines) or "No conversation is locked."

        await admin(interaction, act)

    @mutex.command(name="release", description="Free a stuck conversation lock")
    @app_commands.describe(key="The conversation key (see /admin mutex status)")
    async def mutex_release(interaction: discord.Interaction, key: str) -> None:
        async def act(by: str) -> str:
            done = await ops.mutex_release(key, by=by)
            return f"Released `{done['key']}` (held by {done['holder']} for {human(done['held_for'])})."

        await admin(interaction, act)

    _observability_commands(group, ops, admin)
    @group.command(name="incidents", description="Outages recorded: per dependency MTTR and MTBF, the latest")
    async def incidents(interaction: discord.Interaction) -> None:
        async def act(by: str) -> str:
            return format_incidents(await ops.incidents(by=by), commands.app.clock.time())

        await admin(interaction, act)

    @group.command(name="healing", description="What self-healing did: restarts, recoveries, reconnects, gc")
    async def healing(interaction: discord.Interaction) -> None:
        async def act(by: str) -> str:
            return format_healing(await ops.healing(by=by), commands.app.clock.time())

        await admin(interaction, act)

    return group


def _observability_commands(
    group: app_commands.Group,
    ops: Operations,
    admin: Callable[[discord.Interaction, Action], Awaitable[None]],
) -> None:
    """``/admin trace <id>`` and ``/admin errors``: what one request did, and what keeps failing."""

    @group.command(name="trace", description="The steps of one request, by the trace id of an apology or log")
    @app_commands.describe(trace_id="The trace id (from a bug apology, a log line, /admin errors)")
    async def trace(interaction: discord.Interaction, trace_id: str) -> None:
        async def act(by: str) -> str:
            return format_trace(await ops.trace(trace_id, by=by))

        await admin(interaction, act)

    @group.command(name="errors", description="Failures grouped by cause, busiest in the last hour first")
    async def errors(interaction: discord.Interaction) -> None:
        async def act(by: str) -> str:
            return format_errors(await ops.errors(limit=10, by=by))

        await admin(interaction, act)


def server_group(commands: SlashCommands, ops: Operations) -> app_commands.Group:
    """``/server``: the maintenance mode and chat channels of the guild it is run in.

    Every subcommand acts on ``interaction.guild_id`` and no other guild, and only for a member
    who manages that guild (Administrator or Manage Server), checked on each invocation.
    """
    group = app_commands.Group(
        name="server",
        description="This server's managers: its maintenance mode, chat channels and tools",
        guild_only=True,  # Discord does not offer it in DMs (dm_permission, and contexts below)
        allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=False, private_channel=False),
        default_permissions=discord.Permissions(manage_guild=True),  # UI metadata only
    )

    def manage(interaction: discord.Interaction, action: GuildAction) -> Awaitable[None]:
        """Run ``action(guild_id, by)`` for the interaction's guild, as its manager's command."""

        async def act(by: str) -> str:
            if interaction.guild_id is None:  # require_guild_manager refuses DMs first
                raise RuntimeError("a /server command outside a server")
            return await action(interaction.guild_id, by)

        return commands.run(interaction, _show(interaction, act), check=commands.require_guild_manager)

    maintenance = app_commands.Group(
        name="maintenance", description="Maintenance mode for this server only", parent=group
    )

    @maintenance.command(name="on", description="Turn this server's maintenance on; messages are saved")
    @app_commands.describe(message="The notice members of this server see")
    async def maintenance_on(interaction: discord.Interaction, message: str | None = None) -> None:
        async def act(guild_id: int, by: str) -> str:
            return format_guild_maintenance(await ops.guild_maintenance_on(guild_id, message, by=by))

        await manage(interaction, act)

    @maintenance.command(name="off", description="Turn this server's maintenance off; answer what was saved")
    async def maintenance_off(interaction: discord.Interaction) -> None:
        async def act(guild_id: int, by: str) -> str:
            return format_guild_maintenance(await ops.guild_maintenance_off(guild_id, by=by))

        await manage(interaction, act)

    @maintenance.command(name="status", description="Whether this server's maintenance is on")
    async def maintenance_status(interaction: discord.Interaction) -> None:
        async def act(guild_id: int, by: str) -> str:
            return format_guild_maintenance(await ops.guild_maintenance_status(guild_id, by=by))

        await manage(interaction, act)

    channels = app_commands.Group(
        name="channels", description="Channels where I answer every message", parent=group
    )

    @channels.command(name="list", description="Channels of this server where I answer every message")
    async def channels_list(interaction: discord.Interaction) -> None:
        async def act(guild_id: int, by: str) -> str:
            return format_chat_channels(await ops.guild_chat_channels(guild_id, by=by))

        await manage(interaction, act)

    @channels.command(name="add", description="Answer every message in a channel, not only mentions")
    @app_commands.describe(channel="A text channel or thread of this server")
    async def channels_add(
        interaction: discord.Interaction,
        channel: app_commands.AppCommandChannel | app_commands.AppCommandThread,
    ) -> None:
        async def act(guild_id: int, by: str) -> str:
            done = await ops.guild_chat_channel_add(guild_id, _chat_channel(channel), by=by)
            lead = f"I now answer every message in <#{channel.id}>." if done["changed"] else (
                f"I already answer every message in <#{channel.id}>."
            )
            return f"{lead} {format_chat_channels(done)}"

        await manage(interaction, act)

    @channels.command(name="remove", description="Answer only mentions and replies in a channel again")
    @app_commands.describe(channel="A channel or thread of this server")
    async def channels_remove(
        interaction: discord.Interaction,
        channel: app_commands.AppCommandChannel | app_commands.AppCommandThread,
    ) -> None:
        async def act(guild_id: int, by: str) -> str:
            done = await ops.guild_chat_channel_remove(guild_id, channel.id, by=by)
            lead = f"In <#{channel.id}> I answer only mentions and replies now." if done["changed"] else (
                f"<#{channel.id}> was not a chat channel."
            )
            return f"{lead} {format_chat_channels(done)}"

        await manage(interaction, act)

    tools = app_commands.Group(
        name="tools", description="Tools Google runs for my answers here (all off by default)", parent=group
    )

    @tools.command(name="status", description="Which tools are on in this server")
    async def tools_status(interaction: discord.Interaction) -> None:
        async def act(guild_id: int, by: str) -> str:
            return format_guild_tools(await ops.guild_tools(guild_id, by=by))

        await manage(interaction, act)

    @tools.command(name="on", description="Turn a tool on for this server (it costs Gemini quota)")
    @app_commands.describe(tool="Which tool")
    async def tools_on(interaction: discord.Interaction, tool: ToolName) -> None:
        async def act(guild_id: int, by: str) -> str:
            return format_guild_tools(await ops.guild_tool_set(guild_id, tool, True, by=by))

        await manage(interaction, act)

    @tools.command(name="off", description="Turn a tool off for this server")
    @app_commands.describe(tool="Which tool")
    async def tools_off(interaction: discord.Interaction, tool: ToolName) -> None:
        async def act(guild_id: int, by: str) -> str:
            return format_guild_tools(await ops.guild_tool_set(guild_id, tool, False, by=by))

        await manage(interaction, act)

    return group


def _show(interaction: discord.Interaction, action: Action) -> Callable[[], Awaitable[None]]:
    """A command body: run ``action(by)`` and show the text it returns, ephemerally."""

    async def body() -> None:
        await followup(interaction, _clip(await action(f"discord:{interaction.user.id}")))

    return body


def _chat_channel(channel: app_commands.AppCommandChannel | app_commands.AppCommandThread) -> int:
    """The id of a channel the bot can chat in, or ``InvalidRequestError``.

    Discord resolves a channel option only among the channels of the guild it is run in.
    """
    if channel.type not in CHAT_CHANNEL_TYPES:
        raise InvalidRequestError("pick a text channel or a thread: I can only chat there")
    return channel.id


def format_guild_maintenance(status: GuildMaintenanceStatus) -> str:
    if status["enabled"]:
        text = (
            f"Maintenance mode is on for this server. Members here see: {status['message']} "
            "I save their messages and answer them when you turn it off."
        )
    else:
        text = "Maintenance mode is off for this server."
    if status["bot_wide"]:
        text += " (The bot's owners have also turned maintenance on for every server.)"
    return text


def format_chat_channels(status: ChatChannels) -> str:
    if not status["channels"]:
        return "No chat channels: in this server I answer mentions and replies to me."
    listed = ", ".join(f"<#{c}>" for c in status["channels"])
    return f"Chat channels (I answer every message there): {listed}."


def format_guild_tools(status: GuildTools) -> str:
    lines = [f"- {TOOL_LABELS[name]}: {'on' if on else 'off'}" for name, on in status["tools"].items()]
    head = "Tools Google runs for my answers in this server"
    if not any(status["tools"].values()):
        head += " (all off; each costs Gemini quota when on)"
    # Search grounding is also a /settings setting: the same switch for the server, and per place.
    head += "; Search grounding may differ per channel, forum, category or thread (`/settings set grounding`)"
    return head + ":\n" + "\n".join(lines)


def format_usage_report(report: UsageReport) -> str:
    days = report["last_day"] - report["first_day"] + 1
    when = "today (UTC)" if days == 1 else f"the last {days} days"
    lines = [f"The bot used, {when}: {tokens(report['total'])}."]
    for model, figures in report["by_model"].items():
        lines.append(f"- `{model}`: {tokens(figures)}")
    if report["users"]:
        top = ", ".join(f"<@{u['id']}> {u['usage']['counted']:,}" for u in report["users"])
        lines.append(f"Top users: {top}")
    if report["guilds"]:
        names = [
            f"`{g['id']}` {g['usage']['counted']:,}" if g["id"] else f"DMs {g['usage']['counted']:,}"
            for g in report["guilds"]
        ]
        lines.append("Top servers: " + ", ".join(names))
    quotas = [
        f"{label} {value:,} tokens a day" if value else f"{label} unlimited"
        for label, value in (("users", report["user_quota"]), ("servers", report["guild_quota"]))
    ]
    lines.append(f"Quotas: {'; '.join(quotas)}; they reset at midnight UTC, in {human(report['resets_in'])}.")
    return "\n".join(lines)


def format_circuit_status(status: CircuitStatus, now: float) -> str:
    lines = []
    for row in status["breakers"]:
        line = f"`{row['name']}`: {row['state']} for {human(now - row['since'])}"
        if row["remaining"]:
            line += f", next try in {human(row['remaining'])}"
        if row["forced_reason"]:
            line += f" ({row['forced_reason']})"
        if row["last_error"]:
            line += f"; last error {row['last_error']}"
        lines.append(line)
    return "\n".join(lines) or "No breakers."


def format_incidents(report: dict[str, Any], now: float) -> str:
    """Per dependency: incidents, MTTR, MTBF and what they cost; then the latest five."""
    lines = []
    for row in report["dependencies"]:
        line = f"`{row['dependency']}`: {row['incidents']} incident{'s' if row['incidents'] != 1 else ''}"
        if row["open"]:
            line += f" ({row['open']} going on)"
        if row["mttr_seconds"] is not None:
            line += f", MTTR {human(row['mttr_seconds'])}"
        if row["mtbf_seconds"] is not None:
            line += f", MTBF {human(row['mtbf_seconds'])}"
        line += (
            f"; {row['queued']} queued, {row['answered_after']} answered after,"
            f" {row['dead_lettered']} dead-lettered"
        )
        lines.append(line)
    if not lines:
        return "No incidents recorded."
    lines.append("Latest:")
    for row in report["incidents"][:5]:
        when = f"{human(now - row['started_at'])} ago"
        lasted = "going on" if row["seconds"] is None else f"lasted {human(row['seconds'])}"
        lines.append(f"- `{row['dependency']}` {when}, {lasted}: {row['cause']}")
    if not report.get("stored", True):
        lines.append("(storage is unreadable: only the incidents this process holds in memory)")
    return "\n".join(lines)


def format_healing(report: dict[str, Any], now: float) -> str:
    """The healer's state, each kind's budget this hour, and its latest actions (newest first)."""
    if not report["enabled"]:
        head = "Self-healing is off (HEAL_ENABLED=false)."
    else:
        head = (
            f"Self-healing is on: at most {report['max_per_hour']} actions of each kind an hour;"
            f" the gateway is reconnected after {human(report['gateway_silence_seconds'])} of silence;"
            f" gc and cache trims above {report['memory_threshold_bytes'] // (1024 * 1024)} MiB."
        )
    budgets = []
    for kind, use in report["kinds"].items():
        line = f"{kind} {use['used']}/{report['max_per_hour']}"
        if use["held"]:
            line += f" (held back, next in {human(use['free_in'])})"
        budgets.append(line)
    lines = [head, "This hour: " + ", ".join(budgets) + "."]
    history = report["history"]
    if not history:
        lines.append("No actions yet.")
    for row in history[:10]:
        lines.append(
            f"- {human(now - row['at'])} ago, {row['kind']} `{row['target']}`: {row['outcome']}"
            f" ({row['reason']}): {row['detail']}"
        )
    if len(history) > 10:
        lines.append(f"… and {len(history) - 10} older (GET /api/health/healing lists them all)")
    return "\n".join(lines)


def format_maintenance(status: MaintenanceStatus) -> str:
    if not status["enabled"]:
        return f"Maintenance mode is off (mode: {status['mode']})."
    return f"Maintenance mode is on. Users see: {status['message']}"


def format_queue_status(status: QueueStatus) -> str:
    text = f"{status['pending']} waiting"
    if status["oldest_pending_age"] is not None:
        text += f", oldest {human(status['oldest_pending_age'])}"
    counts = [
        f"{kind} {state} {n}" for kind, states in status["depth"].items() for state, n in states.items() if n
    ]
    if counts:
        text += f" ({', '.join(counts)})"
    lines = [text + "."]
    for row in status["items"]:
        lines.append(
            f"#{row['id']} {row['kind']} {row['state']}, {row['attempts']} attempts, "
            f"{human(row['age'])} old" + (f", last error {row['last_error']}" if row["last_error"] else "")
        )
    return "\n".join(lines)


def format_trace(trace: dict[str, Any]) -> str:
    """A trace as its steps, indented by nesting, with offsets and durations in milliseconds."""
    fields = trace["fields"]
    who = ", ".join(f"{k} {fields[k]}" for k in ("guild", "channel", "user", "command") if k in fields)
    head = f"Trace `{trace['trace_id']}`: {trace['name']}, {_ms(trace['duration'])}"
    if trace["error"]:
        head += f", failed: {trace['error']}"
    lines = [head + (f" ({who})" if who else "")]
    for step in trace["spans"]:
        facts = ", ".join(f"{k}={v}" for k, v in step["attributes"].items() if k != "dependency")
        line = f"{'  ' * step['depth']}• `{step['name']}` +{_ms(step['offset'])} {_ms(step['duration'])}"
        if step["error"]:
            line += f" ✗ {step['error']}"
        lines.append(line + (f" ({facts})" if facts else ""))
    if trace["dropped_spans"]:
        lines.append(f"… and {trace['dropped_spans']} more steps not kept")
    if trace["slow_spans"]:
        lines.append(f"Slow: {', '.join(trace['slow_spans'])}")
    return "\n".join(lines)


def format_errors(view: ErrorsView) -> str:
    """One line per failure group: counts over 5 min / 1 h / 24 h, who it hit, a trace to look at."""
    if not view["groups"]:
        return "No failures recorded."
    lines = []
    for row in view["groups"]:
        w = row["windows"]
        users = f"{row['users']}{'+' if row['users_capped'] else ''}"
        guilds = f"{row['guilds']}{'+' if row['guilds_capped'] else ''}"
        sample = row["sample_trace_ids"][-1] if row["sample_trace_ids"] else None
        lines.append(
            f"`{row['id']}` {row['category']} {row['error']} in {row['dependency']} ({row['route']}): "
            f"{w['5m']} / {w['1h']} / {w['24h']} in 5 min / 1 h / 24 h, {row['count']} in all; "
            f"{users} users, {guilds} servers" + (f"; e.g. `/admin trace {sample}`" if sample else "")
        )
    if view["evicted"]:
        lines.append(f"({view['evicted']} older groups forgotten; at most {view['max_groups']} are kept)")
    return "\n".join(lines)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _clip(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"
