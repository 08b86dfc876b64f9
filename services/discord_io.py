"""Everything the bot asks of Discord's REST API, behind one circuit breaker per operation.

``DiscordIO`` sends, edits (and deletes its own messages), reacts and shows the typing indicator
through the breakers ``discord.send``, ``discord.edit``, ``discord.react`` and ``discord.typing``,
and reads (fetch a channel or a user, open a DM, look through a channel's history) through
``discord.read``, each call under a timeout. Why one per operation: Discord rate-limits and
fails them separately, a reaction outage must not stop answers, and a read that hangs must
not hold a queued item until its lease runs out.

Only Discord's failures (5xx, timeouts, dropped connections) count towards opening a breaker.
Permanent ones (403 Missing Permissions, 404 Unknown Channel, 400 too long) are a fact about
one channel or one message, not about Discord: a bot muted in one channel must keep answering
in all the others, so those are excluded and count neither way. So are rate limits: a 429 is
Discord asking for a slower pace on one route (one channel's bucket, say), not a failure, and
one throttled channel must not open ``discord.send`` for every other (a Cloudflare ban of the
whole IP is the exception: see ``not_discords_fault``).

There is no retry loop here. discord.py already retries 429s (with ``Via``) and one 500;
the durable outbound queue is the bot's retry for everything else, so a failed send raises
the original discord.py exception for the pipeline to classify and queue.

Rate limits and the call timeout: discord.py waits out a rate limit of up to
``MAX_RATELIMIT_WAIT`` seconds itself (the client is built with that ``max_ratelimit_timeout``;
``client_options()``) and raises ``discord.RateLimited`` for a longer one, which the caller
queues with its ``retry_after``. The call timeout bounds Discord's answer, not those waits: it
restarts with every request discord.py puts on the wire (aiohttp's trace, the client's
``http_trace``), and while discord.py holds the call for a rate limit (before its request, or
sleeping out a 429) the call has ``MAX_RATELIMIT_WAIT`` more. A call held past that raises
``RateLimitWaitError`` (a ``discord.RateLimited``, not counted), never a breaker-counted timeout.

Every message goes out with ``allowed_mentions_for(mention_user)``: "@everyone", "@here" and
role mentions in Gemini's text never ping anyone, and a user is pinged only when we reply
to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import unicodedata
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import discord
import structlog

from resilience.breakers import Breaker, BreakerBoard
from resilience.clock import Clock, SystemClock
from resilience.context import span
from resilience.errors import CallTimeoutError, Category, classify, parse_duration

if TYPE_CHECKING:
    from services.metrics import Metrics

T = TypeVar("T")

OPERATIONS = ("send", "edit", "react", "typing", "read")
"""The Discord operations that have a breaker each, named ``discord.<operation>``."""

TYPING_DELAY = 0.5
"""Seconds before the typing indicator is first sent: a faster answer needs no indicator.

Not a setting: below half a second nobody waits for a sign of life, and sparing the request
spares Discord's rate limit and the bot a REST round trip on every quick answer."""

MAX_RATELIMIT_WAIT = 30.0
"""The longest rate-limit wait discord.py takes on itself (its ``max_ratelimit_timeout``; 30 s is the
smallest it accepts); a longer one raises ``discord.RateLimited`` and the item is queued instead."""

log = structlog.get_logger(__name__)

Reference = discord.Message | discord.PartialMessage | discord.MessageReference


def allowed_mentions_for(user: discord.abc.Snowflake | None = None) -> discord.AllowedMentions:
    """Mentions a bot message may trigger: nobody, or only ``user`` (also as the replied-to author).

    ``@everyone``, ``@here`` and role mentions never ping, whatever the text says. Use
    ``allowed_mentions_for(None)`` (same as ``AllowedMentions.none()``) as the client default.
    """
    return discord.AllowedMentions(
        everyone=False,
        roles=False,
        users=[user] if user is not None else False,
        replied_user=user is not None,
    )


UNKNOWN_MESSAGE = 10008
"""Discord's JSON error code for "Unknown Message"."""


def is_permanent(exc: BaseException) -> bool:
    """True for failures that retrying cannot fix (``classify`` says not retryable)."""
    return not classify(exc).retryable


