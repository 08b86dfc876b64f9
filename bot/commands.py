"""Slash commands: ``/ask``, ``/reset``, ``/status``, ``/help``, and the frame every command runs in.

Every command defers at once (Discord allows 3 s to acknowledge), runs its body under a
timeout inside a request context, and follows up. Any failure reaches the user as one clear
ephemeral sentence, turned into text in one place (``SlashCommands.sentence``); unknown or
out-of-sync commands are answered by the tree's error handler.

``/ask`` takes the same road as a message: it is accepted durably (the interaction id is the
message id), answered under the conversation's mutex through Gemini's retry/breaker/timeout,
and delivered as the interaction's follow-up through ``Answerer.deliver``. When Gemini
is down the follow-up is the queue acknowledgement and the drain posts the answer later in
the channel (interaction tokens expire after 15 minutes). ``/ask`` itself stops a minute before
the token expires; an answer that still meets an expired token (Discord: 401, code 50027) is
posted like a late one instead: in the channel, mentioning the asker, or by DM when private.

Who may run what is checked on every invocation, by the frame (``check=``), never left to
``default_permissions`` (which only hides a command in Discord's UI):

- ``/admin`` (``bot.admin``) changes the bot for every guild: only its owners (``require_owner``:
  ``ADMIN_USER_IDS``, the DataStore ``admins`` file, and the application's owner or the admins
  and developers of the team that owns it, fetched at start-up).
- ``/server`` changes one guild: only that guild's managers (``require_guild_manager``:
  Administrator or Manage Server), in that guild.
- ``/reset`` in a guild channel or thread forgets a shared conversation: Manage Messages there
  (``require_reset``); anyone may reset their own DM with the bot.

A refusal is one ephemeral sentence and a ``command.refused`` log line with the user id.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import discord
import structlog
from discord import app_commands

from bot import texts
from bot.answering import Answerer
from bot.conversations import speaker_label
from bot.health import AVAILABILITY_DAYS, Availability
from bot.inbound import Inbound, Snowflake
from bot.memory_commands import memory_group
from bot.operations import (
    InvalidRequestError,
    OperationError,
    Operations,
    SettingChange,
    SettingsView,
    UsageFigures,
    UsageReport,
    describe_processes,
    process_rows,
)
from bot.routing import FailureRouter
from bot.settings import DEFAULT, SERVER, scope_chain
from bot.splitting import DISCORD_LIMIT
from resilience.context import request_context
from resilience.degradation import ItemKind, ItemState, QueueItem
from resilience.errors import Category, MutexTimeoutError, QueueFullError, classify
from services.config import SAFETY_THRESHOLDS
from services.coordination import HEARTBEAT_SECONDS
from services.datastore import MAX_PERSONA_CHARS
from services.discord_io import Upload, allowed_mentions_for
from services.gemini import model_breaker_name

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.commands")

DEFAULT_TIMEOUT = 10.0
"""Seconds a command other than ``/ask`` may run before the user is told it took too long."""
ASK_MARGIN = 5.0
"""``/ask`` may run its mutex wait plus the processing timeout plus this much."""
INTERACTION_TOKEN_SECONDS = 15 * 60.0
"""How long Discord accepts follow-ups with an interaction's token ("Interaction tokens are valid
for 15 minutes", discord-api-docs, Receiving and Responding); then 401 50027 Invalid Webhook Token."""
ASK_TOKEN_MARGIN = 60.0
"""``/ask`` stops this long before the token expires, so its "took too long" sentence still shows."""
INVALID_WEBHOOK_TOKEN = 50027
"""Discord's JSON error code for a webhook call with an expired (or unknown) interaction token."""
LATENCY_WINDOW = 100
"""How many recent requests ``/status`` summarises."""

Body = Callable[[], Awaitable[None]]
Check = Callable[[discord.Interaction, str], None]
"""Raises ``RefusedError`` unless the interaction's user may run the named command there."""


class RefusedError(Exception):
    """The member may not run this command here; ``sentence`` tells them why (shown as is)."""

    def __init__(self, user_id: int, command: str, needs: str, sentence: str) -> None:
        super().__init__(f"user {user_id} may not run /{command}: needs {needs}")
        self.user_id = user_id
        self.command = command
        self.needs = needs
        self.sentence = sentence


def application_owners(info: discord.AppInfo) -> frozenset[int]:
    """Who owns the application: its owner, or the owner, admins and developers of its team.

    A team-owned application's ``owner`` is a stand-in user for the team, not a person; read-only
    team members and members still invited (not accepted) do not own the bot.
    """
    team = info.team
    if team is None:
        return frozenset({info.owner.id})
    members = {
        m.id
        for m in team.members
        if m.role in (discord.TeamMemberRole.admin, discord.TeamMemberRole.developer)
        and m.membership_state is discord.TeamMembershipState.accepted
    }
    return frozenset(members | ({team.owner_id} if team.owner_id is not None else set()))


