"""A loopback Discord (REST API v10 + gateway) that a real, unpatched discord.py client logs in to.

Point discord.py at it before ``login``/``start``::

    async with DiscordEmulator() as emu:
        discord.http.Route.BASE = emu.api_base            # REST, webhooks and interaction callbacks
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(emu.gateway_url)
        await bot.start(emu.token)

``Route.BASE`` covers every REST call, including interaction callbacks and follow-ups
(``discord/webhook/async_.py`` builds them from ``Route`` too). Restore both attributes afterwards.

The world (a guild with ``general``/``random`` channels and a thread, more guilds on request,
DMs, an admin and a normal member, roles, the application's owner or team) lives in
:class:`sandbox.discord_state.World`. Faults come from a shared
:class:`sandbox.faults.FaultPlan`; each REST route has a name used as the fault ``target``:

==========  ==================================================================
route name  requests
==========  ==================================================================
me          ``GET /users/@me``
user        ``GET /users/{id}`` (any user of the world; 404 10013 Unknown User otherwise)
application ``GET /oauth2/applications/@me``
send        ``POST /channels/{id}/messages`` (``nonce`` + ``enforce_nonce`` dedup like Discord;
            a resend whose first copy was deleted gets 404 Unknown Message, 10008)
edit        ``PATCH /channels/{id}/messages/{mid}``
delete      ``DELETE /channels/{id}/messages/{mid}``
history     ``GET /channels/{id}/messages``
message     ``GET /channels/{id}/messages/{mid}``
react       ``PUT``/``DELETE .../reactions/{emoji}/@me``
thread      ``POST /channels/{id}/messages/{mid}/threads`` (Start Thread from Message: the thread's
            id is the message's; 403 50013 without Create Public Threads, 400 160004 for a
            message that already has one; THREAD_CREATE follows)
typing      ``POST /channels/{id}/typing``
dm          ``POST /users/@me/channels``
channel     ``GET /channels/{id}``
commands    application command sync (global and guild)
interaction ``POST /interactions/{id}/{token}/callback`` and every ``/webhooks/{app}/{token}`` call
followup    ``/webhooks/{app}/{token}...`` only (follow-ups, ``@original`` get/edit/delete)
webhook     ``POST /webhooks/{id}/{token}`` of an incoming webhook (``add_webhook(channel_id)``):
            a message in its channel authored by the webhook, without the bot's token
gateway     gateway faults (``close``, ``disconnect``, ``reconnect``, ``invalid_session``, ``silent``,
            ``unavailable``)
==========  ==================================================================

REST fault kinds: ``"500"``/``"502"``/``"503"``/``"504"`` (or ``"error"`` with ``status=``, and
optionally ``code=``/``message=`` for a Discord JSON error body, e.g. ``status=403, code=50013``),
``"429"`` (params ``retry_after=0.05``, ``global=False`` (or ``global_``), ``via=True``), ``"latency"``
(``seconds=1.0``, then served normally; with ``after=True`` served at once and only the response
held back, like a Discord that posted the message but answers late) and ``"drop"`` (the TCP
connection is closed unanswered; with ``after=True`` only once the request was served, like a
Discord that posted the message but whose answer never arrived).
Gateway fault kinds, checked when a session goes live and before each dispatch: ``"close"``
(``code=4000``), ``"disconnect"`` (TCP cut without a close frame), ``"reconnect"`` (op 7),
``"invalid_session"`` (op 9, ``resumable=False``) and
``"silent"`` (no more heartbeat ACKs or dispatches on that connection, so the client times out
and RESUMEs); ``"unavailable"`` is checked when a client opens a gateway connection instead: the
upgrade is refused with a 503 (an outage), so the client stays away while the fault lasts.

Message components, like Discord's (discord-api-docs ``docs/components/reference.mdx``,
``docs/interactions/receiving-and-responding.mdx``): a message created or edited with
``components`` keeps them (action rows of at most five buttons, at most five rows, each button
with a ``custom_id`` of at most 100 characters unique in its message, or a link; anything else is
400 50035); ``click_button`` dispatches the INTERACTION_CREATE of type 3 (MESSAGE_COMPONENT) that
a member's click sends, carrying the message, and only for a button the message has now. Its
callback may be 6 (DEFERRED_UPDATE_MESSAGE: nothing changes yet), 7 (UPDATE_MESSAGE: the message
is edited with the callback's data), 4 or 5; after 6 or 7, ``@original`` is the message itself.

Sessions, like Discord's: events are buffered per session, so a RESUME replays what the client
missed, but only for ``session_lifetime`` seconds (default 180) after its connection dropped.
Discord keeps a dropped session "active" and lets it "timeout after a few minutes", and a RESUME
that comes too late gets op 9 Invalid Session with ``d: false``: nothing is replayed and the client
must IDENTIFY afresh (discord-api-docs ``docs/topics/Gateway.md``, "Initiating a Disconnect" and
"Resuming"; Discord publishes no exact figure). What happened meanwhile is lost to that session.
A client that closes with 1000 or 1001 ends its session at once (same page).

The gateway records presence updates (op 3) in ``presences`` (the last one: ``presence``).

Sharding, like Discord's (discord-api-docs ``docs/topics/Gateway.md``, "Sharding"): a client may
IDENTIFY with ``shard: [shard_id, num_shards]``, one gateway session per shard. A guild's events go
to the session of shard ``(guild_id >> 22) % num_shards`` ("Sharding Formula"), and "DMs will only
be sent to shard 0"; READY lists, and GUILD_CREATE is sent for, the shard's guilds only, and READY
carries the ``shard`` pair back. A shard id not below the count is closed with 4010 (Invalid shard).
An unsharded session (no ``shard``) is shard 0 of 1: it receives everything. ``GET /gateway/bot``
recommends ``shards`` (``recommended_shards``, else one per 1,000 guilds as Discord sizes it;
Discord requires sharding from 2,500 guilds). ``World.add_guild(..., shard=(id, count))`` makes a
guild whose id falls on that shard; ``shard_sessions`` tells which shards are connected.

Rate limits (``rate_limits``, a :class:`sandbox.discord_state.RateLimits` on the emulator's
``clock``): every request Discord serves counts against its route's bucket for its channel (or
guild, webhook), and every answer carries ``X-RateLimit-Limit``/``-Remaining``/``-Reset``/
``-Reset-After``/``-Bucket`` like Discord's. By default each route allows 50 requests a second per
channel; ``rate_limits.set("send", 2, 40.0, channel_id=id)`` throttles one channel's
sends to two per 40 s (429 with ``retry_after`` the rest of the window), ``set_global(50)`` adds
the global limit. A fault answers before the bucket is counted (Discord's edge failing first).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import mimetypes
import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from aiohttp import WSMsgType, web

from sandbox.discord_state import (
    CHANNEL_FORUM,
    CHANNEL_TEXT,
    CREATE_PUBLIC_THREADS,
    INTENT_MESSAGE_CONTENT,
    IS_VOICE_MESSAGE,
    READ_MESSAGE_HISTORY,
    THREAD_NAME_MAX,
    VIEW_CHANNEL,
    RateLimits,
    RateVerdict,
    UserRecord,
    World,
    now_iso,
)
from sandbox.faults import Fault, FaultPlan

REST_FAULT_KINDS = frozenset({"500", "502", "503", "504", "error", "429", "latency", "drop"})
# Faults that disturb a live gateway connection (checked before each dispatch) ...
GATEWAY_DISTURBANCES = frozenset({"close", "disconnect", "reconnect", "invalid_session", "silent"})
# ... and every gateway fault, "unavailable" (refuses new connections) included.
GATEWAY_FAULT_KINDS = GATEWAY_DISTURBANCES | {"unavailable"}
EPHEMERAL = 1 << 6
_HTTP_STATUSES = frozenset(s.value for s in HTTPStatus)
WAIT_POLL_SECONDS = 0.05
NONCE_WINDOW_SECONDS = 300.0  # Discord checks enforce_nonce "in the past few minutes"
# How long a dropped gateway session can be resumed: Discord says "a few minutes" (see the module
# docstring) without a figure; three minutes is that, and short enough to be met in a rehearsal.
SESSION_LIFETIME_SECONDS = 180.0
# Close codes with which a client ends its session for good (Gateway.md, "Initiating a Disconnect").
SESSION_ENDING_CLOSE_CODES = frozenset({1000, 1001})
# "Interaction tokens are valid for 15 minutes" (discord-api-docs, Receiving and Responding);
# after that every webhook call with the token gets 401 {"message": "Invalid Webhook Token",
# "code": 50027} (discord/discord-api-docs#6851, germanoeich/nirn-proxy#23).
INTERACTION_TOKEN_LIFETIME_SECONDS = 15 * 60.0

OP_DISPATCH, OP_HEARTBEAT, OP_IDENTIFY, OP_PRESENCE_UPDATE, OP_RESUME = 0, 1, 2, 3, 6
OP_RECONNECT, OP_REQUEST_MEMBERS, OP_INVALID_SESSION, OP_HELLO, OP_HEARTBEAT_ACK = 7, 8, 9, 10, 11

_ERROR_BODIES: dict[int, tuple[str, str]] = {
    500: ("application/json", json.dumps({"message": "500: Internal Server Error", "code": 0})),
    502: ("text/html", "<html><head><title>502 Bad Gateway</title></head><body>"
          "<center><h1>502 Bad Gateway</h1></center><hr><center>cloudflare</center></body></html>"),
    503: ("text/plain", "upstream connect error or disconnect/reset before headers. "
          "reset reason: connection termination"),
    504: ("text/html", "<html><head><title>504 Gateway Time-out</title></head><body>"
          "<center><h1>504 Gateway Time-out</h1></center><hr><center>cloudflare</center></body></html>"),
}

Handler = Callable[[web.Request, Any], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """A Discord API error response (status, JSON code and message) raised inside a handler."""

    def __init__(self, status: int, message: str, code: int = 0, errors: dict[str, Any] | None = None):
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.code = code
        self.errors = errors


@dataclass
class RecordedRequest:
    """One REST request as the emulator saw it; ``status`` is None when the connection was dropped."""

    method: str
    route: str
    path: str
    json: Any
    time: float
    query: dict[str, str] = field(default_factory=dict)
    status: int | None = None
    fault: str | None = None
    rate_limited: str | None = None  # "user" or "global" when a bucket (not a fault) answered 429


@dataclass
class SentMessage:
    """A message the bot created (REST or interaction follow-up), with what it asked for."""

    id: int
    channel_id: int
    content: str
    embeds: list[dict[str, Any]]
    allowed_mentions: dict[str, Any] | None
    message_reference: dict[str, Any] | None
    flags: int
    payload: dict[str, Any]
    edits: list[dict[str, Any]] = field(default_factory=list)
    deleted: bool = False
    attachments: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)  # uploaded files by name, as sent
    at: float = field(default_factory=time.monotonic)  # when the emulator recorded it

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & EPHEMERAL)

    @property
    def components(self) -> list[dict[str, Any]]:
        """The message's components as Discord keeps them now (after the last edit)."""
        return list(self.payload.get("components") or [])

    @property
    def custom_ids(self) -> list[str]:
        """The ``custom_id`` of every button the message shows now, in order."""
        return [str(c["custom_id"]) for row in self.components for c in row.get("components", [])
                if "custom_id" in c]

    @property
    def pings(self) -> set[str]:
        """Who Discord would notify: ``"everyone"``, ``"user:<id>"``, ``"role:<id>"``.

        Applies Discord's ``allowed_mentions`` rules to the content: without the field every
        mention in the text pings and a reply pings its author; with it, only what it allows.
        """
        return _pings(self.content, self.allowed_mentions, self.payload.get("referenced_message"))


