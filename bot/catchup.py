"""Catch-up: after a reconnect that could not resume, find what users said to the bot meanwhile.

Discord keeps a dropped gateway session resumable for a few minutes only ("the session will
remain active and timeout after a few minutes", discord-api-docs ``docs/topics/Gateway.md``).
A RESUME in time replays every missed event; a later one gets op 9 Invalid Session, discord.py
IDENTIFIEs afresh, and the messages sent in between are never delivered. discord.py tells the
two apart: ``parse_ready`` dispatches ``connect`` (and ``ready`` once the guilds arrived) for
every IDENTIFY, ``parse_resumed`` only ``resumed`` (``discord/state.py``, 2.7).

So the client keeps a ``Watch``: the channels (and threads, and DMs) where the bot was recently
addressed or posted, each with the last message id it saw there. On a ``connect`` after the
first one (a fresh IDENTIFY in a process that had been connected), the watch is copied, and once
the client is ready ``Catchup`` reads each of those channels after that message, through
``DiscordIO.history`` (the ``discord.read`` breaker and the call timeout), and hands the messages
addressed to the bot to the normal intake, oldest first. Intake drops what it has seen (in
memory, and durably by message id), so nothing is answered twice.

Bounds (constants, not settings: they only limit how far back a reconnect looks):
``MAX_CHANNELS`` watched channels (the least recently active leave first), ``MAX_MESSAGES`` read
per channel, and ``MAX_AGE``: a channel not active for that long is not read, and a message
older than that is not answered (an hour-old question out of the blue helps nobody).

A read that fails (no Read Message History there: 403 50001; Discord down; the breaker open)
skips that channel, with a log line; its messages stay unanswered, like any the bot never saw.

While a channel waits for its catch-up or is being read, its live messages wait behind it
(``defer``, at most ``MAX_MESSAGES`` a channel) and are handed over after the missed ones, so a
conversation is answered in the order it was written.

A process that takes over a shard (a sharded bot restarted, or started after another died) has
no watch of its own: ``take_over`` notes the channels of its shards in which the database holds
messages accepted in the last ``MAX_AGE`` (by any process), each from the newest one there, and
the first ``ready`` reads them like a reconnect.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import discord
import structlog

from resilience.clock import Clock
from resilience.errors import classify

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.catchup")

MAX_CHANNELS = 50
"""Channels the watch keeps, the most recently active ones."""
MAX_MESSAGES = 100
"""Messages read per channel after the last one the bot saw there (one page of Discord's history)."""
MAX_AGE = 3600.0
"""Seconds: channels not active for this long are not read, messages older than this not answered."""
TAKE_OVER_CHANNELS = 1000
"""Channels a process taking over shards reads back at most (those active most recently first)."""
CONCURRENCY = 4
"""Channels caught up at once (read, then answered in order): a reconnect must not become a burst."""


@dataclass(slots=True)
class _Watched:
    last_id: int  # the newest message id seen in the channel
    active_at: float  # wall time the bot was last addressed or posted there


class Watch:
    """The channels the bot was active in, each with the last message id it saw there; bounded.

    ``active`` marks a channel (the bot was addressed there, or posted there); ``seen`` only moves
    the mark of a watched channel forward. Both are O(1) and do no I/O: ``seen`` runs for every
    message the gateway delivers.
    """

    def __init__(self, clock: Clock, *, max_channels: int = MAX_CHANNELS) -> None:
        if max_channels < 1:
            raise ValueError("max_channels must be at least 1")
        self._clock = clock
        self.max_channels = max_channels
        self._channels: OrderedDict[int, _Watched] = OrderedDict()

    def __len__(self) -> int:
        return len(self._channels)

    def active(self, channel_id: int, message_id: int) -> None:
        """The bot was addressed, or posted, in ``channel_id`` with message ``message_id``."""
        watched = self._channels.get(channel_id)
        now = self._clock.time()
        if watched is None:
            self._channels[channel_id] = _Watched(message_id, now)
            if len(self._channels) > self.max_channels:
                self._channels.popitem(last=False)
            return
        watched.last_id = max(watched.last_id, message_id)
        watched.active_at = now
        self._channels.move_to_end(channel_id)

    def seen(self, channel_id: int, message_id: int) -> None:
        """Any message in ``channel_id``: moves a watched channel's mark, ignores the others."""
        watched = self._channels.get(channel_id)
        if watched is not None and message_id > watched.last_id:
            watched.last_id = message_id

    def snapshot(self, *, max_age: float = MAX_AGE) -> dict[int, int]:
        """Channel id -> the message id to read after: channels active within ``max_age``, each
        from its mark or from ``max_age`` ago, whichever is later."""
        now = self._clock.time()
        floor = discord.utils.time_snowflake(datetime.fromtimestamp(now - max_age, UTC))
        return {
            channel_id: max(watched.last_id, floor)
            for channel_id, watched in self._channels.items()
            if now - watched.active_at <= max_age
        }


Handler = Callable[[discord.Message], Awaitable[None]]


class Catchup:
    """Reads what the bot missed after each fresh IDENTIFY and feeds it to ``handle`` (intake).

    The client calls ``connected()`` from ``on_connect`` (it copies the watch, at the instant of
    READY, before any event of the new session moves a mark) and ``ready()`` from ``on_ready``
    (the guilds are cached: the reads start). ``close()`` stops it; safe to call twice.
    """

    def __init__(
        self,
        app: Application,
        handle: Handler,
        is_for_me: Callable[[discord.Message], bool],
        *,
        max_channels: int = MAX_CHANNELS,
        max_messages: int = MAX_MESSAGES,
        max_age: float = MAX_AGE,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self.app = app
        self.watch = Watch(app.clock, max_channels=max_channels)
        self._handle = handle
        self._is_for_me = is_for_me
        self.max_messages = max_messages
        self.max_age = max_age
        self._slots = asyncio.Semaphore(concurrency)
        self._connects = 0
        # channel -> the message id to read after (None: nothing to read, only live messages held)
        self._pending: dict[int, int | None] = {}
        self._holding_all = False  # taking over: every live message waits until the first ready
        self._reading: set[int] = set()  # channels being read now
        self._deferred: dict[int, list[discord.Message]] = {}  # live messages waiting behind them
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def connected(self) -> None:
        """A session was IDENTIFIED. After the first one, what came before it may be lost: note
        where to read from (merged with a catch-up not started yet, keeping the older mark)."""
        self._connects += 1
        if self._connects == 1:
            return
        for channel_id, after in self.watch.snapshot(max_age=self.max_age).items():
            self._note(channel_id, after)
        log.info("catchup.reidentified", channels=len(self._pending))

    def _note(self, channel_id: int, after: int | None) -> None:
        """Read ``channel_id`` after ``after`` (the older mark wins; None: only hand over what waits)."""
        if channel_id not in self._pending or self._pending[channel_id] is None:
            self._pending[channel_id] = after
        elif after is not None:
            self._pending[channel_id] = min(after, self._pending[channel_id] or after)

    def take_over(self, marks: dict[int, int], *, hold: bool = False) -> None:
        """Read these channels (id -> the message id to read after) at the next ready, as after a
        reconnect: a process taking over shards another process held. With ``hold``, every live
        message waits until then (the channels to read are known only once the guilds arrived)."""
        for channel_id, after in list(marks.items())[:TAKE_OVER_CHANNELS]:
            self._note(channel_id, after)
        self._holding_all = self._holding_all or hold
        if marks:
            log.info("catchup.taking_over", channels=len(self._pending))

    def defer(self, message: discord.Message) -> bool:
        """Keep a live message of a channel that waits for (or is in) its catch-up, to be handed
        over after the missed ones; False (handle it now) for any other channel, or a full one."""
        channel_id = message.channel.id
        waits = self._holding_all or channel_id in self._pending or channel_id in self._reading
        if self._closing or not waits:
            return False
        waiting = self._deferred.setdefault(channel_id, [])
        if len(waiting) >= self.max_messages:
            return False
        waiting.append(message)
        return True

    def ready(self) -> None:
        """The client is ready: read the noted channels (unless a catch-up is running: it goes on
        with them when it is done); live messages held for a take-over go on in their order."""
        if self._holding_all:
            self._holding_all = False
            for channel_id in list(self._deferred):
                if channel_id not in self._reading:
                    self._note(channel_id, None)
        if self._closing or not self._pending:
            return
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="catchup")

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def stop(self) -> None:
        """Hand no more messages to intake (the one being handled finishes: intake tracks it)."""
        self._closing = True

    async def close(self) -> None:
        """``stop``, then cancel the reads still in progress and wait for them. Safe to call twice."""
        self.stop()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while self._pending and not self._closing:
            pending, self._pending = self._pending, {}
            self._reading.update(pending)  # live messages keep waiting until each channel is read
            results = await asyncio.gather(
                *(self._channel(cid, after) for cid, after in pending.items()), return_exceptions=True
            )
            for result in results:
                if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                    log.error("catchup.bug", exc_info=result)
            fed = sum(n for n in results if isinstance(n, int))
            read = sum(1 for n in results if isinstance(n, int))
            log.info("catchup.done", channels=len(pending), read=read, messages=fed)

    async def _channel(self, channel_id: int, after: int | None) -> int | None:
        """Hand the addressed messages of one channel after ``after`` to intake, oldest first,
        then the live ones that waited behind them; how many were read and handed over (intake
        drops those it has seen), None when unreadable."""
        self._reading.add(channel_id)
        try:
            fed = 0 if after is None else await self._read_channel(channel_id, after)
            # Live messages that came meanwhile, in order; those coming while these are handed
            # over wait too (the channel is still being read until none is left).
            while waiting := self._deferred.pop(channel_id, None):
                for message in waiting:
                    if self._closing:
                        break
                    await self._handle(message)
            return fed
        finally:
            self._reading.discard(channel_id)
            self._deferred.pop(channel_id, None)

    async def _read_channel(self, channel_id: int, after: int) -> int | None:
        async with self._slots:  # a few channels at a time, reading and answering alike
            try:
                channel = await self.app.channel(channel_id)
                messages = await self.app.discord_io.history(
                    channel, after=discord.Object(id=after), limit=self.max_messages
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                code = exc.code if isinstance(exc, discord.HTTPException) else None
                log.warning(
                    "catchup.channel_unreadable",
                    channel_id=channel_id,
                    category=classify(exc).category.value,
                    discord_code=code,
                )
                return None
            if len(messages) >= self.max_messages:
                log.warning("catchup.channel_truncated", channel_id=channel_id, read=len(messages))
            fed = 0
            for message in messages:
                self.watch.seen(channel_id, message.id)
                if self._closing:
                    break
                if self._is_for_me(message):
                    fed += 1
                    await self._handle(message)
            return fed
