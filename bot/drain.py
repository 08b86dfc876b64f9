"""The drain: answers queued messages and delivers queued answers once their dependency is back.

A supervised loop (``resilience.tasks.SupervisedTask``). Each run expires stale items (and
tells their users), then claims work only as far as the breakers let calls through: nothing
while ``discord.send`` is open, outbound items while Gemini is open, one inbound item as the
probe while Gemini is half-open, up to ``concurrency`` items when it is closed, and questions
(inbound items) at most ``QUEUE_DRAIN_PER_SECOND`` a second (a ``TokenBucket`` on the
application's clock): the backlog that maintenance or an outage leaves reaches Gemini at that
pace, not all at once. Each claimed item runs as a task of its own and the loop claims again
as soon as one finishes, so one slow item (a hang, a retried 429) holds up only its own
conversation. The queue hands out at most the head of each conversation and nothing where one
is claimed, so answers stay in order per conversation. A restarted bot resumes what the
previous process left: its claims are released at start-up, and only such an item
(``claim_abandoned``) is looked for in the channel's history. A streamed answer a dead process was
writing is not an answer (its messages' marks say so, ``bot.streaming``): its messages are taken
into the item (``Streaming.adopt``) and the answer is written into them again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

import discord
import structlog

from bot import marks, streaming, texts
from bot.answering import Answerer
from bot.inbound import Inbound
from bot.ratelimit import TokenBucket
from bot.routing import FailureRouter
from bot.streaming import Posted, is_partial
from resilience.breakers import BreakerState
from resilience.context import request_context, span
from resilience.degradation import ItemKind, QueueItem
from resilience.errors import CallTimeoutError, Category, CircuitOpenError, MutexTimeoutError, classify
from resilience.tasks import SupervisedTask, exponential_backoff
from services.storage import StorageError, claim_abandoned

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.drain")

# How far past a queued message the drain looks for an answer a dead process posted but never
# recorded (pages of 100, oldest first, stopping at the first match). Discord's nonce catches a
# resend only within a few minutes and is not in the history; the answer is known by its mark
# (bot.marks). In a busy channel it can sit far behind the question (every message queued after
# it adds the user's message and an acknowledgement).
HISTORY_LOOKBACK = 500
# A bug apology is no answer (its trace id follows the fixed part of the sentence).
BUG_APOLOGY = texts.bug("").partition("(")[0]
HOUSEKEEPING_EVERY = 600.0  # seconds between runs of the storage housekeeping (retention)
HOUSEKEEPING_SOON = 5.0  # seconds to the next run when the last one stopped with more to delete
PROCESSED_RETENTION = 7 * 86400.0  # Discord replays only recent events; a week is ample
# A failed run means storage failed (the breakers keep Gemini and Discord outages out of it). With an
# open storage breaker a run costs one rejected call, and the drain is what probes the breaker
# when no user writes: a long backoff would leave the queue waiting long after storage is back.
FAILURE_BACKOFF_CAP = 5.0
# Items worked on at once. Each waits mostly on Gemini or Discord; the queue gives out one item per
# conversation, so this also bounds how many conversations the drain serves at the same time.
CONCURRENCY = 20
# An item's task is cancelled this long before its lease runs out, so no second claim overlaps it.
LEASE_MARGIN = 10.0
# A question from a guild in maintenance waits this long before the drain looks at it again; the
# end of that guild's maintenance makes it due at once (Operations.guild_maintenance_off).
GUILD_MAINTENANCE_HOLD = 600.0


class Drain:
    """Owns the drain loop and its in-flight items; ``wake()`` runs it now (after a requeue, a breaker
    reset, an operator, a finished item)."""

    def __init__(
        self,
        app: Application,
        answerer: Answerer,
        router: FailureRouter,
        *,
        interval: float = 1.0,
        concurrency: int = CONCURRENCY,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.app = app
        self.answerer = answerer
        self.router = router
        self.concurrency = concurrency
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
        self.pace = TokenBucket(cfg.queue_drain_per_second, clock=app.clock)
        self._next_housekeeping = 0.0
        self._inflight: dict[asyncio.Task[None], ItemKind] = {}

    def start(self) -> None:
        self.task.start()

    async def stop(self) -> None:
        """Stop claiming, cancel the items in flight and wait for them; safe to call twice.

        A cancelled item stays claimed: the next start releases it (``release_claims``) and the
        drain then looks for its answer in the channel before answering it again.
        """
        try:
            await self.task.stop()
        finally:
            tasks = list(self._inflight)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    def wake(self) -> None:
        self.task.wake()

    @property
    def next_housekeeping(self) -> float:
        """The wall-clock time (the app's clock) of the next storage housekeeping run."""
        return self._next_housekeeping

    @property
    def inflight(self) -> int:
        """How many claimed items are being worked on now."""
        return len(self._inflight)

    async def run_once(self) -> None:
        """One pass: housekeeping and expiry, then claim as many due items as there are free slots."""
        app = self.app
        now = app.clock.time()
        if now >= self._next_housekeeping:
            await self._housekeeping(now)
        for item in await app.storage.expire(now=now, max_age=app.config.queue_max_age_seconds):
            app.metrics.queue_expired.labels(kind=item.kind.value).inc()
            await self.router.notify(item, texts.expired(now - item.created_at))
        for item in await self._claim(now):
            self._spawn(item)
        await self._publish_stats()

    async def _claim(self, now: float) -> list[QueueItem]:
        """Claim what the free slots and the breakers allow: the one probe of a half-open breaker."""
        app = self.app
        free = self.concurrency - len(self._inflight)
        send = app.board["discord.send"]
        if free <= 0 or not send.would_admit():
            return []
        # Discord half-open: one send decides whether it is back, and every item ends in a send.
        probing = send.state is not BreakerState.CLOSED
        if probing and self._inflight:
            return []
        limit = 1 if probing else free
        items = await app.storage.claim(
            now=now, lease_seconds=self.lease, kind=ItemKind.OUTBOUND, limit=limit
        )
        gemini = app.board["gemini"]
        if app.maintenance() is not None:
            inbound_limit = 0  # maintenance: hold questions; answers already made still go out
        elif gemini.state is BreakerState.CLOSED:
            inbound_limit = limit - len(items)
        elif gemini.would_admit() and ItemKind.INBOUND not in self._inflight.values():
            inbound_limit = min(1, limit - len(items))  # one probe while half-open
        else:
            inbound_limit = 0
        inbound_limit = min(inbound_limit, self.pace.available())
        if inbound_limit > 0:
            questions = await app.storage.claim(
                now=now,
                lease_seconds=self.lease,
                kind=ItemKind.INBOUND,
                limit=inbound_limit,
                # The probe is the least suspect question: one that timed out before (a poison
                # essay) must not be the probe every time while the rest wait behind the breaker.
                fewest_attempts_first=gemini.state is not BreakerState.CLOSED,
            )
            self.pace.take(len(questions))
            items += questions
        return items

    def _spawn(self, item: QueueItem) -> None:
        task = asyncio.get_running_loop().create_task(self._run_item(item), name=f"drain:item:{item.id}")
        self._inflight[task] = item.kind
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.pop(task, None)
        if not task.cancelled():
            self.wake()  # a slot is free, and the conversation's next item may be due

    async def _run_item(self, item: QueueItem) -> None:
        """Work on one claimed item, time-boxed within its lease; never raises but for cancellation."""
        try:
            async with asyncio.timeout(self.lease - LEASE_MARGIN):
                await self._process(item)
        except asyncio.CancelledError:
            raise
        except (StorageError, CircuitOpenError, CallTimeoutError) as exc:
            # Storage failed (requeueing, recording): the claim's lease brings the item back.
            log.warning("drain.item_not_recorded", item=item.id, category=classify(exc).category.value)
        except TimeoutError:
            # Still claimed: when the lease runs out it is reaped, and its answer looked for first.
            log.warning("drain.item_timed_out", item=item.id, seconds=self.lease - LEASE_MARGIN)
        except Exception:
            log.exception("drain.item_crashed", item=item.id)

    async def _process(self, item: QueueItem) -> None:
        inbound = Inbound.from_payload(item.payload)
        with (
            request_context(
                collector=self.app.traces,
                route="drain",
                guild=inbound.guild_id,
                channel=inbound.channel_id,
                user=inbound.author_id,
            ),
            span("drain.item", item=item.id, kind=item.kind.value, attempts=item.attempts),
        ):
            try:
                await self._process_item(item, inbound)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                verdict = classify(exc)
                log.warning("drain.item_failed", item=item.id, category=verdict.category.value)
                await self.router.requeue(
                    item,
                    verdict.category.value,
                    retry_after=verdict.retry_after,
                    # an open breaker or a rate limit says nothing about the item
                    count_attempt=verdict.category not in (Category.CIRCUIT_OPEN, Category.RATE_LIMITED),
                )

    async def _process_item(self, item: QueueItem, inbound: Inbound) -> None:
        app = self.app
        if item.kind is ItemKind.INBOUND and app.guild_maintenance(inbound.guild_id) is not None:
            # Its guild is in maintenance: hold the question (answers already made still go out).
            await self.router.requeue(
                item, "guild maintenance", retry_after=GUILD_MAINTENANCE_HOLD, count_attempt=False
            )
            return
        channel = await app.channel_for(item)
        original = inbound.reference()
        if item.kind is ItemKind.OUTBOUND:
            chunks = [str(c) for c in item.payload.get("chunks", [])]
            if claim_abandoned(item) and streaming.streamed(item):
                # Its final edits were cut short: edit the same messages (and those it posted unrecorded).
                posted = await self._posted(channel, inbound.message_id)
                item = await self.answerer.streaming.adopt(item, posted)
            elif claim_abandoned(item):
                # A dead process may have posted some of these chunks: skip what its marks show.
                item, chunks = await self._skip_posted(item, inbound, channel, chunks)
                if not chunks:
                    await app.storage.complete(item.id)
                    return
            outcome = await self.answerer.deliver(
                item,
                inbound,
                chunks,
                original=original,
                channel=channel,
                outcome=str(item.payload.get("outcome", "answered_late")),
            )
            self._count_answered(item, outcome)
            return
        if claim_abandoned(item):
            posted = await self._posted(channel, inbound.message_id)
            if posted.answered and not posted.partial and not item.payload.get("regenerate"):
                # A previous process answered and died before it could record that. (A regenerated
                # answer is looked for in no history: its old messages already answer the question.)
                await app.storage.complete(item.id)
                return
            if posted.partial or streaming.streamed(item):
                # It was being written when the process died: write it again into the same messages.
                item = await self.answerer.streaming.adopt(item, posted)
        try:
            async with app.mutex.acquire(
                inbound.key, app.config.mutex_acquire_timeout_seconds, holder="drain"
            ):
                outcome = await self.answerer.answer(
                    item, inbound, channel=channel, original=original, live=False
                )
        except MutexTimeoutError:
            await self.router.requeue(item, "conversation busy", count_attempt=False)
            return
        self._count_answered(item, outcome)

    def _count_answered(self, item: QueueItem, outcome: str) -> None:
        """A queued message answered now counts as ``answered_late`` (notices and alerts do not)."""
        if outcome in ("answered", "answered_late") and not item.payload.get("notice"):
            self.app.metrics.observe_message("answered_late", self.app.clock.time() - item.created_at)

    async def _posted(self, channel: discord.abc.Messageable, message_id: int) -> Posted:
        """What the bot posted in answer to ``message_id`` after it: whether an answer is there, and
        every message marked as a chunk of one (written or being written), by chunk index."""
        me = self.app.bot_user_id()
        answered = False
        found: dict[int, tuple[int, bool]] = {}

        def note(message: discord.Message) -> bool:
            nonlocal answered
            if me is None or message.author.id != me:
                return False
            answered = answered or is_answer_to(message, message_id)
            mark = marks.read(message.content)
            if mark is not None and mark[0] == message_id:
                index = mark[1] - streaming.PARTIAL if is_partial(mark[1]) else mark[1]
                found.setdefault(index, (message.id, is_partial(mark[1])))
            return False  # look through the whole window: the chunks may be anywhere in it

        await self._look_back(channel, message_id, note)
        return Posted(answered, found)

    async def _skip_posted(
        self, item: QueueItem, inbound: Inbound, channel: discord.abc.Messageable, chunks: list[str]
    ) -> tuple[QueueItem, list[str]]:
        """The item and its chunks still to send, past the last chunk a dead process posted (by mark)."""
        me = self.app.bot_user_id()
        first = int(item.payload.get("chunk_offset", 0))
        posted = -1

        def note(message: discord.Message) -> bool:
            nonlocal posted
            mark = marks.read(message.content) if message.author.id == me else None
            if mark is not None and mark[0] == inbound.message_id and not is_partial(mark[1]):
                posted = max(posted, mark[1])
            return False  # look through the whole window: the chunks may be anywhere in it

        await self._look_back(channel, inbound.message_id, note)
        skip = min(len(chunks), posted + 1 - first)
        if skip <= 0:
            return item, chunks
        log.info("drain.chunks_already_posted", item=item.id, skipped=skip)
        payload = {**item.payload, "chunks": chunks[skip:], "chunk_offset": first + skip}
        return await self.app.storage.update_payload(item.id, payload), chunks[skip:]

    async def _look_back(
        self,
        channel: discord.abc.Messageable,
        message_id: int,
        match: Callable[[discord.Message], bool],
    ) -> discord.Message | None:
        """The first bot message after ``message_id`` that ``match``es; None if none or unreadable."""
        try:
            return await self.app.discord_io.find_message(
                channel, match, after=discord.Object(id=message_id), limit=HISTORY_LOOKBACK
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # Not knowing is no reason to stay silent: answer (at worst twice, never never).
            log.info("drain.history_unavailable", category=classify(exc).category.value)
            return None

    async def _housekeeping(self, now: float) -> None:
        """Keep the database small: answered items, and dead or expired ones, history and processed
        ids past their retention, in short transactions; back soon when there was more to delete."""
        cfg = self.app.config
        done = await self.app.storage.housekeeping(
            now=now,
            queue_retention=cfg.queue_retention_seconds,
            history_retention=cfg.history_retention_seconds,
            processed_retention=PROCESSED_RETENTION,
        )
        # The history's file references (bot.attachments) go after the history's retention too.
        refs = await self.app.storage.prune_attachment_refs(cfg.history_retention_seconds, now=now)
        self._next_housekeeping = now + (HOUSEKEEPING_SOON if done.more else HOUSEKEEPING_EVERY)
        if done.total or refs:
            log.info("queue.housekeeping", **done.as_dict(), attachment_refs=refs)

    async def _publish_stats(self) -> None:
        try:
            stats = await self.app.storage.stats(now=self.app.clock.time())
        except asyncio.CancelledError:
            raise
        except Exception:
            return
        self.app.metrics.set_queue_stats(stats)


def is_answer_to(message: discord.Message, message_id: int) -> bool:
    """Whether the bot's ``message`` is (a chunk of) the answer to ``message_id``.

    ``deliver`` ends every answer chunk with the mark of its question (``bot.marks``), which
    Discord returns in the history like any content; no other message of the bot (an
    acknowledgement, a bug apology, a notice) carries one. A message of a streamed answer still
    being written carries a partial mark (``bot.streaming``): it is no answer. A message without a
    mark (posted before marks existed) is the answer when it replies to the question and is neither
    an acknowledgement nor an apology.
    """
    mark = marks.read(message.content)
    if mark is not None:
        return mark[0] == message_id and not is_partial(mark[1])
    ref = message.reference
    if ref is None or ref.message_id != message_id:
        return False
    return not message.content.startswith((texts.ACK_MARK, BUG_APOLOGY))
