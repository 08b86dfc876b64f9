"""``/remind``: reminders that survive restarts and are delivered once.

``/remind me when:10m what:...`` stores a reminder in the bot's storage (``app.storage``, the
``reminders`` table of SQLite or PostgreSQL); ``/remind list`` and ``/remind cancel`` show and
delete one's own. A background loop hands each due reminder to the durable outbound queue
(``app.queue_notice``, whose dedup key names the reminder) and then marks it fired: the drain
delivers it, retrying while Discord is down, and a crash between the two steps only finds the
queued delivery again, so each reminder is posted once. Times come from ``app.clock``.

The plugin also gives Gemini a function, ``set_reminder`` (a ``write`` tool in ``app.tools``, on
where a server's ``functions`` setting names it or ``write``): "remind me in an hour to call Sam"
becomes the same stored reminder, run at most once per question like every write tool.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import discord
import structlog
from discord import app_commands
from discord.ext import commands

from services.tools import Safety, Tool

log = structlog.get_logger("plugins.remind")

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(
    r"\s*(\d{1,6})\s*(seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h|days?|d|weeks?|w)(?![a-z])\s*", re.I
)
MAX_SECONDS = 366 * 86400
MAX_TEXT = 500
MAX_PER_USER = 25  # as the storage's cap (REMINDERS_PER_USER)
TOOL_NAME = "set_reminder"
POLL_SECONDS = 30.0  # the longest the loop sleeps between looks (a new reminder wakes it)


def parse_duration(text: str) -> float | None:
    """Seconds in ``"10m"``, ``"1h 30m"``, ``"2 days"``; None when it is not such a duration, is
    zero, or is over a year."""
    text = text.strip().lower()
    if not text:
        return None
    total = 0
    position = 0
    while position < len(text):
        match = _PART.match(text, position)
        if match is None:
            return None
        total += int(match.group(1)) * UNITS[match.group(2)[0]]
        position = match.end()
    return float(total) if 0 < total <= MAX_SECONDS else None


def reminder_text(user_id: int, text: str) -> str:
    """What the reminder says when it fires (it pings its owner only)."""
    return f"<@{user_id}> \u23f0 Reminder: {text}"


def human(seconds: float) -> str:
    seconds = round(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


class ReminderDesk:
    """The reminders' logic over the application (``storage``, ``clock``, ``queue_notice``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def add(
        self, *, user_id: int, channel_id: int, guild_id: int | None, source_id: int, when: str, text: str
    ) -> str:
        """Store a reminder; the sentence to show the user."""
        seconds = parse_duration(when)
        if seconds is None:
            return "I can't read that time: write it like `10m`, `2h 30m`, `3d` or `1w` (at most a year)."
        text = " ".join(text.split())[:MAX_TEXT]
        if not text:
            return "Tell me what to remind you of."
        pending = await self.app.storage.user_reminders(user_id)
        if len(pending) >= MAX_PER_USER:
            return f"You have {len(pending)} reminders waiting, the most I keep; cancel one first."
        due = self.app.clock.time() + seconds
        reminder = await self.app.storage.add_reminder(
            user_id=user_id,
            channel_id=channel_id,
            guild_id=guild_id,
            source_id=source_id,
            text=text,
            due_at=due,
        )
        return (
            f"I'll remind you in {human(seconds)} (<t:{int(due)}:f>), here: {text} (reminder #{reminder.id})."
        )

    async def listing(self, user_id: int) -> str:
        pending = await self.app.storage.user_reminders(user_id)
        if not pending:
            return "You have no reminders waiting."
        now = self.app.clock.time()
        lines = [f"#{r.id} in {human(max(0.0, r.due_at - now))}: {r.text}" for r in pending]
        return "Your reminders:\n" + "\n".join(lines)

    async def cancel(self, user_id: int, reminder_id: int) -> str:
        if await self.app.storage.cancel_reminder(reminder_id, user_id):
            return f"Reminder #{reminder_id} is cancelled."
        return f"You have no reminder #{reminder_id} waiting."

    async def fire_due(self) -> int:
        """Hand every due reminder to the outbound queue, then mark it fired; how many."""
        storage = self.app.storage
        fired = 0
        for reminder in await storage.due_reminders(now=self.app.clock.time()):
            await self.app.queue_notice(
                channel_id=reminder.channel_id,
                guild_id=reminder.guild_id,
                user_id=reminder.user_id,
                text=reminder_text(reminder.user_id, reminder.text),
                ref_id=reminder.source_id,
                dedup_key=f"reminder:{reminder.id}",
            )
            await storage.reminder_fired(reminder.id)
            fired += 1
        return fired

    async def seconds_to_next(self) -> float:
        """How long the loop may sleep: until the next reminder is due, at most ``POLL_SECONDS``."""
        due = await self.app.storage.next_reminder_at()
        if due is None:
            return POLL_SECONDS
        return min(POLL_SECONDS, max(0.0, due - self.app.clock.time()))


