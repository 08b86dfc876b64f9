"""The drain: answers queued messages and delivers queued answers once their dependency is back.

A supervised loop (``resilience.tasks.SupervisedTask``). Each run expires stale items (and
tells their users), then claims work only as far as the breakers let calls through: nothing
while ``discord.send`` is open, outbound items while Gemini is open, one inbound item as the
probe while Gemini is half-open, a batch when it is closed. The queue hands out at most the
head of each conversation, so answers stay in order per conversation. A restarted bot
resumes what the previous process left: its claims are released at start-up.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import discord
import structlog

from bot import texts
from bot.pipeline import Inbound, MessagePipeline
from resilience.breakers import BreakerState
from resilience.context import request_context
from resilience.degradation import ItemKind, ItemState, QueueItem
from resilience.errors import CallTimeoutError, Category, CircuitOpenError, MutexTimeoutError, classify
from resilience.tasks import SupervisedTask, exponential_backoff
from services.storage import StorageError

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.drain")

# How far past a queued message the drain looks for an answer a dead process posted but never
# recorded (pages of 100, oldest first, stopping at the first match). Discord's nonce catches a
# resend only within a few minutes; in a busy channel the answer can sit far behind the question
# (every message queued after it adds the user's message and an acknowledgement).
HISTORY_LOOKBACK = 500
# A bug apology is no answer (its trace id follows the fixed part of the sentence).
BUG_APOLOGY = texts.bug("").partition("(")[0]
HOUSEKEEPING_EVERY = 600.0  # seconds between purges of finished items and old processed ids
PROCESSED_RETENTION = 7 * 86400.0  # Discord replays only recent events; a week is ample
# A failed run means storage failed (the breakers keep Gemini and Discord outages out of it). With an
# open storage breaker a run costs one rejected call, and the drain is what probes the breaker
# when no user writes: a long backoff would leave the queue waiting long after storage is back.
FAILURE_BACKOFF_CAP = 5.0


class Drain:
    """Owns the drain loop; ``wake()`` runs it now (after a requeue, a breaker reset, an operator)."""

    def __init__(self, app: Application, pipeline: MessagePipeline, *, interval: float = 1.0, batch: int = 5):
        self.app = app
        self.pipeline = pipeline
        self.batch = batch
        cfg = app.config
        self.lease = cfg.processing_timeout_seconds * 2 + 30.0
        self.task = SupervisedTask(
            "drain",
            self.run_once,
            interval=interval,
            run_timeout=self.lease,
            backoff=exponential_backoff(base=interval, cap=max(interval, FAILURE_BACKOFF_CAP)),
            max_consecutive_failures=1_000_000,  # the drain must never give up for good
            clock=app.clock,
            expected=(CircuitOpenError, CallTimeoutError, StorageError),  # storage down: no stack
        )
        self._next_housekeeping = 0.0

    def start(self) -> None:
        self.task.start()

    async def stop(self) -> None:
        await self.task.stop()

    def wake(self) -> None:
        self.task.wake()

    async def run_once(self) -> None:
        """One pass; wakes itself again when it did work, so a backlog drains without waiting."""
        app = self.app
        now = app.clock.time()
        if now >= self._next_housekeeping:
            await self._housekeeping(now)
        for item in await app.storage.expire(now=now, max_age=app.config.queue_max_age_seconds):
            app.metrics.queue_expired.labels(kind=item.kind.value).inc()
            await self.pipeline.notify(item, texts.expired(now - item.created_at))
        send = app.board["discord.send"]
        if not send.would_admit():
            await self._publish_stats()
            return
        # Discord half-open: one send decides whether it is back (a batch would fail as one).
        probing = send.state is not BreakerState.CLOSED
        items = await app.storage.claim(
            now=now, lease_seconds=self.lease, kind=ItemKind.OUTBOUND, limit=1 if probing else self.batch
        )
        gemini = app.board["gemini"]
        if app.maintenance() is not None:
            inbound_limit = 0  # maintenance: hold questions; answers already made still go out
        elif gemini.state is BreakerState.CLOSED:
            inbound_limit = self.batch
        else:
            inbound_limit = 1 if gemini.would_admit() else 0  # one probe while half-open
        if probing:
            inbound_limit = 0 if items else min(inbound_limit, 1)
        if inbound_limit:
            items += await app.storage.claim(
                now=now, lease_seconds=self.lease, kind=ItemKind.INBOUND, limit=inbound_limit
            )
        if items:
            await asyncio.gather(*(self._process(item) for item in items))
            self.wake()
        await self._publish_stats()

    async def _process(self, item: QueueItem) -> None:
        inbound = Inbound.from_payload(item.payload)
        with request_context(
            collector=self.app.traces,
            guild=inbound.guild_id,
            channel=inbound.channel_id,
            user=inbound.author_id,
        ):
            try:
                await self._process_item(item, inbound)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                verdict = classify(exc)
                log.warning("drain.item_failed", item=item.id, category=verdict.category.value)
                await self.pipeline.requeue(
                    item,
                    verdict.category.value,
                    retry_after=verdict.retry_after,
                    count_attempt=verdict.category is not Category.CIRCUIT_OPEN,
                )

    async def _process_item(self, item: QueueItem, inbound: Inbound) -> None:
        app = self.app
        channel = await app.channel_for(item)
        original = inbound.reference()
        if item.kind is ItemKind.OUTBOUND:
            chunks = [str(c) for c in item.payload.get("chunks", [])]
            await self.pipeline.deliver(
                item,
                inbound,
                chunks,
                original=original,
                channel=channel,
                outcome=str(item.payload.get("outcome", "answered_late")),
            )
            return
        if await self._already_answered(channel, inbound.message_id):
            # A previous process answered and died before it could record that.
            await app.storage.complete(item.id)
            return
        try:
            async with app.mutex.acquire(
                inbound.key, app.config.mutex_acquire_timeout_seconds, holder="drain"
            ):
                await self.pipeline.answer(item, inbound, channel=channel, original=original, live=False)
        except MutexTimeoutError:
            await self.pipeline.requeue(item, "conversation busy", count_attempt=False)

    async def _already_answered(self, channel: discord.abc.Messageable, message_id: int) -> bool:
        me = self.app.bot_user_id()
        if me is None:
            return False
        try:
            async for message in channel.history(limit=HISTORY_LOOKBACK, after=discord.Object(id=message_id)):
                if message.author.id == me and is_answer_to(message, message_id):
                    return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not knowing is no reason to stay silent: answer (at worst twice, never never).
            log.info("drain.history_unavailable", category=classify(exc).category.value)
        return False

    async def _housekeeping(self, now: float) -> None:
        """Keep the database small: finished items go, processed ids older than a week go."""
        self._next_housekeeping = now + HOUSEKEEPING_EVERY
        purged = await self.app.storage.purge(ItemState.DONE)
        pruned = await self.app.storage.prune_processed(PROCESSED_RETENTION, now=now)
        if purged or pruned:
            log.info("queue.housekeeping", done_items_purged=purged, processed_ids_pruned=pruned)

    async def _publish_stats(self) -> None:
        try:
            stats = await self.app.storage.stats(now=self.app.clock.time())
        except asyncio.CancelledError:
            raise
        except Exception:
            return
        self.app.metrics.set_queue_stats(stats)


def is_answer_to(message: discord.Message, message_id: int) -> bool:
    """Whether the bot's ``message`` is (the first chunk of) the answer to ``message_id``.

    ``deliver`` sends an answer's chunk 0 with the nonce ``<message id>.0``; every other message
    of the bot (an acknowledgement, a bug apology, a notice) has another nonce, so the nonce
    decides when the history carries one. Without it (Discord does not promise to return it),
    the answer is the reply to the message that is neither an acknowledgement nor an apology.
    """
    if message.nonce is not None:
        return str(message.nonce) == f"{message_id}.0"[-25:]
    ref = message.reference
    if ref is None or ref.message_id != message_id:
        return False
    return not message.content.startswith((texts.ACK_MARK, BUG_APOLOGY))