@dataclass
class IncomingWebhook:
    """A channel's incoming webhook (channel settings > Integrations > Webhooks): anyone holding its
    URL posts to the channel with ``POST /webhooks/{id}/{token}``, without the bot's token."""

    id: int
    token: str
    channel_id: int
    name: str
    messages: list[SentMessage] = field(default_factory=list)


@dataclass
class InteractionRecord:
    """Everything that happened to one interaction, in order (``events``: (kind, json) pairs)."""

    id: int
    token: str
    name: str
    options: dict[str, Any]
    user_id: int
    channel_id: int
    payload: dict[str, Any]
    created: float = field(default_factory=time.monotonic)
    events: list[tuple[str, Any]] = field(default_factory=list)
    callback_type: int | None = None
    callback_data: dict[str, Any] | None = None
    original: dict[str, Any] | None = None
    followups: list[SentMessage] = field(default_factory=list)
    message_id: int | None = None  # the message whose button was clicked (a component interaction)

    @property
    def acknowledged(self) -> bool:
        return self.callback_type is not None

    @property
    def deferred(self) -> bool:
        return self.callback_type == 5

    @property
    def ephemeral(self) -> bool:
        """True when the first response (callback or deferral) was ephemeral."""
        return bool((self.callback_data or {}).get("flags", 0) & EPHEMERAL)

    @property
    def choices(self) -> list[dict[str, Any]] | None:
        """The autocomplete choices the bot answered with (callback type 8), else None."""
        if self.callback_type != AUTOCOMPLETE_RESULT:
            return None
        return list((self.callback_data or {}).get("choices") or [])

    @property
    def modal(self) -> dict[str, Any] | None:
        """The modal the bot answered with (callback type 9): custom id, title, components."""
        return self.callback_data if self.callback_type == MODAL else None

    def texts(self) -> list[str]:
        """Every text the user saw: the callback message, the original's edits, the follow-ups."""
        shown = {"callback_message", "edit_original"}
        out = [d.get("content") or "" for kind, d in self.events if kind in shown]
        return out + [f.content for f in self.followups]


def shard_of(guild_id: int | None, shard_count: int) -> int:
    """The shard that receives a guild's events; DMs (no guild) go to shard 0 (Gateway.md, "Sharding")."""
    return 0 if guild_id is None else (guild_id >> 22) % shard_count


class _Session:
    """A gateway session: survives a disconnect for a while, so a RESUME can replay what was missed."""

    def __init__(
        self, session_id: str, intents: int, buffer_size: int, shard: tuple[int, int] = (0, 1)
    ) -> None:
        self.id = session_id
        self.intents = intents
        self.shard = shard  # (shard_id, num_shards); (0, 1) for an unsharded session
        self.seq = 0
        self.buffer: deque[dict[str, Any]] = deque(maxlen=buffer_size)
        self.conn: _Connection | None = None
        self.detached_at: float | None = None  # monotonic time its connection dropped

    def can_replay_after(self, seq: int) -> bool:
        return not self.buffer or self.buffer[0]["s"] <= seq + 1

    def expired(self, now: float, lifetime: float) -> bool:
        """Dropped longer ago than ``lifetime``: Discord no longer knows it."""
        return self.conn is None and self.detached_at is not None and now - self.detached_at >= lifetime

    def receives(self, guild_id: int | None) -> bool:
        """Whether an event of ``guild_id`` (None: a DM or no guild) belongs to this session's shard."""
        shard_id, count = self.shard
        return shard_of(guild_id, count) == shard_id


class _Connection:
    """One gateway websocket; sends are serialized so sequence numbers go out in order."""

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.BaseTransport | None) -> None:
        self.ws = ws
        self.transport = transport
        self.session: _Session | None = None
        self.silent = False
        self.lock = asyncio.Lock()
        self.heartbeats = 0
        self.closed_by_server = False

    async def send(self, *payloads: dict[str, Any]) -> None:
        """Send frames back to back: nothing else interleaves (a replay stays contiguous)."""
        async with self.lock:
            for payload in payloads:
                if self.ws.closed:
                    return
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.send_str(json.dumps(payload))

    async def close(self, code: int) -> None:
        self.closed_by_server = True
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.close(code=code, message=b"emulator close")

    def cut(self) -> None:
        """Drop the TCP connection without a close frame, like a network failure."""
        self.silent = True
        self.closed_by_server = True
        if self.transport is not None:
            self.transport.close()


