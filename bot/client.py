"""The discord.py client, the top of ``bot/``: wires the pieces together, starts the services in
``setup_hook`` and drains them in ``close``.

The pieces take what they need by constructor (like discord.py's ``Client`` builds its
``ConnectionState``): the application (``bot.app``) at the bottom, then the failure router,
the answerer, intake, the catch-up after a lost session, the drain, the operations, the slash
commands and the buttons on answers (``bot.views``, added as a persistent view at start-up so that
clicks on buttons an earlier process drew still work). Nothing below imports this module.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import discord
import structlog
from discord.ext import commands

from bot.admin import admin_group, server_group
from bot.alerts import Alerter
from bot.answering import Answerer
from bot.app import Application
from bot.catchup import MAX_CHANNELS, Catchup
from bot.commands import DEFAULT_TIMEOUT, SlashCommands, application_owners, command_names, setup_commands
from bot.drain import Drain
from bot.healing import GatewayReading
from bot.health import HealthMonitor
from bot.history import MAX_CONVERSATIONS_TOLD
from bot.incidents import IncidentTracker
from bot.intake import RECENT_IDS, Intake
from bot.operations import (
    apply_breaker_overrides,
    follow_other_processes,
    process_state,
    serve_operations,
)
from bot.plugin_admin import plugin_commands, proposal_buttons
from bot.plugins import CommandSyncer
from bot.routing import FailureRouter
from bot.selfmod import ProposalBook, SelfModifier, SelfModifyError
from bot.streaming import Regenerator
from bot.tools import ToolConfirmation, builtin_tools
from bot.views import AnswerButtons
from resilience.errors import CallTimeoutError, CircuitOpenError
from resilience.tasks import SupervisedTask, exponential_backoff
from services.config import SHARD_AUTO
from services.coordination import HEARTBEAT_SECONDS
from services.http_api import BoundedCache
from services.storage import StorageError

log = structlog.get_logger("bot.client")


# What the bot does in a channel: read it, answer (also in threads), quote history, react, embed,
# and attach long answers and big code blocks as files (bot/long_answers.py).
PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    read_message_history=True,
    add_reactions=True,
    embed_links=True,
    attach_files=True,
)


class BucketPruner:
    """Forgets discord.py's idle rate-limit buckets; replaces ``HTTPClient._try_clear_expired_ratelimits``.

    discord.py keeps one bucket per route and channel (each new DM adds one for its send, and
    more for a typing indicator or a fetch), and once it holds 256 it scans them all on every
    new bucket, dropping only those idle for 300 s. With thousands of conversations that is
    O(n) work per new channel and about 1 KB per bucket for five minutes: 10,000 DMs
    (tests/chaos/test_memory_chaos.py) cost the bot 114 s of CPU instead of 78 s, its answer
    rate fell steadily, and its RSS grew 9 MB over the last 5,000 instead of 5 MB.

    This scans only when the map has doubled since the last scan (amortized O(1) per bucket)
    and drops a bucket once it has been idle for ``idle`` seconds with no request in flight
    and no live rate-limit window: a new bucket behaves the same, except that it learns the
    route's limit again from the next response.
    """

    def __init__(self, http: discord.http.HTTPClient, *, idle: float = 10.0, floor: int = 256) -> None:
        self._http = http
        self._idle = idle
        self._floor = floor
        self._next_scan = floor

    def __call__(self) -> None:
        buckets = self._http._buckets
        if len(buckets) < self._next_scan:
            return
        now = asyncio.get_running_loop().time()
        idle = [key for key, bucket in buckets.items() if self._forgettable(bucket, now)]
        for key in idle:
            del buckets[key]
        self._next_scan = max(self._floor, 2 * len(buckets))

    def _forgettable(self, bucket: discord.http.Ratelimit, now: float) -> bool:
        return (
            bucket.outgoing == 0
            and not bucket._pending_requests
            and not bucket._sleeping.locked()
            and (bucket.expires is None or bucket.expires < now)
            and now - bucket._last_request >= self._idle
        )


def intents() -> discord.Intents:
    """What the bot needs: guild messages with their content, DMs. Message content is privileged."""
    wanted = discord.Intents.default()
    wanted.message_content = True
    return wanted


class GeminiBot(commands.Bot):
    """A ``commands.Bot`` whose message handling is the resilient pipeline."""

    def __init__(
        self, app: Application, *, drain_interval: float = 1.0, check_models: bool = True, **options: object
    ) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents(),
            # A default that pings nobody: each send states who may be pinged (discord_io).
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            # Rate limits: discord.py waits out at most MAX_RATELIMIT_WAIT and raises RateLimited
            # beyond; its requests, traced, restart DiscordIO's call timeout (discord_io).
            **{**app.discord_io.client_options(), **options},  # type: ignore[arg-type]
        )
        self.app = app
        app.client = self
        # An instance attribute: discord.py calls self._try_clear_expired_ratelimits() on each new bucket.
        self.http._try_clear_expired_ratelimits = BucketPruner(self.http)  # type: ignore[method-assign]
        # Functions Gemini may call (bot.tools): the built-in Discord tools; plugins register theirs.
        for tool in builtin_tools():
            if tool.name not in app.tools:
                app.tools.register(tool)
        self.router = FailureRouter(app)
        self.answerer = Answerer(app, self.router)
        # Regenerate on a streamed answer: a new answer to its question, by edit (bot.streaming).
        self.regenerator = Regenerator(app, self.router, self.answerer.answer)
        self.intake = Intake(app, self.answerer, self.router, bot_user_id=app.bot_user_id)
        # What users said while a session that could not be resumed was down, read back after
        # the new IDENTIFY and handed to intake (bot.catchup).
        self.catchup = Catchup(app, self.intake.on_message, self.intake.is_for_me)
        self.drain = Drain(app, self.answerer, self.router, interval=drain_interval)
        app.drain_waker = self.drain.wake
        # The application's owner (or its team's admins and developers): owners of the bot, like
        # ADMIN_USER_IDS. Learned once in setup_hook (from application_info); empty until then.
        self.application_owners: frozenset[int] = frozenset()
        # Operations that speak up: incidents as breakers open and the mode changes, the periodic
        # health assessment (degraded mode, the presence), and alerts from its facts.
        self.incidents = IncidentTracker(app)
        app.board.add_listener(self.incidents.breaker_listener)
        app.degradation.add_listener(self.incidents.mode_listener)
        self.health = HealthMonitor(
            app, presence=self.show_presence, tasks=lambda: (self.drain.task, self.health.task)
        )
        self.alerter = Alerter(app, owners=self.owners)
        self.health.add_consumer(self.incidents.update)
        self.health.add_consumer(self.alerter.evaluate)
        self._presence: str | None = None
        app.http_api.sources.incidents = self.incidents.report
        app.http_api.sources.assessment = self.assessment
        self.operations = serve_operations(app, incidents=self.incidents.report)
        # Self-healing (bot.healing): it acts on each assessment, watches the gateway, and recovers
        # files and reconnects the way an operator's /admin command does.
        self.health.add_consumer(app.healer.observe)
        app.healer.attach(
            gateway=self.gateway_reading,
            reconnect=lambda: self.operations.discord_reconnect(by="healer"),
            recover_file=self._recover_file,
        )
        # Several processes on one database (PostgreSQL): act on the others' operator actions, and
        # record this one's state in its heartbeat row for their /status.
        follow_other_processes(app)
        self.heartbeat = SupervisedTask(
            "heartbeat",
            self._beat,
            interval=HEARTBEAT_SECONDS,
            run_timeout=HEARTBEAT_SECONDS * 2,
            backoff=exponential_backoff(base=HEARTBEAT_SECONDS, cap=60.0),
            max_consecutive_failures=1_000_000,  # storage comes back: keep beating
            clock=app.clock,
            expected=(StorageError, CircuitOpenError, CallTimeoutError, ConnectionError),
        )
        # Plugins (bot.plugins): extensions of this bot, loaded by the registry's "plugins" service;
        # after each change the slash commands are copied to the test guild and synced, rate-limited.
        self.command_syncer = CommandSyncer(
            self._sync_commands, interval=app.config.command_sync_interval_seconds, clock=app.clock
        )
        app.plugins.attach(self, on_change=self._plugins_changed)
        self.selfmod = SelfModifier(
            app.plugins,
            ProposalBook(app.config.data_dir / "self_modify.json"),
            ask=self._ask_gemini,
            clock=app.clock,
            enabled=app.config.self_modify,
            test_timeout=app.config.self_modify_test_timeout_seconds,
        )
        self._check_models = check_models
        self._closed = False
        # Set while setup_hook runs: a close() meanwhile waits for it, so that every service
        # it starts is also stopped (a SIGTERM during start-up leaves nothing running).
        self._setting_up: asyncio.Event | None = None
        self._watch_caches()

    def _watch_caches(self) -> None:
        """Show the pipeline's and discord.py's per-conversation caches in the memory view."""
        state = self._connection
        self.app.http_api.sources.caches.update(
            {
                "recent_message_ids": BoundedCache(lambda: self.intake.recent_ids, RECENT_IDS),
                "catchup_channels": BoundedCache(lambda: len(self.catchup.watch), MAX_CHANNELS),
                "refusal_notices": BoundedCache(
                    lambda: len(self.intake.refusals), self.intake.refusals.status()["max_keys"]
                ),
                "history_notes": BoundedCache(lambda: len(self.answerer.left_out), MAX_CONVERSATIONS_TOLD),
                # Today's users and servers with a quota (none when quotas are off); emptied at midnight UTC.
                "quota_owners": BoundedCache(lambda: self.app.usage.tracked, 2 * self.app.usage.max_owners),
                # Trimmed under memory pressure (bot.healing): discord.py refetches what it needs.
                "discord_messages": BoundedCache(
                    lambda: len(self.cached_messages), state.max_messages or 0, trim=self._trim_messages
                ),
                # discord.py keeps at most 128 DM channels (ConnectionState._add_private_channel).
                "discord_dm_channels": BoundedCache(lambda: len(self.private_channels), 128),
                # Weakly held (the live objects only), and pruned by BucketPruner: no fixed bound.
                "discord_users": lambda: len(self.users),
                "discord_ratelimit_buckets": lambda: len(self.http._buckets),
            }
        )

    def _trim_messages(self) -> int:
        """Empty discord.py's message cache; returns how many messages it held."""
        messages = self._connection._messages
        if messages is None:
            return 0
        count = len(messages)
        messages.clear()
        return count

    def gateway_reading(self) -> GatewayReading | None:
        """Seconds since the gateway's last frame (an event or a heartbeat ACK) and its heartbeat
        interval, from discord.py's keep-alive handler; None without a live session to judge.

        discord.py stamps every frame it receives (``KeepAliveHandler.tick``, ``time.perf_counter``)
        and gives up on a connection only after ``heartbeat_timeout`` (60 s) without one.
        """
        ws = self.ws
        if not self.is_ready() or self.is_closed() or ws is None or not ws.open:
            return None
        # Private attributes of discord.py 2.x, read defensively: a release without them turns the
        # healer's gateway watch off (None) instead of failing it.
        keep_alive = getattr(ws, "_keep_alive", None)
        last_frame = getattr(keep_alive, "_last_recv", None)
        if keep_alive is None or not isinstance(last_frame, float):
            return None  # between the socket opening and HELLO
        interval = getattr(keep_alive, "interval", None)
        return GatewayReading(
            silent_for=max(0.0, time.perf_counter() - last_frame),
            heartbeat_interval=float(interval) if isinstance(interval, int | float) else None,
        )

    async def _recover_file(self, name: str) -> str:
        return (await self.operations.datastore_recover(name, by="healer"))["source"]

    async def setup_hook(self) -> None:
        """Start the services in dependency order (rolled back on failure), then the drain."""
        self._setting_up = asyncio.Event()
        try:
            await self._start_services()
        finally:
            self._setting_up.set()

    async def _start_services(self) -> None:
        await self.app.registry.start_all()
        if self._closed:
            return  # close() was called meanwhile; it stops what was started
        self.app.reload_settings()
        await self._take_over()
        await self._learn_owners()
        if self._check_models:
            # Warnings only, bounded: a missing model or an unreachable Gemini never stops the start.
            await self.app.gemini.check_models()
        self.install_commands()
        # Fixed custom_ids: a click on a button any earlier process drew lands here (bot.views).
        self.add_view(
            AnswerButtons(on_stop=self.answerer.streaming.on_stop, on_regenerate=self.regenerator.on_click)
        )
        # Confirm / Cancel of a proposed destructive function call: the action is in the custom_id.
        self.add_dynamic_items(ToolConfirmation)
        await self._sync_commands()
        await self._take_up_operations_state()
        reopened = await apply_breaker_overrides(self.app)
        if reopened:
            log.info("breakers.overrides_applied", breakers=reopened)
        released = await self.app.storage.release_claims()
        if released:
            log.info("queue.resumed", items=released)
        self.drain.start()
        self.health.start()
        self.heartbeat.start()
        log.info("bot.services_started", services=self.app.registry.order)

    async def _take_over(self) -> None:
        """What a process that takes over shards reads back at its first ready (none unsharded)."""

    async def _take_up_operations_state(self) -> None:
        """End the incidents a dead process left open and take up its alert states (before the
        breaker overrides re-open anything, so those start incidents of this process)."""
        try:
            await self.incidents.recover()
        except Exception as exc:  # storage down at start: the records stay open, the bot starts
            log.warning("incident.recover_failed", error=type(exc).__name__)
        await self.alerter.load()

    async def _beat(self) -> None:
        """Record this process alive, with its mode, breakers and connection (others' /status); the
        claims of a process that died come back with it, and the drain takes them up at once."""
        running = self.drain.task.state.value in ("running", "sleeping", "backing_off")
        released = await self.app.coordination.beat(process_state(self.app, drain_running=running))
        if released:
            log.info("queue.released_claims_of_gone_process", items=released)
            self.app.drain_wake()

    def owners(self) -> frozenset[int]:
        """The bot's owners: ``ADMIN_USER_IDS``, the ``admins`` file, the application's owners."""
        stored = (self.app.store.cached("admins") or {}).get("user_ids") or []
        return self.app.config.admin_user_ids | {int(i) for i in stored} | self.application_owners

    def assessment(self) -> dict[str, object] | None:
        """The last health assessment, for the degradation view."""
        facts = self.health.last
        if facts is None:
            return None
        return {
            "at": facts.at,
            "reasons": list(facts.problems),
            "presence": self._presence,
            "alerts": self.alerter.firing(),
            "alert_lines_waiting": self.alerter.pending(),
            "availability": None if facts.availability is None
            else facts.availability.as_dict(int(facts.at // 86400)),
        }

    async def show_presence(self, text: str | None) -> None:
        """Show ``text`` as the bot's status (idle while degraded), or clear it; raises without a
        gateway session (the health monitor tries again)."""
        if not self.is_ready() or self.is_closed():
            raise ConnectionError("no gateway session")
        if text is None:
            await self.change_presence(activity=None, status=discord.Status.online)
        else:
            await self.change_presence(activity=discord.CustomActivity(name=text), status=discord.Status.idle)
        self._presence = text

    async def _learn_owners(self) -> None:
        """Keep who owns the application (its owner, or its team's admins and developers) for ``/admin``.

        discord.py's ``login`` fetched ``application_info()`` just before ``setup_hook``; a failure
        there already ended the start-up, with its own sentence.
        """
        info = self.application if self.application is not None else await self.application_info()
        self.application_owners = application_owners(info)
        log.info("owners.learned", owners=sorted(self.application_owners), team=info.team is not None)

    def install_commands(self, *, timeout: float = DEFAULT_TIMEOUT) -> SlashCommands:
        """Put the chat, ``/server`` and ``/admin`` commands on ``self.tree`` (replacing earlier
        ones); ``timeout`` bounds every command but ``/ask``. Syncing with Discord is a separate step."""
        commands = SlashCommands(
            self.app, self.answerer, self.router, timeout=timeout, owners=lambda: self.application_owners
        )
        admin = admin_group(commands, self.operations)
        plugin_commands(admin, commands, self.app.plugins, self.selfmod)
        setup_commands(
            self.tree,
            commands,
            groups=(server_group(commands, self.operations), admin),
            guild_id=self.app.config.discord_guild_id,
        )
        # Apply / Reject on a self-modification proposal, also one an earlier process showed.
        self.add_dynamic_items(proposal_buttons(commands, self.selfmod))
        return commands

    def _plugins_changed(self) -> None:
        """A plugin was loaded, unloaded or reloaded: refresh the test guild's copies of the
        commands at once (interactions from there use them), and sync with Discord soon."""
        guild_id = self.app.config.discord_guild_id
        if guild_id is not None:
            guild = discord.Object(id=guild_id)
            self.tree.clear_commands(guild=guild)
            self.tree.copy_global_to(guild=guild)
        self.app.metrics.set_commands(command_names(self.tree))
        self.command_syncer.request()

    async def _ask_gemini(self, prompt: str) -> str:
        """One answer from Gemini for self-modification (no persona, no history)."""
        reply = await self.app.gemini.generate(prompt, persona="")
        if not reply.ok:
            raise SelfModifyError(f"Gemini gave no patch: {reply.user_message or reply.finish_reason}")
        return reply.text

    async def _sync_commands(self) -> None:
        """Publish the slash commands: to the test guild at once, or globally (Discord takes a while)."""
        guild_id = self.app.config.discord_guild_id
        try:
            if guild_id is not None:
                synced = await self.tree.sync(guild=discord.Object(id=guild_id))  # copies: setup_commands
            else:
                synced = await self.tree.sync()
        except discord.HTTPException as exc:
            # Commands keep working where they were synced before; messages work regardless.
            log.warning("commands.sync_failed", status=exc.status, code=exc.code)
            return
        log.info("commands.synced", count=len(synced), scope="guild" if guild_id else "global")

    def invite_url(self) -> str | None:
        """The OAuth2 URL that adds this bot to a server with the permissions it needs."""
        if self.application_id is None:
            return None
        return discord.utils.oauth_url(
            self.application_id, permissions=PERMISSIONS, scopes=("bot", "applications.commands")
        )

    async def on_connect(self) -> None:
        """Every IDENTIFY (discord.py dispatches ``connect`` from READY, never after a RESUME).

        Runs before any event of the new session is handled (its task was scheduled first), so
        the catch-up notes the channels' marks as they were when the old session ended.
        """
        self.catchup.connected()

    async def on_ready(self) -> None:
        user = self.user
        log.info(
            "bot.ready", user_id=user.id if user else None, guilds=len(self.guilds), invite=self.invite_url()
        )
        self.catchup.ready()  # after a fresh IDENTIFY: read what the lost session never delivered
        self.health.presence_lost()  # a new session starts with the presence given at IDENTIFY

    async def on_message(self, message: discord.Message) -> None:
        watch = self.catchup.watch
        if self.intake.is_for_me(message):
            watch.active(message.channel.id, message.id)
            if self.catchup.defer(message):
                return  # its channel's missed messages come first (bot.catchup)
            await self.intake.on_message(message)
            return
        me = self.user
        if me is not None and message.author.id == me.id:
            watch.active(message.channel.id, message.id)  # the bot posted here: it is active here
        else:
            watch.seen(message.channel.id, message.id)

    async def close(self) -> None:
        """Stop taking messages, let in-flight ones finish within the grace period, stop services."""
        if self._closed:
            return
        self._closed = True
        self.app.http_api.set_shutting_down()  # /ready answers 503 from now on
        if self._setting_up is not None:
            await self._setting_up.wait()
        # discord.py's guild-ready wait would otherwise dispatch on_ready on a closed client.
        ready_task = getattr(self._connection, "_ready_task", None)
        if ready_task is not None and not ready_task.done():
            ready_task.cancel()
            # asyncio.wait_for in Python 3.11 can swallow that cancel when its inner wait
            # finishes at the same moment; wait for the task so it ends while the loop is set.
            await asyncio.wait({ready_task}, timeout=5.0)
        grace = self.app.config.shutdown_grace_seconds
        self.catchup.stop()  # no more missed messages handed to intake; the one in hand finishes
        left = await self.intake.drain_inflight(grace)
        if left:
            log.warning("bot.shutdown_unfinished", messages=left, note="their queue items resume on restart")
        await self.catchup.close()
        await self.heartbeat.stop()
        await self.command_syncer.close()
        await self.health.stop()
        await self.app.healer.stop()  # no restart nor reconnect while the bot shuts down
        await self.drain.stop()
        await self.alerter.close()
        try:
            await super().close()
        finally:
            await self.app.registry.stop_all()
            log.info("bot.stopped")

    def shard_ids_held(self) -> tuple[int, ...] | None:
        """The shards whose gateway events this process receives; None when it is not sharded."""
        return None


TAKE_OVER_ITEMS = 5000
"""Accepted messages looked at when taking over shards (the newest; their channels are read back)."""


class ShardedGeminiBot(GeminiBot, commands.AutoShardedBot):
    """The same bot on discord.py's ``AutoShardedClient``: one gateway session per shard it holds.

    ``SHARD_COUNT`` is the bot's total (``auto``: what ``GET /gateway/bot`` recommends) and
    ``SHARD_IDS`` the shards of this process (empty: all of them). A guild's events arrive on shard
    ``(guild_id >> 22) % shard_count``, DMs on shard 0 (Discord docs, Gateway "Sharding"); REST works
    from any process, so the drain answers every queued item wherever its guild's shard is held.
    """

    def __init__(
        self, app: Application, *, drain_interval: float = 1.0, check_models: bool = True, **options: object
    ) -> None:
        config = app.config
        count = None if config.shard_count == SHARD_AUTO else config.shard_count
        ids = list(config.shard_ids) or None
        super().__init__(
            app, drain_interval=drain_interval, check_models=check_models, shard_count=count, shard_ids=ids,
            **options,
        )
        # Set at start-up when another process held these shards: read back the channels with a
        # message after this id (its last heartbeat) at the first ready.
        self._gap_after: int | None = None

    async def _take_over(self) -> None:
        """What no process received while this process's shards had no session, read back at the
        first ready (bot.catchup): the channels where the database holds messages of the last hour
        (from the newest one accepted there), and, when another process held these shards before
        (its heartbeat row says so), every channel of their guilds with a message since its last
        heartbeat (Discord's ``last_message_id`` in GUILD_CREATE). Live messages wait meanwhile."""
        held, count = set(self.shard_ids_held() or ()), self.shard_count
        if not held or not count:
            return  # SHARD_COUNT=auto: the count comes with the gateway, after this
        now = self.app.clock.time()
        since = now - self.catchup.max_age
        try:
            payloads = await self.app.storage.recent_inbound(since, TAKE_OVER_ITEMS)
            processes = await self.app.coordination.processes()
        except StorageError as exc:
            log.warning("catchup.take_over_unreadable", error=type(exc).__name__)
            return
        beats = [
            p.beat_at for p in processes
            if not p.this and held & set((p.state.get("shards") or {}).get("ids") or ())
        ]
        if beats:
            # From a heartbeat before its last: what arrived just before it may not be accepted yet.
            gap_start = max(since, max(beats) - HEARTBEAT_SECONDS)
            self._gap_after = discord.utils.time_snowflake(datetime.fromtimestamp(gap_start, UTC))
        marks: dict[int, int] = {}
        for payload in payloads:  # newest first: the most recently active channels first
            try:
                guild_id, channel_id = payload.get("guild_id"), int(payload["channel_id"])
                message_id = int(payload["message_id"])
            except (KeyError, TypeError, ValueError):
                continue
            shard = 0 if guild_id is None else (int(guild_id) >> 22) % count
            if shard in held:
                marks[channel_id] = max(marks.get(channel_id, 0), message_id)
        self.catchup.take_over(marks, hold=bool(marks) or self._gap_after is not None)

    async def on_ready(self) -> None:
        gap_after, self._gap_after = self._gap_after, None
        if gap_after is not None:
            # Channels of this process's guilds with a message since the shards were last held.
            active: dict[int, int] = {}
            for guild in self.guilds:
                channels: list[discord.TextChannel | discord.Thread] = [*guild.text_channels, *guild.threads]
                for channel in channels:
                    if channel.last_message_id is not None and channel.last_message_id > gap_after:
                        active[channel.id] = gap_after
            self.catchup.take_over(active)
        await super().on_ready()

    def shard_ids_held(self) -> tuple[int, ...] | None:
        if self.shard_ids is not None:
            return tuple(self.shard_ids)
        if self.shard_count is None:
            return ()  # asking Discord for the count: not known yet
        return tuple(range(self.shard_count))


def make_bot(
    app: Application, *, drain_interval: float = 1.0, check_models: bool = True, **options: object
) -> GeminiBot:
    """The bot for ``app``'s configuration: sharded when ``SHARD_COUNT`` is set, else one session."""
    kind = ShardedGeminiBot if app.config.sharded else GeminiBot
    return kind(app, drain_interval=drain_interval, check_models=check_models, **options)