class SlashCommands:
    """The behaviour behind every slash command; ``setup_commands`` registers it on a tree."""

    def __init__(
        self,
        app: Application,
        answerer: Answerer,
        router: FailureRouter,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        owners: Callable[[], Collection[int]] = frozenset,
    ) -> None:
        self.app = app
        self.answerer = answerer
        self.router = router
        self.timeout = timeout
        self._application_owners = owners
        cfg = app.config
        self.ask_timeout = min(
            cfg.mutex_acquire_timeout_seconds + cfg.processing_timeout_seconds + ASK_MARGIN,
            INTERACTION_TOKEN_SECONDS - ASK_TOKEN_MARGIN,
        )

    # -- the frame every command runs in --------------------------------------------------

    async def run(
        self,
        interaction: discord.Interaction,
        body: Body,
        *,
        ephemeral: bool = True,
        limit: float | None = None,
        check: Check | None = None,
    ) -> None:
        """Defer, check, run ``body`` under a timeout; turn any failure into one ephemeral sentence."""
        name = interaction.command.qualified_name if interaction.command else "?"
        clock = self.app.clock
        started = clock.monotonic()
        outcome = "error"
        with request_context(
            collector=self.app.traces,
            guild=interaction.guild_id,
            channel=interaction.channel_id,
            user=interaction.user.id,
            command=name,
        ) as trace:
            try:
                try:
                    await interaction.response.defer(ephemeral=ephemeral, thinking=True)
                except discord.HTTPException as exc:
                    # Past Discord's 3 s (or a duplicate delivery): nobody is listening any more.
                    log.warning("command.defer_failed", command=name, status=exc.status, code=exc.code)
                    outcome = "not_acknowledged"
                    return
                try:
                    if check is not None:
                        check(interaction, name)
                    async with asyncio.timeout(self.timeout if limit is None else limit):
                        await body()
                    outcome = "ok"
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    outcome = _command_outcome(exc)
                    await self.fail(interaction, name, exc, trace.trace_id, public=not ephemeral)
            finally:
                # The command's name comes from the tree (a fixed set): Metrics bounds the label.
                self.app.metrics.observe_command(name, outcome, clock.monotonic() - started)

    # -- who may run what ----------------------------------------------------------------

    def is_owner(self, user_id: int) -> bool:
        """One of the bot's owners: ``ADMIN_USER_IDS``, the ``admins`` file, the application's owners."""
        return (
            user_id in self.app.config.admin_user_ids
            or user_id in self._stored_admins()
            or user_id in self._application_owners()
        )

    def require_owner(self, interaction: discord.Interaction, command: str) -> None:
        """Bot-wide actions (every guild at once): the bot's owners only, wherever they ask."""
        if self.is_owner(interaction.user.id):
            return
        self._refuse(interaction, command, "owner", texts.owners_only())

    def require_guild_manager(self, interaction: discord.Interaction, command: str) -> None:
        """One guild's settings: a member with Administrator or Manage Server, in that guild."""
        root = command.split()[0]
        named = root if root in ("settings", "model", "memory") else "server"  # sentences name the command
        if interaction.guild_id is None:
            self._refuse(interaction, command, "a server", texts.server_only(named))
        perms = interaction.permissions
        if perms.administrator or perms.manage_guild:
            return
        sentence = texts.managers_only(named) if named != "server" else texts.managers_only()
        self._refuse(interaction, command, "manage_guild", sentence)

    def require_reset(self, interaction: discord.Interaction, command: str) -> None:
        """A shared conversation (guild channel or thread): Manage Messages there; one's own DM: anyone."""
        if interaction.guild_id is None and isinstance(interaction.channel, discord.DMChannel):
            return
        perms = interaction.permissions
        if perms.administrator or perms.manage_messages:
            return
        self._refuse(interaction, command, "manage_messages", texts.reset_refused())

    def _refuse(
        self, interaction: discord.Interaction, command: str, needs: str, sentence: str
    ) -> NoReturn:
        user_id = interaction.user.id
        log.warning(
            "command.refused", command=command, user_id=user_id, guild_id=interaction.guild_id, needs=needs
        )
        raise RefusedError(user_id, command, needs, sentence)

    def _stored_admins(self) -> list[int]:
        """Owners added in the DataStore ``admins`` file (read from memory, no I/O)."""
        ids = (self.app.store.cached("admins") or {}).get("user_ids") or []
        return [int(i) for i in ids]

    def sentence(self, exc: BaseException, trace_id: str) -> str:
        """The one sentence a user sees for a failed command."""
        if isinstance(exc, RefusedError):
            return exc.sentence
        if isinstance(exc, MutexTimeoutError):
            return "I'm busy answering in this conversation right now; please try again in a few seconds."
        if isinstance(exc, TimeoutError):
            return "That took too long, so I stopped. Please try again in a moment."
        if _is_operations_error(exc):
            text = str(exc)
            return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
        verdict = classify(exc, now=self.app.clock.time())
        if verdict.category is Category.INTERNAL:
            return texts.bug(trace_id)
        return verdict.user_message

    async def fail(
        self, interaction: discord.Interaction, name: str, exc: Exception, trace_id: str, *, public: bool
    ) -> None:
        """Log the failure and tell the user, ephemerally, in one sentence."""
        verdict = classify(exc)
        if isinstance(exc, RefusedError | TimeoutError) or _is_operations_error(exc):
            log.info("command.failed", command=name, error=type(exc).__name__)
        elif verdict.category is Category.INTERNAL:
            log.error("command.bug", command=name, exc_info=exc)
            self.app.metrics.errors.labels(category=Category.INTERNAL.value).inc()
        else:
            log.warning("command.failed", command=name, category=verdict.category.value)
        text = self.sentence(exc, trace_id)
        if public:
            # The first follow-up would replace the public "thinking" message; remove it so the
            # error can be ephemeral.
            try:
                await interaction.delete_original_response()
            except discord.HTTPException:
                pass
        try:
            await followup(interaction, text)
        except discord.HTTPException as err:
            log.warning("command.error_not_shown", command=name, status=err.status)

    # -- /ask -----------------------------------------------------------------------------

    async def ask(self, interaction: discord.Interaction, prompt: str, private: bool) -> None:
        """Answer ``prompt`` like a message; the answer is the follow-up."""
        started = time.perf_counter()
        outcome = "error"
        try:
            outcome = await self._ask(interaction, prompt, private)
        finally:
            self.app.metrics.observe_message(outcome, time.perf_counter() - started)

    async def _ask(self, interaction: discord.Interaction, prompt: str, private: bool) -> str:
        app = self.app
        cfg = app.config
        text = prompt.strip()
        reply_to = _FollowupChannel(interaction, app, private=private, prompt=text)
        if not text:
            await reply_to.say(texts.empty_mention())
            return "refused"
        if len(text) > cfg.max_input_chars:
            await reply_to.say(texts.too_long(len(text), cfg.max_input_chars))
            return "refused"
        if interaction.channel_id is None:
            raise RuntimeError("an application command interaction without a channel")
        inbound = Inbound(
            message_id=interaction.id,
            channel_id=interaction.channel_id,
            guild_id=interaction.guild_id,
            author_id=interaction.user.id,
            content=text,
            speaker=speaker_label(interaction.user.display_name, interaction.user.id)
            if interaction.guild_id is not None
            else None,
            scopes=scope_chain(interaction.channel),
        )
        # The follow-up is the acknowledgement: nothing else may post one for this item. The
        # flags tell the drain the message id is an interaction's, not a message to reply to.
        extra = {"acked": True, "interaction": True, "private": private}

        # The rate limit first: maintenance must not become a way to queue past it.
        wait = app.ratelimiter.check(inbound.author_id, inbound.guild_id)
        if wait is not None:
            await reply_to.say(texts.cooldown(wait))
            return "rate_limited"
        over = app.usage.check(inbound.author_id, inbound.guild_id)
        if over is not None:
            await reply_to.say(texts.quota_exhausted(over.scope, over.limit, over.resets_in))
            return "refused"

        maintenance = app.maintenance(inbound.guild_id)
        try:
            if maintenance is not None:
                position: int | None = None
                if cfg.maintenance_queue_messages:
                    item = await app.accept(inbound, claim=False, extra=extra)
                    position = await app.storage.position(item.id) if item is not None else None
                await reply_to.say(texts.maintenance(maintenance, queued_position=position))
                return "maintenance"
            item = await app.accept(inbound, claim=True, extra=extra)
        except asyncio.CancelledError:
            raise
        except QueueFullError as exc:
            await reply_to.say(texts.queue_full(exc.scope, exc.limit))
            return "refused"
        except Exception as exc:
            if maintenance is not None:
                raise
            await reply_to.say(texts.cannot_accept(classify(exc)))
            return "error"
        if item is None:
            return "ignored_duplicate"
        if item.state is ItemState.PENDING:
            await reply_to.say(texts.queued_busy(await app.storage.position(item.id)))
            return "queued"
        try:
            async with app.mutex.acquire(
                inbound.key, cfg.mutex_acquire_timeout_seconds, holder=str(interaction.id)
            ):
                history = await app.storage.history_if_next(inbound.key, item.id)
                if history is None:  # older messages of this conversation go first
                    return await self._queue_busy(item, reply_to, "behind queued messages")
                return await self._generate(item, inbound, history, reply_to)
        except MutexTimeoutError:
            return await self._queue_busy(item, reply_to, "conversation busy")

    async def _generate(
        self, item: QueueItem, inbound: Inbound, history: list[Any], reply_to: _FollowupChannel
    ) -> str:
        """Gemini, then the follow-up: the message pipeline's own path, writing to the follow-up."""
        return await self.answerer.answer(
            item,
            inbound,
            channel=reply_to,  # type: ignore[arg-type]  # quacks like a Messageable for send()/typing()
            original=inbound.reference(),
            live=True,
            history=history,
        )

    async def _queue_busy(self, item: QueueItem, reply_to: _FollowupChannel, why: str) -> str:
        requeued = await self.router.requeue(item, why, count_attempt=False)
        await reply_to.say(texts.queued_busy(await self.app.storage.position(requeued.id)))
        return "queued"

    # -- /reset, /status, /help -------------------------------------------------------------

    async def reset(self, interaction: discord.Interaction, confirm: bool) -> None:
        """Forget this channel's (or thread's, or DM's) conversation history, once confirmed.

        Run with ``check=require_reset``: in a guild it needs Manage Messages.
        """
        if not confirm:
            await followup(
                interaction,
                "This forgets everything I remember of this conversation, for everyone in it. "
                "To go ahead, run `/reset confirm:True`.",
            )
            return
        if interaction.channel_id is None:
            raise RuntimeError("an application command interaction without a channel")
        key = Inbound(interaction.id, interaction.channel_id, None, interaction.user.id, "").key
        # Under the conversation's lock, so an answer being written cannot slip in after the reset.
        async with self.app.mutex.acquire(
            key, self.app.config.mutex_acquire_timeout_seconds, holder=f"reset:{interaction.id}"
        ):
            forgotten = await self.app.storage.forget(key, branches=True)  # its reply branches too
        log.info("conversation.reset", channel_id=interaction.channel_id, turns=forgotten)
        await followup(
            interaction,
            f"Done: I forgot this conversation ({forgotten} message{'s' if forgotten != 1 else ''}). "
            "We start afresh.",
        )

    async def status_embed(self, guild_id: int | None = None, *, availability: bool = False) -> discord.Embed:
        """Mode (and guild ``guild_id``'s own maintenance), each breaker's state and time in it, queue
        depth and oldest age, every process sharing the database (when there are others), recent
        latency; with ``availability`` (for the bot's owners) the share of messages answered within
        30 s against the objective and the error budget left."""
        app = self.app
        now = app.clock.time()
        mode = app.degradation.snapshot()
        stats = await app.storage.stats(now=now)
        guild_notice = app.guild_maintenance(guild_id)
        healthy = (
            mode.mode.value == "normal"
            and guild_notice is None
            and all(b.state.value == "closed" for b in app.board)
        )
        embed = discord.Embed(
            title="Bot status",
            colour=discord.Colour.green() if healthy else discord.Colour.orange(),
        )
        mode_text = mode.mode.value
        if mode.reason:
            mode_text += f" ({mode.reason})"
        embed.add_field(name="Mode", value=f"{mode_text}, for {human(now - mode.since)}", inline=False)
        if guild_notice is not None:
            value = f"maintenance (set by this server's managers): {guild_notice}"
            embed.add_field(name="This server", value=value[:1024], inline=False)
        for snap in app.board.snapshot():
            value = f"{snap.state.value} for {human(now - snap.since)}"
            if snap.remaining > 0:
                value += f", next try in {human(snap.remaining)}"
            if snap.failures:
                value += f", {snap.failures} recent failure{'s' if snap.failures != 1 else ''}"
            embed.add_field(name=f"Breaker {snap.name}", value=value, inline=True)
        pending = stats.pending()
        queue = f"{pending} waiting ({stats.pending(ItemKind.INBOUND)} to answer, "
        queue += f"{stats.pending(ItemKind.OUTBOUND)} to deliver)"
        if stats.oldest_pending_age is not None:
            queue += f", oldest {human(stats.oldest_pending_age)}"
        dead = sum(n for (_, state), n in stats.depth.items() if state is ItemState.DEAD)
        if dead:
            queue += f"; {dead} dead-lettered"
        embed.add_field(name="Queue", value=queue, inline=False)
        processes = await self._processes()
        if processes is not None:
            embed.add_field(name="Processes", value=processes[:1024], inline=False)
        embed.add_field(name="Latency", value=self._latency(), inline=False)
        if availability:
            embed.add_field(name="Availability (owners)", value=await self._availability(now), inline=False)
        return embed

    async def _processes(self) -> str | None:
        """Each process sharing the database, from its heartbeat; None when this one is alone."""
        try:
            rows = await process_rows(self.app)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return f"unknown: storage unreadable ({classify(exc).category.value})"
        if all(row["this"] for row in rows):
            return None
        return describe_processes(rows, HEARTBEAT_SECONDS)

    async def _availability(self, now: float) -> str:
        slo = self.app.config.availability_slo
        try:
            days = await self.app.storage.availability(now=now, days=AVAILABILITY_DAYS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return f"unknown: storage unreadable ({classify(exc).category.value})"
        report = Availability(slo, tuple(days))
        today_number = int(now // 86400)
        today = report.today if report.today is not None and report.today.day == today_number else None
        ratio = report.ratio_of(today)
        text = f"Objective: {_percent(slo)} of messages answered within 30 s, per day (UTC).\n"
        if ratio is None or today is None:
            text += "Today: no message settled yet; error budget untouched."
        else:
            text += (
                f"Today: {_percent(ratio)} of {today.settled} answered within 30 s; error budget left "
                f"{_percent(report.budget_left_of(today))}."
            )
        week = [d for d in days if d.settled]
        if week:
            settled = sum(d.settled for d in week)
            in_time = sum(d.answered_in_time for d in week)
            text += f"\nLast {AVAILABILITY_DAYS} days: {_percent(in_time / settled)} of {settled}."
        return text

    def _latency(self) -> str:
        durations = sorted(r.duration for r in self.app.traces.recent()[:LATENCY_WINDOW])
        parts = []
        if durations:
            parts.append(
                f"requests p50 {_ms(_rank(durations, 0.5))}, p95 {_ms(_rank(durations, 0.95))}"
                f" (last {len(durations)})"
            )
        timeout = self.app.gemini.timeout
        p50, p95 = timeout.percentile(0.5), timeout.percentile(0.95)
        if p50 is not None and p95 is not None:
            parts.append(f"Gemini p50 {_ms(p50)}, p95 {_ms(p95)} (last {timeout.samples})")
        return "; ".join(parts) or "no requests yet"

    async def status(self, interaction: discord.Interaction) -> None:
        owner = self.is_owner(interaction.user.id)
        embed = await self.status_embed(interaction.guild_id, availability=owner)
        await interaction.followup.send(embed=embed, ephemeral=True)

    async def help(self, interaction: discord.Interaction) -> None:
        await followup(interaction, help_text())

    def usage_check(self, server: bool) -> Check:
        """``/usage``: one's own for anyone; ``server:True`` for the guild's managers only."""

        def check(interaction: discord.Interaction, command: str) -> None:
            if server:
                self.require_guild_manager(interaction, command)

        return check

    async def usage(self, interaction: discord.Interaction, server: bool) -> None:
        """The caller's Gemini tokens today and this week, or (``server``) this guild's today with its
        top users; with the daily quotas and when they reset."""
        ops = Operations(self.app)
        by = f"discord:{interaction.user.id}"
        if server and interaction.guild_id is not None:
            today = await ops.usage_report(days=1, guild_id=interaction.guild_id, by=by)
            week = await ops.usage_report(days=7, guild_id=interaction.guild_id, top=0, by=by)
            text = format_usage(today, week, whose="This server", quota=today["guild_quota"])
        else:
            today = await ops.usage_report(days=1, user_id=interaction.user.id, by=by)
            week = await ops.usage_report(days=7, user_id=interaction.user.id, by=by)
            text = format_usage(today, week, whose="You", quota=today["user_quota"])
        await followup(interaction, text[:DISCORD_LIMIT])


def tokens(figures: UsageFigures) -> str:
    """One line of usage: counted tokens, then what they are made of."""
    parts = [f"{figures['prompt']:,} read"]
    if figures["cached"]:
        parts[0] += f" ({figures['cached']:,} from Gemini's cache)"
    parts.append(f"{figures['output']:,} written")
    if figures["thought"]:
        parts.append(f"{figures['thought']:,} thinking")
    answers = figures["calls"]
    return (
        f"**{figures['counted']:,} tokens** in {answers:,} answer{'s' if answers != 1 else ''}"
        f" ({', '.join(parts)})"
    )


def format_usage(today: UsageReport, week: UsageReport, *, whose: str, quota: int) -> str:
    """``/usage``: today's and the week's tokens, the daily quota and its reset, the top users."""
    verb = "have" if whose == "You" else "has"
    lines = [f"{whose} {verb} used, today (UTC): {tokens(today['total'])}."]
    if quota:
        left = max(0, quota - today["total"]["counted"])
        lines.append(
            f"Daily allowance: {quota:,} tokens, {left:,} left; it resets at midnight UTC, in "
            f"{human(today['resets_in'])}."
        )
    else:
        lines.append("No daily allowance is set: usage is not limited.")
    lines.append(f"Last 7 days: {tokens(week['total'])}.")
    if today["users"] and today["guild_id"] is not None:
        top = ", ".join(f"<@{u['id']}> {u['usage']['counted']:,}" for u in today["users"])
        lines.append(f"Top users today: {top}.")
    return "\n".join(lines)


def help_text() -> str:
    """What the bot does and how to talk to it."""
    return (
        "I answer questions with Google Gemini.\n"
        "**Talk to me** by mentioning me, replying to one of my messages, in a DM, or with "
        "`/ask prompt:<question>` (add `private:True` to see the answer alone).\n"
        "I remember the recent conversation of each channel, thread and DM; `/reset` makes me forget it "
        "(in a server that needs the Manage Messages permission; your DM with me you can always reset).\n"
        "**Long-term memory** is yours to choose: `/memory on` and I remember what you tell me and recall "
        "it when it helps, anywhere; `/memory show` lists it, `/memory forget` deletes it.\n"
        "**When Gemini or Discord has trouble** I save your message, tell you it is queued, and answer it "
        "here as soon as I can; nothing you sent is lost.\n"
        "`/status` shows how I'm doing; `/usage` the Gemini tokens you used today (and your daily "
        "allowance, if there is one).\n"
        "**Server managers** (Manage Server): `/server` for this server only: its maintenance mode, "
        "the channels where I answer every message, and the tools Google runs for my answers (search "
        "grounding with sources, reading links, running code); `/usage server:True` for its usage; "
        "`/settings` for how I answer here (persona, model, temperature, answer length, safety filter, "
        "history, grounding, streaming, chat channels, auto-threads, a moderation log, the server's memory, "
        "the answer cache, cached answers while Gemini is down), for the whole "
        "server or one category, channel, forum or thread; `/settings show` says what applies where. "
        "`/model` shows (and managers choose) the Gemini model; if it is overloaded, the next answers "
        "and says so.\n"
        "In a server I tell people apart, a thread or forum post is a conversation of its own, and a reply "
        "to one of my earlier answers continues from that answer.\n"
        "**The bot's owners**: `/admin` for what affects every server: breakers, maintenance, the queue, "
        "data and locks."
    )


class _FollowupChannel:
    """The interaction follow-up, shaped like the channel ``DiscordIO.send`` writes to.

    Once Discord refuses the token (expired: 401, code 50027), this and every later message of
    the answer goes where a late answer would (``_post_instead``).
    """

    def __init__(
        self, interaction: discord.Interaction, app: Application, *, private: bool, prompt: str
    ) -> None:
        self.interaction = interaction
        self.app = app
        self.private = private
        self.prompt = prompt
        self.id = interaction.channel_id  # for DiscordIO's logs
        self._expired = False
        self._introduced = False

    async def send(
        self,
        content: str,
        *,
        allowed_mentions: discord.AllowedMentions | None = None,
        reference: object = None,  # a follow-up is tied to its interaction, not a message
        embed: discord.Embed | None = None,
        nonce: str | None = None,  # webhooks have no nonce; a follow-up is sent once per token anyway
        files: Sequence[discord.File] = (),
    ) -> discord.Message:
        kwargs: dict[str, Any] = {"embed": embed} if embed is not None else {}
        # discord.py closes a File once it is sent: keep the bytes for a second attempt elsewhere.
        uploads = [Upload(f.filename or "file", f.fp.read()) for f in files]
        if uploads:
            kwargs["files"] = [u.file() for u in uploads]
        if not self._expired:
            try:
                return await self.interaction.followup.send(
                    content,
                    ephemeral=self.private,
                    allowed_mentions=allowed_mentions or discord.AllowedMentions.none(),
                    wait=True,
                    **kwargs,
                )
            except discord.HTTPException as exc:
                if exc.code != INVALID_WEBHOOK_TOKEN:
                    raise
                self._expired = True
                log.warning(
                    "ask.token_expired",
                    interaction_id=self.interaction.id,
                    user_id=self.interaction.user.id,
                    instead="dm" if self.private else "channel",
                )
        if uploads:
            kwargs["files"] = [u.file() for u in uploads]
        return await self._post_instead(content, nonce=nonce, **kwargs)

    async def _post_instead(self, content: str, *, nonce: str | None, **kwargs: Any) -> discord.Message:
        """Post in the channel (by DM when private), like the drain's late answer to a slash command:
        no reply (there is no message to reply to), the asker mentioned, the question recalled."""
        app = self.app
        user_id = self.interaction.user.id
        if self.private:
            channel = await app.discord_io.dm_channel(self.interaction.client, user_id)
        else:
            if self.interaction.channel_id is None:
                raise RuntimeError("an application command interaction without a channel")
            channel = await app.channel(self.interaction.channel_id)
        mention = allowed_mentions_for(Snowflake(user_id))
        if not self._introduced:
            self._introduced = True
            intro = f"<@{user_id}> {texts.late_answer_prefix(self.prompt)}"
            if len(intro) + len(content) <= DISCORD_LIMIT:
                content = intro + content
            else:  # no room in this chunk: the introduction goes first, on its own
                await channel.send(intro.rstrip(), allowed_mentions=mention)
        if nonce is not None:
            kwargs["nonce"] = nonce  # a resend after a timeout is not posted twice (DiscordIO.send)
        sent: discord.Message = await channel.send(content, allowed_mentions=mention, **kwargs)
        return sent

    async def typing(self) -> None:
        """Nothing to do: the deferred response already shows "thinking"."""

    async def say(self, text: str) -> None:
        """A notice instead of an answer (cooldown, queued, ...)."""
        await self.send(text)


async def followup(interaction: discord.Interaction, text: str) -> None:
    """One ephemeral follow-up sentence that pings nobody."""
    await interaction.followup.send(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())


def _command_outcome(exc: BaseException) -> str:
    """The ``bot_commands_total`` outcome of a command that raised ``exc``."""
    if isinstance(exc, RefusedError):
        return "refused"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "error"


def command_names(tree: app_commands.CommandTree[Any]) -> list[str]:
    """The qualified name of every command on ``tree`` (``ask``, ``admin circuit reset``, ...)."""
    names: list[str] = []
    for command in tree.get_commands():
        if isinstance(command, app_commands.Group):
            names.extend(sub.qualified_name for sub in command.walk_commands()
                         if isinstance(sub, app_commands.Command))
        else:
            names.append(command.qualified_name)
    return names


def _is_operations_error(exc: BaseException) -> bool:
    """Errors of the admin operations carry a sentence written for the operator."""
    return isinstance(exc, OperationError)


def _rank(ordered: list[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def _percent(share: float) -> str:
    """A share as a percentage with the digits an objective like 99.9% needs."""
    return f"{share * 100:.2f}".rstrip("0").rstrip(".") + "%"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


human = texts.duration
"""A duration for people (``texts.duration``)."""


# -- /settings and /model ---------------------------------------------------------------------

SettingName = Literal[
    "persona", "model", "temperature", "max_output_tokens", "safety", "history", "grounding", "streaming",
    "chat", "auto_thread", "modlog_channel", "modlog_text",
]
"""The choices of ``/settings set|reset setting:`` (``bot.settings.SETTINGS``)."""
Place = app_commands.AppCommandChannel | app_commands.AppCommandThread
"""Where a setting applies: a category, a text or announcement channel, a forum, a thread."""
SETTING_PLACES = frozenset({
    discord.ChannelType.text,
    discord.ChannelType.news,
    discord.ChannelType.forum,
    discord.ChannelType.category,
    discord.ChannelType.public_thread,
    discord.ChannelType.private_thread,
    discord.ChannelType.news_thread,
})
MODAL_TIMEOUT = 600.0
"""Seconds an open persona modal waits for its submission (then discord.py forgets it: bounded)."""
_BOOLEAN_SETTINGS = ("grounding", "streaming", "chat", "auto_thread", "modlog_text")
_EXAMPLES = {
    "temperature": ("0", "0.2", "0.7", "1", "1.5", "2"),
    "max_output_tokens": ("256", "512", "1024", "2048", "4096", "8192"),
    "history": ("0", "5", "10", "20", "50"),
    "safety": SAFETY_THRESHOLDS,
    **{name: ("on", "off") for name in _BOOLEAN_SETTINGS},
}


def _place(where: Place | None) -> int | None:
    """The id of the place a setting is for (None: the whole server), or ``InvalidRequestError``."""
    if where is None:
        return None
    if where.type not in SETTING_PLACES:
        raise InvalidRequestError(
            f"settings apply to text channels, forums, categories and threads, not <#{where.id}>"
        )
    return where.id


def _chain(interaction: discord.Interaction, place: int | None) -> tuple[int, ...]:
    """The scope chain of ``place``, or of the channel the command was run in (memory only)."""
    guild = interaction.guild
    target: Any = interaction.channel
    if place is not None:
        target = guild.get_channel_or_thread(place) if guild is not None else None
        if target is None:
            return (place,)
    return scope_chain(target)


def _where(scope: int | None) -> str:
    return "for this server" if scope is None else f"in <#{scope}>"


def _source(source: str | int) -> str:
    if source == SERVER:
        return "set for this server"
    if source == DEFAULT:
        return "the bot's default"
    return f"set in <#{source}>"


def format_settings(view: SettingsView) -> str:
    """``/settings show``: each setting's value where it applies, and where it comes from."""
    head = (
        f"Settings that apply in <#{view['chain'][0]}>" if view["chain"] else "Settings for this server"
    ) + " (a thread, then its channel or forum, the category, this server, the bot's default):"
    lines = [head]
    for row in view["settings"]:
        lines.append(f"- **{row['label']}**: {row['shown']} ({_source(row['source'])})")
    if view["scopes"]:
        places = ", ".join(f"<#{s}>" for s in view["scopes"][:20])
        more = f" and {len(view['scopes']) - 20} more" if len(view["scopes"]) > 20 else ""
        lines.append(f"Places with settings of their own: {places}{more}.")
    return "\n".join(lines)


def format_setting_change(done: SettingChange) -> str:
    """The sentence after ``/settings set|reset`` (and ``/model``, the persona modal)."""
    where = _where(done["scope"])
    if done["shown"] is None:
        if not done["changed"]:
            return f"{done['label']} had no value of its own {where}: nothing changed."
        return f"{done['label']} is no longer set {where}: the next place out applies again."
    if not done["changed"]:
        return f"{done['label']} was already {done['shown']} {where}."
    return f"{done['label']} is now {done['shown']} {where}."


class PersonaModal(discord.ui.Modal):
    """``/settings persona``: the persona's text in a modal (it can be long: up to 4,000 characters)."""

    def __init__(
        self,
        run: Callable[[discord.Interaction, Callable[[int, str], Awaitable[str]]], Awaitable[None]],
        ops: Operations,
        scope: int | None,
        current: str | None,
    ) -> None:
        super().__init__(title="Persona: the instruction I follow", timeout=MODAL_TIMEOUT)
        self._run = run
        self._ops = ops
        self._scope = scope
        self.text: discord.ui.TextInput[PersonaModal] = discord.ui.TextInput(
            label="Persona (Gemini's system instruction)",
            style=discord.TextStyle.paragraph,
            max_length=MAX_PERSONA_CHARS,
            default=current,
            placeholder="You are a patient tutor for this server's Python course...",
        )
        self.add_item(self.text)

    async def on_submit(self, interaction: discord.Interaction) -> None:  # type: ignore[override]
        async def act(guild_id: int, by: str) -> str:
            done = await self._ops.guild_setting_set(
                guild_id, "persona", self.text.value, scope=self._scope, by=by
            )
            return format_setting_change(done)

        await self._run(interaction, act)


def settings_commands(
    commands: SlashCommands, ops: Operations
) -> tuple[app_commands.Group, app_commands.Command[Any, Any, None]]:
    """``/settings show|set|reset|persona`` (a server's managers) and ``/model`` (anyone sees the model;
    a server's managers choose it). Every change is checked at runtime (Manage Server or
    Administrator, in that server) and answered privately; a value the bot cannot take gets one
    sentence naming the limit (``Operations.guild_setting_set``)."""
    allowed = commands.app.settings.limits.models
    group = app_commands.Group(
        name="settings",
        description="How I answer in this server (Manage Server): persona, model, temperature, ...",
        guild_only=True,
        allowed_contexts=app_commands.AppCommandContext(guild=True, dm_channel=False, private_channel=False),
        default_permissions=discord.Permissions(manage_guild=True),  # UI metadata only
    )

    def manage(
        interaction: discord.Interaction, action: Callable[[int, str], Awaitable[str]]
    ) -> Awaitable[None]:
        """Run ``action(guild_id, by)`` as a manager's command and show its text, privately."""

        async def body() -> None:
            if interaction.guild_id is None:  # require_guild_manager refuses DMs first
                raise RuntimeError("a /settings command outside a server")
            text = await action(interaction.guild_id, f"discord:{interaction.user.id}")
            if len(text) > DISCORD_LIMIT:
                text = text[: DISCORD_LIMIT - 1] + "…"
            await followup(interaction, text)

        return commands.run(interaction, body, check=commands.require_guild_manager)

    @group.command(name="show", description="What applies here (or in a place), and where each value is set")
    @app_commands.describe(where="A channel, thread, forum or category (default: this channel)")
    async def show(interaction: discord.Interaction, where: Place | None = None) -> None:
        async def act(guild_id: int, by: str) -> str:
            place = _place(where)
            view = await ops.guild_settings_show(guild_id, _chain(interaction, place), by=by)
            return format_settings(view)

        await manage(interaction, act)

    @group.command(name="set", description="Set how I answer, for this server or one place")
    @app_commands.describe(
        setting="Which setting", value="Its value", where="Only in this channel, thread, forum or category"
    )
    async def set_(
        interaction: discord.Interaction, setting: SettingName, value: str, where: Place | None = None
    ) -> None:
        async def act(guild_id: int, by: str) -> str:
            text = str(_modlog_channel(interaction, value)) if setting == "modlog_channel" else value
            done = await ops.guild_setting_set(guild_id, setting, text, scope=_place(where), by=by)
            return format_setting_change(done)

        await manage(interaction, act)

    @set_.autocomplete("value")
    async def complete_value(
        interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        name = str(getattr(interaction.namespace, "setting", "") or "")
        options = allowed if name == "model" else _EXAMPLES.get(name, ())
        found = [o for o in options if current.lower() in o.lower()] or list(options)
        return [app_commands.Choice(name=o, value=o) for o in found[:25]]

    @group.command(name="reset", description="Remove a setting's value for this server or one place")
    @app_commands.describe(setting="Which setting", where="Only in this channel, thread, forum or category")
    async def reset(
        interaction: discord.Interaction, setting: SettingName, where: Place | None = None
    ) -> None:
        async def act(guild_id: int, by: str) -> str:
            done = await ops.guild_setting_reset(guild_id, setting, scope=_place(where), by=by)
            return format_setting_change(done)

        await manage(interaction, act)

    @group.command(name="persona", description="Write the persona (the instruction I follow) in a form")
    @app_commands.describe(where="Only in this channel, thread, forum or category")
    async def persona(interaction: discord.Interaction, where: Place | None = None) -> None:
        # A modal must be the first response, so the manager is checked before it opens (and again
        # when it is submitted: the submission runs in the same frame as every command).
        started = commands.app.clock.monotonic()
        outcome = "ok"
        try:
            commands.require_guild_manager(interaction, "settings persona")
            scope = _place(where)
            guild_id = interaction.guild_id or 0  # require_guild_manager refused DMs
            current = commands.app.settings.value_at(guild_id, scope, "persona")
            await interaction.response.send_modal(PersonaModal(manage, ops, scope, current))
        except (RefusedError, OperationError) as exc:
            outcome = "refused"
            await interaction.response.send_message(commands.sentence(exc, "-"), ephemeral=True)
        finally:
            commands.app.metrics.observe_command(
                "settings persona", outcome, commands.app.clock.monotonic() - started
            )

    @app_commands.command(name="model", description="Which Gemini model answers here; managers choose it")
    @app_commands.describe(
        model="A model this bot allows (empty: show which one answers here)",
        where="Only in this channel, thread, forum or category",
    )
    async def model(
        interaction: discord.Interaction, model: str | None = None, where: Place | None = None
    ) -> None:
        if model is None:

            async def look() -> None:
                settings = commands.app.settings
                place = _place(where)
                chosen = settings.effective(interaction.guild_id, _chain(interaction, place))
                board = commands.app.board
                resting = {m for m in allowed if model_breaker_name(m) in board
                           and not board[model_breaker_name(m)].would_admit()}
                states = [f"`{m}`" + (" (resting: it failed)" if m in resting else "") for m in allowed]
                await followup(
                    interaction,
                    f"Gemini model {_where(place) if interaction.guild_id else 'here'}: `{chosen.model}`. "
                    f"If it is overloaded or out of quota, the next of the bot's chain answers and says so. "
                    f"Allowed: {', '.join(states)}.",
                )

            await commands.run(interaction, look)
            return

        async def act(guild_id: int, by: str) -> str:
            return format_setting_change(
                await ops.guild_setting_set(guild_id, "model", model, scope=_place(where), by=by)
            )

        await manage(interaction, act)

    @model.autocomplete("model")
    async def complete_model(
        interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        found = [m for m in allowed if current.lower() in m.lower()] or list(allowed)
        return [app_commands.Choice(name=m, value=m) for m in found[:25]]

    return group, model


def _modlog_channel(interaction: discord.Interaction, value: str) -> int:
    """The moderation log's channel: a text channel of this server (by mention or id)."""
    digits = "".join(c for c in value if c.isdigit())
    guild = interaction.guild
    channel = guild.get_channel(int(digits)) if guild is not None and digits else None
    if not isinstance(channel, discord.TextChannel):
        raise InvalidRequestError(
            "the moderation log must be a text channel of this server: name it as #channel"
        )
    return channel.id


# -- registration ---------------------------------------------------------------------------


def setup_commands(
    tree: app_commands.CommandTree[Any],
    commands: SlashCommands,
    *,
    groups: tuple[app_commands.Group, ...] = (),
    guild_id: int | None = None,
) -> None:
    """Add the chat commands, ``groups`` and the error handler to ``tree`` (replacing earlier ones).

    Call it in ``setup_hook``; syncing the tree with Discord is a separate, rate-limited step.
    With ``guild_id`` (the test guild) the commands are also copied to that guild.
    """

    @app_commands.command(name="ask", description="Ask Gemini something")
    @app_commands.describe(prompt="Your question", private="Only you see the answer")
    async def ask(interaction: discord.Interaction, prompt: str, private: bool = False) -> None:
        await commands.run(
            interaction,
            lambda: commands.ask(interaction, prompt, private),
            ephemeral=private,
            limit=commands.ask_timeout,
        )

    @app_commands.command(name="reset", description="Forget this conversation's history")
    @app_commands.describe(confirm="Set to True to really forget it")
    async def reset(interaction: discord.Interaction, confirm: bool = False) -> None:
        await commands.run(
            interaction, lambda: commands.reset(interaction, confirm), check=commands.require_reset
        )

    @app_commands.command(name="status", description="How the bot and its dependencies are doing")
    async def status(interaction: discord.Interaction) -> None:
        await commands.run(interaction, lambda: commands.status(interaction))

    @app_commands.command(name="help", description="What this bot does and how to talk to it")
    async def help_(interaction: discord.Interaction) -> None:
        await commands.run(interaction, lambda: commands.help(interaction))

    @app_commands.command(name="usage", description="Gemini tokens you used today (server: this server's)")
    @app_commands.describe(server="This server's usage instead (needs Manage Server)")
    async def usage(interaction: discord.Interaction, server: bool = False) -> None:
        await commands.run(
            interaction, lambda: commands.usage(interaction, server), check=commands.usage_check(server)
        )

    settings_group, model = settings_commands(commands, Operations(commands.app))
    command: app_commands.Command[Any, Any, None]
    for command in (ask, reset, status, help_, usage, model):
        tree.add_command(command, override=True)
    for group in (*groups, settings_group, memory_group(commands)):
        tree.add_command(group, override=True)
    if guild_id is not None:
        # The test guild gets its own copies (synced there at once); refresh them too, or they
        # would shadow the commands just added for interactions from that guild.
        tree.copy_global_to(guild=discord.Object(id=guild_id))
    commands.app.metrics.set_commands(command_names(tree))

    async def on_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await _on_tree_error(commands, interaction, error)

    tree.on_error = on_error  # type: ignore[method-assign]


async def _on_tree_error(
    commands: SlashCommands, interaction: discord.Interaction, error: app_commands.AppCommandError
) -> None:
    """Errors raised before a command body runs: unknown, out-of-sync, bad options, failed checks."""
    if isinstance(error, app_commands.CommandNotFound | app_commands.CommandSignatureMismatch):
        log.warning("command.out_of_sync", error=type(error).__name__, name=getattr(error, "name", None))
        text = (
            "I don't know that command in this form; Discord may still be updating my command list. "
            "Please try again in a minute."
        )
    elif isinstance(error, app_commands.CheckFailure):
        log.warning("command.check_failed", user_id=interaction.user.id, error=str(error))
        text = "You can't use that command here."
    elif isinstance(error, app_commands.TransformerError):
        text = f"I couldn't read the option value {error.value!r}; please check it and try again."
    else:
        original = getattr(error, "original", error)
        log.error("command.bug", exc_info=original)
        commands.app.metrics.errors.labels(category=Category.INTERNAL.value).inc()
        text = texts.bug("-")
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as exc:
        log.warning("command.error_not_shown", status=exc.status)