def not_discords_fault(exc: BaseException) -> bool:
    """Breaker exclusion: a permanent failure, or a rate limit Discord announced (the breakers count
    neither). A 429 discord.py could not wait out itself, without ``Via`` or with an HTML body, is
    Cloudflare refusing this IP every request for a while: that one counts, so the breaker pauses
    the calls that would only prolong the ban."""
    return isinstance(exc, discord.RateLimited) or not classify(exc).retryable


class RateLimitWaitError(discord.RateLimited):
    """discord.py held a call for Discord's rate limits (before sending it, or sleeping out a 429)
    past the call's deadline: no failure of Discord. ``retry_after`` is Discord's last hint of the
    wait left, or ``MAX_RATELIMIT_WAIT`` when it gave none."""


class EmptyMessageError(ValueError):
    """Content that is only whitespace, with no embed: Discord refuses it (400, code 50006), so it is
    never sent. A caller's bug (an answer with nothing to show gets a sentence instead)."""


@dataclass(frozen=True, slots=True)
class Upload:
    """A file to attach to a message: its name (the extension sets Discord's preview) and bytes."""

    filename: str
    data: bytes

    def file(self) -> discord.File:
        """A fresh ``discord.File`` (one is consumed by each send)."""
        return discord.File(io.BytesIO(self.data), filename=self.filename)


MAX_FILES_PER_MESSAGE = 10
"""Discord takes at most ten attachments per message ("files[n]", Create Message, discord-api-docs)."""


class PartialDeliveryError(Exception):
    """Some chunks of an answer were delivered and the rest were not.

    ``sent`` holds the messages posted in order, ``remaining`` the chunks still to send (queue
    only these; the chunks before them are done, also those skipped as blank or whose earlier
    copy was deleted), ``cause`` the exception that stopped delivery (also ``__cause__``;
    classify ``cause``, not this error, to decide between queueing and giving up).
    """

    def __init__(self, sent: list[discord.Message], remaining: list[str], cause: BaseException) -> None:
        total = len(sent) + len(remaining)
        super().__init__(f"delivered {len(sent)} of {total} chunks; stopped by {type(cause).__name__}")
        self.sent = sent
        self.remaining = remaining
        self.cause = cause


