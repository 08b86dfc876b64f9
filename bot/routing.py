"""Failure routing: what happens to a message whose answer failed, and what its user is told.

``FailureRouter.route`` classifies the failure (``resilience.errors.classify``): a transient
one puts the item back in the durable queue (``requeue``) and tells the user it is queued,
with its position; a permanent one or a bug comes back as an ``Explanation`` for the caller
to deliver in place of the answer. ``requeue`` dead-letters an item after
``QUEUE_MAX_ATTEMPTS`` counted attempts and tells its user (``notify``), queueing the notice
itself when Discord does not take it now.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import discord
import structlog

from bot import texts
from bot.inbound import Inbound, Snowflake, backoff
from resilience.breakers import BreakerState
from resilience.context import current_trace_id
from resilience.degradation import ItemKind, ItemState, QueueItem
from resilience.errors import Category, Classification, classify

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.routing")

# Gemini failures that may be the question's own doing (an answer too long for the timeout) rather
# than Gemini's health: they count as the item's attempts even when they opened the breaker or
# failed its half-open probe, so a poison message is dead-lettered after QUEUE_MAX_ATTEMPTS instead
# of holding the breaker open for everyone. A 503, a 429, a refused connection or a garbled body
# say nothing about the question and never count while the breaker is not closed: an outage longer
# than the back-off must not dead-letter what it hit. (A Gemini that hangs for everyone does cost
# each probe's item an attempt: the price of not letting one question stall the bot.)
ITEM_SUSPECTS = frozenset({Category.TIMEOUT})

# Discord's JSON error codes for refusals that name their cause in the log and the dead letter.
CANNOT_DM = 50007  # "Cannot send messages to this user": DMs closed, or the bot blocked
_REFUSALS = {CANNOT_DM: "dm_closed", 50001: "missing_access", 50013: "missing_permissions"}

Original = discord.Message | discord.MessageReference


@dataclass(frozen=True, slots=True)
class Explanation:
    """A failure the user gets a sentence for instead of an answer (delivered like one)."""

    text: str


class FailureRouter:
    """Requeues, dead-letters and acknowledges; built once per application."""

    def __init__(self, app: Application) -> None:
        self.app = app

    async def route(
        self,
        item: QueueItem,
        original: Original,
        exc: BaseException,
        *,
        live: bool,
        channel: discord.abc.Messageable,
    ) -> str | Explanation:
        """Queue ``item`` (acknowledged in ``channel``, where the answer would go) and return the
        outcome, or return the ``Explanation`` to deliver for a failure that retrying cannot mend."""
        app = self.app
        verdict = classify(exc, now=app.clock.time())
        app.metrics.errors.labels(category=verdict.category.value).inc()
        if not verdict.retryable:
            if verdict.category is Category.INTERNAL:
                log.error("pipeline.bug", item=item.id, exc_info=exc)
                return Explanation(texts.bug(current_trace_id() or "-"))
            return Explanation(verdict.user_message)
        counted = self.counts_against(verdict, "gemini", suspects=ITEM_SUSPECTS)
        try:
            requeued = await self.requeue(
                item, verdict.category.value, retry_after=verdict.retry_after, count_attempt=counted
            )
        except asyncio.CancelledError:
            raise
        except Exception as failure:
            # Still claimed under its lease: the drain picks it up when the lease runs out.
            log.warning("pipeline.requeue_failed", item=item.id, category=classify(failure).category.value)
            requeued = item
        if requeued.state is ItemState.DEAD:
            return "error"
        if live or not item.payload.get("acked"):
            position = await self.position(requeued)
            text = texts.queued(verdict, position)
            offer = self.offline_answer(item)
            if offer is not None:
                text = f"{text}\n\n{offer}"
            await self.acknowledge(channel, original, text, requeued)
        return "queued"

    def offline_answer(self, item: QueueItem) -> str | None:
        """For a ``/ask`` in a server whose ``offline_answers`` setting is on: an earlier answer to the
        same question (``bot.answer_cache``), marked as cached and dated; else None."""
        payload = item.payload
        if not payload.get("interaction") or payload.get("guild_id") is None:
            return None
        inbound = Inbound.from_payload(payload)
        assert inbound.guild_id is not None
        if not self.app.effective(inbound.guild_id, inbound.chain).offline_answers:
            return None
        found = self.app.answer_cache.offline(inbound.guild_id, inbound.content)
        if found is None:
            return None
        log.info("answer_cache.offline_offer", item=item.id)
        return texts.cached_answer(found.reply.text, found.stored_at)

    def counts_against(
        self, verdict: Classification, breaker: str, *, suspects: frozenset[Category] = frozenset()
    ) -> bool:
        """Whether a transient failure says something about the item, so it counts as an attempt.

        A rejection by an open breaker never counts. A failure that leaves ``breaker`` closed
        (read after the failure) counts: a message that keeps failing while the dependency works
        is dead-lettered after ``queue_max_attempts``. A failure that opened the breaker or failed
        its half-open probe counts only when its category is one of ``suspects`` (see
        ``ITEM_SUSPECTS``); otherwise it is the dependency's outage, not the item's fault.
        """
        if verdict.category is Category.CIRCUIT_OPEN:
            return False
        return verdict.category in suspects or self.app.board[breaker].state is BreakerState.CLOSED

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

    async def undeliverable(self, item: QueueItem, exc: BaseException) -> None:
        """Discord refuses an answer for good (``exc`` is not retryable): dead-letter the item, log
        why, and tell the asker where that is still possible.

        A private ``/ask`` answer goes by DM (its token expired, or it was answered late). When the
        asker accepts no DMs (403, code 50007) nothing private can reach them: an ephemeral message
        needs the expired interaction. If they asked in a server channel, a short notice there
        says so, mentioning only them and holding neither the question nor the answer (those stay
        private; that a private question was asked does not). From a DM there is nowhere to say it.
        """
        verdict = classify(exc)
        code = exc.code if isinstance(exc, discord.HTTPException) else None
        reason = _REFUSALS.get(code or 0, verdict.category.value)
        private = bool(item.payload.get("private"))
        log.warning(
            "pipeline.undeliverable",
            item=item.id,
            category=verdict.category.value,
            discord_code=code,
            reason=reason,
            private=private,
            user_id=item.payload.get("author_id"),
        )
        await self.app.storage.dead_letter(item.id, f"undeliverable: {reason}")
        from_guild = item.payload.get("guild_id") is not None
        if code == CANNOT_DM and private and from_guild and not item.payload.get("notice"):
            in_channel = replace(item, payload={**item.payload, "private": False})
            await self.notify(in_channel, texts.private_answer_undeliverable())

    async def notify(self, item: QueueItem, text: str) -> None:
        """Tell the author of a queued message something (a dead letter, an expiry), as a reply to it.

        A notice Discord does not take now (it is down: often why the item gave up) is queued as
        an outbound item of its own, so the user is told once Discord is back; a notice that
        cannot be queued either is logged.
        """
        inbound = Inbound.from_payload(item.payload)
        mention = None
        if item.payload.get("interaction"):
            text, mention = f"<@{inbound.author_id}> {text}", Snowflake(inbound.author_id)
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

    async def acknowledge(
        self, channel: discord.abc.Messageable, original: Original, text: str, item: QueueItem
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

    async def acknowledge_busy(self, message: discord.Message, item: QueueItem) -> None:
        """"Queued behind earlier messages of this conversation", as a reply to ``message``."""
        position = await self.position(item)
        await self.acknowledge(message.channel, message, texts.queued_busy(position), item)

    async def position(self, item: QueueItem) -> int:
        """The item's queue position for an acknowledgement, or 0 (none shown) if storage cannot say."""
        try:
            return await self.app.storage.position(item.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("pipeline.position_unavailable", item=item.id, category=classify(exc).category.value)
            return 0
