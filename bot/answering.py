"""Answering: a claimed inbound item through Gemini, split into chunks, delivered as a reply.

``Answerer.answer`` runs the processing timeout and the typing indicator around
``GeminiService.generate`` (with the guild's tools and the history bounded in tokens,
``bot.history``) and hands a failure to the ``FailureRouter``; the answer gets its sources
(``bot.grounding``), long ones and big code blocks go as files (``bot.long_answers``), and its
tokens are charged (``bot.usage``). ``deliver`` sends the chunks with per-chunk nonces and moves
what Discord does not take now to the outbound queue. A streamed answer (``bot.streaming``) is
shown as Gemini writes it, and ``deliver`` then edits its messages to the final text instead.
The live path (``bot.intake``), ``/ask`` and the drain all answer through here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

import discord
import structlog

from bot import conversations, grounding, long_answers, marks, moderation, streaming, texts, tools
from bot.answer_cache import context_key
from bot.attachments import Attachments, Prepared, describe, files_of
from bot.history import LeftOutNotes, fit
from bot.inbound import Inbound, Snowflake
from bot.long_answers import AnswerFiles
from bot.routing import Explanation, FailureRouter, Original
from bot.settings import Effective, fallback_note, recent
from bot.splitting import has_visible_text, split_message
from resilience.context import span
from resilience.degradation import ItemKind, ItemState, QueueItem
from resilience.errors import Category, classify
from services.discord_io import PartialDeliveryError
from services.gemini import Reply, ReplyKind
from services.memory_store import Scope
from services.storage import Turn, TurnInput, UsageRecord

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.answering")

TurnRow = TurnInput


class Answerer:
    """Generates and delivers answers; built once per application."""

    def __init__(self, app: Application, router: FailureRouter) -> None:
        self.app = app
        self.router = router
        self.attachments = Attachments(app)
        self.left_out = LeftOutNotes()
        self.streaming = streaming.Streaming(app)

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
        left_out = 0
        settings = app.effective(inbound.guild_id, inbound.chain)  # the server's /settings (memory)
        owners: list[tuple[Scope, int]] = []
        cache_key: str | None = None
        hit: Reply | None = None
        functions: tools.AnswerTools | None = None
        prefix = self._prefix(item, inbound, live)
        stream = self.streaming.open(
            item, inbound, channel, original=original, prefix=prefix, files=long_answers.can_attach(channel),
            enabled=settings.streaming,
        )
        try:
            if history is None:
                history = await app.storage.history(inbound.key)
            history, left_out = fit(recent(history, settings.history), app.config.history_max_tokens)
            prompt, earlier = conversations.for_gemini(inbound, history)  # who said what, in a server
            owners = app.memory.owners(
                author_id=inbound.author_id, guild_id=inbound.guild_id, guild_on=settings.memory,
                private=bool(item.payload.get("private")),
            )
            async with app.discord_io.typing(channel):
                async with asyncio.timeout(app.config.processing_timeout_seconds):
                    # Functions Gemini may call here (bot.tools), run by our runtime between rounds.
                    functions = tools.for_answer(
                        app, settings, channel=channel, author_id=inbound.author_id,
                        question_id=inbound.message_id, author=getattr(original, "author", None),
                    )
                    if owners:  # what was said long ago, when relevant (bot.memory); "" on any failure
                        skip = {turn.text for turn in history}
                        prompt = await app.memory.recall(inbound.content, owners, skip=skip) + prompt
                    # An answer that may call functions is never cached: it depends on the moment, or acts.
                    if functions is None:
                        cache_key = self._cache_key(item, inbound, settings, prompt, earlier)
                    if cache_key and inbound.guild_id is not None:
                        hit = app.answer_cache.get(inbound.guild_id, cache_key)
                    if hit is not None:
                        log.info("answer_cache.hit", item=item.id)
                        generating = _cached(hit)
                    else:
                        # Files (bot.attachments): read, then sent with the question; none: generate.
                        generating = self.attachments.generate(
                            item.payload, prompt, inbound.key, earlier,
                            tools=settings.tools, persona=settings.persona, options=settings.options(),
                            observer=stream, functions=functions,
                        )
                    if stream is None:
                        reply, attached = await generating
                    else:  # shown as it is written; a Stop ends it with what was written
                        reply, attached = await stream.run(generating, _stopped)
        except asyncio.CancelledError:
            if stream is not None:
                stream.abandon()
            raise
        except Exception as exc:
            if stream is not None:
                item = await stream.interrupt()  # what shows says it is not the whole answer
            routed = await self.router.route(item, original, exc, live=live, channel=channel)
            if isinstance(routed, Explanation):
                return await self.deliver(
                    item, inbound, [routed.text], original=original, channel=channel, outcome="refused",
                    stream=stream if stream is not None and stream.started else None,
                )
            return routed
        if stream is not None:
            item = await stream.halt()
            if not stream.started:
                stream = None  # nothing was shown yet (a quick answer, a refusal): sent as usual
        usage = app.usage.record(inbound.author_id, inbound.guild_id, reply)
        # Only whole answers are kept: not one cut short (MAX_TOKENS), stopped (no finish reason), blank.
        whole = reply.ok and reply.finish_reason == "STOP" and has_visible_text(reply.text)
        if hit is None and whole and attached.empty and inbound.guild_id is not None:
            if cache_key:
                app.answer_cache.put(inbound.guild_id, cache_key, reply)
            offline = settings.offline_answers and functions is None
            if offline and inbound.content and not item.payload.get("private"):
                app.answer_cache.put_offline(inbound.guild_id, inbound.content, reply)

        turns: list[TurnRow] = []
        files: AnswerFiles | None = None
        if reply.ok and not has_visible_text(reply.text):
            # Text with nothing to show (only a code fence, say): no answer, and no turn for the history.
            log.warning("pipeline.blank_answer", item=item.id, length=len(reply.text))
            chunks = [texts.no_answer()]
            outcome = "refused"
        elif reply.ok:
            shaped = self._shape(
                reply, inbound, kept=len(history), left_out=left_out, files=long_answers.can_attach(channel),
                chosen=settings.model,
            )
            body = prefix + shaped.text
            asked = inbound.content or f"({describe(item.payload)})"
            if attached.notes:  # files left out: one sentence each, after the answer
                body = f"{body}\n\n{' '.join(attached.notes)}"
            chunks = split_message(body, limit=marks.ROOM if stream is None else streaming.ROOM)
            files = long_answers.attach(shaped, chunks)
            if not item.payload.get("private"):  # a private /ask stays out of the channel's history
                turns = [
                    ("user", asked, inbound.message_id, inbound.speaker),
                    ("model", reply.text or "", None),
                ]
            outcome = "answered" if live else "answered_late"
        else:
            chunks = [reply.user_message or texts.no_answer()]
            outcome = "refused"
        delivered = await self.deliver(
            item,
            inbound,
            chunks,
            original=original,
            channel=channel,
            outcome=outcome,
            turns=turns,
            files=files,
            usage=usage,
            stream=stream,
        )
        if not reply.ok:
            await moderation.record(app, inbound, reply, settings)  # the server's log of blocks, if any
        if turns and delivered != "error":
            await self.attachments.remember(inbound.key, inbound.message_id, attached)
        if reply.ok and owners and delivered != "error" and inbound.content:
            app.memory.remember(  # in the background: nobody waits for the embedding
                owners, author_id=inbound.author_id, guild_id=inbound.guild_id, text=inbound.content,
                answer=reply.text, said_at=item.created_at,
            )
        return delivered

    @staticmethod
    def _cache_key(
        item: QueueItem, inbound: Inbound, settings: Effective, prompt: str, history: Sequence[Turn]
    ) -> str | None:
        """The answer cache's key for this request (``bot.answer_cache``), or None when it is not
        cached: the server's ``answer_cache`` setting off, a DM, a question with files."""
        if not settings.answer_cache or inbound.guild_id is None or files_of(item.payload):
            return None
        return context_key(
            prompt=prompt, history=history, persona=settings.persona, tools=settings.tools,
            options=settings.options(),
        )

    @staticmethod
    def _prefix(item: QueueItem, inbound: Inbound, live: bool) -> str:
        """What goes before an answer: a late one recalls the question; the asker of a late slash
        command, or of a question whose answer opens its own thread (bot.conversations), has no
        message to reply to there and is pinged by name instead."""
        prefix = "" if live else texts.late_answer_prefix(inbound.content or f"({describe(item.payload)})")
        if (not live and item.payload.get("interaction")) or item.payload.get("threaded"):
            prefix = f"<@{inbound.author_id}> {prefix}"
        return prefix

    def _shape(
        self,
        reply: Reply,
        inbound: Inbound,
        *,
        kept: int,
        left_out: int,
        files: bool,
        chosen: str | None = None,
    ) -> long_answers.Shaped:
        """The answer for chat: its sources (``bot.grounding``), the model that answered when it is not
        the ``chosen`` one (a fallback), a note when older turns were left out (once per conversation,
        ``bot.history``), and, where the bot may upload (``files``), long answers or big code blocks as
        files (``bot.long_answers``)."""
        cfg = self.app.config
        notes = [grounding.sources_line(reply.sources), fallback_note(reply.model, chosen)]
        if left_out and self.left_out.first_time(inbound.key):
            notes.append(texts.history_left_out(kept))
        never = len(reply.text) + 1
        return long_answers.shape(
            reply.text,
            long_chars=cfg.long_answer_chars if files else never,
            code_chars=cfg.code_file_chars if files else never,
            appendix="\n".join(note for note in notes if note),
            file_appendix=grounding.sources_markdown(reply.sources),
        )

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
        files: AnswerFiles | None = None,
        usage: UsageRecord | None = None,
        stream: streaming.StreamWriter | None = None,
    ) -> str:
        """Send ``chunks`` as a reply; what Discord does not take now goes to the outbound queue.

        A streamed answer (``stream``, or an outbound item whose payload keeps its messages) is
        not sent: its messages are edited to show ``chunks`` (``StreamWriter.finalize``), and what
        Discord does not take now is queued the same way, messages and all.

        Chunks with nothing in them are never recorded as an answer: the user gets
        ``texts.no_answer()`` instead (outcome ``"refused"``, no turns).
        ``turns`` (the question and the answer) join the conversation history when the item is
        finished, in the same transaction, or as soon as the answer is queued for delivery;
        ``usage`` (the Gemini call's tokens) is written with them, or with the finish when there
        are no turns. ``files`` go with the chunk they name (``bot.long_answers``), and are kept in
        the item's payload while the answer waits; an outbound item's are read from there.
        Chunk ``i`` carries the nonce ``<message id>.<i>``, so a chunk resent after a timeout
        within Discord's nonce window is not posted twice, and ends with the invisible mark of
        (question, ``i``) (``bot.marks``), by which a restarted bot recognises in the channel's
        history what a dead process posted; a long answer is staged as an outbound item before
        its first chunk goes out, so a crash between chunks resumes the delivery.
        """
        app = self.app
        if stream is None and streaming.streamed(item):
            stream = self.streaming.resume(item, inbound, channel, original=original)
        if stream is not None:
            item = stream.item
        room = marks.ROOM if stream is None else streaming.ROOM
        if files is None and item.kind is ItemKind.OUTBOUND:
            files = AnswerFiles.from_payload(item.payload.get("files"))
        if not any(chunk.strip() for chunk in chunks):
            # Nothing to send is no answer: finishing the item would record silence as answered.
            log.warning("pipeline.nothing_to_deliver", item=item.id, outcome=outcome)
            chunks, outcome, turns, files = [texts.no_answer()], "refused", (), None
        if any(len(chunk) > room for chunk in chunks):
            # Queued by a version without marks (chunks of up to 2,000): re-split to leave room.
            chunks = [piece for chunk in chunks for piece in _fit(chunk, room)]
        first = int(item.payload.get("chunk_offset", 0))
        kept = {"files": files.payload()} if files is not None else {}
        if len(chunks) > 1 and item.kind is ItemKind.INBOUND:
            item = await app.storage.update_payload(
                item.id,
                {**item.payload, "chunks": list(chunks), "outcome": outcome, "chunk_offset": first, **kept},
                kind=ItemKind.OUTBOUND,
            )
            if stream is not None:
                stream.item = item
            if turns or usage is not None:
                await app.storage.append_turns(inbound.key, turns, usage=usage)
                turns, usage = (), None
        try:
            if stream is not None:
                with span("deliver", dependency="discord.edit", chunks=len(chunks), outcome=outcome):
                    await stream.finalize(chunks, files)  # every message edited to the final text
            else:
                with span("deliver", dependency="discord.send", chunks=len(chunks), outcome=outcome):
                    await app.discord_io.send_chunks(
                        channel,
                        [marks.mark(chunk, inbound.message_id, first + i) for i, chunk in enumerate(chunks)],
                        reply_to=original,
                        mention_user=Snowflake(inbound.author_id),
                        nonce=str(item.payload.get("nonce", inbound.message_id)),
                        first_index=first,
                        files=files.uploads() if files is not None else None,
                    )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if stream is not None:
                item = stream.item  # its payload holds the messages posted so far
            if isinstance(exc, PartialDeliveryError):
                done = len(chunks) - len(exc.remaining)  # sent, or skipped as blank or deleted
                remaining, verdict = chunks[done:], classify(exc.cause)  # unmarked
                first += done
            else:
                remaining, verdict = chunks, classify(exc)
            if verdict.retryable:
                if turns or usage is not None:
                    await app.storage.append_turns(inbound.key, turns, usage=usage)
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
                        **kept,
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
            await self._record_usage(usage)
            await self.router.undeliverable(item, exc.cause if isinstance(exc, PartialDeliveryError) else exc)
            return "error"
        try:
            await app.storage.finish(item.id, key=inbound.key, turns=turns, usage=usage)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Delivered, not recorded: once the lease runs out the drain finds the answer by its
            # nonce and completes the item (the exchange stays out of the history).
            log.warning("pipeline.finish_failed", item=item.id, category=classify(exc).category.value)
        return outcome

    async def _record_usage(self, usage: UsageRecord | None) -> None:
        """Store a Gemini call's usage on its own (no transaction finishes its item); never raises."""
        if usage is None:
            return
        try:
            await self.app.storage.record_usage(usage)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("usage.not_recorded", category=classify(exc).category.value)


def _fit(chunk: str, room: int = marks.ROOM) -> list[str]:
    """``chunk`` in pieces that leave room for a mark; one with nothing to show stays as it is
    (``send_chunks`` skips it)."""
    if len(chunk) <= room or not has_visible_text(chunk):
        return [chunk]
    return split_message(chunk, limit=room)


async def _cached(reply: Reply) -> tuple[Reply, Prepared]:
    """An answer from the answer cache, as a generation returns it."""
    return reply, Prepared()


def _stopped(text: str) -> tuple[Reply, Prepared]:
    """A streamed answer someone stopped: what was written is the answer (no usage was reported)."""
    return Reply(ReplyKind.ANSWER, text, ""), Prepared()