class DiscordEmulator:
    """A loopback Discord API and gateway with fault injection and full recording.

    Public API (also used by the terminal console):

    - lifecycle: ``await start()``, ``await stop()``, ``async with``; ``api_base``, ``gateway_url``,
      ``token``, ``application_id``, ``faults``, ``heartbeat_interval`` (seconds).
    - world: ``guild_id``, ``channels[name]``, ``thread_id``, ``users[key]`` (ids),
      ``bot_user_id``, ``dm_channel(user)``, ``world`` (the :class:`World`: also a user who
      accepts no DMs, ``world.close_dms(user)``, and channel permission overwrites,
      ``world.set_overwrite(channel, role_or_user, allow=, deny=)``, which the REST API enforces:
      no Read Message History there means 403 50001 on reading messages).
    - users act: ``send_user_message(...)``, ``send_interaction(...)`` (nested options for
      subcommands), ``click_button(channel_id, message_id, custom_id)`` (a button on a message:
      a MESSAGE_COMPONENT interaction), ``redeliver_message(channel_id, message_id)`` (a repeated
      MESSAGE_CREATE),
      ``delete_message(channel_id, message_id)`` (an author or a moderator deletes a message).
      An interaction must be acknowledged within ``interaction_deadline`` (3 s) and its token
      works for ``interaction_token_lifetime`` (15 min), then 401 50027 Invalid Webhook Token.
    - gateway control: ``close_gateway(code)``, ``cut_gateway()``, ``send_reconnect()``,
      ``invalidate_session()``, ``set_silent(bool)``, ``connected``, ``identify_count``,
      ``resume_count``, ``session_lifetime``, ``live_sessions``, ``expired_sessions``;
      sharding: ``shard_sessions`` (shard id -> live connections), ``recommended_shards`` (what
      ``GET /gateway/bot`` answers; default one per 1,000 guilds), ``world.add_guild(shard=...)``.
    - recording: ``requests``, ``sent_messages(channel_id)``, ``history(channel_id)``,
      ``interaction_log(id)``, ``commands``, ``typing``, ``reactions(message_id)``.
    - waiting: ``wait_for_bot_message(channel_id, count, timeout)``, ``wait_until(pred, timeout)``,
      ``wait_connected(timeout)``.
    """

    def __init__(
        self,
        token: str = "sandbox-token",
        host: str = "127.0.0.1",
        port: int = 0,
        faults: FaultPlan | None = None,
        *,
        heartbeat_interval: float = 41.25,
        buffer_size: int = 1000,
        echo_bot_messages: bool = True,
        interaction_deadline: float = 3.0,
        max_recorded_requests: int = 10_000,
        session_lifetime: float = SESSION_LIFETIME_SECONDS,
        interaction_token_lifetime: float = INTERACTION_TOKEN_LIFETIME_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        recommended_shards: int | None = None,
    ) -> None:
        self.token = token
        self.host = host
        self.port = port
        self.faults = faults if faults is not None else FaultPlan()
        self.heartbeat_interval = heartbeat_interval
        self.buffer_size = buffer_size
        self.echo_bot_messages = echo_bot_messages
        self.interaction_deadline = interaction_deadline
        self.session_lifetime = session_lifetime
        self.interaction_token_lifetime = interaction_token_lifetime
        self.world = World()
        self.recommended_shards = recommended_shards
        # Discord's REST rate limits, on ``clock`` (a test can move it with the client's loop time)
        self.rate_limits = RateLimits(clock)
        # bounded: a long sandbox or chaos session must not grow without limit
        self.requests: deque[RecordedRequest] = deque(maxlen=max_recorded_requests)
        self.commands: dict[int | None, list[dict[str, Any]]] = {}  # guild id (None = global) -> commands
        self.typing: list[int] = []  # channel ids, one per typing request
        self.identify_count = 0
        self.resume_count = 0
        self.expired_sessions = 0  # sessions forgotten because nobody resumed them in time
        # Presence updates (gateway op 3) as the client sent them, oldest first.
        self.presences: deque[dict[str, Any]] = deque(maxlen=1000)
        self.webhooks: dict[int, IncomingWebhook] = {}
        self._sent: dict[int, list[SentMessage]] = {}
        self._sent_by_id: dict[int, SentMessage] = {}
        self._sent_log: list[SentMessage] = []  # every channel message, in the order created
        # (channel, nonce) -> (message, when), oldest first, so expired ones leave from the front
        self._nonces: OrderedDict[tuple[int, str], tuple[int, float]] = OrderedDict()
        self._interactions: dict[int, InteractionRecord] = {}
        self._by_token: dict[str, InteractionRecord] = {}
        self._sessions: dict[str, _Session] = {}
        self._connections: set[_Connection] = set()
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind 127.0.0.1 (port 0 = any free port) and start serving."""
        app = web.Application(client_max_size=32 * 1024 * 1024)
        app.router.add_get("/gateway", self._gateway)
        for method, path, name, handler, auth in self._routes():
            app.router.add_route(method, "/api/v10" + path, self._wrap(name, handler, auth=auth))
        # The CDN (cdn.discordapp.com and the media proxy) on the same loopback origin.
        app.router.add_get("/attachments/{channel_id}/{attachment_id}/{filename}", self._cdn)
        app.router.add_get("/external/{key}/{filename}", self._cdn)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = int(self._runner.addresses[0][1])  # the real port when asked for port 0
        self.world.cdn_base = f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Close every websocket, stop background sends and the server. Safe to call twice."""
        for conn in list(self._connections):
            await conn.close(1001)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> DiscordEmulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def api_base(self) -> str:
        """The value for ``discord.http.Route.BASE``."""
        return f"http://{self.host}:{self.port}/api/v10"

    @property
    def gateway_url(self) -> str:
        """The value (as ``yarl.URL``) for ``discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY``."""
        return f"ws://{self.host}:{self.port}/gateway"

    # --- world shortcuts ---------------------------------------------------------------------

    @property
    def application_id(self) -> int:
        return self.world.application_id

    @property
    def bot_user_id(self) -> int:
        return self.world.bot.id

    @property
    def guild_id(self) -> int:
        return self.world.guild_id

    @property
    def channels(self) -> dict[str, int]:
        return self.world.channels

    @property
    def thread_id(self) -> int:
        return self.world.thread_id

    @property
    def users(self) -> dict[str, int]:
        """User ids by key: ``"bot"``, ``"admin"``, ``"normal"`` and any added member."""
        return {key: user.id for key, user in self.world.users.items()}

    def dm_channel(self, user: str | int) -> int:
        """The DM channel between the bot and ``user`` (key or id), created on first use."""
        return self.world.dm_channel(user)

    @property
    def connected(self) -> bool:
        """True while a client holds a live (identified or resumed) gateway connection."""
        return any(s.conn is not None for s in self._sessions.values())

    @property
    def shard_sessions(self) -> dict[int, int]:
        """Shard id -> live connections of that shard (an unsharded session counts as shard 0)."""
        counts: dict[int, int] = {}
        for session in self._sessions.values():
            if session.conn is not None:
                counts[session.shard[0]] = counts.get(session.shard[0], 0) + 1
        return counts

    @property
    def live_sessions(self) -> int:
        """Sessions a client holds or could still RESUME (expired ones are forgotten first)."""
        self._expire_sessions()
        return len(self._sessions)

    # --- recording ---------------------------------------------------------------------------

    def sent_messages(self, channel_id: int) -> list[SentMessage]:
        """Messages the bot created in a channel, in order (deleted ones included, flagged)."""
        return list(self._sent.get(channel_id, []))

    def sent_log(self, start: int = 0) -> list[SentMessage]:
        """Channel messages the bot created in every channel, in creation order, from index ``start``."""
        return self._sent_log[start:]

    def history(self, channel_id: int) -> list[dict[str, Any]]:
        """The channel's stored messages (users' and the bot's), oldest first."""
        return list(self.world.messages.get(channel_id, []))

    def interaction_log(self, interaction_id: int) -> InteractionRecord:
        return self._interactions[interaction_id]

    def reactions(self, message_id: int) -> dict[str, set[int]]:
        """Emoji -> ids of users (the bot included) who reacted to a message."""
        return {k: set(v) for k, v in self.world.reactions.get(message_id, {}).items()}

    def requests_for(self, route: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.route == route]

    def add_webhook(self, channel_id: int, name: str = "alerts") -> IncomingWebhook:
        """Create an incoming webhook of ``channel_id``; its URL is :meth:`webhook_url`."""
        webhook = IncomingWebhook(self.world.snowflake(), secrets.token_urlsafe(48), channel_id, name)
        self.webhooks[webhook.id] = webhook
        return webhook

    def webhook_url(self, webhook: IncomingWebhook) -> str:
        """The URL Discord shows for the webhook (``https://discord.com/api/webhooks/<id>/<token>``),
        here on the emulator's own API base."""
        return f"{self.api_base}/webhooks/{webhook.id}/{webhook.token}"

    @property
    def presence(self) -> dict[str, Any] | None:
        """The last presence the client set (gateway op 3's ``d``), or None."""
        return self.presences[-1] if self.presences else None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # the wait helpers take ``timeout`` (tests read better with it than with asyncio.timeout blocks)
    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds; raises ``TimeoutError`` after ``timeout``.

        Woken by every change the emulator sees, and every 50 ms as well, so a predicate over
        the client's own state (what a test bot received) is noticed too.
        """
        async with asyncio.timeout(timeout), self._changed:
            while not predicate():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WAIT_POLL_SECONDS):
                        await self._changed.wait()

    async def wait_for_bot_message(
        self, channel_id: int, count: int = 1, timeout: float = 5.0  # noqa: ASYNC109
    ) -> list[SentMessage]:
        """Wait until the bot has created at least ``count`` messages in the channel; return them all."""
        await self.wait_until(lambda: len(self._sent.get(channel_id, [])) >= count, timeout)
        return self.sent_messages(channel_id)

    async def wait_connected(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Wait until a client holds a live gateway session."""
        await self.wait_until(lambda: self.connected, timeout)

    # --- users act -----------------------------------------------------------------------------

    async def send_user_message(
        self,
        channel_id: int,
        author: str | int = "normal",
        content: str = "",
        *,
        reference_message_id: int | None = None,
        mentions_bot: bool = False,
        attachments: list[dict[str, Any]] | None = None,
        embeds: list[dict[str, Any]] | None = None,
        stickers: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """A user posts a message: it is stored and dispatched as MESSAGE_CREATE; returns the payload.

        ``mentions_bot`` puts ``<@bot>`` in the content and the bot in ``mentions``; a reply
        (``reference_message_id``) carries ``message_reference`` and ``referenced_message``, and
        mentions the replied-to author like Discord's default reply ping. ``attachments`` are
        specs: ``{"filename", "content_type", "data": bytes}`` uploads a file to the CDN (a signed
        URL that expires; re-reading the message gives a fresh one), ``"voice": True`` makes the
        message a voice message; a spec without ``data`` only describes one (``size``, ``url``).
        ``embeds`` are embed objects (``media_proxy_url`` puts an image behind one), ``stickers``
        sticker items (``{"id", "name", "format_type"}``).
        """
        user = self.world.user(author)
        if channel_id not in self.world.channel_data:
            raise KeyError(f"unknown channel {channel_id}")
        mentions: list[UserRecord] = []
        if mentions_bot:
            tag = f"<@{self.bot_user_id}>"
            if tag not in content:
                content = f"{tag} {content}".strip()
            mentions.append(self.world.bot)
        if reference_message_id is not None:
            ref = self.world.find_message(channel_id, reference_message_id)
            if ref is not None:
                ref_author = self.world.user(int(ref["author"]["id"]))
                if ref_author not in mentions and ref_author.id != user.id:
                    mentions.append(ref_author)
        voice = any(spec.get("voice") for spec in attachments or [])
        data = self.world.message_payload(
            channel_id, user, content, mentions=mentions,
            reference_message_id=reference_message_id, attachments=attachments, embeds=embeds,
            flags=IS_VOICE_MESSAGE if voice else 0,
            extra={"sticker_items": [dict(s) for s in stickers]} if stickers else None,
        )
        self.world.store(data)
        await self._dispatch("MESSAGE_CREATE", data)
        await self._notify()
        return data

    async def redeliver_message(self, channel_id: int, message_id: int) -> dict[str, Any]:
        """Dispatch a stored message's MESSAGE_CREATE again, under a new sequence number.

        Discord's gateway delivers at least once (a resumed session or a reconnect can repeat
        an event), so a bot must not answer the repeat; this is that repeat.
        """
        data = self.world.find_message(channel_id, message_id)
        if data is None:
            raise KeyError(f"no message {message_id} in channel {channel_id}")
        await self._dispatch("MESSAGE_CREATE", data)
        await self._notify()
        return data

    async def delete_message(self, channel_id: int, message_id: int) -> None:
        """Someone deletes a message (its author, or a moderator deleting the bot's): it leaves the
        channel's history (the bot's record is flagged ``deleted``) and MESSAGE_DELETE is dispatched."""
        message = self.world.find_message(channel_id, message_id)
        if message is None:
            raise KeyError(f"no message {message_id} in channel {channel_id}")
        await self._remove(channel_id, message)

    async def send_interaction(
        self,
        name: str,
        options: dict[str, Any] | None = None,
        *,
        user: str | int = "normal",
        channel_id: int | None = None,
        focused: str | None = None,
    ) -> InteractionRecord:
        """A user runs slash command ``name``: dispatches INTERACTION_CREATE; returns its record.

        With ``focused`` (an option's name) the user is still typing that option: the interaction is
        an autocomplete (type 4) with that option ``focused``, and the bot answers with choices
        (callback type 8, ``record.choices``), as Discord asks while a user types.

        ``options`` maps option names to values (str, int, bool, float, or a :class:`ChannelRef`
        for a channel option, sent with its ``resolved`` data). A dict value is a
        subcommand: ``{"circuit": {"reset": {"name": "gemini"}}}`` runs ``/name circuit reset
        name:gemini``; a dict whose values are all dicts is a subcommand group (type 2), any
        other dict (also ``{}``) a subcommand (type 1), each with its nested ``options``, as
        Discord sends them. In a DM channel the interaction carries ``user`` instead of ``member``;
        in a guild channel, ``member`` with the member's permissions in that channel's guild.
        """
        who = self.world.user(user)
        channel_id = channel_id if channel_id is not None else self.channels["general"]
        channel = self.world.channel_data[channel_id]
        guild_id = self.world.channel_guild(channel_id)
        iid = self.world.snowflake()
        token = "itok-" + secrets.token_hex(16)
        command_id = self._command_id(name)
        data: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": 2 if focused is None else 4,
            "token": token,
            "version": 1,
            "data": {
                "id": str(command_id),
                "name": name,
                "type": 1,
                "options": _focus(_options(options or {}), focused),
            },
            "channel_id": str(channel_id),
            "channel": dict(channel),
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id or self.guild_id)},
            "attachment_size_limit": 8 * 1024 * 1024,
            "app_permissions": str(self.world.permissions(self.world.bot, guild_id)),
        }
        perms = self.world.permissions(who, guild_id) if guild_id is not None else 0
        channels = _resolved_channels(options or {})
        if channels:
            data["data"]["resolved"] = {"channels": {
                str(cid): self.world.channel_data[cid] | {"permissions": str(perms)} for cid in channels
            }}
        self._invoker(data, who, guild_id, perms)
        if guild_id is not None:
            data["data"]["guild_id"] = str(guild_id)
        record = InteractionRecord(iid, token, name, dict(options or {}), who.id, channel_id, data)
        self._interactions[iid] = record
        self._by_token[token] = record
        await self._dispatch("INTERACTION_CREATE", data)
        return record

    def _invoker(self, data: dict[str, Any], who: UserRecord, guild_id: int | None, permissions: int) -> None:
        """Who invoked an interaction, as Discord puts it: ``user`` in a DM (context 1); in a guild
        (context 0), the guild and ``member`` with ``permissions``."""
        if guild_id is None:
            data["user"] = who.payload()
            data["context"] = 1
            return
        data["guild_id"] = str(guild_id)
        data["guild_locale"] = "en-US"
        data["guild"] = {"id": str(guild_id), "locale": "en-US", "features": []}
        data["member"] = self.world.member_payload(who, guild_id=guild_id) | {"permissions": str(permissions)}
        data["context"] = 0

    async def click_button(
        self, channel_id: int, message_id: int, custom_id: str, *, user: str | int = "normal"
    ) -> InteractionRecord:
        """``user`` clicks the button ``custom_id`` on a message: dispatches the MESSAGE_COMPONENT
        interaction (type 3) Discord sends, with the message as it is now; returns its record.

        Raises ``KeyError`` when the message is gone or shows no such button (nobody can click it).
        """
        message = self.world.find_message(channel_id, message_id) or self._ephemeral_message(message_id)
        if message is None:
            raise KeyError(f"no message {message_id} in channel {channel_id}")
        buttons = [c for row in message.get("components") or [] for c in row.get("components", [])]
        if not any(c.get("custom_id") == custom_id for c in buttons):
            raise KeyError(f"message {message_id} has no button {custom_id!r}")
        who = self.world.user(user)
        channel = self.world.channel_data[channel_id]
        guild_id = self.world.channel_guild(channel_id)
        iid = self.world.snowflake()
        token = "itok-" + secrets.token_hex(16)
        data: dict[str, Any] = {
            "id": str(iid),
            "application_id": str(self.application_id),
            "type": 3,
            "token": token,
            "version": 1,
            "data": {"custom_id": custom_id, "component_type": 2},
            "message": self.world.refreshed(message),
            "channel_id": str(channel_id),
            "channel": dict(channel),
            "locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(guild_id or self.guild_id)},
            "attachment_size_limit": 8 * 1024 * 1024,
            "app_permissions": str(self.world.permissions(self.world.bot, guild_id)),
        }
        # Discord sends the member's permissions in the channel, overwrites included.
        in_guild = guild_id is not None
        self._invoker(data, who, guild_id, self.world.channel_permissions(who, channel_id) if in_guild else 0)
        record = InteractionRecord(iid, token, custom_id, {}, who.id, channel_id, data)
        record.message_id = message_id
        self._interactions[iid] = record
        self._by_token[token] = record
        await self._dispatch("INTERACTION_CREATE", data)
        return record

    def _ephemeral_message(self, message_id: int) -> dict[str, Any] | None:
        """An ephemeral follow-up (only its user sees it, and may click its buttons: Discord sends
        the component interaction like any other)."""
        for record in self._interactions.values():
            for sent in record.followups:
                if sent.id == message_id and sent.ephemeral:
                    return sent.payload
        return None

    async def submit_modal(
        self, record: InteractionRecord, values: dict[str, str], *, user: str | int | None = None
    ) -> InteractionRecord:
        """The user fills in and submits the modal the bot answered ``record`` with (callback type
        9): a MODAL_SUBMIT interaction (type 5) with the text inputs' ``values`` by custom id, in the
        components' shape the modal was sent in (action rows, or labels). Returns its record."""
        modal = record.modal
        if modal is None:
            raise ValueError(f"interaction {record.id} was not answered with a modal")
        inputs = _modal_inputs(modal)
        unknown = set(values) - set(inputs)
        if unknown:
            raise KeyError(f"no text input {sorted(unknown)} in the modal")
        for custom_id, spec in inputs.items():
            value = values.get(custom_id, "")
            if spec.get("required", True) and not value:
                raise ValueError(f"the modal's input {custom_id!r} is required")  # Discord's client stops it
            if len(value) > int(spec.get("max_length", 4000)):
                raise ValueError(f"{custom_id!r} is longer than its max_length")  # the client stops that too
        components = []
        for n, (cid, spec) in enumerate(inputs.items()):
            entered = {"type": 4, "id": 2 * n + 2, "custom_id": cid, "value": values.get(cid, "")}
            if spec["__labelled"]:
                components.append({"type": 18, "id": 2 * n + 1, "component": entered})
            else:
                components.append({"type": 1, "id": 2 * n + 1, "components": [entered]})
        who = self.world.user(user if user is not None else record.user_id)
        iid = self.world.snowflake()
        token = "itok-" + secrets.token_hex(16)
        data = {**record.payload, "id": str(iid), "token": token, "type": 5,
                "data": {"custom_id": modal["custom_id"], "components": components}}
        if "member" in data:
            data["member"] = {**data["member"], "user": who.payload()}
        else:
            data["user"] = who.payload()
        submitted = InteractionRecord(iid, token, record.name, dict(values), who.id, record.channel_id, data)
        self._interactions[iid] = submitted
        self._by_token[token] = submitted
        await self._dispatch("INTERACTION_CREATE", data)
        return submitted

    async def create_forum_post(
        self,
        forum_id: int,
        author: str | int = "normal",
        title: str = "A question",
        content: str = "",
        *,
        mentions_bot: bool = False,
    ) -> dict[str, Any]:
        """A user opens a post in a forum: a public thread (type 11, parent the forum) whose first
        message has the thread's id, as Discord's Start Thread in Forum Channel makes them;
        THREAD_CREATE, then MESSAGE_CREATE of that message. Returns the message's payload."""
        if self.world.channel_data.get(forum_id, {}).get("type") != CHANNEL_FORUM:
            raise ValueError(f"channel {forum_id} is not a forum")
        mid = self.world.snowflake()
        thread_id = self.world.add_thread(forum_id, title[:THREAD_NAME_MAX], owner=author, thread_id=mid)
        self.world.channel_data[forum_id]["last_message_id"] = str(thread_id)
        await self._dispatch("THREAD_CREATE", {**self.world.channel_data[thread_id], "newly_created": True})
        user = self.world.user(author)
        mentions = []
        if mentions_bot:
            tag = f"<@{self.bot_user_id}>"
            content = content if tag in content else f"{tag} {content}".strip()
            mentions.append(self.world.bot)
        data = self.world.message_payload(thread_id, user, content, mentions=mentions)
        data["id"] = str(mid)
        self.world.store(data)
        await self._dispatch("MESSAGE_CREATE", data)
        await self._notify()
        return data

    def _command_id(self, name: str) -> int:
        for commands in self.commands.values():
            for command in commands:
                if command["name"] == name:
                    return int(command["id"])
        return self.world.snowflake()

    # --- gateway control -------------------------------------------------------------------------

    async def close_gateway(self, code: int = 4000) -> None:
        """Close every live gateway connection with ``code`` (4000 resumable, 4004 fatal, ...)."""
        for conn in list(self._connections):
            conn.silent = True  # nothing more goes out on it: later events wait for the RESUME
            await conn.close(code)

    def cut_gateway(self) -> None:
        """Cut every gateway TCP connection without a close frame (discord.py RESUMEs)."""
        for conn in list(self._connections):
            conn.cut()

    async def send_reconnect(self) -> None:
        """Send op 7 RECONNECT on every live connection (discord.py RESUMEs)."""
        for conn in list(self._connections):
            await conn.send({"op": OP_RECONNECT, "d": None})
            conn.silent = True

    async def invalidate_session(self, resumable: bool = False) -> None:
        """Send op 9 INVALID_SESSION; unless resumable the sessions are forgotten (re-IDENTIFY)."""
        for conn in list(self._connections):
            await self._invalid_session(conn, resumable)

    def set_silent(self, silent: bool = True) -> None:
        """Stop (or resume) heartbeat ACKs and dispatches on live connections; events keep buffering."""
        for conn in self._connections:
            conn.silent = silent

    # --- gateway ----------------------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.StreamResponse:
        if self.faults.pick("gateway", kinds=("unavailable",)) is not None:
            # An outage in front of the gateway: the upgrade is refused, the client backs off.
            return web.Response(status=503, text=_ERROR_BODIES[503][1], content_type="text/plain")
        ws = web.WebSocketResponse(max_msg_size=0, timeout=2.0, autoping=True)
        await ws.prepare(request)
        conn = _Connection(ws, request.transport)
        self._connections.add(conn)
        try:
            hello = {"heartbeat_interval": int(self.heartbeat_interval * 1000)}
            await conn.send({"op": OP_HELLO, "d": hello})
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                try:
                    payload = json.loads(msg.data)
                except ValueError:
                    await conn.close(4002)  # decode error, as Discord does
                    break
                await self._gateway_op(conn, payload)
        finally:
            self._connections.discard(conn)
            session = conn.session
            if session is not None and session.conn is conn:
                session.conn = None
                session.detached_at = time.monotonic()
                if not conn.closed_by_server and ws.close_code in SESSION_ENDING_CLOSE_CODES:
                    self._sessions.pop(session.id, None)  # the client ended it: nothing to resume
            await self._notify()
        return ws

    async def _gateway_op(self, conn: _Connection, payload: dict[str, Any]) -> None:
        op, data = payload.get("op"), payload.get("d")
        if op == OP_HEARTBEAT:
            conn.heartbeats += 1
            if not conn.silent:
                await conn.send({"op": OP_HEARTBEAT_ACK})
        elif op == OP_IDENTIFY:
            await self._identify(conn, data or {})
        elif op == OP_RESUME:
            await self._resume(conn, data or {})
        elif op == OP_PRESENCE_UPDATE and conn.session is not None:
            # Discord takes the bot's status and activities (a custom status: type 4 with "state")
            # and shows them to users; it sends the bot no answer (Gateway Events, Update Presence).
            self.presences.append(dict(data or {}))
            await self._notify()
        elif op == OP_REQUEST_MEMBERS and conn.session is not None:
            gid = int((data or {}).get("guild_id") or self.guild_id)
            if gid not in self.world.guilds:
                return
            await self._emit(conn.session, "GUILD_MEMBERS_CHUNK", {
                "guild_id": str(gid),
                "members": [self.world.member_payload(u, guild_id=gid) for u in self.world.users.values()],
                "chunk_index": 0,
                "chunk_count": 1,
                "nonce": (data or {}).get("nonce"),
            })

    async def _identify(self, conn: _Connection, data: dict[str, Any]) -> None:
        if data.get("token") != self.token:
            await conn.close(4004)
            return
        shard = _shard_pair(data.get("shard"))
        if shard is None:
            await conn.close(4010)  # Invalid shard (Gateway.md, "Gateway Close Event Codes")
            return
        self.identify_count += 1
        # one bot per emulator: a fresh IDENTIFY supersedes its shard's sessions nobody is attached to
        for sid in [sid for sid, s in self._sessions.items() if s.conn is None and s.shard == shard]:
            del self._sessions[sid]
        session = _Session(secrets.token_hex(16), int(data.get("intents", 0)), self.buffer_size, shard)
        self._sessions[session.id] = session
        session.conn = conn
        conn.session = session
        guilds = [gid for gid in self.world.guilds if session.receives(gid)]
        ready = self.world.ready_payload(session.id, self.gateway_url, guilds=guilds)
        if "shard" in data:
            ready["shard"] = list(shard)
        await self._emit(session, "READY", ready, check=False)
        for gid in guilds:
            guild = self.world.guild_create_payload(session.intents, gid)
            await self._emit(session, "GUILD_CREATE", guild, check=False)
        await self._notify()
        await self._gateway_fault(conn)

    async def _resume(self, conn: _Connection, data: dict[str, Any]) -> None:
        self._expire_sessions()  # too late for an expired one: op 9, nothing replayed
        session = self._sessions.get(str(data.get("session_id")))
        seq = data.get("seq") or 0
        if data.get("token") != self.token:
            await conn.close(4004)
            return
        if session is None or not session.can_replay_after(seq):
            await self._invalid_session(conn, False)
            return
        self.resume_count += 1
        old = session.conn
        session.conn = conn
        conn.session = session
        if old is not None and old is not conn:
            self._spawn(old.close(4000))
        await conn.send(*[frame for frame in session.buffer if frame["s"] > seq])
        await self._emit(session, "RESUMED", {}, check=False)
        await self._notify()
        await self._gateway_fault(conn)

    async def _invalid_session(self, conn: _Connection, resumable: bool) -> None:
        if not resumable and conn.session is not None:
            self._sessions.pop(conn.session.id, None)
            conn.session.conn = None
            conn.session = None
        await conn.send({"op": OP_INVALID_SESSION, "d": resumable})

    def _expire_sessions(self) -> None:
        """Forget sessions dropped longer than ``session_lifetime`` ago, with what they buffered."""
        now = time.monotonic()
        for sid in [sid for sid, s in self._sessions.items() if s.expired(now, self.session_lifetime)]:
            del self._sessions[sid]
            self.expired_sessions += 1

    async def _dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send an event to every session of its guild's shard (buffered for replay while a dropped
        one can be resumed); an event without a guild goes to shard 0."""
        self._expire_sessions()
        gid = data.get("guild_id")
        guild_id = int(gid) if gid is not None else None
        for session in list(self._sessions.values()):
            if session.receives(guild_id):
                await self._emit(session, event, self._visible(session, event, data))

    def _visible(self, session: _Session, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """Blank message content the way Discord does for a bot without the message-content intent."""
        if event != "MESSAGE_CREATE" or session.intents & INTENT_MESSAGE_CONTENT or "guild_id" not in data:
            return data
        bot = str(self.bot_user_id)
        if data["author"]["id"] == bot or any(m["id"] == bot for m in data.get("mentions", [])):
            return data
        return data | {"content": "", "embeds": [], "attachments": [], "components": []}

    async def _emit(self, session: _Session, event: str, data: dict[str, Any], *, check: bool = True) -> None:
        session.seq += 1
        frame = {"op": OP_DISPATCH, "t": event, "s": session.seq, "d": data}
        session.buffer.append(frame)
        conn = session.conn
        if conn is None or conn.silent:
            return
        if check and await self._gateway_fault(conn):
            return  # the frame stays buffered; a RESUME replays it
        await conn.send(frame)

    async def _gateway_fault(self, conn: _Connection) -> bool:
        """Apply the next gateway fault to ``conn``, if any; True when the connection is disturbed."""
        fault = self.faults.pick("gateway", kinds=GATEWAY_DISTURBANCES)
        if fault is None:
            return False
        # Whatever the fault, nothing more goes out on this connection: an event sent after the
        # one held back would move the client's sequence past it, and the RESUME would skip it.
        conn.silent = True
        if fault.kind == "close":
            self._spawn(conn.close(int(fault.params.get("code", 4000))))
        elif fault.kind == "disconnect":
            conn.cut()
        elif fault.kind == "reconnect":
            await conn.send({"op": OP_RECONNECT, "d": None})
        elif fault.kind == "invalid_session":
            await self._invalid_session(conn, bool(fault.params.get("resumable", False)))
        return True

    def _spawn(self, coro: Awaitable[Any]) -> None:
        """Run a close in the background (it waits for the client's answer) and track it for stop()."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- REST plumbing --------------------------------------------------------------------------------

    def _wrap(self, name: str, handler: Handler, *, auth: bool) -> Callable[[web.Request], Awaitable[Any]]:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            route = self._route_name(name, request)
            targets = (route, "interaction") if route == "followup" else (route,)
            body = await _read_body(request)
            record = RecordedRequest(request.method, route, request.path, body, time.monotonic(),
                                     dict(request.query))
            self.requests.append(record)
            verdict: RateVerdict | None = None
            try:
                if auth and request.headers.get("Authorization") != f"Bot {self.token}":
                    raise ApiError(401, "401: Unauthorized", 0)
                fault = self.faults.pick(*targets, kinds=REST_FAULT_KINDS)
                after = fault is not None and bool(fault.params.get("after"))
                late = after and fault is not None and fault.kind in ("latency", "drop")
                response = await self._rest_fault(request, fault, record) if fault and not late else None
                if response is None:
                    # Served by Discord itself (a fault above stands for its edge failing first):
                    # the request counts against its bucket, and every answer carries the headers.
                    verdict = self.rate_limits.hit(route, _resource(request))
                    if verdict.limited:
                        record.rate_limited = verdict.scope
                        response = _rate_limited(verdict)
                    else:
                        response = await handler(request, body)
                if late:
                    assert fault is not None
                    record.fault = fault.kind
                    await self._notify()  # what the handler did is visible while the response waits
                    if fault.kind == "drop":
                        if request.transport is not None:
                            request.transport.close()  # served, but the client never hears so
                    else:
                        await asyncio.sleep(_latency_seconds(fault.params))
            except ApiError as exc:
                response = _json(exc.status, {"message": exc.message, "code": exc.code}
                                 | ({"errors": exc.errors} if exc.errors else {}))
            if verdict is not None:
                response.headers.update(verdict.headers)
            record.status = response.status if not record.fault == "drop" else None
            await self._notify()
            return response

        return wrapped

    def _route_name(self, name: str, request: web.Request) -> str:
        """``webhook`` for a call to an incoming webhook: the interaction follow-up routes have the same
        path (``/webhooks/{id}/{token}``), told apart, as by Discord, by whose id it is."""
        if name == "followup" and request.method == "POST" and "message_id" not in request.match_info:
            with contextlib.suppress(ValueError):
                if int(request.match_info["app_id"]) in self.webhooks:
                    return "webhook"
        return name

    async def _rest_fault(
        self, request: web.Request, fault: Fault, record: RecordedRequest
    ) -> web.StreamResponse | None:
        record.fault = fault.kind
        kind, params = fault.kind, fault.params
        if kind == "latency":
            await asyncio.sleep(_latency_seconds(params))
            return None
        if kind == "drop":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never reaches the client
        if kind == "429":
            retry_after = float(params.get("retry_after", 0.05))
            is_global = bool(params.get("global", params.get("global_", False)))
            headers = {
                "Retry-After": str(math.ceil(retry_after)),
                "X-RateLimit-Scope": "global" if is_global else "user",
            }
            if is_global:
                headers["X-RateLimit-Global"] = "true"
            else:
                headers |= {
                    "X-RateLimit-Limit": "5",
                    "X-RateLimit-Remaining": "0",
                    "X-RateLimit-Reset-After": f"{retry_after:.3f}",
                    "X-RateLimit-Reset": f"{time.time() + retry_after:.3f}",
                    # the route's own hash: another would make discord.py re-key the route's bucket
                    "X-RateLimit-Bucket": self.rate_limits.bucket_hash(record.route),
                }
            verdict = RateVerdict(headers, retry_after, "global" if is_global else "user")
            return _rate_limited(verdict, via=bool(params.get("via", True)))
        status = int(params.get("status", 500)) if kind == "error" else int(kind)
        if "code" in params or "message" in params or status not in _ERROR_BODIES:
            # Discord's own JSON error body: discord.py reads code/message into HTTPException.
            default = f"{status}: {HTTPStatus(status).phrase}" if status in _HTTP_STATUSES else str(status)
            body = {"message": str(params.get("message", default)), "code": int(params.get("code", 0))}
            return _json(status, body)
        content_type, text = _ERROR_BODIES[status]
        return web.Response(status=status, body=text.encode(), headers={"Content-Type": content_type})

    def _routes(self) -> list[tuple[str, str, str, Handler, bool]]:
        msg = "/channels/{channel_id}/messages/{message_id}"
        guild_commands = "/applications/{app_id}/guilds/{guild_id}/commands"
        hook = "/webhooks/{app_id}/{token}"
        return [
            ("GET", "/users/@me", "me", self._get_me, True),
            ("GET", "/users/{user_id}", "user", self._get_user, True),
            ("GET", "/oauth2/applications/@me", "application", self._get_application, True),
            ("GET", "/gateway", "gateway_url", self._get_gateway, False),
            ("GET", "/gateway/bot", "gateway_url", self._get_gateway, True),
            ("POST", "/users/@me/channels", "dm", self._create_dm, True),
            ("GET", "/channels/{channel_id}", "channel", self._get_channel, True),
            ("POST", "/channels/{channel_id}/typing", "typing", self._typing, True),
            ("POST", "/channels/{channel_id}/messages", "send", self._create_message, True),
            ("GET", "/channels/{channel_id}/messages", "history", self._get_history, True),
            ("GET", msg, "message", self._get_message, True),
            ("PATCH", msg, "edit", self._edit_message, True),
            ("DELETE", msg, "delete", self._delete_message, True),
            ("PUT", msg + "/reactions/{emoji}/@me", "react", self._add_reaction, True),
            # Pin Message (discord-api-docs, Message resource): PUT /channels/{id}/messages/pins/{id},
            # 204; a message already pinned stays pinned (the same 204).
            ("PUT", "/channels/{channel_id}/messages/pins/{message_id}", "pin", self._pin_message, True),
            ("POST", msg + "/threads", "thread", self._start_thread, True),
            ("DELETE", msg + "/reactions/{emoji}/@me", "react", self._remove_reaction, True),
            ("GET", "/applications/{app_id}/commands", "commands", self._get_commands, True),
            ("PUT", "/applications/{app_id}/commands", "commands", self._put_commands, True),
            ("GET", guild_commands, "commands", self._get_commands, True),
            ("PUT", guild_commands, "commands", self._put_commands, True),
            ("POST", "/interactions/{interaction_id}/{token}/callback", "interaction", self._callback, False),
            ("POST", hook, "followup", self._followup, False),
            ("GET", hook + "/messages/{message_id}", "followup", self._get_hook_message, False),
            ("PATCH", hook + "/messages/{message_id}", "followup", self._edit_hook_message, False),
            ("DELETE", hook + "/messages/{message_id}", "followup", self._delete_hook_message, False),
        ]

    # --- REST handlers ----------------------------------------------------------------------------------

    async def _get_me(self, request: web.Request, body: Any) -> web.Response:
        return _json(200, self.world.bot.payload() | {"verified": True, "mfa_enabled": False, "flags": 0})

    async def _get_user(self, request: web.Request, body: Any) -> web.Response:
        # Get User (discord-api-docs docs/resources/User.md): how a bot without the members intent
        # (discord.py's fetch_user) learns a user it must DM
        try:
            return _json(200, self.world.user(int(request.match_info["user_id"])).payload())
        except (KeyError, ValueError):
            raise ApiError(404, "Unknown User", 10013) from None

    async def _get_application(self, request: web.Request, body: Any) -> web.Response:
        return _json(200, self.world.application_payload())

    async def _get_gateway(self, request: web.Request, body: Any) -> web.Response:
        # Discord recommends a shard per 1,000 guilds (Gateway.md, "Sharding": "each shard can
        # only support a maximum of 2500 guilds", and the recommendation leaves room to grow).
        shards = self.recommended_shards or max(1, math.ceil(len(self.world.guilds) / 1000))
        return _json(200, {"url": self.gateway_url, "shards": shards,
                           "session_start_limit": {"total": 1000, "remaining": 1000,
                                                   "reset_after": 0, "max_concurrency": 1}})

    async def _create_dm(self, request: web.Request, body: Any) -> web.Response:
        try:
            cid = self.world.dm_channel(int(body["recipient_id"]))
        except (KeyError, TypeError, ValueError):
            raise ApiError(400, "Invalid Recipient(s)", 50033) from None
        return _json(200, self.world.channel_data[cid])

    def _channel(self, request: web.Request) -> int:
        cid = int(request.match_info["channel_id"])
        if cid not in self.world.channel_data:
            raise ApiError(404, "Unknown Channel", 10003)
        return cid

    def _message(self, request: web.Request) -> tuple[int, dict[str, Any]]:
        cid = self._channel(request)
        message = self.world.find_message(cid, int(request.match_info["message_id"]))
        if message is None:
            raise ApiError(404, "Unknown Message", 10008)
        return cid, message

    async def _get_channel(self, request: web.Request, body: Any) -> web.Response:
        return _json(200, self.world.channel_data[self._channel(request)])

    async def _start_thread(self, request: web.Request, body: Any) -> web.Response:
        """Start Thread from Message (discord-api-docs, Channel resource): a public thread whose id is
        the message's, in a text channel. Needs Create Public Threads there (403 50013, "Missing
        Permissions"); a message can start one thread only (400 160004, "A thread has already been
        created for this message"); the name is 1 to 100 characters (400 50035)."""
        cid, message = self._message(request)
        channel = self.world.channel_data[cid]
        if channel.get("type") != CHANNEL_TEXT:
            raise ApiError(400, "Cannot execute action on this channel type", 50024)
        if not self.world.channel_permissions(self.world.bot, cid) & CREATE_PUBLIC_THREADS:
            raise ApiError(403, "Missing Permissions", 50013)
        mid = int(message["id"])
        if mid in self.world.channel_data:
            raise ApiError(400, "A thread has already been created for this message", 160004)
        name = str((body or {}).get("name") or "")
        if not 1 <= len(name) <= THREAD_NAME_MAX:
            raise ApiError(400, "Invalid Form Body", 50035, {"name": {"_errors": [
                {"code": "BASE_TYPE_BAD_LENGTH", "message": "Must be between 1 and 100 in length."}]}})
        tid = self.world.add_thread(cid, name, owner="bot", thread_id=mid)
        duration = (body or {}).get("auto_archive_duration")
        if duration:
            self.world.channel_data[tid]["thread_metadata"]["auto_archive_duration"] = int(duration)
        message["thread"] = dict(self.world.channel_data[tid])
        message["flags"] = int(message.get("flags") or 0) | HAS_THREAD
        await self._dispatch("THREAD_CREATE", {**self.world.channel_data[tid], "newly_created": True})
        return _json(201, self.world.channel_data[tid])

    async def _typing(self, request: web.Request, body: Any) -> web.Response:
        self.typing.append(self._channel(request))
        return web.Response(status=204)

    async def _create_message(self, request: web.Request, body: Any) -> web.Response:
        cid = self._channel(request)
        self._check_can_post(cid)
        body = body or {}
        self._check_can_attach(cid, body)
        nonce = str(body["nonce"]) if body.get("nonce") is not None else None
        if nonce is not None and body.get("enforce_nonce"):
            # Discord: a repeated nonce from the same author within a few minutes returns the
            # message already created instead of posting it again (safe resend after a timeout).
            earlier = self._nonces.get((cid, nonce))
            if earlier is not None and time.monotonic() - earlier[1] < NONCE_WINDOW_SECONDS:
                message = self._sent_by_id.get(earlier[0])
                if message is not None and not message.deleted and self.world.find_message(cid, message.id):
                    return _json(200, {**message.payload, "nonce": nonce})
                # The message created with this nonce was deleted since: Discord does not post
                # it again and answers Unknown Message (Discord's engineer on enforce_nonce,
                # discord/discord-api-docs#6647: "That we don't try to recreate the message if it
                # was created then subsequently deleted is intentional"; discord.py documents the
                # resulting NotFound on Messageable.send).
                raise ApiError(404, "Unknown Message", 10008)
        sent = self._new_bot_message(cid, body)
        if nonce is not None:
            now = time.monotonic()
            # Bounded by the window, in O(1) per send (rebuilding the map past 10,000 nonces made
            # every send O(n) in a long run).
            while self._nonces and now - next(iter(self._nonces.values()))[1] >= NONCE_WINDOW_SECONDS:
                self._nonces.popitem(last=False)
            self._nonces[(cid, nonce)] = (sent.id, now)
            self._nonces.move_to_end((cid, nonce))
        self.world.store(sent.payload)
        # Discord returns the nonce in the create response and the MESSAGE_CREATE event only: it
        # is not stored, so history and GET of the message never carry it (discord.py docs,
        # Message.nonce: "The value used by the discord guild and the client to verify that the
        # message is successfully sent. This is not stored long term within Discord's servers and
        # is only used ephemerally.").
        created = sent.payload if nonce is None else {**sent.payload, "nonce": nonce}
        if self.echo_bot_messages:
            await self._dispatch("MESSAGE_CREATE", created)
        return _json(200, created)

    def _new_bot_message(
        self, cid: int, body: dict[str, Any], extra: dict[str, Any] | None = None
    ) -> SentMessage:
        """Validate a create-message body like Discord and record it as sent by the bot."""
        content = body.get("content") or ""
        embeds = body.get("embeds") or []
        files = body.get("__files__", [])
        components = _validate_components(body.get("components"))
        _validate_content(content, embeds, files, components)
        uploads = _uploads(body)
        ref = body.get("message_reference")
        ref_id = int(ref["message_id"]) if ref and ref.get("message_id") else None
        unknown_ref = ref is not None and ref_id is not None and self.world.find_message(cid, ref_id) is None
        if unknown_ref and (ref or {}).get("fail_if_not_exists", True):
            raise ApiError(400, "Invalid Form Body", 50035, {"message_reference": {"_errors": [
                {"code": "REPLIES_UNKNOWN_MESSAGE", "message": "Unknown message"}]}})
        # A reply to a message that no longer exists, sent with fail_if_not_exists=false, is
        # posted as a plain message: Discord drops the reference (API docs, Message Reference:
        # "fail_if_not_exists: when sending, whether to error if the referenced message doesn't
        # exist instead of sending as a normal (non-reply) message").
        payload = self.world.message_payload(
            cid, self.world.bot, content, embeds=embeds, reference_message_id=None if unknown_ref else ref_id,
            attachments=[{"filename": name, "size": len(data), "content_type": _content_type(name)}
                         for name, data in uploads] or [{"filename": f} for f in files],
            flags=int(body.get("flags") or 0), extra={**(extra or {}), "components": components},
        )
        sent = SentMessage(
            int(payload["id"]), cid, content, embeds, body.get("allowed_mentions"), ref,
            int(body.get("flags") or 0), payload, attachments=list(files), files=dict(uploads),
        )
        pings = sent.pings
        payload["mention_everyone"] = "everyone" in pings
        payload["mention_roles"] = sorted(p[5:] for p in pings if p.startswith("role:"))
        for ping in sorted(pings):
            if ping.startswith("user:"):
                with contextlib.suppress(KeyError):
                    payload["mentions"].append(self.world.user(int(ping[5:])).payload())
        self._sent.setdefault(cid, []).append(sent)
        self._sent_by_id[sent.id] = sent
        self._sent_log.append(sent)
        return sent

    def _check_can_read(self, cid: int) -> None:
        """Reading messages of a guild channel needs View Channel and Read Message History.

        Discord's docs say a bot without Read Message History gets no messages; the API answers
        403 {"message": "Missing Access", "code": 50001} (discord/discord-api-docs#7399,
        machineonamission/mediaforge#242 and #264: ``channel.history`` raising Forbidden 50001
        for a bot without "read message history"), so the emulator does that.
        """
        if not self.world.is_guild_channel(cid):
            return
        perms = self.world.channel_permissions(self.world.bot, cid)
        if not perms & VIEW_CHANNEL or not perms & READ_MESSAGE_HISTORY:
            raise ApiError(403, "Missing Access", 50001)

    def _check_can_post(self, cid: int) -> None:
        """A DM to a user who accepts none from the bot: 403 {"message": "Cannot send messages to
        this user", "code": 50007} (discord-api-docs ``Opcodes_and_Status_Codes.md``, JSON error
        code 50007). Opening the DM channel itself succeeds."""
        recipient = self.world.dm_recipient(cid)
        if recipient is not None and recipient in self.world.closed_dms:
            raise ApiError(403, "Cannot send messages to this user", 50007)

    def _check_can_attach(self, cid: int, body: dict[str, Any]) -> None:
        """Uploading files to a guild channel needs Attach Files ("Allows for uploading images and
        files", discord-api-docs ``docs/topics/Permissions.md``); without it Discord answers 403
        {"message": "Missing Permissions", "code": 50013}."""
        if not body.get("__uploads__") or not self.world.is_guild_channel(cid):
            return
        if not self.world.channel_permissions(self.world.bot, cid) & ATTACH_FILES:
            raise ApiError(403, "Missing Permissions", 50013)

    async def _get_history(self, request: web.Request, body: Any) -> web.Response:
        cid = self._channel(request)
        self._check_can_read(cid)
        q = request.query
        limit = max(1, min(100, int(q.get("limit", 50))))
        before = int(q["before"]) if "before" in q else None
        after = int(q["after"]) if "after" in q else None
        found = self.world.history(cid, limit=limit, before=before, after=after)
        return _json(200, [self.world.refreshed(m) for m in found])

    async def _get_message(self, request: web.Request, body: Any) -> web.Response:
        self._check_can_read(self._channel(request))
        return _json(200, self.world.refreshed(self._message(request)[1]))

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        """``GET`` of an attachment (signed: 404 once ``ex`` has passed or the message was deleted)
        or of a media-proxied embed image; faults target ``"cdn"`` (5xx, ``latency``, ``drop``)."""
        record = RecordedRequest("GET", "cdn", request.path, None, time.monotonic(), dict(request.query))
        self.requests.append(record)
        fault = self.faults.pick("cdn", kinds=REST_FAULT_KINDS - {"429"})
        response = await self._rest_fault(request, fault, record) if fault else None
        if response is None:
            if request.path.startswith("/external/"):
                blob = self.world.blobs.get(int(request.match_info["key"]))
            else:
                blob = self.world.cdn_blob(request.path, dict(request.query))
            if blob is None:
                # What Discord's CDN answers for an expired, unsigned or deleted attachment.
                response = web.Response(status=404, text="This content is no longer available.")
            else:
                response = web.Response(
                    status=200, body=blob.data, headers={"Content-Type": blob.content_type}
                )
        record.status = response.status if record.fault != "drop" else None
        await self._notify()
        return response

    async def _edit_message(self, request: web.Request, body: Any) -> web.Response:
        cid, message = self._message(request)
        if message["author"]["id"] != str(self.bot_user_id):
            raise ApiError(403, "Cannot edit a message authored by another user", 50005)
        body = body or {}
        if body.get("__uploads__"):
            self._check_can_attach(cid, body)
        self._check_edit(message, body)
        self._apply_edit(message, body, cid)
        if self.echo_bot_messages:
            await self._dispatch("MESSAGE_UPDATE", message)
        return _json(200, message)

    @staticmethod
    def _check_edit(message: dict[str, Any], body: dict[str, Any]) -> None:
        """Refuse an edit that leaves what Discord refuses (too long, nothing to show, bad components)."""
        if "components" in body:
            _validate_components(body["components"])
        if "content" in body or "attachments" in body:
            content = body["content"] if "content" in body else message.get("content")
            kept = body["attachments"] if "attachments" in body else message.get("attachments")
            components = body["components"] if "components" in body else message.get("components")
            _validate_content(content or "", body.get("embeds", message["embeds"]),
                              [a for a in kept or [] if isinstance(a, dict)], components or [])

    def _apply_edit(self, message: dict[str, Any], body: dict[str, Any], cid: int | None = None) -> None:
        for key in ("content", "embeds", "flags", "components"):
            if key in body and body[key] is not None:
                message[key] = body[key]
        sent = self._sent_by_id.get(int(message["id"]))
        if "attachments" in body and cid is not None:
            # The attachments become those listed: earlier ones named by their id stay, new ones
            # ("id": n for the upload files[n]) are added (Edit Message, "attachments").
            earlier = {str(a["id"]): a for a in message.get("attachments") or []}
            uploads = dict(_uploads(body))
            kept: list[dict[str, Any]] = []
            for entry in body["attachments"] or []:
                if str(entry.get("id")) in earlier:
                    kept.append(earlier[str(entry["id"])])
                elif entry.get("filename") in uploads:
                    name = str(entry["filename"])
                    spec = {"filename": name, "data": uploads[name], "content_type": _content_type(name)}
                    kept.append(self.world._attachment(spec, cid))
            message["attachments"] = kept
            if sent is not None:
                names = {a["filename"] for a in kept}
                sent.files = {n: d for n, d in {**sent.files, **uploads}.items() if n in names}
                sent.attachments = [a["filename"] for a in kept]
        message["edited_timestamp"] = now_iso()
        if sent is not None:
            sent.edits.append(body)
            sent.content = message["content"]
            sent.embeds = message["embeds"]

    async def _delete_message(self, request: web.Request, body: Any) -> web.Response:
        cid, message = self._message(request)
        await self._remove(cid, message, echo=self.echo_bot_messages)
        return web.Response(status=204)

    async def _remove(self, cid: int, message: dict[str, Any], *, echo: bool = True) -> None:
        """Delete a stored message (flagging the bot's record) and, with ``echo``, dispatch MESSAGE_DELETE."""
        self.world.delete_message(cid, int(message["id"]))
        sent = self._sent_by_id.get(int(message["id"]))
        if sent is not None:
            sent.deleted = True
        if echo:
            event = {"id": message["id"], "channel_id": message["channel_id"]}
            if "guild_id" in message:
                event["guild_id"] = message["guild_id"]
            await self._dispatch("MESSAGE_DELETE", event)
        await self._notify()

    async def _add_reaction(self, request: web.Request, body: Any) -> web.Response:
        _, message = self._message(request)
        emoji = request.match_info["emoji"]
        self.world.reactions.setdefault(int(message["id"]), {}).setdefault(emoji, set()).add(self.bot_user_id)
        return web.Response(status=204)

    async def _pin_message(self, request: web.Request, body: Any) -> web.Response:
        _, message = self._message(request)
        message["pinned"] = True
        return web.Response(status=204)

    async def _remove_reaction(self, request: web.Request, body: Any) -> web.Response:
        _, message = self._message(request)
        users = self.world.reactions.get(int(message["id"]), {}).get(request.match_info["emoji"])
        if users is not None:
            users.discard(self.bot_user_id)
        return web.Response(status=204)

    def _command_scope(self, request: web.Request) -> int | None:
        if int(request.match_info["app_id"]) != self.application_id:
            raise ApiError(403, "Missing Access", 50001)
        guild = request.match_info.get("guild_id")
        if guild is not None and int(guild) not in self.world.guilds:
            raise ApiError(403, "Missing Access", 50001)
        return int(guild) if guild is not None else None

    async def _get_commands(self, request: web.Request, body: Any) -> web.Response:
        return _json(200, self.commands.get(self._command_scope(request), []))

    async def _put_commands(self, request: web.Request, body: Any) -> web.Response:
        scope = self._command_scope(request)
        stored = []
        for command in body or []:
            item = {
                "id": str(self._command_id(command["name"])),
                "application_id": str(self.application_id),
                "version": str(self.world.snowflake()),
                "type": 1,
                "description": "",
                "options": [],
                "default_member_permissions": None,
                "nsfw": False,
            } | command
            if scope is not None:
                item["guild_id"] = str(scope)
            stored.append(item)
        self.commands[scope] = stored
        return _json(200, stored)

    # --- interactions ---------------------------------------------------------------------------------------

    def _interaction(self, token: str) -> InteractionRecord:
        record = self._by_token.get(token)
        if record is None:
            raise ApiError(404, "Unknown Webhook", 10015)
        return record

    async def _callback(self, request: web.Request, body: Any) -> web.Response:
        record = self._interaction(request.match_info["token"])
        if int(request.match_info["interaction_id"]) != record.id:
            raise ApiError(404, "Unknown interaction", 10062)
        if record.acknowledged:
            raise ApiError(400, "Interaction has already been acknowledged.", 40060)
        if time.monotonic() - record.created > self.interaction_deadline:
            # Discord gives a bot 3 s to acknowledge; after that the interaction is gone
            raise ApiError(404, "Unknown interaction", 10062)
        body = body or {}
        kind = int(body.get("type", 0))
        data = body.get("data") or {}
        if kind == AUTOCOMPLETE_RESULT:
            _validate_choices(data)
        elif kind == MODAL:
            _validate_modal(data)
        record.events.append(("callback", body))
        record.callback_type = kind
        record.callback_data = data
        resource: dict[str, Any] = {"type": kind}
        component = record.message_id is not None
        if kind in (6, 7) and not component:
            raise ApiError(400, "Invalid Form Body", 50035, {"type": {"_errors": [
                {"code": "INTERACTION_RESPONSE_TYPE_INVALID", "message": "Only components can update"}]}})
        if kind in (6, 7):
            assert record.message_id is not None
            message = self.world.find_message(record.channel_id, record.message_id)
            if message is None:
                raise ApiError(404, "Unknown Message", 10008)
            if kind == 7:
                self._check_edit(message, data)
                self._apply_edit(message, data, record.channel_id)
                if self.echo_bot_messages:
                    await self._dispatch("MESSAGE_UPDATE", message)
            record.original = message
            resource["message"] = message
        if kind in (4, 5):
            # Discord creates the original response now: the answer (4) or a "thinking" message (5)
            content = data.get("content", "") if kind == 4 else ""
            if kind == 4:
                _validate_content(content or "", data.get("embeds") or [], body.get("__files__", []))
                record.events.append(("callback_message", data))
            message = self.world.message_payload(
                record.channel_id, self.world.bot, content or "", embeds=data.get("embeds"),
                flags=int(data.get("flags") or 0) | (128 if kind == 5 else 0),
                extra={"interaction_metadata": {"id": str(record.id), "type": 2,
                                                "user": self.world.user(record.user_id).payload()},
                       "webhook_id": str(self.application_id), "application_id": str(self.application_id)},
            )
            record.original = message
            resource["message"] = message
        if "with_response" not in request.query:
            return web.Response(status=204)
        return _json(200, {
            "interaction": {
                "id": str(record.id),
                "type": 2,
                "response_message_id": record.original["id"] if record.original else None,
                "response_message_loading": kind == 5,
                "response_message_ephemeral": bool(int(data.get("flags") or 0) & EPHEMERAL),
            },
            "resource": resource,
        })

    def _hook_record(self, request: web.Request) -> InteractionRecord:
        if int(request.match_info["app_id"]) != self.application_id:
            raise ApiError(404, "Unknown Webhook", 10015)
        record = self._interaction(request.match_info["token"])
        if time.monotonic() - record.created >= self.interaction_token_lifetime:
            # the token has expired (see INTERACTION_TOKEN_LIFETIME_SECONDS): follow-ups, and
            # getting, editing or deleting the original or a follow-up, are all refused
            raise ApiError(401, "Invalid Webhook Token", 50027)
        if not record.acknowledged:
            raise ApiError(404, "Unknown Webhook", 10015)  # Discord has no webhook until the callback
        return record

    async def _execute_webhook(self, request: web.Request, body: Any) -> web.Response:
        """Execute Webhook: a message in the webhook's channel, authored by the webhook (a bot user
        named after it, with ``webhook_id``). 204 unless ``?wait=true``, then the message (Discord's
        Execute Webhook). A wrong token: 401 50027 Invalid Webhook Token."""
        webhook = self.webhooks[int(request.match_info["app_id"])]
        if not secrets.compare_digest(request.match_info["token"], webhook.token):
            raise ApiError(401, "Invalid Webhook Token", 50027)
        body = body or {}
        content = body.get("content") or ""
        embeds = body.get("embeds") or []
        _validate_content(content, embeds, body.get("__files__", []))
        author = UserRecord(webhook.id, str(body.get("username") or webhook.name), bot=True)
        payload = self.world.message_payload(
            webhook.channel_id, author, content, embeds=embeds, extra={"webhook_id": str(webhook.id)}
        )
        sent = SentMessage(int(payload["id"]), webhook.channel_id, content, embeds,
                           body.get("allowed_mentions"), None, int(body.get("flags") or 0), payload)
        webhook.messages.append(sent)
        self.world.store(payload)
        await self._dispatch("MESSAGE_CREATE", payload)
        if request.query.get("wait", "").lower() in ("true", "1"):  # discord.py sends wait=1
            return _json(200, payload)
        return web.Response(status=204)

    async def _followup(self, request: web.Request, body: Any) -> web.Response:
        if self._route_name("followup", request) == "webhook":
            return await self._execute_webhook(request, body)
        record = self._hook_record(request)
        body = body or {}
        extra = {"webhook_id": str(self.application_id), "application_id": str(self.application_id)}
        sent = self._new_bot_message(record.channel_id, body, extra)
        if sent.ephemeral:
            # ephemeral messages are only in the interaction's record, never in channel history
            self._sent[record.channel_id].remove(sent)
        else:
            self.world.store(sent.payload)
        record.followups.append(sent)
        record.events.append(("followup", body))
        return _json(200, sent.payload)

    def _hook_message(self, request: web.Request) -> tuple[InteractionRecord, dict[str, Any]]:
        record = self._hook_record(request)
        mid = request.match_info["message_id"]
        if mid == "@original":
            if record.original is None:
                raise ApiError(404, "Unknown Message", 10008)
            return record, record.original
        for sent in record.followups:
            if str(sent.id) == mid:
                return record, sent.payload
        raise ApiError(404, "Unknown Message", 10008)

    async def _get_hook_message(self, request: web.Request, body: Any) -> web.Response:
        return _json(200, self._hook_message(request)[1])

    async def _edit_hook_message(self, request: web.Request, body: Any) -> web.Response:
        record, message = self._hook_message(request)
        body = body or {}
        if "content" in body:
            _validate_content(body["content"] or "", body.get("embeds") or message["embeds"], [])
        self._apply_edit(message, body)
        message["flags"] = int(message.get("flags", 0)) & ~128  # no longer "thinking"
        if request.match_info["message_id"] == "@original":
            record.events.append(("edit_original", body))
        else:
            record.events.append(("edit_followup", body))
        return _json(200, message)

    async def _delete_hook_message(self, request: web.Request, body: Any) -> web.Response:
        record, message = self._hook_message(request)
        record.events.append(("delete", {"message_id": message["id"]}))
        if message is record.original:
            record.original = None
        return web.Response(status=204)


def _shard_pair(value: Any) -> tuple[int, int] | None:
    """IDENTIFY's ``shard`` as ``(shard_id, num_shards)``: ``(0, 1)`` when absent, None when invalid."""
    if value is None:
        return (0, 1)
    try:
        shard_id, count = (int(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (shard_id, count) if count >= 1 and 0 <= shard_id < count else None


def _resource(request: web.Request) -> str:
    """The top-level resource a route's bucket is counted per: the channel, guild or webhook."""
    info = request.match_info
    for key in ("channel_id", "guild_id", "token", "interaction_id"):
        if key in info:
            return info[key]
    return ""


def _rate_limited(verdict: RateVerdict, *, via: bool = True) -> web.Response:
    """Discord's 429: the JSON body discord.py reads ``retry_after`` from, and the headers.

    ``Via`` marks an answer from Discord's API (discord.py takes a 429 without it, or with a
    non-JSON body, for a Cloudflare ban and raises instead of waiting).
    """
    is_global = verdict.scope == "global"
    body = {"message": "You are being rate limited.", "retry_after": round(verdict.retry_after, 3),
            "global": is_global}
    headers = {"Content-Type": "application/json", **verdict.headers}
    if via:
        headers["Via"] = "1.1 google"
    return web.Response(status=429, body=json.dumps(body).encode(), headers=headers)


def _json(status: int, data: Any) -> web.Response:
    # discord.py parses JSON only when Content-Type is exactly "application/json" (no charset)
    headers = {"Content-Type": "application/json"}
    return web.Response(status=status, body=json.dumps(data).encode(), headers=headers)


def _pings(content: str, allowed: dict[str, Any] | None, replied_to: dict[str, Any] | None) -> set[str]:
    """Apply Discord's allowed_mentions rules; see :attr:`SentMessage.pings`."""
    parse = {"everyone", "users", "roles"} if allowed is None else set(allowed.get("parse") or [])
    users = {str(u) for u in (allowed or {}).get("users") or []}
    roles = {str(r) for r in (allowed or {}).get("roles") or []}
    found: set[str] = set()
    if "everyone" in parse and ("@everyone" in content or "@here" in content):
        found.add("everyone")
    for uid in re.findall(r"<@!?(\d+)>", content):
        if "users" in parse or uid in users:
            found.add(f"user:{uid}")
    for rid in re.findall(r"<@&(\d+)>", content):
        if "roles" in parse or rid in roles:
            found.add(f"role:{rid}")
    # a reply pings its author unless allowed_mentions is given without replied_user=true
    if replied_to and (allowed is None or allowed.get("replied_user", False)):
        found.add(f"user:{replied_to['author']['id']}")
    return found


def _validate_content(
    content: str, embeds: list[Any], files: list[Any], components: list[Any] | None = None
) -> None:
    """Refuse what Discord refuses: over 2,000 characters (50035), or nothing to show (50006).

    A message needs content, an embed or a file (Discord's create-message docs: at least one of
    content, embeds, sticker_ids, components, files or poll). Content that is only whitespace
    counts as none: Discord answers 400 "Cannot send an empty message" (code 50006) to a bare
    "\n" (NITKC-DEV/Kisarazu-Multi-Manager#32) and to spaces (Together-Java/JShellBot#28). A
    zero-width space (U+200B) is not whitespace: bridges send it to make a blank line postable
    (qaisjp/go-discord-irc#133), so it is accepted here too. Whitespace is what ``str.strip``
    removes (Unicode White_Space): Discord does not document its check, and its API is Python
    (discord.com/blog/cost-attribution-in-discords-api), so that is the likeliest rule.
    """
    if len(content) > 2000:
        raise ApiError(400, "Invalid Form Body", 50035, {"content": {"_errors": [
            {"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 2000 or fewer in length."}]}})
    if not content.strip() and not embeds and not files and not components:
        raise ApiError(400, "Cannot send an empty message", 50006)


BUTTON = 2
ACTION_ROW = 1
LINK_STYLE = 5


def _validate_components(components: Any) -> list[dict[str, Any]]:
    """Refuse components Discord refuses (400 50035): top-level action rows only, at most five, each
    with one to five buttons; a button of styles 1-4 needs a ``custom_id`` (at most 100 characters,
    unique in the message), a link button (style 5) a ``url`` and no ``custom_id``. Returns them."""
    if components is None:
        return []

    def invalid(why: str) -> ApiError:
        return ApiError(400, "Invalid Form Body", 50035, {"components": {"_errors": [
            {"code": "COMPONENT_INVALID", "message": why}]}})

    if not isinstance(components, list) or len(components) > 5:
        raise invalid("at most 5 action rows")
    seen: set[str] = set()
    for row in components:
        if not isinstance(row, dict) or row.get("type") != ACTION_ROW:
            raise invalid("top-level components must be action rows")
        items = row.get("components")
        if not isinstance(items, list) or not 1 <= len(items) <= 5:
            raise invalid("an action row holds 1 to 5 components")
        for item in items:
            if not isinstance(item, dict) or item.get("type") != BUTTON:
                raise invalid("only buttons are emulated")
            if item.get("style") == LINK_STYLE:
                if "custom_id" in item or not item.get("url"):
                    raise invalid("a link button has a url and no custom_id")
                continue
            custom_id = item.get("custom_id")
            if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= 100 or custom_id in seen:
                raise invalid("a button needs a unique custom_id of 1 to 100 characters")
            seen.add(custom_id)
    return components


ATTACH_FILES = 1 << 15  # the permission to upload files (discord-api-docs, Permissions)
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
"""Discord's upload limit per file for a bot without boosts (10 MiB since 2024); a larger one gets
413 with JSON error code 40005, "Request entity too large" (discord-api-docs, JSON Error Codes)."""


def _uploads(body: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The files of a multipart create-message body, as Discord reads them: each ``files[n]`` part is
    the attachment whose ``id`` is ``n`` in ``payload_json.attachments``, named by that entry's
    ``filename`` ("Attachment id, for new attachments this must match the n in files[n]":
    discord-api-docs, Message resource, Attachment request structure; discord.py's
    ``handle_message_parameters`` sends exactly that). Raises 413/40005 over ``MAX_UPLOAD_BYTES``."""
    entries = [a for a in body.get("attachments") or [] if isinstance(a, dict)]
    named = {str(a.get("id")): a.get("filename") for a in entries}
    out = []
    for upload in body.get("__uploads__", []):
        field_name, data = str(upload["field"]), bytes(upload["data"])
        if len(data) > MAX_UPLOAD_BYTES:
            raise ApiError(413, "Request entity too large", 40005)
        index = field_name[len("files["):-1] if field_name.startswith("files[") else field_name
        out.append((str(named.get(index) or upload["filename"]), data))
    return out


def _content_type(filename: str) -> str:
    """The content type Discord reports for an uploaded file: from its extension, text with its charset."""
    guessed = mimetypes.guess_type(filename)[0] or ("text/markdown" if filename.endswith(".md") else None)
    kind = guessed or "application/octet-stream"
    return f"{kind}; charset=utf-8" if kind.startswith("text/") else kind


def _latency_seconds(params: dict[str, Any]) -> float:
    return float(params.get("seconds", params.get("delay", 1.0)))


@dataclass(frozen=True)
class ChannelRef:
    """A channel (or thread) as a slash-command option value: sent as type 7 with its resolved data."""

    id: int


def _resolved_channels(options: dict[str, Any]) -> list[int]:
    """The ids of every ``ChannelRef`` in (nested) options."""
    found: list[int] = []
    for value in options.values():
        if isinstance(value, dict):
            found += _resolved_channels(value)
        elif isinstance(value, ChannelRef):
            found.append(value.id)
    return found


def _focus(options: list[dict[str, Any]], focused: str | None) -> list[dict[str, Any]]:
    """``options`` with option ``focused`` (at any depth) marked as the one being typed: an
    autocomplete sends its value as typed so far, always as a string (discord-api-docs,
    Autocomplete: "the focused option ... value will be the partial user input")."""
    if focused is None:
        return options
    out = []
    for option in options:
        if "options" in option:
            option = {**option, "options": _focus(option["options"], focused)}
        elif option["name"] == focused:
            option = {**option, "value": str(option["value"]), "type": option["type"], "focused": True}
        out.append(option)
    return out


AUTOCOMPLETE_RESULT = 8
MODAL = 9
HAS_THREAD = 1 << 5  # message flag: a thread was started from it
MAX_CHOICES = 25  # autocomplete choices, at most (discord-api-docs, Autocomplete)
MODAL_TITLE_MAX = 45
TEXT_INPUT_MAX = 4000


def _validate_choices(data: dict[str, Any]) -> None:
    """Refuse autocomplete results Discord refuses: more than 25 choices, names of 1 to 100
    characters, string values of at most 100 (400 50035, "Invalid Form Body")."""
    choices = data.get("choices")
    bad = not isinstance(choices, list) or len(choices) > MAX_CHOICES or any(
        not isinstance(c, dict) or not 1 <= len(str(c.get("name", ""))) <= 100
        or (isinstance(c.get("value"), str) and len(c["value"]) > 100)
        for c in choices or []
    )
    if bad:
        raise ApiError(400, "Invalid Form Body", 50035, {"data": {"choices": {"_errors": [
            {"code": "BASE_TYPE_BAD_LENGTH", "message": "Must be between 1 and 25 in length."}]}}})


def _modal_inputs(modal: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A modal's text inputs by custom id, each marked ``__labelled`` when sent inside a label
    (type 18, ``component``) rather than an action row (type 1, ``components``)."""
    found: dict[str, dict[str, Any]] = {}
    for top in modal.get("components") or []:
        if top.get("type") == 18:
            inner, labelled = [top.get("component") or {}], True
        else:
            inner, labelled = top.get("components") or [], False
        for item in inner:
            if item.get("type") == 4:
                found[str(item.get("custom_id"))] = {**item, "__labelled": labelled}
    return found


def _validate_modal(data: dict[str, Any]) -> None:
    """Refuse a modal Discord refuses (discord-api-docs, Interaction Response "Modal" and Text
    Input): a title of 1 to 45 characters, 1 to 5 components, each text input with a custom id, a
    label of at most 45 characters (on the input or its label) and max_length of at most 4000."""
    inputs = _modal_inputs(data)
    components = data.get("components") or []
    title = str(data.get("title") or "")
    bad = not data.get("custom_id") or not 1 <= len(title) <= MODAL_TITLE_MAX or not 1 <= len(components) <= 5
    for top in components:
        label = top.get("label") if top.get("type") == 18 else None
        for item in ([top.get("component")] if top.get("type") == 18 else top.get("components") or []):
            if not isinstance(item, dict) or item.get("type") != 4:
                continue
            text = label if label is not None else item.get("label")
            bad = bad or not text or len(str(text)) > MODAL_TITLE_MAX
            bad = bad or int(item.get("max_length", TEXT_INPUT_MAX)) > TEXT_INPUT_MAX
            bad = bad or len(str(item.get("value") or "")) > int(item.get("max_length", TEXT_INPUT_MAX))
    if bad or not inputs:
        raise ApiError(400, "Invalid Form Body", 50035, {"data": {"_errors": [
            {"code": "MODAL_INVALID", "message": "Invalid modal."}]}})


def _options(options: dict[str, Any]) -> list[dict[str, Any]]:
    return [_option(k, v) for k, v in options.items()]


def _option(name: str, value: Any) -> dict[str, Any]:
    """An application-command option as Discord sends it, typed from the Python value."""
    if isinstance(value, dict):
        # A group holds only subcommands; a subcommand holds only plain values (or nothing).
        group = bool(value) and all(isinstance(v, dict) for v in value.values())
        return {"name": name, "type": 2 if group else 1, "options": _options(value)}
    if isinstance(value, ChannelRef):
        return {"name": name, "type": 7, "value": str(value.id)}
    if isinstance(value, bool):
        kind = 5
    elif isinstance(value, int):
        kind = 4
    elif isinstance(value, float):
        kind = 10
    else:
        kind, value = 3, str(value)
    return {"name": name, "type": kind, "value": value}


async def _read_body(request: web.Request) -> Any:
    """The JSON body, or ``payload_json`` of a multipart body: the uploaded files' names under
    ``__files__``, and the files themselves (form field, name, bytes) under ``__uploads__``."""
    if not request.can_read_body:
        return None
    if request.content_type.startswith("multipart/"):
        form = await request.post()
        body = json.loads(str(form.get("payload_json", "{}")))
        fields = [(k, v) for k, v in form.items() if k != "payload_json"]
        body["__files__"] = [getattr(v, "filename", k) for k, v in fields]
        body["__uploads__"] = [
            {"field": k, "filename": getattr(v, "filename", k), "data": v.file.read()}
            for k, v in fields if isinstance(v, web.FileField)
        ]
        return body
    raw = await request.read()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