class Reminders(commands.Cog):
    """``/remind``, and the loop that fires due reminders while the plugin is loaded."""

    remind = app_commands.Group(name="remind", description="Reminders that survive restarts")

    def __init__(self, bot: Any) -> None:
        self.desk = ReminderDesk(bot.app)
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def cog_load(self) -> None:
        self.desk.app.tools.register(self.tool())
        self.task = asyncio.create_task(self.run())

    async def cog_unload(self) -> None:
        self.desk.app.tools.unregister(TOOL_NAME)
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=5.0)

    def tool(self) -> Tool:
        """``set_reminder``, the function Gemini may call to store a reminder for the asker."""

        async def set_reminder(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
            said = await self.desk.add(
                user_id=ctx.invoker_id,
                channel_id=ctx.channel.id,
                guild_id=ctx.guild.id if ctx.guild is not None else None,
                source_id=ctx.question_id,
                when=str(args["when"]),
                text=str(args["what"]),
            )
            self.wake()
            return {"result": said}

        return Tool(
            TOOL_NAME,
            "Remind the asker of something later, in this channel: `when` like 10m, 2h 30m, 3d, 1w.",
            set_reminder,
            {
                "type": "object",
                "properties": {"when": {"type": "string"}, "what": {"type": "string"}},
                "required": ["when", "what"],
            },
            safety=Safety.WRITE,
        )

    def wake(self) -> None:
        """Look for due reminders now (after a new one, or a test moving the clock)."""
        self.wakeup.set()

    async def run(self) -> None:
        while True:
            wait = POLL_SECONDS
            try:
                await self.desk.fire_due()
                wait = await self.desk.seconds_to_next()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # storage or the breaker down: look again later
                log.warning("remind.fire_failed", error=repr(exc)[:200])
            self.wakeup.clear()
            try:
                async with asyncio.timeout(max(wait, 0.05)):
                    await self.wakeup.wait()
            except TimeoutError:
                pass

    async def answer(self, interaction: discord.Interaction, doing: Any) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)
        text = await doing
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())

    @remind.command(name="me", description="Remind me of something later, here")
    @app_commands.describe(when="In how long: 10m, 2h 30m, 3d, 1w", what="What to remind you of")
    async def me(self, interaction: discord.Interaction, when: str, what: str) -> None:
        doing = self.desk.add(
            user_id=interaction.user.id,
            channel_id=interaction.channel_id or 0,
            guild_id=interaction.guild_id,
            source_id=interaction.id,
            when=when,
            text=what,
        )
        await self.answer(interaction, doing)
        self.wake()

    @remind.command(name="list", description="My reminders waiting")
    async def list_(self, interaction: discord.Interaction) -> None:
        await self.answer(interaction, self.desk.listing(interaction.user.id))

    @remind.command(name="cancel", description="Cancel one of my reminders")
    @app_commands.describe(reminder="Its number (see /remind list)")
    async def cancel(self, interaction: discord.Interaction, reminder: int) -> None:
        await self.answer(interaction, self.desk.cancel(interaction.user.id, reminder))


async def setup(bot: commands.Bot) -> None:
    await bot.add_cog(Reminders(bot))
