"""Answering: a claimed inbound item through Gemini, split into chunks, delivered as a reply.

``Answerer.answer`` runs the processing timeout and the typing indicator around
``GeminiService.generate`` and hands a failure to the ``FailureRouter``; ``deliver`` sends the
chunks with per-chunk nonces and moves what Discord does not take now to the outbound queue.
The live path (``bot.intake``), ``/ask`` and the drain all answer through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import discord
import structlog

from bot import marks, texts
from bot.attachments import Attachments, describe
from bot.inbound import Inbound, Snowflake
from bot.routing import Explanation, FailureRouter, Original
from bot.splitting import has_visible_text, split_message
from resilience.context import span
from resilience.degradation import ItemKind, ItemState, QueueItem
from resilience.errors import Category, classify
from services.discord_io import PartialDeliveryError
from services.storage import Turn

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.answering")

TurnRow = tuple[str, str, str | int | None]


class Answerer:
    """Generates and delivers answers; built once per application."""

    def __init__(self, app: Application, router: FailureRouter) -> None:
        self.app = app
        self.router = router
        self.attachments = Attachments(app)

    async def answer(
        self,
        item: QueueItem,
        inbound: Inbound,
        *,
        channel: discord.abc.Messageable,
        original: Original,
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
                    # Files (bot.attachments): read, then sent with the question; none: generate.
                    reply, files = await self.attachments.generate(
                        item.payload, inbound.content, inbound.key, history
                    )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            routed = await self.router.route(item, original, exc, live=live, channel=channel)
            if isinstance(routed, Explanation):
                return await self.deliver(
                    item, inbound, [routed.text], original=original, channel=channel, outcome="refused"
                )
            return routed

        turns: list[TurnRow] = []
        if reply.ok and not has_visible_text(reply.text):
            # Text with nothing to show (only a code fence, say): no answer, and no turn for the history.
            log.warning("pipeline.blank_answer", item=item.id, length=len(reply.text))
            chunks = [texts.no_answer()]
            outcome = "refused"
        elif reply.ok:
            body = reply.text or ""
            asked = inbound.content or f"({describe(item.payload)})"
            if not live:
                body = texts.late_answer_prefix(asked) + body
                if item.payload.get("interaction"):
                    # A slash command has no message to reply to: ping the asker by name instead.
                    body = f"<@{inbound.author_id}> {body}"
            if files.notes:  # files left out: one sentence each, after the answer
                body = f"{body}\n\n{' '.join(files.notes)}"
            chunks = split_message(body, limit=marks.ROOM)
            if not item.payload.get("private"):  # a private /ask stays out of the channel's history
                turns = [("user", asked, inbound.message_id), ("model", reply.text or "", None)]
            outcome = "answered" if live else "answered_late"
        else:
            chunks = [reply.user_message or texts.no_answer()]
            outcome = "refused"
        delivered = await self.deliver(
            item, inbound, chunks, original=original, channel=channel, outcome=outcome, turns=turns
        )
        if turns and delivered != "error":
            await self.attachments.remember(inbound.key, inbound.message_id, files)
        return delivered

    async def deliver(
        self,
        item: QueueItem,
        inbound: Inbound,
        chunks: list[str],
        *,
        original: Original,
        channel: discord.abc.Messageable,
        outcome: str,
        turns: Sequence[TurnRow] = (),
    ) -> str:
        """Send ``chunks`` as a reply; what Discord does not take now goes to the outbound queue.

        Chunks with nothing in them are never recorded as an answer: the user gets
        ``texts.no_answer()`` instead (outcome ``"refused"``, no turns).
        ``turns`` (the question and the answer) join the conversation history when the item is
        finished, in the same transaction, or as soon as the answer is queued for delivery.
        Chunk ``i`` carries the nonce ``<message id>.<i>``, so a chunk resent after a timeout
        within Discord's nonce window is not posted twice, and ends with the invisible mark of
        (question, ``i``) (``bot.marks``), by which a restarted bot recognises in the channel's
        history what a dead process posted; a long answer is staged as an outbound item before
        its first chunk goes out, so a crash between chunks resumes the delivery.
        """
        app = self.app
        if not any(chunk.strip() for chunk in chunks):
            # Nothing to send is no answer: finishing the item would record silence as answered.
            log.warning("pipeline.nothing_to_deliver", item=item.id, outcome=outcome)
            chunks, outcome, turns = [texts.no_answer()], "refused", ()
        if any(len(chunk) > marks.ROOM for chunk in chunks):
            # Queued by a version without marks (chunks of up to 2,000): re-split to leave room.
            chunks = [piece for chunk in chunks for piece in _fit(chunk)]
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
            with span("deliver", dependency="discord.send", chunks=len(chunks), outcome=outcome):
                await app.discord_io.send_chunks(
                    channel,
                    [marks.mark(chunk, inbound.message_id, first + i) for i, chunk in enumerate(chunks)],
                    reply_to=original,
                    mention_user=Snowflake(inbound.author_id),
                    nonce=str(item.payload.get("nonce", inbound.message_id)),
                    first_index=first,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, PartialDeliveryError):
                done = len(chunks) - len(exc.remaining)  # sent, or skipped as blank or deleted
                remaining, verdict = chunks[done:], classify(exc.cause)  # unmarked
                first += done
            else:
                remaining, verdict = chunks, classify(exc)
            if verdict.retryable:
                if turns:
                    await app.storage.append_turns(inbound.key, turns)
                # the first failure of a fresh answer is no attempt at delivering a queued one, nor
                # is a rate limit (Discord asked for a slower pace, one says nothing of the answer)
                rate_limited = verdict.category is Category.RATE_LIMITED
                counted = (
                    item.kind is ItemKind.OUTBOUND
                    and not rate_limited
                    and self.router.counts_against(verdict, "discord.send")
                )
                requeued = await self.router.requeue(
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
                if rate_limited and first == 0 and not item.payload.get("acked"):
                    # The answer waits out Discord's limit (tens of seconds): say so, where Discord
                    # lets us (the acknowledgement may be refused by the same bucket).
                    if requeued.state is not ItemState.DEAD:
                        position = await self.router.position(requeued)
                        text = texts.queued(verdict, position)
                        await self.router.acknowledge(channel, original, text, requeued)
                return "queued"
            await self.router.undeliverable(item, exc.cause if isinstance(exc, PartialDeliveryError) else exc)
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


def _fit(chunk: str) -> list[str]:
    """``chunk`` in pieces that leave room for a mark; one with nothing to show stays as it is
    (``send_chunks`` skips it)."""
    if len(chunk) <= marks.ROOM or not has_visible_text(chunk):
        return [chunk]
    return split_message(chunk, limit=marks.ROOM)
