"""The message pipeline: one user message from ``on_message`` to an answer, a "queued", or a reason.

Order (DESIGN.md, "One message, end to end"): fast exit -> in-memory dedup -> input checks ->
maintenance -> rate limits -> durable acceptance (dedup across restarts) -> per-conversation
mutex -> processing timeout + typing -> Gemini -> split + send as a reply -> history stored.
A failure is routed by ``classify``: transient -> the durable queue and an acknowledgement
with the queue position; permanent -> a clear sentence; a bug -> an apology with a trace id.

Acceptance is the durable point of no return: ``storage.accept`` records the message id as
processed and stores the work item in one transaction, so after ``kill -9`` the drain finds
it (its lease runs out) and answers it, and a replayed gateway event is never answered twice.
A live message is accepted with ``accept_with_history``: the same transaction also reads the
history to answer with, when the message is next in its conversation. Messages of one
conversation reach its mutex in arrival order (``Arrivals``), however long each one's write
took, so an unsaved answer (storage down) never overtakes an earlier message.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import discord
import structlog

from bot import texts
from bot.splitting import split_message
from resilience.breakers import BreakerState
from resilience.context import current_trace_id, request_context
from resilience.degradation import ItemKind, ItemState, QueueItem
from resilience.errors import Category, Classification, MutexTimeoutError, classify, user_message_for
from services.discord_io import PartialDeliveryError
from services.storage import StorageError, Turn

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.pipeline")

RECENT_IDS = 10_000
LEASE_MARGIN = 30.0


def backoff(attempts: int) -> float:
    """Seconds before a queued item is tried again after ``attempts`` counted failures."""
    return float(min(300, 2 ** min(attempts + 1, 9)))


def conversation_key(channel_id: int) -> str:
    """One conversation per channel, thread or DM channel."""
    return str(channel_id)


@dataclass(frozen=True, slots=True)
class Inbound:
    """What the pipeline and the drain need of a user message; also the queue payload."""

    message_id: int
    channel_id: int
    guild_id: int | None
    author_id: int
    content: str

    def payload(self, **extra: Any) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "channel_id": self.channel_id,
            "guild_id": self.guild_id,
            "author_id": self.author_id,
            "content": self.content,
            **extra,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Inbound:
        return cls(
            message_id=int(payload["message_id"]),
            channel_id=int(payload["channel_id"]),
            guild_id=None if payload.get("guild_id") is None else int(payload["guild_id"]),
            author_id=int(payload["author_id"]),
            content=str(payload["content"]),
        )

    @property
    def key(self) -> str:
        return conversation_key(self.channel_id)

    def reference(self) -> discord.MessageReference:
        """A reply reference to the original message that does not fail if it was deleted."""
        return discord.MessageReference(
            message_id=self.message_id,
            channel_id=self.channel_id,
            guild_id=self.guild_id,
            fail_if_not_exists=False,
        )


class MessagePipeline:
    """Runs every message addressed to the bot; built once per application."""

    def __init__(self, app: Application, *, bot_user_id: Callable[[], int | None]) -> None:
        self.app = app
        self._bot_user_id = bot_user_id
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._arrivals = Arrivals()

    # -- the fast path --------------------------------------------------------------------

    def is_for_me(self, message: discord.Message) -> bool:
        """True for DMs, mentions, replies to the bot and configured chat channels. No I/O."""
        author = message.author
        if author.bot:
            return False
        me = self._bot_user_id()
        if me is None or author.id == me:
            return False
        if message.guild is None:
            return True
        for user in message.mentions:
            if user.id == me:
                return True
        ref = message.reference
        if ref is not None:
            resolved = ref.resolved
            if isinstance(resolved, discord.Message) and resolved.author.id == me:
                return True
        return message.channel.id in self.app.chat_channels(message.guild.id)

    async def on_message(self, message: discord.Message) -> None:
        """The ``on_message`` listener."""
        if not self.is_for_me(message):
            return
        if self._seen(message.id):
            return
        task = asyncio.current_task()
        if task is not None:
            self._inflight.add(task)
        started = time.perf_counter()
        outcome = "error"
        try:
            with request_context(
                collector=self.app.traces,
                guild=message.guild.id if message.guild else None,
                channel=message.channel.id,
                user=message.author.id,
            ) as trace:
                try:
                    outcome = await self._handle(message)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("pipeline.bug", message_id=message.id)
                    self.app.metrics.errors.labels(category=Category.INTERNAL.value).inc()
                    await self._say(message, texts.bug(trace.trace_id))
        finally:
            seconds = time.perf_counter() - started
            self.app.metrics.observe_message(outcome, seconds)
            self.app.message_latency.observe(seconds)
            if task is not None:
                self._inflight.discard(task)

    def _seen(self, message_id: int) -> bool:
        if message_id in self._recent:
            return True
        self._recent[message_id] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
        return False

    # -- the slow path --------------------------------------------------------------------

    async def _handle(self, message: discord.Message) -> str:
        app = self.app
        cfg = app.config
        text = self.clean_content(message)
        if len(text) > cfg.max_input_chars:
            await self._say(message, texts.too_long(len(text), cfg.max_input_chars))
            return "refused"
        if not text:
            await self._say(
                message, texts.attachments_only() if message.attachments else texts.empty_mention()
            )
            return "refused"

        inbound = Inbound(
            message_id=message.id,
            channel_id=message.channel.id,
            guild_id=message.guild.id if message.guild else None,
            author_id=message.author.id,
            content=text,
        )
        maintenance = app.maintenance()
        if maintenance is not None:
            position: int | None = None
            if cfg.maintenance_queue_messages:
                try:
                    item = await self.accept(inbound, claim=False, extra={"acked": True})
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # not saved: the notice must not say it was
                    log.warning("pipeline.accept_failed", category=classify(exc).category.value)
                else:
                    if item is None:
                        return "ignored_duplicate"
                    position = await self._position(item)
            await self._say(message, texts.maintenance(maintenance, queued_position=position))
            return "maintenance"

        wait = app.ratelimiter.check(message.author.id, inbound.guild_id)
        if wait is not None:
            await self._say(message, texts.cooldown(wait))
            return "rate_limited"

        arrival = self._arrivals.enter(inbound.key)
        try:
            try:
                accepted = await app.storage.accept_with_history(
                    inbound.message_id,
                    ItemKind.INBOUND,
                    inbound.key,
                    inbound.payload(attachments=bool(message.attachments)),
                    now=app.clock.time(),
                    lease_seconds=self._lease_seconds(),
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Storage is down: we cannot promise a later answer, so answer live or say why now.
                verdict = classify(exc)
                log.warning("pipeline.accept_failed", category=verdict.category.value)
                return await self._answer_unsaved(message, inbound, arrival)
            if accepted is None:
                return "ignored_duplicate"
            item, history = accepted
            try:
                return await self._answer_accepted(message, inbound, item, history, arrival)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, StorageError) and not classify(exc).retryable:
                    raise  # a bug: on_message apologises
                # Storage failed after acceptance. The item is safe (claimed under its lease, or
                # pending): the drain answers it, so the honest reply is "queued", not an apology.
                verdict = classify(exc)
                category = verdict.category.value
                log.warning("pipeline.storage_failed_after_accept", item=item.id, category=category)
                if verdict.category is Category.INTERNAL:
                    verdict = replace(verdict, user_message=user_message_for(Category.UNAVAILABLE))
                await self._reply_ack(message.channel, message, texts.queued(verdict, 0), item)
                return "queued"
        finally:
            self._arrivals.leave(inbound.key, arrival)

    async def _answer_accepted(
        self,
        message: discord.Message,
        inbound: Inbound,
        item: QueueItem,
        history: list[Turn] | None,
        arrival: asyncio.Future[None],
    ) -> str:
        """Answer a freshly accepted message live, or queue it behind its conversation."""
        app = self.app
        cfg = app.config
        if item.state is ItemState.PENDING:
            # The conversation already has queued messages: this one waits its turn behind them.
            self._arrivals.leave(inbound.key, arrival)
            await self._ack_busy(message, item)
            return "queued"

        try:
            # An older message of this conversation still on its way to the mutex (a slow write,
            # an unsaved answer being generated) goes first; waiting too long is a busy conversation.
            waited = await self._arrivals.wait_older(inbound.key, arrival, cfg.mutex_acquire_timeout_seconds)
            self._arrivals.leave(inbound.key, arrival)  # nothing awaits from here to the mutex queue
            if waited or app.mutex.locked(inbound.key):
                # Someone went first or holds the conversation (an older message, a /reset): the
                # history read at acceptance may be stale, so read it again under the mutex.
                history = None
            async with app.mutex.acquire(
                inbound.key, cfg.mutex_acquire_timeout_seconds, holder=str(message.id)
            ):
                if history is None:
                    history = await app.storage.history_if_next(inbound.key, item.id)
                if history is None:  # an older message of this conversation goes first
                    await self.requeue(item, "behind queued messages", count_attempt=False)
                    await self._ack_busy(message, item)
                    return "queued"
                return await self.answer(
                    item, inbound, channel=message.channel, original=message, live=True, history=history
                )
        except MutexTimeoutError:
            await self.requeue(item, "conversation busy", count_attempt=False)
            await self._ack_busy(message, item)
            return "queued"

    async def answer(
        self,
        item: QueueItem,
        inbound: Inbound,
        *,
        channel: discord.abc.Messageable,
        original: discord.Message | discord.MessageReference,
        live: bool,
        history: list[Turn] | None = None,
    ) -> str:
        """Generate and deliver the answer to a claimed inbound item; route any failure."""
        app = self.app
        try:
            if history is None:
                history = await app.storage.history(inbound.key)
            async with app.discord_io.typing(channel):
                async with asyncio.timeout(app.config.processing_timeout_seconds):
                    reply = await app.gemini.generate(inbound.content, history)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return await self._route_failure(item, inbound, original, exc, live=live, channel=channel)

        if reply.ok:
            body = reply.text or ""
            if not live:
                body = texts.late_answer_prefix(inbound.content) + body
                if item.payload.get("interaction"):
                    # A slash command has no message to reply to: ping the asker by name instead.
                    body = f"<@{inbound.author_id}> {body}"
            if item.payload.get("attachments"):
                body = f"{body}\n\n{texts.attachments_ignored()}"
            chunks = split_message(body)
            turns = [("user", inbound.content, inbound.message_id), ("model", reply.text or "", None)]
            if item.payload.get("private"):
                turns = []  # a private /ask stays out of the channel's shared history
            outcome = "answered" if live else "answered_late"
        else:
            chunks = [reply.user_message or texts.no_answer()]
            turns = []
            outcome = "refused"
        return await self.deliver(
            item, inbound, chunks, original=original, channel=channel, outcome=outcome, turns=turns
        )

    async def deliver(
        self,
        item: QueueItem,
        inbound: Inbound,
        chunks: list[str],
        *,
        original: discord.Message | discord.MessageReference,
        channel: discord.abc.Messageable,
        outcome: str,
        turns: Sequence[tuple[str, str, str | int | None]] = (),
    ) -> str:
        """Send ``chunks`` as a reply; what Discord does not take now goes to the outbound queue.

        ``turns`` (the question and the answer) join the conversation history when the item is
        finished, in the same transaction, or as soon as the answer is queued for delivery.
        Chunk ``i`` carries the nonce ``<message id>.<i>``, so a chunk resent after a timeout or
        a crash is not posted twice; a long answer is staged as an outbound item before its
        first chunk goes out, so a crash between chunks resumes the delivery.
        """
        app = self.app
        first = int(item.payload.get("chunk_offset", 0))
        if len(chunks) > 1 and item.kind is ItemKind.INBOUND:
            item = await app.storage.update_payload(
                item.id,
                {**item.payload, "chunks": list(chunks), "outcome": outcome, "chunk_offset": first},
                kind=ItemKind.OUTBOUND,
            )
            if turns:
                await app.storage.append_turns(inbound.key, turns)
                turns = ()
        try:
            await app.discord_io.send_chunks(
                channel,
                chunks,
                reply_to=original,
                mention_user=_Snowflake(inbound.author_id),
                nonce=str(item.payload.get("nonce", inbound.message_id)),
                first_index=first,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, PartialDeliveryError):
                remaining, verdict = exc.remaining, classify(exc.cause)
                first += len(exc.sent)
            else:
                remaining, verdict = chunks, classify(exc)
            if verdict.retryable:
                if turns:
                    await app.storage.append_turns(inbound.key, turns)
                # the first failure of a fresh answer is no attempt at delivering a queued one
                counted = item.kind is ItemKind.OUTBOUND and self.counts_against(verdict, "discord.send")
                await self.requeue(
                    item,
                    f"delivery: {verdict.category.value}",
                    kind=ItemKind.OUTBOUND,
                    payload={
                        **item.payload,
                        "chunks": list(remaining),
                        "outcome": outcome,
                        "chunk_offset": first,
                    },
                    retry_after=verdict.retry_after,
                    count_attempt=counted,
                )
                return "queued"
            log.warning("pipeline.undeliverable", category=verdict.category.value, item=item.id)
            await app.storage.dead_letter(item.id, f"undeliverable: {verdict.category.value}")
            return "error"
        try:
            await app.storage.finish(item.id, key=inbound.key, turns=turns)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Delivered, not recorded: once the lease runs out the drain finds the answer by its
            # nonce and completes the item (the exchange stays out of the history).
            log.warning("pipeline.finish_failed", item=item.id, category=classify(exc).category.value)
        return outcome

    # -- failure routing ------------------------------------------------------------------

    async def _route_failure(
        self,
        item: QueueItem,
        inbound: Inbound,
        original: discord.Message | discord.MessageReference,
        exc: BaseException,
        *,
        live: bool,
        channel: discord.abc.Messageable,
    ) -> str:
        """Queue (with the acknowledgement) or explain, in ``channel``: where the answer would go."""
        app = self.app
        verdict = classify(exc, now=app.clock.time())
        app.metrics.errors.labels(category=verdict.category.value).inc()
        if verdict.retryable:
            counted = self.counts_against(verdict, "gemini")
            try:
                requeued = await self.requeue(
                    item, verdict.category.value, retry_after=verdict.retry_after, count_attempt=counted
                )
            except asyncio.CancelledError:
                raise
            except Exception as failure:
                # Still claimed under its lease: the drain picks it up when the lease runs out.
                category = classify(failure).category.value
                log.warning("pipeline.requeue_failed", item=item.id, category=category)
                requeued = item
            if requeued.state is ItemState.DEAD:
                return "error"
            if live or not item.payload.get("acked"):
                position = await self._position(requeued)
                await self._reply_ack(channel, original, texts.queued(verdict, position), requeued)
            return "queued"
        if verdict.category is Category.INTERNAL:
            log.error("pipeline.bug", item=item.id, exc_info=exc)
            text = texts.bug(current_trace_id() or "-")
        else:
            text = verdict.user_message
        return await self.deliver(
            item,
            inbound,
            [text],
            original=original,
            channel=channel,
            outcome="refused",
        )

    def counts_against(self, verdict: Classification, breaker: str) -> bool:
        """Whether a transient failure says something about the item, so it counts as an attempt.

        A rejection by an open breaker, a failed half-open probe and the failure that opened the
        breaker are the dependency's outage, not the item's fault: counted, an outage longer
        than the back-off would dead-letter whatever it hit. So only a failure that leaves
        ``breaker`` closed (read after the failure) counts; a message that keeps failing while
        the dependency works is still dead-lettered after ``queue_max_attempts``.
        """
        if verdict.category is Category.CIRCUIT_OPEN:
            return False
        return self.app.board[breaker].state is BreakerState.CLOSED

    async def requeue(
        self,
        item: QueueItem,
        error: str,
        *,
        retry_after: float | None = None,
        count_attempt: bool = True,
        kind: ItemKind | None = None,
        payload: dict[str, Any] | None = None,
    ) -> QueueItem:
        """Put a claimed item back in the queue; dead-letter it (and tell the user) after N attempts."""
        app = self.app
        delay = retry_after if retry_after is not None else (backoff(item.attempts) if count_attempt else 0.0)
        updated = await app.storage.requeue(
            item.id,
            error=error,
            next_attempt_at=app.clock.time() + delay,
            count_attempt=count_attempt,
            kind=kind,
            payload=payload,
        )
        if count_attempt and updated.attempts >= app.config.queue_max_attempts:
            dead = await app.storage.dead_letter(updated.id, error)
            app.metrics.queue_dead_letters.labels(kind=dead.kind.value).inc()
            log.error("queue.dead_letter", item=dead.id, attempts=updated.attempts, error=error)
            await self.notify(dead, texts.dead_letter(updated.attempts))
            return dead
        app.drain_wake()
        return updated

    async def notify(self, item: QueueItem, text: str) -> None:
        """Tell the author of a queued message something (a dead letter, an expiry), as a reply to it.

        A notice Discord does not take now (it is down: often why the item gave up) is queued as
        an outbound item of its own, so the user is told once Discord is back; a notice that
        cannot be queued either is logged.
        """
        inbound = Inbound.from_payload(item.payload)
        mention = None
        if item.payload.get("interaction"):
            text, mention = f"<@{inbound.author_id}> {text}", _Snowflake(inbound.author_id)
        try:
            channel = await self.app.channel_for(item)
            await self.app.discord_io.send(channel, text, reply_to=inbound.reference(), mention_user=mention)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            verdict = classify(exc)
            log.warning("pipeline.notice_failed", item=item.id, category=verdict.category.value)
            if not verdict.retryable or item.payload.get("notice"):
                return  # a notice about an undeliverable notice would only loop
        payload = {
            **item.payload,
            "chunks": [text],
            "chunk_offset": 0,
            "outcome": "refused",
            "notice": True,
            # not the answer's nonce: Discord would take the notice for a resent answer chunk
            "nonce": f"n{inbound.message_id}",
        }
        try:
            now = self.app.clock.time()
            await self.app.storage.enqueue(
                ItemKind.OUTBOUND, inbound.key, payload, now=now, dedup_key=f"notice:{item.id}"
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("pipeline.notice_lost", item=item.id, category=classify(exc).category.value)
            return
        self.app.drain_wake()

    async def _reply_ack(
        self,
        channel: discord.abc.Messageable,
        original: discord.Message | discord.MessageReference,
        text: str,
        item: QueueItem,
    ) -> None:
        """Tell the user the message is queued; remember that we did, so the drain does not repeat it."""
        try:
            await self.app.discord_io.send(channel, text, reply_to=original, mention_user=None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("pipeline.ack_failed", category=classify(exc).category.value)
            return
        if not item.payload.get("acked"):
            try:
                await self.app.storage.update_payload(item.id, {**item.payload, "acked": True})
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("pipeline.ack_not_recorded", item=item.id)

    async def _ack_busy(self, message: discord.Message, item: QueueItem) -> None:
        position = await self._position(item)
        await self._reply_ack(message.channel, message, texts.queued_busy(position), item)

    async def _position(self, item: QueueItem) -> int:
        """The item's queue position for an acknowledgement, or 0 (none shown) if storage cannot say."""
        try:
            return await self.app.storage.position(item.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("pipeline.position_unavailable", item=item.id, category=classify(exc).category.value)
            return 0

    async def accept(self, inbound: Inbound, *, claim: bool, extra: dict[str, Any]) -> QueueItem | None:
        """Accept a message durably (see ``SqliteStore.accept``); None when it was seen before."""
        return await self.app.storage.accept(
            inbound.message_id,
            ItemKind.INBOUND,
            inbound.key,
            inbound.payload(**extra),
            now=self.app.clock.time(),
            lease_seconds=self._lease_seconds(),
            claim=claim,
        )

    def _lease_seconds(self) -> float:
        """How long a claim outlives a crash: the longest the holder may wait and work, plus a margin."""
        cfg = self.app.config
        return cfg.processing_timeout_seconds + cfg.mutex_acquire_timeout_seconds + LEASE_MARGIN

    async def _answer_unsaved(
        self, message: discord.Message, inbound: Inbound, arrival: asyncio.Future[None]
    ) -> str:
        """Storage is down: try to answer live without a durable record, or say clearly why not.

        The answer (history-less, so it can be generated at once) is sent only after the older
        messages of the conversation have taken their place at the mutex: a slow write cannot be
        overtaken by a later message. A reason why not needs no order and goes out at once.
        """
        app = self.app
        cfg = app.config
        try:
            async with app.discord_io.typing(message.channel):
                async with asyncio.timeout(cfg.processing_timeout_seconds):
                    reply = await app.gemini.generate(inbound.content, ())
            chunks = (
                split_message(reply.text or "") if reply.ok else [reply.user_message or texts.no_answer()]
            )
            # An older message takes at most its write and its generation to reach the mutex.
            older = app.storage.statement_timeout + cfg.processing_timeout_seconds
            try:
                await self._arrivals.wait_older(inbound.key, arrival, older)
            except MutexTimeoutError:
                log.warning("pipeline.order_wait_timed_out", key=inbound.key)
            self._arrivals.leave(inbound.key, arrival)  # nothing awaits from here to the mutex queue
            async with app.mutex.acquire(inbound.key, cfg.mutex_acquire_timeout_seconds):
                await app.discord_io.send_chunks(
                    message.channel, chunks, reply_to=message, mention_user=message.author
                )
            return "answered" if reply.ok else "refused"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._arrivals.leave(inbound.key, arrival)
            await self._say(message, texts.cannot_accept(classify(exc)))
            return "error"

    async def _say(self, message: discord.Message, text: str) -> None:
        """A short notice as a reply; a failure to say it is logged, never raised."""
        try:
            await self.app.discord_io.send(message.channel, text, reply_to=message, mention_user=None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("pipeline.notice_failed", category=classify(exc).category.value)

    # -- helpers --------------------------------------------------------------------------

    def clean_content(self, message: discord.Message) -> str:
        """The text with the bot's own mention removed."""
        me = self._bot_user_id()
        content = message.content or ""
        if me is not None:
            content = content.replace(f"<@{me}>", "").replace(f"<@!{me}>", "")
        return content.strip()

    async def drain_inflight(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for messages being handled; return how many were still running."""
        pending = {t for t in self._inflight if not t.done()}
        if not pending:
            return 0
        _, still = await asyncio.wait(pending, timeout=grace)
        return len(still)


class _Snowflake:
    """A bare id, enough for ``AllowedMentions(users=[...])``."""

    __slots__ = ("id",)

    def __init__(self, id: int) -> None:
        self.id = id


class Arrivals:
    """Per conversation, the messages between arrival and their place in the conversation's mutex queue.

    Acceptance runs before the mutex and may take up to the storage timeout; a later message
    whose write failed at once must not overtake an earlier one still writing. Entering never
    waits (the fast "queued" acknowledgement stays fast); only a message about to take the mutex
    waits for the older ones of its conversation to leave, which they do as they take it.
    """

    def __init__(self) -> None:
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}

    def enter(self, key: str) -> asyncio.Future[None]:
        """Register an arrival; ``leave`` it on every path (it is idempotent)."""
        arrival: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(arrival)
        return arrival

    async def wait_older(self, key: str, arrival: asyncio.Future[None], limit: float) -> bool:
        """Wait until every older arrival of ``key`` has left; True if there was one to wait for.

        Returns without suspending when there is none. Raises ``MutexTimeoutError`` after ``limit`` s.
        """
        waiting = self._waiting.get(key, [])
        older = waiting[: waiting.index(arrival)] if arrival in waiting else []
        if not older:
            return False
        _, pending = await asyncio.wait(older, timeout=limit)
        if pending:
            raise MutexTimeoutError(key, limit)
        return True

    def leave(self, key: str, arrival: asyncio.Future[None]) -> None:
        """Mark an arrival as placed (or gone); younger ones waiting on it go on."""
        if arrival.done():
            return
        arrival.set_result(None)
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.remove(arrival)
            if not waiting:
                del self._waiting[key]
