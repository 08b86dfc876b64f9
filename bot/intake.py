"""Intake: one gateway message from ``on_message`` to acceptance and its place in its conversation.

Order: fast exit -> in-memory dedup -> input checks -> rate limits -> daily token quotas
(``bot.usage``) -> maintenance -> durable acceptance (dedup across restarts) -> per-conversation
mutex -> the ``Answerer``. The rate
limits come before maintenance, so a message saved during maintenance is one the user was
allowed to send: the backlog maintenance leaves is bounded per user and per guild. A refused
message (too long, empty, over the rate limit) is answered as ``NoticeLimiter`` decides: one
notice per user, kind and window, then a few reactions, then silence, so a flood of refused
messages cannot become a flood of posts.

Acceptance (``Application.accept``) is the durable point of no return. A live message is
accepted with ``accept_with_history``: the same transaction also reads the history to answer
with, when the message is next in its conversation. Messages of one conversation reach its
mutex in arrival order (``Arrivals``), however long each one's write took, so an unsaved
answer (storage down) never overtakes an earlier message.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import discord
import structlog

from bot import marks, texts
from bot.answering import Answerer
from bot.attachments import Collected, collect
from bot.conversations import NO_THREAD_PERMISSION, Conversations, for_gemini, speaker_label
from bot.inbound import Inbound, lease_seconds
from bot.ratelimit import Feedback, NoticeLimiter
from bot.routing import FailureRouter, Original
from bot.settings import scope_chain
from bot.splitting import has_visible_text, split_message
from resilience.context import request_context, span
from resilience.degradation import ItemKind, ItemState, QueueItem
from resilience.errors import Category, MutexTimeoutError, QueueFullError, classify, user_message_for
from services.storage import StorageError, Turn

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.intake")

RECENT_IDS = 10_000
# Reactions per user and rate-limit window for refusals after the notice: enough to show a few
# more messages were not taken, few enough that a flood costs at most this many writes.
REFUSAL_REACTIONS = 3


class Intake:
    """Runs every message addressed to the bot; built once per application."""

    def __init__(
        self,
        app: Application,
        answerer: Answerer,
        router: FailureRouter,
        *,
        bot_user_id: Callable[[], int | None],
    ) -> None:
        self.app = app
        self.answerer = answerer
        self.router = router
        self._bot_user_id = bot_user_id
        self.conversations = Conversations(app, bot_user_id=bot_user_id)
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._inflight: set[asyncio.Task[Any]] = set()
        self._arrivals = Arrivals()
        self.refusals = NoticeLimiter(
            window=app.ratelimiter.window, reactions=REFUSAL_REACTIONS, clock=app.clock
        )

    @property
    def recent_ids(self) -> int:
        """How many message ids the in-memory dedup remembers now (at most ``RECENT_IDS``)."""
        return len(self._recent)

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
        return self.app.is_chat(message.guild.id, message.channel)

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
                route="message",
                guild=message.guild.id if message.guild else None,
                channel=message.channel.id,
                user=message.author.id,
            ) as trace:
                try:
                    outcome = await self._handle(message)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    trace.fail(exc, "bot")  # the apology's trace id shows this trace, failed
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
            await self._refuse(message, texts.TOO_LONG, texts.too_long(len(text), cfg.max_input_chars))
            return "refused"
        files = collect(message, cfg)  # no I/O: limits and re-fetch plans (bot.attachments)
        if not text and not files.files and not files.stickers:
            if files.refused:
                refused = texts.attachments_refused(files.refused)
                await self._refuse(message, texts.ATTACHMENTS_REFUSED, refused)
            else:
                await self._refuse(message, texts.EMPTY_MENTION, texts.empty_mention())
            return "refused"

        inbound = Inbound(
            message_id=message.id,
            channel_id=message.channel.id,
            guild_id=message.guild.id if message.guild else None,
            author_id=message.author.id,
            content=text,
            # Who said it (Gemini tells the people of a server's channel apart) and where its
            # settings are looked up (the channel, its parent, its category): memory only.
            speaker=speaker_label(message.author.display_name, message.author.id) if message.guild else None,
            scopes=scope_chain(message.channel),
        )
        wait = app.ratelimiter.check(message.author.id, inbound.guild_id)
        if wait is not None:
            await self._refuse(message, texts.COOLDOWN, texts.cooldown(wait))
            return "rate_limited"
        over = app.usage.check(message.author.id, inbound.guild_id)  # daily token quotas (bot.usage)
        if over is not None:
            sentence = texts.quota_exhausted(over.scope, over.limit, over.resets_in)
            await self._refuse(message, texts.QUOTA, sentence)
            return "refused"
        branch = await self.conversations.branch_of(message)  # a reply to an earlier answer
        if branch is not None:
            inbound = replace(inbound, conversation=branch)

        maintenance = app.maintenance(inbound.guild_id)
        if maintenance is not None:
            position: int | None = None
            if cfg.maintenance_queue_messages:
                try:
                    item = await app.accept(inbound, claim=False, extra={"acked": True, **files.payload()})
                except asyncio.CancelledError:
                    raise
                except QueueFullError as exc:
                    await self._refuse(message, texts.QUEUE_FULL, texts.queue_full(exc.scope, exc.limit))
                    return "refused"
                except Exception as exc:  # not saved: the notice must not say it was
                    log.warning("pipeline.accept_failed", category=classify(exc).category.value)
                else:
                    if item is None:
                        return "ignored_duplicate"
                    position = await self.router.position(item)
            await self._say(message, texts.maintenance(maintenance, queued_position=position))
            return "maintenance"
        if app.queue_new_messages:
            queued = await self._queue_new(message, inbound)
            if queued is not None:
                return queued

        channel: discord.abc.Messageable = message.channel
        original: Original = message
        threaded: dict[str, bool] = {}
        wants_thread = self.conversations.wants_thread(message)
        if wants_thread and app.effective(inbound.guild_id, inbound.scopes).auto_thread:
            thread, missing = await self.conversations.open_thread(message, text)
            if thread is not None:
                # Answered in the new thread, a conversation of its own; the question stays in the
                # channel, so the answer refers to it without replying across channels.
                inbound = replace(inbound, channel_id=thread.id, scopes=scope_chain(thread))
                channel, original, threaded = thread, inbound.reference(), {"threaded": True}
            elif missing:
                await self._say(message, NO_THREAD_PERMISSION)

        arrival = self._arrivals.enter(inbound.key)
        try:
            try:
                with span("accept", dependency="storage") as step:
                    accepted = await app.storage.accept_with_history(
                        inbound.message_id,
                        ItemKind.INBOUND,
                        inbound.key,
                        inbound.payload(**files.payload(), **threaded),
                        now=app.clock.time(),
                        lease_seconds=lease_seconds(cfg),
                        caps=app.queue_caps,
                    )
                    step.set(accepted=accepted is not None)
            except asyncio.CancelledError:
                raise
            except QueueFullError as exc:
                await self._refuse(message, texts.QUEUE_FULL, texts.queue_full(exc.scope, exc.limit))
                return "refused"
            except Exception as exc:
                # Storage is down: we cannot promise a later answer, so answer live or say why now.
                verdict = classify(exc)
                log.warning("pipeline.accept_failed", category=verdict.category.value)
                return await self._answer_unsaved(message, inbound, arrival, files, channel=channel)
            if accepted is None:
                return "ignored_duplicate"
            item, history = accepted
            try:
                return await self._answer_accepted(
                    message, inbound, item, history, arrival, channel=channel, original=original
                )
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
                await self.router.acknowledge(channel, original, texts.queued(verdict, 0), item)
                return "queued"
        finally:
            self._arrivals.leave(inbound.key, arrival)

    async def _queue_new(self, message: discord.Message, inbound: Inbound) -> str | None:
        """Shedding load: save the message for the drain and acknowledge it at once; None (answer
        live) when it cannot be saved."""
        try:
            with span("accept", dependency="storage", queued=True):
                item = await self.app.accept(inbound, claim=False, extra={"acked": True})
        except asyncio.CancelledError:
            raise
        except QueueFullError as exc:
            await self._refuse(message, texts.QUEUE_FULL, texts.queue_full(exc.scope, exc.limit))
            return "refused"
        except Exception as exc:
            log.warning("pipeline.accept_failed", category=classify(exc).category.value)
            return None
        if item is None:
            return "ignored_duplicate"
        self.app.drain_wake()
        await self._say(message, texts.queued_load(await self.router.position(item)))
        return "queued"

    async def _answer_accepted(
        self,
        message: discord.Message,
        inbound: Inbound,
        item: QueueItem,
        history: list[Turn] | None,
        arrival: asyncio.Future[None],
        *,
        channel: discord.abc.Messageable,
        original: Original,
    ) -> str:
        """Answer a freshly accepted message live, or queue it behind its conversation."""
        app = self.app
        cfg = app.config
        if item.state is ItemState.PENDING:
            # The conversation already has queued messages: this one waits its turn behind them.
            self._arrivals.leave(inbound.key, arrival)
            await self.router.acknowledge_busy(message, item)
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
                    await self.router.requeue(item, "behind queued messages", count_attempt=False)
                    await self.router.acknowledge_busy(message, item)
                    return "queued"
                return await self.answerer.answer(
                    item, inbound, channel=channel, original=original, live=True, history=history
                )
        except MutexTimeoutError:
            await self.router.requeue(item, "conversation busy", count_attempt=False)
            await self.router.acknowledge_busy(message, item)
            return "queued"

    async def _answer_unsaved(
        self,
        message: discord.Message,
        inbound: Inbound,
        arrival: asyncio.Future[None],
        files: Collected,
        *,
        channel: discord.abc.Messageable,
    ) -> str:
        """Storage is down: try to answer live without a durable record, or say clearly why not.

        The answer (history-less, so it can be generated at once) is sent only after the older
        messages of the conversation have taken their place at the mutex: a slow write cannot be
        overtaken by a later message. A reason why not needs no order and goes out at once.
        """
        app = self.app
        cfg = app.config
        settings = app.effective(inbound.guild_id, inbound.scopes)
        try:
            async with app.discord_io.typing(channel):
                async with asyncio.timeout(cfg.processing_timeout_seconds):
                    prompt, _ = for_gemini(inbound, [])
                    reply, read = await self.answerer.attachments.generate(
                        files.payload(), prompt, inbound.key, [],
                        tools=settings.tools, persona=settings.persona, options=settings.options(),
                    )
            answered = reply.ok and has_visible_text(reply.text)
            notes = f"\n\n{' '.join(read.notes)}" if read.notes else ""
            chunks = (
                split_message(reply.text + notes, limit=marks.ROOM)
                if answered
                else [reply.user_message or texts.no_answer()]
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
                    channel,
                    [marks.mark(chunk, message.id, i) for i, chunk in enumerate(chunks)],
                    reply_to=message if channel is message.channel else inbound.reference(),
                    mention_user=message.author,
                )
            return "answered" if answered else "refused"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._arrivals.leave(inbound.key, arrival)
            await self._say(message, texts.cannot_accept(classify(exc)))
            return "error"

    async def _refuse(self, message: discord.Message, kind: str, text: str) -> None:
        """Answer a refused message: the notice ``text``, a reaction, or nothing (``self.refusals``)."""
        feedback = self.refusals.decide(message.author.id, kind)
        if feedback is Feedback.NOTICE:
            await self._say(message, text)
        elif feedback is Feedback.REACT:
            await self.app.discord_io.react(message, texts.refusal_reaction(kind))  # never raises

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
