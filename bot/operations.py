"""The operator's actions, written once for the ``/admin`` slash commands and the HTTP admin API.

``Operations(app)`` has one coroutine per action. Each returns a plain JSON-serialisable dict
whose fields are fixed by the ``TypedDict`` it is typed with (documented below and on each
method), so the HTTP API can send it as is and the slash commands can format it. Bad input
raises an ``OperationError``:

- ``UnknownNameError(kind, name, valid)``: no breaker / datastore file / held lock of that
  name; ``valid`` lists the names that exist (HTTP 404, an ephemeral sentence naming them);
- ``InvalidRequestError``: a malformed argument (HTTP 400);
- ``OperationUnavailableError``: the action cannot run in this process now, e.g. no Discord
  gateway to reconnect (HTTP 503).

Anything else raised is a dependency failure (storage breaker open, disk error): the edge
classifies it with ``resilience.errors.classify`` (retryable -> 503). Every action logs one
structured line ``admin.<action>`` with the ``actor`` when given, and never a secret or a
message's content.

Breakers an operator opens are written to the DataStore ``breakers`` file so they stay open
across a restart; ``apply_breaker_overrides(app)`` re-applies them at start-up.

Several processes on one PostgreSQL database (``DATABASE_URL``) act as one bot: an action taken in
one reaches the others at once. What is kept in the shared state (maintenance, a guild's settings,
an opened breaker) travels with the state's own change notification; what is not (a breaker reset,
a drain wake-up, load shedding) is sent as a notification of its own (``services.coordination``).
``follow_other_processes(app)`` makes a process act on both; ``processes()`` lists every process
from its heartbeat (``/status``).

Most actions are bot-wide (the bot's owners run them). The ``guild_*`` actions change one
guild only, named by ``guild_id``: its own maintenance mode, its chat channels, the tools
Google runs for its answers and its settings (``guild_setting_set``/``reset``/``guild_settings_show``,
``bot/settings.py``: for the server or one category, channel, forum or thread), all kept in the
DataStore ``guild_settings`` file. ``usage_report``
reads the Gemini token usage of the bot, one guild or one user. Who may run which is the
caller's check (the slash commands check the member; the HTTP API's token is an owner's).
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypedDict
from urllib.parse import urlsplit

import structlog

from bot.grounding import TOOL_NAMES
from bot.settings import (
    GROUNDING_TOOL,
    MAX_SCOPES,
    InvalidSettingError,
    Setting,
    setting,
)
from bot.usage import seconds_to_reset
from resilience.context import TraceRecord
from resilience.degradation import DEFAULT_MAINTENANCE_MESSAGE, ItemKind, ItemState, Mode, QueueItem
from resilience.errors import classify
from resilience.mutex import LockStatus
from services.coordination import ProcessRecord
from services.datastore import DataStoreValidationError
from services.http_api import rss_bytes
from services.storage import UsageRow, UsageTotals, usage_day

if TYPE_CHECKING:
    from bot.app import Application
    from services.config import Config

log = structlog.get_logger("bot.operations")

ALL = "all"
"""The name ``circuit_reset`` takes for every breaker."""

HOLD_SECONDS = 10 * 365 * 86400.0
"""How long ``circuit_open`` without a duration holds a breaker: until an operator resets it."""

PURGEABLE = (ItemState.DEAD, ItemState.EXPIRED, ItemState.DONE)
MAX_NOTICE_CHARS = 1800  # the maintenance notice is sent as one Discord message (2000 max)
MAX_CHAT_CHANNELS = 50  # per guild: where the bot answers every message, not a firehose
PREVIEW_CHARS = 40
RECONNECT_CLOSE_CODE = 4000  # discord.py treats 4000 as resumable: it reconnects and RESUMEs
RECONNECT_CLOSE_TIMEOUT = 5.0
# What waits on which breaker: questions on Gemini, answers on Discord (see bot/drain.py).
WAITS_ON = {"gemini": ItemKind.INBOUND, "discord.send": ItemKind.OUTBOUND}
# A circuit reset makes due now the items waiting longer than this; nearer ones come soon anyway,
# and the drain may claim those at any moment (a claimed item must never be requeued under it).
RESCHEDULE_MARGIN = 60.0
RESCHEDULE_LIMIT = 10_000
MAX_TRACE_ID = 64  # characters: ours are 12, OpenTelemetry's 32
MAX_LIST = 200  # traces or error groups one view lists at most
LOAD_TEST_MAX_REQUESTS = 500
LOAD_TEST_MAX_CONCURRENCY = 20
LOAD_TEST_MAX_SECONDS = 60.0  # then whatever is still running is cancelled and counted unfinished
# Notifications of actions the shared state does not carry (services.coordination kinds).
CIRCUIT_RESET = "circuit_reset"
QUEUE_DRAIN = "queue_drain"
LOAD = "load"
# A process whose heartbeat is older than this many beats is shown as silent in /status.
SILENT_AFTER_BEATS = 3


# --- errors -------------------------------------------------------------------------------


class OperationError(Exception):
    """Root of the operations' refusals; the message is one sentence fit for the operator."""


class UnknownNameError(OperationError, LookupError):
    """No ``kind`` named ``name``; ``valid`` lists the names there are (HTTP 404)."""

    def __init__(self, kind: str, name: str, valid: list[str]) -> None:
        self.kind = kind
        self.name = name
        self.valid = list(valid)
        listed = ", ".join(self.valid) if self.valid else "(none)"
        super().__init__(f"unknown {kind} {name!r}; valid: {listed}")


class InvalidRequestError(OperationError, ValueError):
    """An argument is malformed or not allowed (HTTP 400)."""


class OperationUnavailableError(OperationError):
    """The action cannot run in this process now, e.g. the Discord client is not connected (HTTP 503)."""


class TraceNotFoundError(UnknownNameError):
    """No kept trace has this id (HTTP 404): it is older than what the collector keeps, or wrong."""

    def __init__(self, trace_id: str, kept: int) -> None:
        super().__init__("trace", trace_id, [])
        self.args = (
            f"no trace {trace_id!r} is kept: the bot keeps the last {kept} requests and the last {kept}"
            " slow ones; an older trace is only in the logs (search for its trace_id)",
        )


class ConfirmationRequiredError(OperationError):
    """The action would cost real resources (a load test against the real Gemini API): it needs an
    explicit confirmation (HTTP 409)."""


# --- result shapes ----------------------------------------------------------------------------


class BreakerRow(TypedDict):
    """One breaker: ``state`` closed|open|half_open; ``since`` wall-clock seconds of the last change;
    ``remaining`` seconds until a probe is allowed (None while held open until a reset);
    ``persisted`` whether an operator's opening is on file (survives a restart) and
    ``persisted_until`` when it ends (wall clock; None = until reset)."""

    name: str
    state: str
    since: float
    failures: int
    remaining: float | None
    last_error: str | None
    forced_reason: str | None
    persisted: bool
    persisted_until: float | None


class CircuitStatus(TypedDict):
    breakers: list[BreakerRow]


class CircuitReset(TypedDict):
    """``reset``: the breakers closed; ``overrides_removed``: the persisted openings deleted."""

    reset: list[str]
    overrides_removed: list[str]


class CircuitOpen(TypedDict):
    """``duration`` seconds (None = until reset); ``until`` its wall-clock end (None = until reset)."""

    name: str
    state: str
    duration: float | None
    until: float | None
    reason: str


class MaintenanceStatus(TypedDict):
    """``message`` is the notice users see (None when off); ``since``/``by`` the last change; ``mode``
    the bot's current mode (normal|degraded|maintenance)."""

    enabled: bool
    message: str | None
    since: float | None
    by: str | None
    mode: str


class GuildMaintenanceStatus(TypedDict):
    """One guild's own maintenance mode: ``message`` the notice its members see (None when off);
    ``since``/``by`` the last change; ``bot_wide`` whether the owners' maintenance is on too (it
    covers every guild, with its own notice)."""

    guild_id: int
    enabled: bool
    message: str | None
    since: float | None
    by: str | None
    bot_wide: bool


class ChatChannels(TypedDict):
    """The channels of guild ``guild_id`` where the bot answers every message; ``changed``: whether
    the action changed the list (adding one already there, or removing one not there, does not)."""

    guild_id: int
    channels: list[int]
    changed: bool


class GuildTools(TypedDict):
    """The Google-run tools of guild ``guild_id``: each tool's name -> on; ``changed``: whether the
    action changed it."""

    guild_id: int
    tools: dict[str, bool]
    changed: bool