class DownloadTooLargeError(ValueError):
    """A CDN file was larger than the download allowed (``limit`` bytes): nothing was kept."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the file is larger than {limit} bytes")
        self.limit = limit


class DiscordIO:
    """Discord writes behind per-operation breakers, with safe mentions; a registry service.

    ``board`` gets the breakers ``discord.send``/``edit``/``react``/``typing`` if it does not
    have them yet (created with ``not_discords_fault`` excluded; breakers made beforehand are
    used as they are). ``timeout`` (seconds, None for none) bounds Discord's answer to each
    request of a call, inside its breaker, so a hung request counts as a failure (a send that
    timed out may still have been posted: the price of never holding a conversation for ever);
    rate-limit waits do not count against it (see the module's docstring). Build the discord.py
    client with ``client_options()``: without its trace, a call's timeout covers the waits too.
    ``typing_delay`` is how long a block runs before the typing indicator is first sent,
    ``typing_interval`` how often it is renewed (Discord shows it for 10 s); ``clock`` times
    both (a ``FakeClock`` makes them back-to-back). ``rate_limit_wait`` is how long a call may
    be held for rate limits on top of the timeout (``MAX_RATELIMIT_WAIT``; tests shorten it).
    """

    name = "discord_io"
    depends_on: tuple[str, ...] = ()

    def __init__(
        self,
        board: BreakerBoard,
        *,
        metrics: Metrics | None = None,
        clock: Clock | None = None,
        timeout: float | None = 15.0,
        typing_delay: float = TYPING_DELAY,
        typing_interval: float = 7.0,
        rate_limit_wait: float = MAX_RATELIMIT_WAIT,
    ) -> None:
        self._board = board
        self._metrics = metrics
        self._clock = clock or SystemClock()
        self._timeout = timeout
        self._typing_delay = typing_delay
        self._typing_interval = typing_interval
        self._rate_limit_wait = rate_limit_wait
        self._breakers: dict[str, Breaker] = {}
        self._cdn: aiohttp.ClientSession | None = None  # for attachments; opened on first download
        self._traced = False  # whether the client reports its requests (client_options())
        self.http_trace = aiohttp.TraceConfig()
        self.http_trace.on_request_start.append(self._request_started)
        self.http_trace.on_request_end.append(self._request_answered)
        for operation in OPERATIONS:
            name = f"discord.{operation}"
            if name not in board:
                board.add(name, exclude=[not_discords_fault])
                if metrics is not None:
                    metrics.set_breaker_state(name, board[name].state)
            self._breakers[operation] = board[name]
        self.errors: Counter[tuple[str, str]] = Counter()
        """Failures by ``(operation, category)``, for health views and tests."""

    def client_options(self) -> dict[str, Any]:
        """The discord.py client options this service relies on: ``max_ratelimit_timeout`` (longer
        rate limits raise ``discord.RateLimited``) and ``http_trace`` (requests restart the timeout)."""
        wait = max(MAX_RATELIMIT_WAIT, self._rate_limit_wait)
        return {"max_ratelimit_timeout": wait, "http_trace": self.http_trace}

    # -- service protocol --------------------------------------------------------------

    async def start(self) -> None:
        """Nothing to open: discord.py owns the HTTP session."""

    async def stop(self) -> None:
        """Close the CDN session, if a download opened one; safe to call twice."""
        session, self._cdn = self._cdn, None
        if session is not None:
            await session.close()

    def health(self) -> dict[str, Any]:
        """Not ok while ``discord.send`` is open; every breaker's state and the failure counts."""
        return {
            "ok": self._breakers["send"].state != "open",
            "breakers": {b.name: str(b.state) for b in self._breakers.values()},
            "errors": {f"{op}.{category}": n for (op, category), n in sorted(self.errors.items())},
        }

    # -- operations --------------------------------------------------------------------

    async def send(
        self,
        channel: discord.abc.Messageable,
        content: str,
        *,
        reply_to: Reference | None = None,
        mention_user: discord.abc.Snowflake | None = None,
        embed: discord.Embed | None = None,
        nonce: str | None = None,
        files: Sequence[Upload] = (),
        view: discord.ui.View | None = None,
    ) -> discord.Message:
        """Send ``content`` to ``channel`` through ``discord.send`` and return the message.

        With ``reply_to`` the message is a reply that still goes out if the original was
        deleted meanwhile. Only ``mention_user`` can be pinged. ``files`` (at most
        ``MAX_FILES_PER_MESSAGE``) are attached, as a multipart upload. ``view`` puts its
        components (buttons) on the message; a stopped view is only drawn, its clicks are handled
        by the persistent view with the same ``custom_id`` (``bot.views``). Raises discord.py's
        exception (``HTTPException`` family, ``aiohttp.ClientError``), ``CallTimeoutError``
        or ``CircuitOpenError``; the caller classifies and queues. Blank ``content`` without an
        ``embed`` or a file raises ``EmptyMessageError`` before any request (Discord would refuse it).
        """
        if embed is None and not files and not content.strip():
            raise EmptyMessageError("a message of only whitespace: Discord refuses it (50006)")
        if len(files) > MAX_FILES_PER_MESSAGE:
            raise ValueError(f"{len(files)} files: Discord takes at most {MAX_FILES_PER_MESSAGE} per message")
        kwargs: dict[str, Any] = {"allowed_mentions": allowed_mentions_for(mention_user)}
        if reply_to is not None:
            kwargs["reference"] = _lenient(reply_to)
        if embed is not None:
            kwargs["embed"] = embed
        if files:
            kwargs["files"] = [upload.file() for upload in files]
        if view is not None:
            kwargs["view"] = view
        if nonce is not None:
            # discord.py then sets enforce_nonce: a resend with the same nonce within Discord's
            # window returns the message already posted instead of posting it twice.
            kwargs["nonce"] = nonce
        return await self._guard("send", _channel_id(channel), channel.send, content, **kwargs)

    async def send_chunks(
        self,
        channel: discord.abc.Messageable,
        chunks: Sequence[str],
        *,
        reply_to: Reference | None = None,
        mention_user: discord.abc.Snowflake | None = None,
        nonce: str | None = None,
        first_index: int = 0,
        files: Mapping[int, Sequence[Upload]] | None = None,
    ) -> list[discord.Message]:
        """Send an answer split into chunks, in order; the first replies to ``reply_to``.

        ``files`` maps a chunk's number (counted from the answer's first chunk, like the nonces) to
        the files attached to that chunk's message: a resent chunk carries its files again, under
        the same nonce, so Discord does not post it (nor its files) twice.

        ``chunks`` are the answer's chunks from number ``first_index`` on (a resumed delivery);
        only the first chunk of the answer replies and may ping ``mention_user``. With ``nonce``,
        chunk ``i`` is sent with the nonce ``f"{nonce}.{i}"`` (at most 25 characters), so
        resending a chunk Discord already posted does not post it twice. A resend whose first
        copy was deleted meanwhile gets Unknown Message (10008) from Discord, which does not post
        it again: that chunk counts as delivered (someone removed it, and re-posting it without
        the nonce would undo a moderator), and the rest of the answer goes on. A chunk that shows
        nothing (whitespace, and invisible format characters such as zero-width ones) is skipped:
        Discord would refuse one of only whitespace (50006) and stop the rest of the answer, or
        post an invisible message (an outbound item an older version queued can hold such a
        chunk); an answer with no chunk to show raises ``EmptyMessageError``. If the first chunk fails, its
        exception propagates unchanged (nothing was delivered). If a later one fails, raises
        ``PartialDeliveryError`` (chained to the cause) with what was sent and what remains.
        Do not cancel a delivery part-way: a cancellation carries no progress.
        """
        if first_index == 0 and not any(_shows_something(chunk) for chunk in chunks):
            raise EmptyMessageError("no chunk of the answer shows anything")
        sent: list[discord.Message] = []
        replied = first_index > 0  # a resumed delivery sent the reply before
        for offset, chunk in enumerate(chunks):
            index = first_index + offset
            if not _shows_something(chunk):
                continue
            chunk_nonce = None if nonce is None else f"{nonce}.{index}"[-25:]
            attached = (files or {}).get(index, ())
            try:
                if not replied:
                    replied = True
                    message = await self.send(
                        channel,
                        chunk,
                        reply_to=reply_to,
                        mention_user=mention_user,
                        nonce=chunk_nonce,
                        files=attached,
                    )
                else:
                    message = await self.send(channel, chunk, nonce=chunk_nonce, files=attached)
            except Exception as exc:
                if chunk_nonce is not None and _unknown_message(exc):
                    log.info("discord.chunk_copy_deleted", channel_id=_channel_id(channel), chunk=index)
                    continue
                if offset == 0:
                    raise
                raise PartialDeliveryError(sent, list(chunks[offset:]), exc) from exc
            sent.append(message)
        return sent

    async def edit(
        self,
        message: discord.Message | discord.PartialMessage,
        content: str,
        *,
        mention_user: discord.abc.Snowflake | None = None,
        view: Any = discord.utils.MISSING,
        files: Sequence[Upload] | None = None,
    ) -> discord.Message:
        """Replace ``message``'s content through ``discord.edit``; raises like ``send``.

        ``view``: its components replace the message's (None removes them; left out, they stay).
        ``files``: the message's attachments become exactly these (``()`` removes every one; None
        leaves them), so an edit resent after a lost response attaches its files once. Content
        that is only whitespace raises ``EmptyMessageError`` before any request.
        """
        if not content.strip():
            raise EmptyMessageError("a message of only whitespace: Discord refuses it (50006)")
        kwargs: dict[str, Any] = {"content": content, "allowed_mentions": allowed_mentions_for(mention_user)}
        if view is not discord.utils.MISSING:
            kwargs["view"] = view
        if files is not None:
            if len(files) > MAX_FILES_PER_MESSAGE:
                raise ValueError(f"{len(files)} files: Discord takes at most {MAX_FILES_PER_MESSAGE}")
            kwargs["attachments"] = [upload.file() for upload in files]
        return await self._guard("edit", message.channel.id, message.edit, **kwargs)

    async def delete(self, message: discord.Message | discord.PartialMessage) -> bool:
        """Delete one of the bot's messages through ``discord.edit`` (a change to a posted message);
        False when it was gone already (404 Unknown Message), else True; raises like ``send``."""
        try:
            await self._guard("edit", message.channel.id, message.delete)
        except discord.NotFound as exc:
            if exc.code != UNKNOWN_MESSAGE:
                raise
            return False
        return True

    async def create_thread(self, message: discord.Message, name: str) -> discord.Thread:
        """A public thread started from ``message`` (Discord's Start Thread from Message), through
        ``discord.send``; raises like ``send`` (403 without Create Public Threads, never counted)."""
        return await self._guard(
            "send", message.channel.id, message.create_thread, name=name, auto_archive_duration=1440
        )

    async def fetch_channel(self, client: discord.Client, channel_id: int) -> Any:
        """A channel (or thread, or DM) by id: from discord.py's cache, else fetched via ``discord.read``."""
        channel = client.get_channel(channel_id)
        if channel is None:
            channel = await self._guard("read", channel_id, client.fetch_channel, channel_id)
        return channel

    async def dm_channel(self, client: discord.Client, user_id: int) -> discord.DMChannel:
        """The DM channel with ``user_id`` (the user fetched and the DM opened via ``discord.read``)."""
        user = client.get_user(user_id)
        if user is None:
            user = await self._guard("read", None, client.fetch_user, user_id)
        return await self._guard("read", None, user.create_dm)

    async def find_message(
        self,
        channel: discord.abc.Messageable,
        match: Callable[[discord.Message], bool],
        *,
        after: discord.abc.Snowflake,
        limit: int,
    ) -> discord.Message | None:
        """The first of the ``limit`` messages after ``after`` (oldest first) that ``match``es, or None.

        One guarded read: the pages are fetched under ``discord.read``'s breaker and one timeout.
        """

        async def scan() -> discord.Message | None:
            async for message in channel.history(limit=limit, after=after):
                if match(message):
                    return message
            return None

        return await self._guard("read", _channel_id(channel), scan)

    async def fetch_message(self, channel: discord.abc.Messageable, message_id: int) -> discord.Message:
        """One message read again through ``discord.read`` (fresh attachment URLs among the rest)."""
        return await self._guard("read", _channel_id(channel), channel.fetch_message, message_id)

    async def download(self, url: str, *, max_bytes: int) -> bytes:
        """The file at a Discord CDN ``url`` (an attachment, a media-proxied image), through
        ``discord.read`` under the call timeout, read in pieces and given up past ``max_bytes``.

        Raises discord.py's ``NotFound`` (an expired signed URL, a deleted file: not Discord's
        fault) or ``Forbidden`` or ``HTTPException`` like ``Attachment.read`` does,
        ``DownloadTooLargeError`` (permanent), or the connection's errors.
        """

        async def get() -> bytes:
            if self._cdn is None or self._cdn.closed:
                # Its own session, traced like discord.py's: each request restarts the call timeout.
                self._cdn = aiohttp.ClientSession(trace_configs=[self.http_trace])
            async with self._cdn.get(url) as response:
                if response.status == 404:
                    raise discord.NotFound(response, "file not found (expired or deleted)")
                if response.status == 403:
                    raise discord.Forbidden(response, "cannot retrieve file")
                if response.status >= 500:
                    raise discord.DiscordServerError(response, "the CDN failed")
                if response.status != 200:
                    raise discord.HTTPException(response, "failed to get file")
                if (response.content_length or 0) > max_bytes:
                    raise DownloadTooLargeError(max_bytes)
                data = bytearray()
                async for piece in response.content.iter_chunked(64 * 1024):
                    data += piece
                    if len(data) > max_bytes:
                        raise DownloadTooLargeError(max_bytes)
                return bytes(data)

        return await self._guard("read", None, get)

    async def history(
        self, channel: discord.abc.Messageable, *, after: discord.abc.Snowflake, limit: int
    ) -> list[discord.Message]:
        """At most ``limit`` messages after ``after``, oldest first: one guarded read (``discord.read``)."""

        async def read() -> list[discord.Message]:
            return [message async for message in channel.history(limit=limit, after=after)]

        return await self._guard("read", _channel_id(channel), read)

    async def react(self, message: discord.Message | discord.PartialMessage, emoji: str) -> bool:
        """Add a reaction through ``discord.react``; True if it was added.

        Reactions are cosmetic: every failure is logged and counted, never raised (only
        cancellation propagates).
        """
        try:
            await self._guard("react", message.channel.id, message.add_reaction, emoji)
        except Exception:
            return False  # already logged and counted by _guard
        return True

    @contextlib.asynccontextmanager
    async def typing(self, channel: discord.abc.Messageable) -> AsyncIterator[None]:
        """Show the typing indicator while the block runs; it can never fail the block.

        A background task sends the indicator once the block has run for ``typing_delay``
        seconds (a quick answer goes out with no indicator at all), then every
        ``typing_interval`` seconds, through ``discord.typing``; its errors are logged and
        counted, and a permanent one (no permission to type here) stops the renewals. Entering
        never waits on Discord.
        """
        task = asyncio.create_task(self._keep_typing(channel), name=f"typing:{_channel_id(channel)}")
        try:
            yield
        finally:
            task.cancel()
            # Wait briefly so the request is not left running; a cancellation of the block
            # itself still propagates out of asyncio.wait.
            await asyncio.wait({task}, timeout=1.0)

    # -- internals ---------------------------------------------------------------------

    async def _keep_typing(self, channel: discord.abc.Messageable) -> None:
        """After the delay, renew the typing indicator until cancelled; swallow (log and count) failures."""
        if self._typing_delay > 0:
            await self._clock.sleep(self._typing_delay)
        channel_id = _channel_id(channel)
        while True:
            try:
                await self._guard("typing", channel_id, _send_typing, channel)
            except Exception as exc:
                if is_permanent(exc):
                    return  # no permission to type here: it will not heal while we answer
            await self._clock.sleep(self._typing_interval)

    async def _guard(
        self,
        operation: str,
        channel_id: int | None,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        **kwargs: Any,
    ) -> T:
        """Run ``fn`` through the operation's breaker and timeout; record any failure, then re-raise."""
        name = f"discord.{operation}"
        try:
            with span(name, dependency=name, channel=channel_id):
                return await self._breakers[operation].call(self._timed, operation, fn, args, kwargs)
        except Exception as exc:
            self._record_failure(operation, channel_id, exc)
            raise

    async def _timed(
        self, operation: str, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        """Await ``fn`` under the call's deadline, which the trace moves as requests go out."""
        if self._timeout is None:
            return await fn(*args, **kwargs)
        call = _Call(self._timeout, self._rate_limit_wait if self._traced else 0.0)
        token = _CALL.set(call)
        try:
            async with asyncio.timeout(None) as scope:
                call.start(scope)
                return await fn(*args, **kwargs)
        except TimeoutError as exc:
            if not scope.expired():
                raise  # the callee's own TimeoutError
            raise call.expired(f"discord.{operation}") from exc
        finally:
            call.scope = None
            _CALL.reset(token)

    async def _request_started(
        self,
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestStartParams,
    ) -> None:
        """aiohttp trace: a request of the current call goes on the wire."""
        self._traced = True
        call = _CALL.get()
        if call is not None:
            call.sending()

    async def _request_answered(
        self,
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        """aiohttp trace: Discord answered a request of the current call (headers read)."""
        call = _CALL.get()
        if call is not None:
            call.answered(params.response)

    def _record_failure(self, operation: str, channel_id: int | None, exc: Exception) -> None:
        """Count by operation and category; log without message content."""
        verdict = classify(exc)
        category = verdict.category
        self.errors[(operation, str(category))] += 1
        if self._metrics is not None:
            self._metrics.errors.labels(category=category).inc()
        fields = {
            "operation": operation,
            "channel_id": channel_id,
            "category": str(category),
            "code": verdict.code,
            "discord_code": getattr(exc, "code", None) if isinstance(exc, discord.HTTPException) else None,
            "error": type(exc).__name__,
        }
        if category is Category.CIRCUIT_OPEN:
            log.debug("discord.rejected", **fields)  # one line per rejected call would flood an outage
        elif verdict.retryable:
            log.info("discord.transient_failure", **fields)
        elif category is Category.INTERNAL:
            log.warning("discord.unexpected_failure", **fields)
        else:
            log.warning("discord.permanent_failure", **fields)


def _shows_something(text: str) -> bool:
    """Whether ``text`` has a character that is neither whitespace nor an invisible format character
    (Unicode category Cf: zero-width spaces and joiners, invisible separators)."""
    return any(not char.isspace() and unicodedata.category(char) != "Cf" for char in text)


def _unknown_message(exc: BaseException) -> bool:
    """A send answered 404 Unknown Message: with an enforced nonce, the copy posted earlier under
    it was deleted since (discord.py, ``Messageable.send``: NotFound "You sent a message with the
    same nonce as one that has been explicitly deleted shortly earlier")."""
    return isinstance(exc, discord.NotFound) and exc.code == UNKNOWN_MESSAGE


_CALL: ContextVar[_Call | None] = ContextVar("discord_io_call", default=None)
"""The guarded call the current task is in (aiohttp runs trace callbacks in the caller's task)."""


class _Call:
    """One guarded call's deadline: ``timeout`` for Discord to answer each request, and ``wait``
    more whenever discord.py holds the call for a rate limit: before its request (a bucket with
    nothing left, the global limit), sleeping out a 429's ``retry_after`` before it sends again,
    or sleeping out the rest of a window its request used up (``X-RateLimit-Remaining: 0``)
    before it returns. discord.py never sleeps longer than its ``max_ratelimit_timeout``."""

    __slots__ = ("held", "hint_until", "scope", "timeout", "wait")

    def __init__(self, timeout: float, wait: float) -> None:
        self.timeout = timeout
        self.wait = wait
        self.scope: asyncio.Timeout | None = None
        self.held = True  # until the first request goes out, discord.py may be holding it back
        self.hint_until: float | None = None  # loop time at which Discord said the wait ends

    def start(self, scope: asyncio.Timeout) -> None:
        self.scope = scope
        self._move(self.wait + self.timeout)

    def sending(self) -> None:
        self.held = False
        self._move(self.timeout)

    def answered(self, response: aiohttp.ClientResponse) -> None:
        headers = response.headers
        if response.status != 429 and headers.get("X-RateLimit-Remaining") != "0":
            return
        self.held = True
        hint = parse_duration(headers.get("X-RateLimit-Reset-After") or headers.get("Retry-After") or "")
        now = asyncio.get_running_loop().time()
        self.hint_until = None if hint is None else now + hint
        self._move(self.wait + self.timeout)

    def expired(self, operation: str) -> Exception:
        """The error for a deadline that passed: held for rate limits, or Discord too slow."""
        if not self.held or self.wait == 0.0:
            return CallTimeoutError(operation, self.timeout)
        left = self.wait
        if self.hint_until is not None:
            left = max(0.0, self.hint_until - asyncio.get_running_loop().time())
        return RateLimitWaitError(left)

    def _move(self, seconds: float) -> None:
        scope = self.scope
        if scope is not None and not scope.expired():
            scope.reschedule(asyncio.get_running_loop().time() + seconds)


async def _send_typing(channel: discord.abc.Messageable) -> None:
    """One typing request (discord.py shows it for 10 s)."""
    await channel.typing()


def _lenient(reference: Reference) -> discord.MessageReference:
    """A reply reference that does not fail the send when the original message is gone."""
    if isinstance(reference, discord.MessageReference):
        if not reference.fail_if_not_exists:
            return reference
        if reference.message_id is None:
            raise ValueError("reply_to must reference a message")
        return discord.MessageReference(
            message_id=reference.message_id,
            channel_id=reference.channel_id,
            guild_id=reference.guild_id,
            fail_if_not_exists=False,
        )
    return reference.to_reference(fail_if_not_exists=False)


def _channel_id(channel: object) -> int | None:
    """The channel id for logs (a Context or Interaction carries it on ``.channel``)."""
    channel_id = getattr(channel, "id", None)
    if isinstance(channel_id, int):
        return channel_id
    inner = getattr(channel, "channel", None)
    channel_id = getattr(inner, "id", None)
    return channel_id if isinstance(channel_id, int) else None
