"""The application object: every service and runtime piece, built once in ``main()`` and passed down.

Nothing here is a module-level singleton: ``build_application(config)`` makes one complete,
independent application (tests build several side by side). This module is the bottom of
``bot/``: it imports services and the runtime, never the pieces built on it (intake,
answering, the drain, the operations, the commands); the discord.py client on top
(``bot.client.GeminiBot``) attaches itself as ``client`` and its drain as ``drain_waker``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import discord

from bot.answer_cache import AnswerCache
from bot.healing import MIB, Healer
from bot.inbound import Inbound, lease_seconds
from bot.memory import SemanticMemory
from bot.plugins import PluginHost
from bot.ratelimit import RateLimiter
from bot.settings import Effective, SettingsCache
from bot.usage import UsageLedger
from resilience.breakers import BreakerBoard
from resilience.clock import Clock, SystemClock
from resilience.context import TraceCollector
from resilience.degradation import (
    DEFAULT_MAINTENANCE_MESSAGE,
    DegradationState,
    ItemKind,
    Mode,
    QueueCaps,
    QueueItem,
)
from resilience.fingerprints import ErrorAggregator
from resilience.mutex import KeyedMutex
from resilience.registry import Service, ServiceRegistry
from resilience.retries import RetryBudget, RetryPolicy
from resilience.timeouts import AdaptiveTimeout
from services.config import Config
from services.context_cache import MAX_CACHES as CONTEXT_CACHES_MAX
from services.context_cache import ContextCache
from services.coordination import Coordination, LocalCoordination
from services.datastore import DataStore, DataStoreService, PgDataStore, SharedState, SharedStateService
from services.discord_io import DiscordIO
from services.embeddings import Embedder
from services.gemini import GeminiService, model_breaker_name
from services.http_api import BoundedCache, HealthSources, HttpApi, LatencyWindow
from services.memory_store import MemoryBackend, MemoryStore
from services.metrics import Metrics
from services.otel import OtelTracing
from services.pg_memory_store import PgMemoryStore
from services.pg_storage import PostgresStore
from services.storage import SqliteStore
from services.storage_protocol import Storage
from services.tools import ToolRegistry

SANDBOX_GEMINI_KEY = "sandbox-key"
TRACES_KEPT = 20  # recent traces the healer keeps when it trims caches under memory pressure


@dataclass
class Application:
    """Everything one running bot owns."""

    config: Config
    clock: Clock
    metrics: Metrics
    board: BreakerBoard
    mutex: KeyedMutex
    degradation: DegradationState
    traces: TraceCollector
    store: SharedState
    datastore: SharedStateService
    storage: Storage
    gemini: GeminiService
    discord_io: DiscordIO
    ratelimiter: RateLimiter
    registry: ServiceRegistry
    gemini_retry: RetryPolicy
    http_api: HttpApi
    message_latency: LatencyWindow
    queue_caps: QueueCaps
    usage: UsageLedger
    settings: SettingsCache
    tools: ToolRegistry
    """Functions Gemini may call (``bot.tools``); ``app.tools.register(tool)`` adds one (plugins)."""
    healer: Healer
    memory: SemanticMemory
    answer_cache: AnswerCache
    context_cache: ContextCache
    # Plugins (bot.plugins): discord.py extensions, a registry service; the client attaches itself.
    plugins: PluginHost = field(default_factory=PluginHost)
    # Other processes on the same database (PostgreSQL), or none (SQLite: LocalCoordination).
    coordination: Coordination = field(default_factory=LocalCoordination)
    client: discord.Client | None = None
    drain_waker: Callable[[], None] | None = None
    # Set by an operator shedding load (Operations.load_shed): new messages are saved and
    # acknowledged at once, and the drain answers them at its pace, instead of live.
    queue_new_messages: bool = False
    _guild_maintenance: dict[int, str] = field(default_factory=dict)

    # -- state the hot path reads without I/O ---------------------------------------------

    def chat_channels(self, guild_id: int) -> frozenset[int]:
        """Channels (threads, forums, categories) of a guild where the bot answers every message."""
        return self.settings.chat_channels(guild_id)

    def is_chat(self, guild_id: int, channel: Any) -> bool:
        """Whether the bot answers every message in ``channel`` (``SettingsCache.is_chat``)."""
        return self.settings.is_chat(guild_id, channel)

    def effective(self, guild_id: int | None, chain: tuple[int, ...] | list[int] = ()) -> Effective:
        """The settings for a message in ``guild_id`` whose channel's scope chain is ``chain``
        (``bot.settings``): memory only."""
        return self.settings.effective(guild_id, chain)

    def maintenance(self, guild_id: int | None = None) -> str | None:
        """The maintenance notice while the bot, or guild ``guild_id``, is in maintenance, else None.

        Bot-wide maintenance (the owners') covers every guild and DM; a guild's own maintenance
        (its managers') covers only that guild.
        """
        snap = self.degradation.snapshot()
        if snap.mode is Mode.MAINTENANCE:
            return snap.message
        return self.guild_maintenance(guild_id)

    def guild_tools(self, guild_id: int | None) -> tuple[str, ...]:
        """The Google-run tools guild ``guild_id``'s managers turned on for the whole server
        (``bot.grounding``); none in DMs. A channel may override Search grounding (``effective``)."""
        return () if guild_id is None else self.settings.effective(guild_id).tools

    def guild_maintenance(self, guild_id: int | None) -> str | None:
        """The notice of guild ``guild_id``'s own maintenance (its managers'), else None."""
        return None if guild_id is None else self._guild_maintenance.get(guild_id)

    def reload_settings(self) -> None:
        """Refresh the cached DataStore views (after start and after an operator changes them)."""
        stored = self.store.cached("guild_settings") or {}
        guilds = stored.get("guilds", {})
        self.settings.load(stored)
        # A persona no longer in use anywhere: its Gemini context cache goes (services.context_cache).
        self.context_cache.retain(self.settings.personas())
        self._guild_maintenance = {
            int(gid): (settings["maintenance"].get("message") or DEFAULT_MAINTENANCE_MESSAGE)
            for gid, settings in guilds.items()
            if (settings.get("maintenance") or {}).get("enabled")
        }
        maintenance = self.store.cached("maintenance") or {}
        if maintenance.get("enabled"):
            self.degradation.set(Mode.MAINTENANCE, reason="maintenance", message=maintenance.get("message"))
        elif self.degradation.mode is Mode.MAINTENANCE:
            self.degradation.set(Mode.NORMAL)

    # -- wiring to the Discord client ------------------------------------------------------

    def bot_user_id(self) -> int | None:
        user = self.client.user if self.client is not None else None
        return user.id if user is not None else None

    async def channel(self, channel_id: int) -> Any:
        """A channel (or thread, or DM) by id: from the cache, else fetched through ``discord.read``."""
        return await self.discord_io.fetch_channel(self._client(), channel_id)

    async def channel_for(self, item: QueueItem) -> Any:
        """Where a queued item's late answer goes: its channel, or the asker's DMs for a private /ask."""
        if item.payload.get("private"):
            return await self.discord_io.dm_channel(self._client(), int(item.payload["author_id"]))
        return await self.channel(int(item.payload["channel_id"]))

    def discord_connected(self) -> bool:
        """Logged in and holding an open gateway socket (``is_ready`` stays set across reconnects);
        sharded, one open socket per shard this process holds."""
        client = self.client
        if isinstance(client, discord.AutoShardedClient):
            shards = client.shards
            return (
                client.is_ready() and not client.is_closed() and bool(shards)
                and not any(info.is_closed() for info in shards.values())
            )
        ws = client.ws if client is not None else None
        return (
            client is not None and client.is_ready() and not client.is_closed() and ws is not None and ws.open
        )

    def discord_shards(self) -> dict[str, Any] | None:
        """This process's shards for its heartbeat row and ``/status``: the total count, the ids it
        holds and those whose session is open; None when the bot is not sharded."""
        client = self.client
        if not isinstance(client, discord.AutoShardedClient):
            return None
        count = client.shard_count
        held = list(client.shard_ids) if client.shard_ids is not None else list(range(count or 0))
        open_ids = sorted(i for i, info in client.shards.items() if not info.is_closed())
        return {"count": count, "ids": held, "open": open_ids}

    def drain_wake(self) -> None:
        """Run the drain now (after a requeue, a reset, an operator's action), when one runs here."""
        if self.drain_waker is not None:
            self.drain_waker()

    async def accept(self, inbound: Inbound, *, claim: bool, extra: dict[str, Any]) -> QueueItem | None:
        """Accept a message durably (see ``SqliteStore.accept``); None when it was seen before.

        Raises ``QueueFullError`` (nothing stored) when a cap on waiting messages is reached.
        """
        return await self.storage.accept(
            inbound.message_id,
            ItemKind.INBOUND,
            inbound.key,
            inbound.payload(**extra),
            now=self.clock.time(),
            lease_seconds=lease_seconds(self.config),
            claim=claim,
            caps=self.queue_caps,
        )

    async def queue_notice(
        self,
        *,
        channel_id: int,
        guild_id: int | None,
        user_id: int,
        text: str,
        ref_id: int,
        dedup_key: str,
    ) -> QueueItem:
        """Deliver ``text`` to ``channel_id`` through the durable outbound queue, pinging ``user_id``.

        For plugins (a reminder): the drain sends it, retrying while Discord refuses, and never
        twice: ``dedup_key`` makes a second call for the same notice return the first item, and
        ``ref_id`` (a unique snowflake, e.g. the interaction that asked for it) names the message
        (its nonce and invisible mark, ``bot.marks``) so a restarted bot sees it was posted.
        """
        inbound = Inbound(
            message_id=ref_id, channel_id=channel_id, guild_id=guild_id, author_id=user_id, content=text
        )
        payload = inbound.payload(
            chunks=[text], chunk_offset=0, outcome="notice", notice=True, nonce=f"p{ref_id}"
        )
        item = await self.storage.enqueue(
            ItemKind.OUTBOUND, f"notice:{dedup_key}", payload, now=self.clock.time(), dedup_key=dedup_key
        )
        self.drain_wake()
        return item

    def _client(self) -> discord.Client:
        if self.client is None:
            raise RuntimeError("the Discord client is not attached")
        return self.client


def build_application(
    config: Config, *, clock: Clock | None = None, metrics: Metrics | None = None
) -> Application:
    """Build every service from the configuration; nothing starts until the registry does."""
    clock = clock or SystemClock()
    metrics = metrics or Metrics()
    board = BreakerBoard(clock, fail_max=config.breaker_fail_max, reset_timeout=config.breaker_reset_seconds)
    board.add_listener(metrics.breaker_listener)
    gemini_breaker = board.add("gemini")
    # Each model a server may choose has a breaker of its own: one overloaded model is skipped
    # while the next of the chain answers (services.gemini).
    model_breakers = {model: board.add(model_breaker_name(model)) for model in config.allowed_models()}
    storage_breaker = board.add("storage", fail_max=max(3, config.breaker_fail_max), reset_timeout=5.0)
    mutex = KeyedMutex(clock=clock)
    degradation = DegradationState(clock)
    degradation.add_listener(metrics.mode_listener)
    # Spans go to an OpenTelemetry collector too when one is configured (services.otel).
    endpoint = config.otel_exporter_otlp_endpoint
    otel = OtelTracing.otlp(endpoint) if endpoint else None
    errors = ErrorAggregator(clock=clock)
    traces = TraceCollector(
        clock=clock, slow_threshold=config.trace_slow_seconds, errors=errors, exporter=otel
    )

    data_dir = config.data_dir
    store: SharedState
    datastore: SharedStateService
    storage: Storage
    coordination: Coordination
    if config.database_url:
        # PostgreSQL: the queue, history and shared state of every process on that database; the
        # processes hear of each other's operator actions and changes (services.coordination).
        postgres = PostgresStore(
            config.database_url,
            history_max_messages=config.history_max_messages,
            history_max_chars=config.history_max_chars,
            pool_size=config.database_pool_size,
            clock=clock,
            breaker=storage_breaker,
        )
        shared = PgDataStore(
            postgres, data_dir, keep_history=config.backup_keep, clock=clock, on_event=metrics.datastore_event
        )
        storage, coordination, store, datastore = postgres, postgres, shared, shared
    else:
        files = DataStore(
            data_dir, keep_backups=config.backup_keep, clock=clock, on_event=metrics.datastore_event
        )
        store, datastore = files, DataStoreService(files, breaker=storage_breaker)
        storage = SqliteStore(
            data_dir / "bot.sqlite3",
            history_max_messages=config.history_max_messages,
            history_max_chars=config.history_max_chars,
            # WAL + NORMAL: a commit survives kill -9 of the bot (the promise); only an OS crash or
            # power loss can lose the last commits. FULL costs an fsync per commit on the hot path.
            synchronous="NORMAL",
            clock=clock,
            breaker=storage_breaker,
        )
        coordination = LocalCoordination(clock=clock)
    retry = RetryPolicy(
        "gemini",
        max_attempts=config.retry_max_attempts,
        hint_cap=config.retry_hint_cap_seconds,
        budget=RetryBudget(clock=clock),
        sleep=clock.sleep,
    )
    metrics.watch_retry_policy(retry, "gemini")
    metrics.watch_mutex(mutex)
    # Never shorter than the longest answer allowed takes (an essay after a run of quick answers).
    floor = min(config.gemini_timeout_floor(), config.gemini_timeout_seconds)
    timeout = AdaptiveTimeout(
        max(floor, min(10.0, config.gemini_timeout_seconds)),
        minimum=floor,
        maximum=config.gemini_timeout_seconds,
        clock=clock,
    )
    gemini = GeminiService(
        api_key=config.gemini_api_key or SANDBOX_GEMINI_KEY,
        model=config.gemini_model,
        fallback_models=config.gemini_fallback_models,
        base_url=config.gemini_base_url,
        persona=config.bot_persona,
        max_output_tokens=config.gemini_max_output_tokens,
        allowed_models=config.allowed_models(),
        model_breakers=model_breakers,
        temperature=config.gemini_temperature,
        safety_threshold=config.gemini_safety_threshold,
        breaker=gemini_breaker,
        retry=retry,
        timeout=timeout,
        clock=clock,
        metrics=metrics,
    )
    discord_io = DiscordIO(board, metrics=metrics, timeout=config.discord_timeout_seconds)
    ratelimiter = RateLimiter(
        config.user_rate_limit_per_minute, config.guild_rate_limit_per_minute, clock=clock
    )
    message_latency = LatencyWindow(maxlen=1000)
    max_keys = ratelimiter.status()["max_keys"]
    http_api = HttpApi(
        HealthSources(
            clock=clock,
            metrics=metrics,
            board=board,
            degradation=degradation,
            queue=storage,
            message_latency=message_latency,
            caches={
                "mutex_keys": BoundedCache(lambda: len(mutex), mutex.max_idle_keys, trim=mutex.trim),
                # Under memory pressure the healer keeps the newest traces only (bot.healing).
                "traces": BoundedCache(
                    lambda: len(traces.recent()), traces.max_traces, trim=lambda: traces.trim(TRACES_KEPT)
                ),
                "slow_traces": BoundedCache(lambda: len(traces.slow()), traces.max_traces),
                "error_groups": BoundedCache(lambda: len(errors), errors.max_groups),
                "message_latency": BoundedCache(lambda: len(message_latency), message_latency.maxlen),
                "rate_limit_users": BoundedCache(lambda: ratelimiter.status()["users_tracked"], max_keys),
                "rate_limit_guilds": BoundedCache(lambda: ratelimiter.status()["guilds_tracked"], max_keys),
            },
        ),
        host=config.http_host,
        port=config.http_port,
        admin_token=config.admin_api_token,
    )
    usage = UsageLedger(
        storage,
        user_daily=config.quota_user_tokens_per_day,
        guild_daily=config.quota_guild_tokens_per_day,
        clock=clock,
    )
    # Semantic memory (bot.memory): embeddings behind a breaker and a retry policy of their own, so an
    # embedding outage never pauses answers; stored beside the queue (services.memory_store in its own
    # SQLite file, services.pg_memory_store in the PostgreSQL database).
    embed_retry = RetryPolicy(
        "gemini.embed", max_attempts=2, base_delay=0.2, max_delay=1.0, hint_cap=2.0,
        budget=RetryBudget(clock=clock), sleep=clock.sleep,
    )
    metrics.watch_retry_policy(embed_retry, "gemini.embed")
    embedder = Embedder(
        lambda: gemini.sdk_client,
        model=config.memory_embedding_model,
        dimensions=config.memory_embedding_dimensions,
        breaker=board.add("gemini.embed"),
        retry=embed_retry,
    )
    memory_store: MemoryBackend
    if isinstance(storage, PostgresStore):  # in the shared database, so every process sees it
        memory_store = PgMemoryStore(storage, max_items=config.memory_max_items, clock=clock)
    else:
        memory_path = data_dir / "memory.sqlite3"
        memory_store = MemoryStore(memory_path, max_items=config.memory_max_items, clock=clock)
    memory = SemanticMemory(
        memory_store, embedder, clock=clock, max_tokens=config.memory_max_tokens, top_k=config.memory_top_k
    )
    context_cache = ContextCache(lambda: gemini.sdk_client, ttl=config.context_cache_ttl_seconds, clock=clock)
    gemini.context_cache = context_cache
    answer_cache = AnswerCache(
        max_entries=config.answer_cache_max_entries, ttl=config.answer_cache_ttl_seconds, clock=clock
    )
    # Watches the health assessment and repairs what it can (bot.healing); started after the
    # services it may restart, stopped before them.
    healer = Healer(
        clock=clock,
        metrics=metrics,
        board=board,
        degradation=degradation,
        datastore=datastore,
        caches=http_api.sources.caches,
        enabled=config.heal_enabled,
        max_per_hour=config.heal_max_actions_per_hour,
        gateway_silence=config.heal_gateway_silence_seconds,
        memory_bytes=config.heal_memory_mb * MIB,
    )
    # Plugins (bot.plugins) load once the services they use have started.
    plugins = PluginHost(
        folder=config.plugins_dir,
        enabled=config.plugins,
        required=config.required_plugins,
        load_timeout=config.plugin_load_timeout_seconds,
        clock=clock,
    )
    # The HTTP API right after metrics: it answers /live and /ready while the others start, and
    # stops last; the healer last, so it stops first.
    services: list[Service] = [
        metrics, http_api, datastore, storage, usage, gemini, discord_io,
        memory_store, memory, plugins, healer,
    ]
    if otel is not None:
        services.append(otel)  # last: the bot has stopped taking work when it flushes and stops
    registry = ServiceRegistry(services)
    app = Application(
        config=config,
        clock=clock,
        metrics=metrics,
        board=board,
        mutex=mutex,
        degradation=degradation,
        traces=traces,
        store=store,
        datastore=datastore,
        storage=storage,
        gemini=gemini,
        discord_io=discord_io,
        ratelimiter=ratelimiter,
        registry=registry,
        gemini_retry=retry,
        http_api=http_api,
        message_latency=message_latency,
        queue_caps=QueueCaps(
            max_items=config.queue_max_items,
            max_pending_per_user=config.queue_max_pending_per_user,
            max_pending_per_guild=config.queue_max_pending_per_guild,
        ),
        usage=usage,
        settings=SettingsCache(config),
        tools=ToolRegistry(board, clock=clock, metrics=metrics),
        healer=healer,
        memory=memory,
        answer_cache=answer_cache,
        context_cache=context_cache,
        coordination=coordination,
        plugins=plugins,
    )
    healer.registry = registry
    # The caches of memory and caching, beside the others in the memory view (GET /api/health/memory).
    answers_max = config.answer_cache_max_entries
    http_api.sources.caches.update({
        "answer_cache": BoundedCache(lambda: answer_cache.status()["answers"], answers_max),
        "offline_answers": BoundedCache(lambda: answer_cache.status()["offline"], answers_max),
        "context_caches": BoundedCache(lambda: len(context_cache.names()), CONTEXT_CACHES_MAX),
    })
    http_api.sources.registry = registry
    http_api.sources.discord_connected = app.discord_connected
    return app


def point_discord_at(api_base: str | None, gateway_url: str | None) -> None:
    """Aim discord.py at another REST base / gateway (the sandbox emulator, a proxy)."""
    import yarl

    if api_base:
        discord.http.Route.BASE = api_base.rstrip("/")
    if gateway_url:
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