class SettingRow(TypedDict):
    """One setting as it applies somewhere: its ``value``, the text ``/settings show`` writes for it
    (``shown``), and where it comes from (``source``: ``"server"``, ``"default"``, or the id of the
    category, channel, forum or thread that set it)."""

    name: str
    label: str
    value: Any
    shown: str
    source: str | int


class SettingsView(TypedDict):
    """Every setting of guild ``guild_id`` for the place whose scope chain is ``chain`` (most specific
    first); ``scopes``: the places of the guild with settings of their own."""

    guild_id: int
    chain: list[int]
    settings: list[SettingRow]
    scopes: list[int]


class SettingChange(TypedDict):
    """A setting set (or reset) for the whole server (``scope`` None) or one place; ``value`` what it
    is there now (None after a reset: inherited), ``previous`` what it was there, ``changed``."""

    guild_id: int
    name: str
    label: str
    scope: int | None
    value: Any
    shown: str | None
    previous: Any
    changed: bool


class UsageFigures(TypedDict):
    """Gemini tokens: ``calls`` answers, ``prompt`` read (``cached`` of them from Gemini's cache),
    ``output`` and ``thought`` written; ``counted`` = prompt + output + thought (what quotas count)."""

    calls: int
    prompt: int
    output: int
    thought: int
    cached: int
    counted: int


class UsageOwner(TypedDict):
    """One user's or guild's (``id``; guild 0 is DMs) usage."""

    id: int
    usage: UsageFigures


class UsageReport(TypedDict):
    """Usage over ``days`` UTC days up to today (``first_day``..``last_day``, days since the epoch):
    ``total`` (of the bot, or of one guild or user), ``by_model``, the top ``users`` and ``guilds``
    (one guild's report has no ``guilds``), today's quotas (0 = unlimited) and seconds to their reset."""

    first_day: int
    last_day: int
    guild_id: int | None
    user_id: int | None
    total: UsageFigures
    by_model: dict[str, UsageFigures]
    users: list[UsageOwner]
    guilds: list[UsageOwner]
    user_quota: int
    guild_quota: int
    resets_in: float


class QueueItemRow(TypedDict):
    """One queued item without its content beyond ``preview`` (the first 40 characters)."""

    id: int
    kind: str
    state: str
    conversation_key: str
    attempts: int
    age: float
    next_attempt_in: float
    last_error: str | None
    preview: str


class QueueStatus(TypedDict):
    """``depth[kind][state]`` with every kind and state present; ``items`` the oldest pending or
    claimed items."""

    depth: dict[str, dict[str, int]]
    pending: int
    oldest_pending_age: float | None
    items: list[QueueItemRow]


class QueueDrain(TypedDict):
    """``woken``: a drain runs in this process and was woken; ``blocked_by``: breakers not admitting
    calls now (the drain waits for them)."""

    woken: bool
    pending: int
    pending_inbound: int
    pending_outbound: int
    oldest_pending_age: float | None
    blocked_by: list[str]


class QueuePurge(TypedDict):
    state: str
    purged: int


class FileReport(TypedDict):
    """One DataStore file as on disk now; ``source`` what served it at the last load."""

    name: str
    path: str
    ok: bool
    problems: list[str]
    source: str | None


class DatastoreValidate(TypedDict):
    ok: bool
    files: list[FileReport]


class DatastoreRecover(TypedDict):
    """``source``: file|bak|backup:<name>|defaults; ``alert``: defaults because nothing valid existed."""

    name: str
    source: str
    alert: bool
    problems: list[str]
    quarantined: list[str]


class LockRow(TypedDict):
    key: str
    holder: str
    held_for: float
    waiters: int


class MutexStatus(TypedDict):
    """``locks``: held or awaited keys, longest held first; ``keys``: records kept; ``counters``:
    acquisitions, waits, timeouts, forced_releases."""

    locks: list[LockRow]
    keys: int
    counters: dict[str, int]


class MutexRelease(TypedDict):
    key: str
    released: bool
    holder: str
    held_for: float
    waiters: int


class GcResult(TypedDict):
    """``collected``: unreachable objects found; ``rss_*`` resident memory in bytes (None if unknown)."""

    collected: int
    garbage: int
    rss_before: int | None
    rss_after: int | None


class DiscordReconnect(TypedDict):
    """``closed``: the gateway socket was closed with ``code``; discord.py reconnects and RESUMEs."""

    closed: bool
    code: int


class GeminiTest(TypedDict):
    """``ok``: Gemini answered. On an answer or a refusal ``reply_kind``/``model`` are set; on a failure
    ``category``/``retryable``/``retry_after`` classify it. ``message`` is a sentence for the
    operator; ``breaker`` the Gemini breaker's state afterwards."""

    ok: bool
    latency_ms: float
    reply_kind: str | None
    model: str | None
    category: str | None
    retryable: bool | None
    retry_after: float | None
    message: str | None
    breaker: str


class TraceSummary(TypedDict):
    """One kept trace in a list: ``name`` its route (message, drain, /ask), ``started_at`` wall clock,
    ``duration`` seconds, ``error`` the exception type (and status) it failed with, ``slow_spans``
    the steps over the slow threshold, ``spans`` how many steps it has; ``fields`` guild, channel,
    user ids."""

    trace_id: str
    name: str
    started_at: float
    duration: float
    error: str | None
    slow_spans: list[str]
    spans: int
    fields: dict[str, Any]


class Latency(TypedDict):
    """Nearest-rank percentiles in seconds (None without samples)."""

    count: int
    p50: float | None
    p95: float | None
    p99: float | None
    max: float | None


class TraceList(TypedDict):
    """``traces`` newest first; ``latency`` over their durations; ``slow_threshold`` seconds;
    ``kept`` how many the collector holds (``max_traces`` recent and as many slow)."""

    slow: bool
    traces: list[TraceSummary]
    latency: Latency
    slow_threshold: float
    kept: int
    max_traces: int


class ErrorGroup(TypedDict):
    """One fingerprint (category, error type, dependency, route): counts since ``first_seen`` and
    over the windows ``5m``/``1h``/``24h``, distinct ``users``/``guilds`` (at least, when capped),
    the newest ``sample_trace_ids``."""

    id: str
    category: str
    error: str
    dependency: str
    route: str
    count: int
    windows: dict[str, int]
    first_seen: float
    last_seen: float
    users: int
    users_capped: bool
    guilds: int
    guilds_capped: bool
    sample_trace_ids: list[str]


class ErrorsView(TypedDict):
    """``groups`` busiest in the last hour first; ``recorded`` failures counted since start;
    ``evicted`` groups forgotten to stay within ``max_groups``."""

    groups: list[ErrorGroup]
    recorded: int
    evicted: int
    max_groups: int


class LoadStatus(TypedDict):
    """The rate limits in force (messages per minute) and whether new messages are queued instead
    of answered live; ``configured_*`` the limits of the configuration; ``shedding`` whether
    anything differs from it; ``changed_at`` when an operator last shed or restored (wall clock)."""

    user_per_minute: int
    guild_per_minute: int
    queue_new_messages: bool
    configured_user_per_minute: int
    configured_guild_per_minute: int
    shedding: bool
    changed_at: float | None


class ProcessRow(TypedDict):
    """One bot process on the database: ``alive`` it holds its connection (a dead one is shown for an
    hour); ``this`` the process answering; ``beat_age`` seconds since its last heartbeat; ``state``
    what that heartbeat said (mode, breakers not closed, Discord connected)."""

    id: int
    name: str
    alive: bool
    this: bool
    started_at: float
    beat_age: float
    stopped_at: float | None
    state: dict[str, Any]


class LoadTest(TypedDict):
    """A synthetic load of Gemini test prompts: ``ok`` answered, ``errors`` not (by category in
    ``errors_by_category``; ``unfinished`` still running at ``max_seconds``), ``latency`` seconds,
    ``live`` whether the bot talks to real services (``talks_to_real_services``)."""

    requests: int
    concurrency: int
    ok: int
    errors: int
    errors_by_category: dict[str, int]
    unfinished: int
    duration: float
    per_second: float
    latency: Latency
    live: bool


# --- the operations ---------------------------------------------------------------------------


class Operations:
    """Every operator action on one application; the admin commands and the HTTP API call these.

    Each method takes ``by`` (keyword): who asked, for the log and the files, e.g.
    ``"discord:<user id>"`` or ``"http"``.
    """

    def __init__(
        self, app: Application, *, incidents: Callable[[], Awaitable[dict[str, Any]]] | None = None
    ) -> None:
        self.app = app
        self._load_changed_at: float | None = None
        self._incidents = incidents

    # -- circuit breakers ---------------------------------------------------------------------

    async def circuit_status(self, *, by: str | None = None) -> CircuitStatus:
        """Every breaker's state, with the operator's persisted openings."""
        overrides = _active_overrides(self._cached("breakers").get("overrides", {}), self.app.clock.time())
        rows: list[BreakerRow] = []
        for snap in self.app.board.snapshot():
            persisted = overrides.get(snap.name)
            held = persisted is not None and persisted.get("until") is None and snap.state == "open"
            rows.append(
                BreakerRow(
                    name=snap.name,
                    state=str(snap.state),
                    since=snap.since,
                    failures=snap.failures,
                    remaining=None if held else round(snap.remaining, 3),
                    last_error=snap.last_error,
                    forced_reason=snap.forced_reason,
                    persisted=persisted is not None,
                    persisted_until=None if persisted is None else persisted.get("until"),
                )
            )
        _log("circuit_status", by, breakers=len(rows))
        return CircuitStatus(breakers=rows)

    async def circuit_reset(self, name: str, *, by: str | None = None) -> CircuitReset:
        """Close breaker ``name`` (or every one: ``"all"``), drop its persisted opening, wake the drain."""
        board = self.app.board
        names = board.names() if name == ALL else [self._breaker_name(name, allow_all=True)]

        def drop(data: dict[str, Any]) -> None:
            for n in names:
                data["overrides"].pop(n, None)

        # Memory first: the DataStore writes through the storage breaker, which may be the one
        # being reset. Should the file write then fail, the error says so: those breakers are
        # closed now but would re-open at the next start.
        for n in names:
            board[n].reset()
        persisted = self._cached("breakers").get("overrides", {})
        removed = [n for n in names if n in persisted]
        if removed:
            await self.app.datastore.update("breakers", drop)
        rescheduled = await self._make_due({WAITS_ON[n] for n in names if n in WAITS_ON})
        self.app.drain_wake()
        await self._tell_others(CIRCUIT_RESET, {"names": names})
        _log("circuit_reset", by, target=name, reset=names, overrides_removed=removed, made_due=rescheduled)
        return CircuitReset(reset=names, overrides_removed=removed)

    async def _make_due(self, kinds: set[ItemKind], *, guild_id: int | None = None) -> int:
        """Pending items of ``kinds`` (of guild ``guild_id`` only, when given) become due now; return
        how many.

        A message queued on an exhausted daily quota waits until the quota resets, hours away:
        an operator who resets the circuit (after raising the quota) means "try now"; so does a
        guild's manager who ends its maintenance (the drain held its questions meanwhile). Items due
        within ``RESCHEDULE_MARGIN`` are left alone: the drain cannot claim the others meanwhile,
        so no item is requeued while claimed. A storage failure only skips this (logged).
        """
        if not kinds:
            return 0
        storage = self.app.storage
        now = self.app.clock.time()
        moved = 0
        try:
            for item in await storage.list(ItemState.PENDING, limit=RESCHEDULE_LIMIT):
                if item.kind not in kinds or item.next_attempt_at <= now + RESCHEDULE_MARGIN:
                    continue
                if guild_id is not None and item.payload.get("guild_id") != guild_id:
                    continue
                await storage.requeue(
                    item.id, error=item.last_error or "made due", next_attempt_at=now, count_attempt=False
                )
                moved += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("admin.reschedule_failed", moved=moved, category=classify(exc).category.value)
        return moved

    async def circuit_open(
        self,
        name: str,
        duration: float | None = None,
        *,
        reason: str | None = None,
        by: str | None = None,
    ) -> CircuitOpen:
        """Hold breaker ``name`` open for ``duration`` seconds (None: until ``circuit_reset``).

        The opening is written to the DataStore first, so it survives a restart.
        """
        name = self._breaker_name(name, allow_all=False)
        if duration is not None:
            if isinstance(duration, bool) or not isinstance(duration, int | float):
                raise InvalidRequestError("duration must be a number of seconds")
            if not math.isfinite(duration) or duration <= 0:
                raise InvalidRequestError("duration must be a positive, finite number of seconds")
            duration = float(duration)
        if reason is not None and not isinstance(reason, str):
            raise InvalidRequestError("reason must be text")
        reason = (reason or "").strip()[:200] or (f"opened by {by}" if by else "opened by an operator")
        until = None if duration is None else self.app.clock.time() + duration
        entry = {"state": "open", "until": until, "reason": reason}

        def put(data: dict[str, Any]) -> None:
            data["overrides"][name] = entry

        await self.app.datastore.update("breakers", put)
        breaker = self.app.board[name]
        breaker.force_open(HOLD_SECONDS if duration is None else duration, reason)
        _log("circuit_open", by, breaker=name, duration=duration, until=until, reason=reason)
        return CircuitOpen(name=name, state=str(breaker.state), duration=duration, until=until, reason=reason)

    # -- maintenance ----------------------------------------------------------------------------

    async def maintenance_on(self, message: str | None = None, *, by: str | None = None) -> MaintenanceStatus:
        """Turn maintenance mode on (persisted: it survives a restart); ``message`` is the notice users see.

        Turning it on again changes the notice and keeps ``since``.
        """
        notice = _notice(message)
        now = self.app.clock.time()

        def switch_on(data: dict[str, Any]) -> dict[str, Any]:
            since = data["since"] if data.get("enabled") and data.get("since") is not None else now
            return {"enabled": True, "message": notice, "since": since, "by": by}

        saved = await self.app.datastore.update("maintenance", switch_on)
        self.app.reload_settings()
        status = self._maintenance_view(saved)
        _log("maintenance_on", by, custom_message=notice is not None)
        return status

    async def maintenance_off(self, *, by: str | None = None) -> MaintenanceStatus:
        """Turn maintenance mode off (persisted) and wake the drain for what was queued meanwhile."""
        now = self.app.clock.time()

        def switch_off(data: dict[str, Any]) -> dict[str, Any]:
            return {"enabled": False, "message": None, "since": now, "by": by}

        saved = await self.app.datastore.update("maintenance", switch_off)
        self.app.reload_settings()
        self.app.drain_wake()
        status = self._maintenance_view(saved)
        _log("maintenance_off", by)
        return status

    async def maintenance_status(self, *, by: str | None = None) -> MaintenanceStatus:
        """Whether maintenance mode is on, its notice, since when and who switched it."""
        status = self._maintenance_view(self._cached("maintenance"))
        _log("maintenance_status", by, enabled=status["enabled"])
        return status

    def _maintenance_view(self, data: dict[str, Any]) -> MaintenanceStatus:
        enabled = bool(data.get("enabled"))
        return MaintenanceStatus(
            enabled=enabled,
            message=self.app.maintenance() if enabled else None,
            since=data.get("since"),
            by=data.get("by"),
            mode=str(self.app.degradation.mode),
        )

    # -- one guild: its maintenance and chat channels -------------------------------------------

    async def guild_maintenance_on(
        self, guild_id: int, message: str | None = None, *, by: str | None = None
    ) -> GuildMaintenanceStatus:
        """Turn guild ``guild_id``'s own maintenance on (persisted): its members' messages get the
        notice and are queued, the drain holds its queued questions; other guilds are unaffected."""
        gid = _guild_id(guild_id)
        notice = _notice(message)
        now = self.app.clock.time()

        def switch_on(data: dict[str, Any]) -> None:
            entry = data["guilds"].setdefault(str(gid), {})
            old = entry.get("maintenance") or {}
            since = old["since"] if old.get("enabled") and old.get("since") is not None else now
            entry["maintenance"] = {"enabled": True, "message": notice, "since": since, "by": by}

        saved = await self.app.datastore.update("guild_settings", switch_on)
        self.app.reload_settings()
        _log("guild_maintenance_on", by, guild_id=gid, custom_message=notice is not None)
        return self._guild_maintenance_view(gid, saved)

    async def guild_maintenance_off(self, guild_id: int, *, by: str | None = None) -> GuildMaintenanceStatus:
        """Turn guild ``guild_id``'s maintenance off (persisted); its held questions are answered now."""
        gid = _guild_id(guild_id)
        now = self.app.clock.time()

        def switch_off(data: dict[str, Any]) -> None:
            entry = data["guilds"].setdefault(str(gid), {})
            entry["maintenance"] = {"enabled": False, "message": None, "since": now, "by": by}

        saved = await self.app.datastore.update("guild_settings", switch_off)
        self.app.reload_settings()
        released = await self._make_due({ItemKind.INBOUND}, guild_id=gid)
        self.app.drain_wake()
        _log("guild_maintenance_off", by, guild_id=gid, made_due=released)
        return self._guild_maintenance_view(gid, saved)

    async def guild_maintenance_status(
        self, guild_id: int, *, by: str | None = None
    ) -> GuildMaintenanceStatus:
        """Whether guild ``guild_id``'s own maintenance is on, its notice, since when and who switched it."""
        gid = _guild_id(guild_id)
        status = self._guild_maintenance_view(gid, self._cached("guild_settings"))
        _log("guild_maintenance_status", by, guild_id=gid, enabled=status["enabled"])
        return status

    def _guild_maintenance_view(self, gid: int, settings: dict[str, Any]) -> GuildMaintenanceStatus:
        data = (settings.get("guilds", {}).get(str(gid)) or {}).get("maintenance") or {}
        enabled = bool(data.get("enabled"))
        return GuildMaintenanceStatus(
            guild_id=gid,
            enabled=enabled,
            message=(data.get("message") or DEFAULT_MAINTENANCE_MESSAGE) if enabled else None,
            since=data.get("since"),
            by=data.get("by"),
            bot_wide=self.app.degradation.mode is Mode.MAINTENANCE,
        )

    async def guild_chat_channels(self, guild_id: int, *, by: str | None = None) -> ChatChannels:
        """The channels of guild ``guild_id`` where the bot answers every message, not only mentions."""
        gid = _guild_id(guild_id)
        channels = sorted(self.app.chat_channels(gid))
        _log("guild_chat_channels", by, guild_id=gid, channels=len(channels))
        return ChatChannels(guild_id=gid, channels=channels, changed=False)

    async def guild_chat_channel_add(
        self, guild_id: int, channel_id: int, *, by: str | None = None
    ) -> ChatChannels:
        """Make the bot answer every message in ``channel_id`` (a channel or thread of guild ``guild_id``)."""
        gid, cid = _guild_id(guild_id), _channel_id(channel_id)
        return await self._change_chat_channels(gid, cid, add=True, by=by)

    async def guild_chat_channel_remove(
        self, guild_id: int, channel_id: int, *, by: str | None = None
    ) -> ChatChannels:
        """Make the bot answer only mentions, replies and DMs in ``channel_id`` again."""
        gid, cid = _guild_id(guild_id), _channel_id(channel_id)
        return await self._change_chat_channels(gid, cid, add=False, by=by)

    async def _change_chat_channels(self, gid: int, cid: int, *, add: bool, by: str | None) -> ChatChannels:
        changed = False

        def change(data: dict[str, Any]) -> None:
            nonlocal changed
            entry = data["guilds"].setdefault(str(gid), {})
            channels = [int(c) for c in entry.get("chat_channels") or []]
            if add and cid not in channels:
                if len(channels) >= MAX_CHAT_CHANNELS:
                    raise InvalidRequestError(
                        f"this server already has {len(channels)} chat channels, the most I keep;"
                        " remove one first"
                    )
                channels.append(cid)
                changed = True
            elif not add and cid in channels:
                channels.remove(cid)
                changed = True
            entry["chat_channels"] = sorted(channels)

        await self.app.datastore.update("guild_settings", change)
        self.app.reload_settings()
        channels = sorted(self.app.chat_channels(gid))
        _log("guild_chat_channel_add" if add else "guild_chat_channel_remove", by, guild_id=gid,
             channel_id=cid, changed=changed)
        return ChatChannels(guild_id=gid, channels=channels, changed=changed)

    # -- one guild: the tools Google runs (bot/grounding.py) ----------------------------------

    async def guild_tools(self, guild_id: int, *, by: str | None = None) -> GuildTools:
        """Which Google-run tools guild ``guild_id`` has on (Search grounding, URL context, code)."""
        gid = _guild_id(guild_id)
        on = set(self.app.guild_tools(gid))
        _log("guild_tools", by, guild_id=gid, on=sorted(on))
        return GuildTools(guild_id=gid, tools={n: n in on for n in TOOL_NAMES}, changed=False)

    async def guild_tool_set(
        self, guild_id: int, tool: str, enabled: bool, *, by: str | None = None
    ) -> GuildTools:
        """Turn one Google-run ``tool`` on or off for guild ``guild_id`` (persisted in guild_settings)."""
        gid = _guild_id(guild_id)
        if tool not in TOOL_NAMES:
            raise UnknownNameError("tool", str(tool), list(TOOL_NAMES))
        if not isinstance(enabled, bool):
            raise InvalidRequestError("enabled must be true or false")
        changed = False

        def change(data: dict[str, Any]) -> None:
            nonlocal changed
            entry = data["guilds"].setdefault(str(gid), {})
            tools = dict(entry.get("tools") or {})
            changed = bool(tools.get(tool)) != enabled
            tools[tool] = enabled
            entry["tools"] = tools

        await self.app.datastore.update("guild_settings", change)
        self.app.reload_settings()
        on = set(self.app.guild_tools(gid))
        _log("guild_tool_set", by, guild_id=gid, tool=tool, enabled=enabled, changed=changed)
        return GuildTools(guild_id=gid, tools={n: n in on for n in TOOL_NAMES}, changed=changed)

    # -- one guild: its settings (bot/settings.py) ---------------------------------------------

    async def guild_settings_show(
        self, guild_id: int, chain: list[int] | tuple[int, ...] = (), *, by: str | None = None
    ) -> SettingsView:
        """Every setting that applies at the place whose scope chain is ``chain`` (the server when
        empty) in guild ``guild_id``, and where each value comes from."""
        gid = _guild_id(guild_id)
        scopes = [_channel_id(c) for c in chain]
        rows = [
            SettingRow(
                name=e.setting.name, label=e.setting.label, value=e.value, shown=e.setting.show(e.value),
                source=e.source,
            )
            for e in self.app.settings.explain(gid, scopes)
        ]
        _log("guild_settings_show", by, guild_id=gid, scopes=len(scopes))
        return SettingsView(
            guild_id=gid, chain=scopes, settings=rows, scopes=sorted(self.app.settings.scopes(gid))
        )

    async def guild_setting_set(
        self, guild_id: int, name: str, text: str, *, scope: int | None = None, by: str | None = None
    ) -> SettingChange:
        """Set ``name`` to the value ``text`` says, for the whole server of guild ``guild_id`` or for
        the category, channel, forum or thread ``scope`` (persisted in guild_settings). A value the
        bot cannot take raises ``InvalidRequestError`` with one sentence naming the limit."""
        gid = _guild_id(guild_id)
        spec = _setting_for(name, scope)
        try:
            value = spec.parse(str(text), self.app.settings.limits)
        except InvalidSettingError as exc:
            raise InvalidRequestError(str(exc)) from exc
        return await self._change_setting(gid, spec, scope, value, by=by, reset=False)

    async def guild_setting_reset(
        self, guild_id: int, name: str, *, scope: int | None = None, by: str | None = None
    ) -> SettingChange:
        """Remove ``name``'s value for the server (or for ``scope``): the next place out applies again."""
        gid = _guild_id(guild_id)
        spec = _setting_for(name, scope)
        return await self._change_setting(gid, spec, scope, None, by=by, reset=True)

    async def _change_setting(
        self, gid: int, spec: Setting, scope: int | None, value: Any, *, by: str | None, reset: bool
    ) -> SettingChange:
        name = spec.name
        previous: Any = None
        changed = False

        def change(data: dict[str, Any]) -> None:
            nonlocal previous, changed
            entry = data["guilds"].setdefault(str(gid), {})
            if name == "chat":
                assert scope is not None  # _setting_for refused the server
                channels = [int(c) for c in entry.get("chat_channels") or []]
                previous = scope in channels
                if value and not previous:
                    if len(channels) >= MAX_CHAT_CHANNELS:
                        raise InvalidRequestError(
                            f"this server already has {len(channels)} chat channels, the most I keep;"
                            " turn chat off somewhere first"
                        )
                    channels.append(scope)
                elif not value and previous:
                    channels.remove(scope)
                entry["chat_channels"] = sorted(channels)
                changed = previous != bool(value)
                return
            if name == "grounding" and scope is None:  # the server's Search grounding is /server tools'
                tools = dict(entry.get("tools") or {})
                previous = bool(tools.get(GROUNDING_TOOL))
                tools[GROUNDING_TOOL] = bool(value)
                entry["tools"] = tools
                changed = previous != bool(value)
                return
            stored = entry.setdefault("settings", {})
            if scope is None:
                bucket = stored.setdefault("server", {})
                if name == "persona" and entry.get("persona"):
                    previous = entry.pop("persona")  # an older version's server persona: superseded
            else:
                places = stored.setdefault("channels", {})
                if str(scope) not in places and not reset and len(places) >= MAX_SCOPES:
                    raise InvalidRequestError(
                        f"this server already has settings for {len(places)} channels, categories and "
                        "threads, the most I keep; reset some first"
                    )
                bucket = places.setdefault(str(scope), {})
            previous = bucket.get(name, previous)
            if reset:
                bucket.pop(name, None)
            else:
                bucket[name] = value
            changed = previous != (None if reset else value)
            if scope is not None and not bucket:
                del stored["channels"][str(scope)]
            for part in ("server", "channels"):
                if not stored.get(part):
                    stored.pop(part, None)
            if not stored:
                entry.pop("settings")

        try:
            await self.app.datastore.update("guild_settings", change)
        except DataStoreValidationError as exc:
            problem = exc.problems[0] if exc.problems else str(exc)
            raise InvalidRequestError(f"I can't save that: {problem}") from exc
        self.app.reload_settings()
        _log("guild_setting_reset" if reset else "guild_setting_set", by, guild_id=gid, setting=name,
             scope=scope, changed=changed)
        return SettingChange(
            guild_id=gid, name=name, label=spec.label, scope=scope, value=None if reset else value,
            shown=None if reset else spec.show(value), previous=previous, changed=changed,
        )

    # -- Gemini usage (bot/usage.py) ------------------------------------------------------------

    async def usage_report(
        self,
        *,
        days: int = 1,
        guild_id: int | None = None,
        user_id: int | None = None,
        top: int = 5,
        by: str | None = None,
    ) -> UsageReport:
        """Tokens over the last ``days`` UTC days (today included): the bot's (owners), one guild's
        (its managers: with its top users) or one user's; by model, and the top users and guilds."""
        if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 366:
            raise InvalidRequestError("days must be a whole number from 1 to 366")
        gid = None if guild_id is None else _guild_id(guild_id)
        uid = None if user_id is None else _user_id(user_id)
        storage = self.app.storage
        now = self.app.clock.time()
        last = usage_day(now)
        first = last - days + 1
        total = await storage.usage_totals(first, last, user_id=uid, guild_id=gid)
        models = await storage.usage_by_model(first, last, user_id=uid, guild_id=gid)
        users: list[UsageRow] = []
        guilds: list[UsageRow] = []
        if uid is None:
            users = await storage.usage_top(first, last, by="user", limit=top, guild_id=gid)
            if gid is None:
                guilds = await storage.usage_top(first, last, by="guild", limit=top)
        _log("usage_report", by, days=days, guild_id=gid, user_id=uid)
        ledger = self.app.usage
        return UsageReport(
            first_day=first,
            last_day=last,
            guild_id=gid,
            user_id=uid,
            total=_figures(total),
            by_model={model: _figures(t) for model, t in models.items()},
            users=[UsageOwner(id=r.owner_id, usage=_figures(r.totals)) for r in users],
            guilds=[UsageOwner(id=r.owner_id, usage=_figures(r.totals)) for r in guilds],
            user_quota=ledger.user_daily,
            guild_quota=ledger.guild_daily,
            resets_in=round(seconds_to_reset(now), 3),
        )

    # -- the degradation queue ------------------------------------------------------------------

    async def queue_status(self, *, limit: int = 10, by: str | None = None) -> QueueStatus:
        """Depth by kind and state, the oldest pending age, and the ``limit`` oldest live items."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= 100:
            raise InvalidRequestError("limit must be an integer from 0 to 100")
        storage = self.app.storage
        now = self.app.clock.time()
        stats = await storage.stats(now=now)
        depth = {k.value: {s.value: stats.depth.get((k, s), 0) for s in ItemState} for k in ItemKind}
        live: list[QueueItem] = []
        if limit:
            live = await storage.list(ItemState.PENDING, limit) + await storage.list(ItemState.CLAIMED, limit)
            live = sorted(live, key=lambda item: item.id)[:limit]
        result = QueueStatus(
            depth=depth,
            pending=stats.pending(),
            oldest_pending_age=_round(stats.oldest_pending_age),
            items=[_item_row(item, now) for item in live],
        )
        _log("queue_status", by, pending=result["pending"])
        return result

    async def queue_drain(self, *, by: str | None = None) -> QueueDrain:
        """Wake the drain now; report what is pending and which breakers hold it back."""
        app = self.app
        stats = await app.storage.stats(now=app.clock.time())
        woken = app.drain_waker is not None  # the drain is attached only when a bot runs
        app.drain_wake()
        await self._tell_others(QUEUE_DRAIN, {})
        blocked = [b.name for b in app.board if b.name in ("gemini", "discord.send") and not b.would_admit()]
        result = QueueDrain(
            woken=woken,
            pending=stats.pending(),
            pending_inbound=stats.pending(ItemKind.INBOUND),
            pending_outbound=stats.pending(ItemKind.OUTBOUND),
            oldest_pending_age=_round(stats.oldest_pending_age),
            blocked_by=blocked,
        )
        _log("queue_drain", by, woken=woken, pending=result["pending"], blocked_by=blocked)
        return result

    async def queue_purge(self, state: str, *, by: str | None = None) -> QueuePurge:
        """Delete every item in ``state``: dead, expired or done (never pending or claimed work)."""
        valid = [s.value for s in PURGEABLE]
        if not isinstance(state, str) or state not in valid:
            raise InvalidRequestError(
                f"cannot purge {state!r} items: only {', '.join(valid)} items can be purged"
            )
        purged = await self.app.storage.purge(ItemState(state))
        _log("queue_purge", by, state=state, purged=purged)
        return QueuePurge(state=state, purged=purged)

    # -- the DataStore ------------------------------------------------------------------------------

    async def datastore_validate(
        self, name: str | None = None, *, by: str | None = None
    ) -> DatastoreValidate:
        """Check one DataStore file (or all) on disk as it is now, changing nothing."""
        if name is not None:
            self._file_name(name)
        reports = await self.app.datastore.validate(name)
        files = [
            FileReport(name=r.name, path=str(r.path), ok=r.ok, problems=list(r.problems), source=r.source)
            for r in reports
        ]
        ok = all(f["ok"] for f in files)
        _log("datastore_validate", by, file=name, ok=ok, bad=[f["name"] for f in files if not f["ok"]])
        return DatastoreValidate(ok=ok, files=files)

    async def datastore_recover(self, name: str, *, by: str | None = None) -> DatastoreRecover:
        """Reload DataStore file ``name`` from its best valid source, then apply it to the running bot."""
        self._file_name(name)
        report = await self.app.datastore.recover(name)
        self.app.reload_settings()
        if name == "breakers":
            await apply_breaker_overrides(self.app)
        _log("datastore_recover", by, file=name, source=report.source, alert=report.alert)
        return DatastoreRecover(
            name=report.name,
            source=report.source,
            alert=report.alert,
            problems=list(report.problems),
            quarantined=[str(p) for p in report.quarantined],
        )

    # -- the conversation mutex -------------------------------------------------------------------

    async def mutex_status(self, *, by: str | None = None) -> MutexStatus:
        """Held or awaited conversation locks, longest held first, and the mutex counters."""
        mutex = self.app.mutex
        locks = [_lock_row(s) for s in mutex.status()]
        _log("mutex_status", by, held=len(locks))
        return MutexStatus(locks=locks, keys=len(mutex), counters=mutex.counters())

    async def mutex_release(self, key: str, *, by: str | None = None) -> MutexRelease:
        """Free a stuck conversation lock so its next waiter runs; the stuck holder releases nothing later."""
        mutex = self.app.mutex
        held = {s.key: s for s in mutex.status() if mutex.locked(s.key)}
        if not isinstance(key, str) or key not in held:
            raise UnknownNameError("held lock", str(key), sorted(held))
        row = _lock_row(held[key])
        released = mutex.force_release(key)
        _log("mutex_release", by, key=key, holder=row["holder"], held_for=row["held_for"], released=released)
        return MutexRelease(
            key=key, released=released, holder=row["holder"], held_for=row["held_for"], waiters=row["waiters"]
        )

    # -- traces, errors and load (what the response-time and load-test scripts use) ---------------

    async def trace(self, trace_id: str, *, by: str | None = None) -> dict[str, Any]:
        """One kept trace with every span (``resilience.context.TraceRecord.as_dict``)."""
        if not isinstance(trace_id, str) or not 0 < len(trace_id) <= MAX_TRACE_ID:
            raise InvalidRequestError(f"a trace id is 1 to {MAX_TRACE_ID} characters")
        wanted = trace_id.strip().strip("`").lower()
        traces = self.app.traces
        record = traces.get(wanted)
        if record is None:
            raise TraceNotFoundError(wanted, traces.max_traces)
        _log("trace", by, trace_id=wanted, found=True)
        return record.as_dict()

    async def traces(
        self,
        *,
        slow: bool = False,
        limit: int = 50,
        window: float | None = None,
        since: float | None = None,
        route: str | None = None,
        by: str | None = None,
    ) -> TraceList:
        """Kept traces, newest first: the slow ones with ``slow``; when given, only those that started
        in the last ``window`` seconds, at or after ``since`` (wall clock, e.g. a ``load_shed``'s
        ``changed_at``), of ``route`` (message, drain, /ask); ``latency`` over all of them."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIST:
            raise InvalidRequestError(f"limit must be an integer from 0 to {MAX_LIST}")
        if window is not None and (not math.isfinite(window) or window <= 0):
            raise InvalidRequestError("window must be a positive number of seconds")
        if since is not None and not math.isfinite(since):
            raise InvalidRequestError("since must be a time in seconds since the epoch")
        collector = self.app.traces
        now = self.app.clock.time()
        records = collector.slow() if slow else collector.recent()
        if window is not None:
            records = [r for r in records if r.started_at >= now - window]
        if since is not None:
            records = [r for r in records if r.started_at >= since]
        if route is not None:
            records = [r for r in records if r.name == route]
        result = TraceList(
            slow=slow,
            traces=[_trace_row(r) for r in records[:limit]],
            latency=_latency([r.duration for r in records]),
            slow_threshold=collector.slow_threshold,
            kept=len(collector),
            max_traces=collector.max_traces,
        )
        _log("traces", by, slow=slow, listed=len(result["traces"]))
        return result

    async def errors(self, *, limit: int = 20, by: str | None = None) -> ErrorsView:
        """Failures grouped by fingerprint (``resilience.fingerprints``), busiest in the last hour first."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 <= limit <= MAX_LIST:
            raise InvalidRequestError(f"limit must be an integer from 0 to {MAX_LIST}")
        aggregator = self.app.traces.errors
        if aggregator is None:
            return ErrorsView(groups=[], recorded=0, evicted=0, max_groups=0)
        status = aggregator.status()
        groups = [ErrorGroup(**row) for row in aggregator.snapshot(limit=limit)]  # type: ignore[typeddict-item]
        _log("errors", by, listed=len(groups))
        return ErrorsView(
            groups=groups,
            recorded=status["recorded"],
            evicted=status["evicted"],
            max_groups=status["max_groups"],
        )

    async def load_status(self, *, by: str | None = None) -> LoadStatus:
        """The rate limits in force and whether new messages are queued (see ``load_shed``)."""
        return self._load_status()

    async def load_shed(
        self,
        *,
        user_per_minute: int | None = None,
        guild_per_minute: int | None = None,
        queue_new_messages: bool | None = None,
        by: str | None = None,
    ) -> LoadStatus:
        """Shed load until ``load_restore`` (or a restart): tighten the per-user and per-guild rate
        limits, and/or queue new messages (acknowledged at once, answered by the drain at
        ``QUEUE_DRAIN_PER_SECOND``) instead of answering them live. Unset arguments stay as they are."""
        limiter = self.app.ratelimiter
        current = limiter.status()
        per_user = _per_minute("user_per_minute", user_per_minute, current["per_user"], 10_000)
        per_guild = _per_minute("guild_per_minute", guild_per_minute, current["per_guild"], 100_000)
        if queue_new_messages is not None and not isinstance(queue_new_messages, bool):
            raise InvalidRequestError("queue_new_messages must be true or false")
        limiter.set_limits(per_user, per_guild)
        if queue_new_messages is not None:
            self.app.queue_new_messages = queue_new_messages
        self._load_changed_at = self.app.clock.time()
        result = self._load_status()
        await self._tell_load()
        _log("load_shed", by, user_per_minute=result["user_per_minute"],
             guild_per_minute=result["guild_per_minute"], queue_new_messages=result["queue_new_messages"])
        return result

    async def load_restore(self, *, by: str | None = None) -> LoadStatus:
        """Back to the configured rate limits, answering new messages live."""
        cfg = self.app.config
        self.app.ratelimiter.set_limits(cfg.user_rate_limit_per_minute, cfg.guild_rate_limit_per_minute)
        self.app.queue_new_messages = False
        self._load_changed_at = self.app.clock.time()
        result = self._load_status()
        await self._tell_load()
        _log("load_restore", by, user_per_minute=result["user_per_minute"],
             guild_per_minute=result["guild_per_minute"])
        return result

    def _load_status(self) -> LoadStatus:
        cfg = self.app.config
        status = self.app.ratelimiter.status()
        queue_new = self.app.queue_new_messages
        return LoadStatus(
            user_per_minute=status["per_user"],
            guild_per_minute=status["per_guild"],
            queue_new_messages=queue_new,
            configured_user_per_minute=cfg.user_rate_limit_per_minute,
            configured_guild_per_minute=cfg.guild_rate_limit_per_minute,
            shedding=queue_new
            or status["per_user"] != cfg.user_rate_limit_per_minute
            or status["per_guild"] != cfg.guild_rate_limit_per_minute,
            changed_at=self._load_changed_at,
        )

    async def load_test(
        self,
        requests: int = 20,
        concurrency: int = 4,
        *,
        confirm: bool = False,
        by: str | None = None,
    ) -> LoadTest:
        """A bounded synthetic load: ``requests`` Gemini test prompts (``test_gemini``'s, through the
        same retry, breaker and timeout as messages), ``concurrency`` at a time, for at most
        ``LOAD_TEST_MAX_SECONDS``. On a live bot (``talks_to_real_services``: it costs Gemini quota
        and, if Gemini fails, can open the breaker for users) it runs only with ``confirm``."""
        for name, value, most in (
            ("requests", requests, LOAD_TEST_MAX_REQUESTS),
            ("concurrency", concurrency, LOAD_TEST_MAX_CONCURRENCY),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
                raise InvalidRequestError(f"{name} must be an integer from 1 to {most}")
        app = self.app
        live = talks_to_real_services(app.config)
        if live and confirm is not True:
            raise ConfirmationRequiredError(
                "this is a live bot (Gemini or Discord beyond this machine): a load test costs Gemini"
                " quota and can open the Gemini breaker for users; confirm to run it anyway"
            )
        clock = app.clock
        latencies: list[float] = []
        failures: dict[str, int] = {}
        ok = 0
        slots = asyncio.Semaphore(concurrency)

        async def one() -> None:
            nonlocal ok
            async with slots:
                started = clock.monotonic()
                try:
                    reply = await app.gemini.ping()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    category = classify(exc).category.value
                    failures[category] = failures.get(category, 0) + 1
                else:
                    if reply.ok:
                        ok += 1
                    else:
                        failures[reply.kind.value] = failures.get(reply.kind.value, 0) + 1
                latencies.append(clock.monotonic() - started)

        started = clock.monotonic()
        tasks = [asyncio.ensure_future(one()) for _ in range(requests)]
        _, pending = await asyncio.wait(tasks, timeout=LOAD_TEST_MAX_SECONDS)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        duration = clock.monotonic() - started
        errors = sum(failures.values())
        result = LoadTest(
            requests=requests,
            concurrency=concurrency,
            ok=ok,
            errors=errors,
            errors_by_category=failures,
            unfinished=len(pending),
            duration=round(duration, 3),
            per_second=round((ok + errors) / duration, 2) if duration > 0 else 0.0,
            latency=_latency(latencies),
            live=live,
        )
        _log("load_test", by, requests=requests, concurrency=concurrency, ok=ok, errors=errors,
             unfinished=len(pending), p95=result["latency"]["p95"], live=live)
        return result

    # -- the process ---------------------------------------------------------------------------------

    async def gc(self, *, by: str | None = None) -> GcResult:
        """Run a full garbage collection; report what it found and resident memory before and after."""
        before = rss_bytes()
        collected = gc.collect()
        after = rss_bytes()
        _log("gc", by, collected=collected, rss_before=before, rss_after=after)
        return GcResult(collected=collected, garbage=len(gc.garbage), rss_before=before, rss_after=after)

    async def discord_reconnect(self, *, by: str | None = None) -> DiscordReconnect:
        """Close the gateway websocket with a resumable code: discord.py reconnects and RESUMEs."""
        client = self.app.client
        ws = getattr(client, "ws", None) if client is not None else None
        if client is None or client.is_closed() or ws is None:
            raise OperationUnavailableError("the Discord client is not connected to the gateway")
        if ws.socket.closed:
            raise OperationUnavailableError("the gateway connection is already closed and reconnecting")
        try:
            # close() waits for the server's close frame; a peer that never sends one must not hang us.
            # A cancelled close still drops the socket, and discord.py reconnects just the same.
            async with asyncio.timeout(RECONNECT_CLOSE_TIMEOUT):
                await ws.close(code=RECONNECT_CLOSE_CODE)
        except TimeoutError:
            log.warning("admin.discord_reconnect_close_slow", timeout=RECONNECT_CLOSE_TIMEOUT)
        _log("discord_reconnect", by, code=RECONNECT_CLOSE_CODE)
        return DiscordReconnect(closed=True, code=RECONNECT_CLOSE_CODE)

    async def healing(self, *, by: str | None = None) -> dict[str, Any]:
        """The healer's settings, each kind's use of its hourly budget, and its actions, newest first
        (``bot.healing.Healer.report``)."""
        _log("healing", by)
        return self.app.healer.report()

    async def test_gemini(self, *, by: str | None = None) -> GeminiTest:
        """A tiny prompt through Gemini's breaker, retry and timeout; failures are classified, not raised."""
        app = self.app
        started = app.clock.monotonic()
        try:
            reply = await app.gemini.ping()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            verdict = classify(exc)
            result = GeminiTest(
                ok=False,
                latency_ms=_ms(app.clock.monotonic() - started),
                reply_kind=None,
                model=None,
                category=verdict.category.value,
                retryable=verdict.retryable,
                retry_after=verdict.retry_after,
                message=verdict.user_message,
                breaker=str(app.board["gemini"].state),
            )
        else:
            result = GeminiTest(
                ok=reply.ok,
                latency_ms=_ms(app.clock.monotonic() - started),
                reply_kind=reply.kind.value,
                model=reply.model,
                category=None,
                retryable=None,
                retry_after=None,
                message="Gemini answered." if reply.ok else reply.user_message,
                breaker=str(app.board["gemini"].state),
            )
        _log(
            "test_gemini",
            by,
            ok=result["ok"],
            latency_ms=result["latency_ms"],
            reply_kind=result["reply_kind"],
            category=result["category"],
        )
        return result

    # -- incidents ------------------------------------------------------------------------------------

    async def incidents(self, *, by: str | None = None) -> dict[str, Any]:
        """Incidents per dependency (count, open, MTTR, MTBF, queued, answered after, dead-lettered)
        and the latest ones (``bot.incidents.IncidentTracker.report``)."""
        if self._incidents is None:
            raise OperationUnavailableError("incident records are not kept in this process")
        report = await self._incidents()
        _log("incidents", by, open=len(report.get("open", [])), stored=report.get("stored"))
        return report

    # -- the other processes ---------------------------------------------------------------------------

    async def processes(self, *, by: str | None = None) -> list[ProcessRow]:
        """Every bot process on the database (this one only, on SQLite), oldest first."""
        rows = await process_rows(self.app)
        _log("processes", by, processes=len(rows), alive=sum(r["alive"] for r in rows))
        return rows

    async def _tell_others(self, kind: str, payload: dict[str, Any]) -> None:
        """Send ``kind`` to the other processes; the action here is done already, so a failure to
        tell them is logged, not raised (they act on their own next start, or on the next action)."""
        try:
            await self.app.coordination.notify(kind, payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("admin.tell_others_failed", kind=kind, category=classify(exc).category.value)

    async def _tell_load(self) -> None:
        status = self.app.ratelimiter.status()
        await self._tell_others(
            LOAD,
            {
                "user_per_minute": status["per_user"],
                "guild_per_minute": status["per_guild"],
                "queue_new_messages": self.app.queue_new_messages,
            },
        )

    # -- helpers --------------------------------------------------------------------------------------

    def _breaker_name(self, name: str, *, allow_all: bool) -> str:
        board = self.app.board
        if isinstance(name, str) and name in board:
            return name
        valid = board.names() + ([ALL] if allow_all else [])
        raise UnknownNameError("breaker", str(name), valid)

    def _file_name(self, name: str) -> str:
        names = self.app.store.names()
        if not isinstance(name, str) or name not in names:
            raise UnknownNameError("datastore file", str(name), names)
        return name

    def _cached(self, name: str) -> dict[str, Any]:
        # The committed state without I/O: status views must work while the storage breaker is open.
        return self.app.store.cached(name) or {}


def serve_operations(
    app: Application, *, incidents: Callable[[], Awaitable[dict[str, Any]]] | None = None
) -> Operations:
    """The operations of ``app``, attached to its HTTP admin API (with their refusals' statuses)."""
    operations = Operations(app, incidents=incidents)
    app.http_api.attach_operations(
        operations,
        {
            UnknownNameError: 404,
            InvalidRequestError: 400,
            OperationUnavailableError: 503,
            ConfirmationRequiredError: 409,
        },
    )
    return operations


async def apply_breaker_overrides(app: Application) -> list[str]:
    """Re-open the breakers an operator opened before a restart; return their names.

    Call after the registry started (the DataStore is loaded). Openings whose end has passed
    are removed from the file; an entry naming a breaker that no longer exists is logged and kept.
    """
    overrides = (await app.datastore.get("breakers")).get("overrides", {})
    now = app.clock.time()
    opened: list[str] = []
    expired: list[str] = []
    for name, entry in overrides.items():
        if entry.get("state") != "open":
            continue  # breakers start closed: nothing to do
        until = entry.get("until")
        if until is not None and until <= now:
            expired.append(name)
            continue
        if name not in app.board:
            log.warning("admin.override_unknown_breaker", breaker=name, valid=app.board.names())
            continue
        app.board[name].force_open(HOLD_SECONDS if until is None else until - now, entry.get("reason", ""))
        opened.append(name)
    if expired:

        def drop(data: dict[str, Any]) -> None:
            for name in expired:
                data["overrides"].pop(name, None)

        await app.datastore.update("breakers", drop)
    if opened or expired:
        log.info("admin.breaker_overrides_applied", opened=opened, expired=expired)
    return opened


def follow_breaker_overrides(app: Application) -> list[str]:
    """Open the breakers the shared ``breakers`` state holds open (another process's operator opened
    them) that are not open here; return their names. Writes nothing."""
    now = app.clock.time()
    opened = []
    overrides = (app.store.cached("breakers") or {}).get("overrides", {})
    for name, entry in _active_overrides(overrides, now).items():
        if name not in app.board:
            continue
        snap = app.board[name].snapshot()
        if snap.state.value == "open" and snap.forced_reason == (entry.get("reason") or "forced open"):
            continue  # held open here already (this process opened it, or heard of it before)
        until = entry.get("until")
        app.board[name].force_open(HOLD_SECONDS if until is None else until - now, entry.get("reason", ""))
        opened.append(name)
    return opened


def follow_other_processes(app: Application) -> None:
    """Act on what other processes' operators do: their changes to the shared state (maintenance, a
    guild's settings, owners, opened breakers) and their notifications (a breaker reset, a drain
    wake-up, load shedding). Nothing happens on SQLite, where no other process exists."""

    async def state_changed(name: str) -> None:
        if name == "breakers":
            opened = follow_breaker_overrides(app)
            log.info("admin.followed", state=name, opened=opened)
            return
        app.reload_settings()
        app.drain_wake()  # maintenance may have ended (bot-wide or a guild's): its queue may go now
        log.info("admin.followed", state=name, mode=str(app.degradation.mode))

    async def circuit_reset(payload: dict[str, Any]) -> None:
        names = [n for n in payload.get("names") or [] if isinstance(n, str) and n in app.board]
        for name in names:
            app.board[name].reset()
        app.drain_wake()
        log.info("admin.followed", action=CIRCUIT_RESET, reset=names, origin=payload.get("origin"))

    async def queue_drain(payload: dict[str, Any]) -> None:
        app.drain_wake()
        log.info("admin.followed", action=QUEUE_DRAIN, origin=payload.get("origin"))

    async def load(payload: dict[str, Any]) -> None:
        limiter = app.ratelimiter
        current = limiter.status()
        per_user, per_guild = payload.get("user_per_minute"), payload.get("guild_per_minute")
        limiter.set_limits(
            per_user if isinstance(per_user, int) else current["per_user"],
            per_guild if isinstance(per_guild, int) else current["per_guild"],
        )
        if isinstance(payload.get("queue_new_messages"), bool):
            app.queue_new_messages = payload["queue_new_messages"]
        log.info("admin.followed", action=LOAD, origin=payload.get("origin"))

    app.datastore.add_listener(state_changed)
    app.coordination.subscribe(CIRCUIT_RESET, circuit_reset)
    app.coordination.subscribe(QUEUE_DRAIN, queue_drain)
    app.coordination.subscribe(LOAD, load)


def process_state(app: Application, *, drain_running: bool) -> dict[str, Any]:
    """What this process's heartbeat records for the others' ``/status``."""
    snap = app.degradation.snapshot()
    return {
        "mode": snap.mode.value,
        "reason": snap.reason,
        "breakers": {b.name: b.state.value for b in app.board.snapshot()},
        "discord": app.discord_connected(),
        "drain": drain_running,
        "queue_new_messages": app.queue_new_messages,
        "shards": app.discord_shards(),
    }


async def process_rows(app: Application) -> list[ProcessRow]:
    """Every process on the database from its heartbeat (this one only, on SQLite), oldest first."""
    now = app.clock.time()
    return [_process_row(p, now) for p in await app.coordination.processes()]


def _process_row(process: ProcessRecord, now: float) -> ProcessRow:
    return ProcessRow(
        id=process.id,
        name=process.name,
        alive=process.alive,
        this=process.this,
        started_at=process.started_at,
        beat_age=round(max(0.0, now - process.beat_at), 3),
        stopped_at=process.stopped_at,
        state=process.state,
    )


def describe_processes(rows: list[ProcessRow], heartbeat: float) -> str:
    """One line per process for ``/status``: its name, what its last heartbeat said, how old that is."""
    lines = []
    for row in rows:
        name = row["name"] + (" (this one)" if row["this"] else "")
        if not row["alive"]:
            lines.append(f"{name}: gone" + (" (stopped)" if row["stopped_at"] is not None else " (died)"))
            continue
        state = row["state"]
        parts = [str(state.get("mode", "starting"))]
        shards = state.get("shards")
        if shards:
            parts.insert(0, _describe_shards(shards))
        not_closed = [f"{n} {s}" for n, s in (state.get("breakers") or {}).items() if s != "closed"]
        if not_closed:
            parts.append(", ".join(not_closed))
        if state.get("discord") is False:
            parts.append("Discord not connected")
        age = row["beat_age"]
        silent = " (silent)" if age > SILENT_AFTER_BEATS * heartbeat else ""
        lines.append(f"{name}: {'; '.join(parts)}; heartbeat {age:.0f} s ago{silent}")
    return "\n".join(lines)


def _describe_shards(shards: dict[str, Any]) -> str:
    """``shards 1 of 3`` (``shards 0, 2 of 4``), with those whose gateway session is not open."""
    held = [int(i) for i in shards.get("ids") or []]
    plural = "s" if len(held) != 1 else ""
    text = f"shard{plural} {', '.join(map(str, held)) or '?'} of {shards.get('count') or '?'}"
    down = sorted(set(held) - {int(i) for i in shards.get("open") or []})
    if down:
        text += f" ({', '.join(map(str, down))} not connected)"
    return text


def _active_overrides(overrides: dict[str, dict[str, Any]], now: float) -> dict[str, dict[str, Any]]:
    return {
        name: entry
        for name, entry in overrides.items()
        if entry.get("state") == "open" and (entry.get("until") is None or entry["until"] > now)
    }


def _notice(message: Any) -> str | None:
    """A maintenance notice as given (stripped; None for the default), or ``InvalidRequestError``."""
    if message is not None and not isinstance(message, str):
        raise InvalidRequestError("the maintenance message must be text")
    notice = (message or "").strip() or None
    if notice is not None and len(notice) > MAX_NOTICE_CHARS:
        raise InvalidRequestError(
            f"the maintenance message has {len(notice)} characters; the limit is {MAX_NOTICE_CHARS}"
        )
    return notice


def _guild_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequestError("a guild id must be a positive integer")
    return value


def _setting_for(name: str, scope: int | None) -> Setting:
    """The setting ``name``, if it may be set there (the server when ``scope`` is None)."""
    try:
        spec = setting(str(name))
    except InvalidSettingError as exc:
        raise InvalidRequestError(str(exc)) from exc
    if scope is not None:
        _channel_id(scope)
        if spec.server_only:
            raise InvalidRequestError(f"{spec.name} is set for the whole server, not for one channel")
    elif spec.channel_only:
        raise InvalidRequestError(
            f"{spec.name} is set per channel, forum, category or thread: name the place it applies to"
        )
    return spec


def _user_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequestError("a user id must be a positive integer")
    return value


def _channel_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidRequestError("a channel id must be a positive integer")
    return value


def _log(op: str, by: str | None, **fields: Any) -> None:
    if by is not None:
        fields["actor"] = by
    log.info(f"admin.{op}", **fields)


def _item_row(item: QueueItem, now: float) -> QueueItemRow:
    content = str(item.payload.get("content", ""))
    preview = content if len(content) <= PREVIEW_CHARS else content[: PREVIEW_CHARS - 1] + "…"
    return QueueItemRow(
        id=item.id,
        kind=item.kind.value,
        state=item.state.value,
        conversation_key=item.conversation_key,
        attempts=item.attempts,
        age=round(max(0.0, now - item.created_at), 3),
        next_attempt_in=round(max(0.0, item.next_attempt_at - now), 3),
        last_error=item.last_error,
        preview=preview,
    )


def _figures(totals: UsageTotals) -> UsageFigures:
    return UsageFigures(
        calls=totals.calls,
        prompt=totals.prompt,
        output=totals.output,
        thought=totals.thought,
        cached=totals.cached,
        counted=totals.counted,
    )


def _lock_row(status: LockStatus) -> LockRow:
    return LockRow(
        key=status.key, holder=status.holder, held_for=round(status.held_for, 3), waiters=status.waiters
    )


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def talks_to_real_services(config: Config) -> bool:
    """Whether Gemini or Discord is reached beyond this machine (the real services, or a proxy to
    them): not a sandbox whose emulators both listen on loopback."""
    return not (_on_loopback(config.gemini_base_url) and _on_loopback(config.discord_api_base))


def _on_loopback(url: str | None) -> bool:
    host = urlsplit(url).hostname if url else None  # no URL: the real service's endpoint
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _trace_row(record: TraceRecord) -> TraceSummary:
    return TraceSummary(
        trace_id=record.trace_id,
        name=record.name,
        started_at=record.started_at,
        duration=round(record.duration, 6),
        error=record.error,
        slow_spans=list(record.slow_spans),
        spans=len(record.spans),
        fields={k: v for k, v in record.fields.items() if k in ("guild", "channel", "user", "command")},
    )


def _latency(durations: list[float]) -> Latency:
    """Nearest-rank percentiles of ``durations`` (seconds)."""
    ordered = sorted(durations)
    if not ordered:
        return Latency(count=0, p50=None, p95=None, p99=None, max=None)

    def rank(q: float) -> float:
        return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)], 6)

    return Latency(
        count=len(ordered), p50=rank(0.5), p95=rank(0.95), p99=rank(0.99), max=round(ordered[-1], 6)
    )


def _per_minute(name: str, value: Any, current: int, most: int) -> int:
    if value is None:
        return current
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise InvalidRequestError(f"{name} must be an integer from 1 to {most}")
    return value


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
