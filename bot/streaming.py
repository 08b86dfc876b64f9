"""Streamed answers: the answer appears as Gemini writes it, in messages edited in place.

``Streaming.open`` gives the pipeline (``bot.answering``) a ``StreamWriter`` for one answer. The
writer is the ``StreamObserver`` of ``GeminiService.stream``: each chunk hands it the text so far,
and a task of its own shows that text on Discord, so Discord's pace never holds up the stream:

- the first text is posted at once (a reply to the question, with a Stop button); the text is then
  edited in at most once per ``STREAM_EDIT_INTERVAL_SECONDS`` per message, and never more than five
  edits in five seconds in the channel (Discord's per-channel limit); at ``ROOM`` characters the
  answer continues in a new message (split like every answer, code fences closed and reopened);
- every write goes through ``DiscordIO`` (``discord.send``, ``discord.edit``: their breakers,
  timeouts and allowed mentions); a failed write is tried again at the next flush, no retry loop;
- a message still being written carries the mark of its chunk plus ``PARTIAL`` (``bot.marks``), the
  final text the plain mark: a restarted bot reading the channel tells a half-written answer from
  a written one, and the drain takes it up instead of counting it as answered;
- the id of every message posted is written to the queue item's payload (``stream.messages``) as
  soon as it is posted, so a retry, the drain after an outage, or the next process after
  ``kill -9`` edits the same messages instead of posting new ones (a crash between Discord's post
  and that write is covered by the chunk's nonce and, after Discord's nonce window, by the drain,
  which adopts the marked messages it finds: ``adopt``);
- a retry after partial output shows the new attempt's text from its start in the same messages
  (the observer always gets the whole text of the current attempt); meanwhile, and when the answer
  goes back to the queue, the last message says ``(interrupted, retrying)``;
- the final edit (``finalize``, from ``Answerer.deliver``) writes the exact final text: the answer as
  shaped for chat (sources, notes, long answers and big code blocks as files attached to the last
  message), marked, with a Regenerate button on the last message; surplus messages are deleted.
  What Discord does not take is queued as an outbound item that keeps ``stream.messages``: the
  drain edits the same messages later.

Streaming and long answers: the text streams into chat messages while it is at most
``LONG_ANSWER_CHARS`` long; past that the messages stop growing and say that the whole answer will
come as ``answer.md``. At the end the answer is shaped exactly as an unstreamed one: a long answer
becomes its opening plus ``answer.md`` attached to the first message (the others are deleted), big
code blocks become files on the last message. Answers with attachments stream the same way.
``/ask`` is not streamed: its answer is an interaction follow-up.

Stop and Regenerate (``bot.views``): ``Streaming.on_stop`` cancels the generation of the answer
whose message was clicked (the asker, or a member who may manage messages); what was written
stays, marked ``(stopped)``. ``Regenerator.on_click`` (the asker only) accepts the click durably
as a new item for the same question whose ``stream.messages`` are the old answer's messages, and
answers it: the new answer replaces the old one by edit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import discord
import structlog

from bot import marks, texts, views
from bot.attachments import collect
from bot.inbound import Inbound, Snowflake, lease_seconds
from bot.long_answers import AnswerFiles
from bot.routing import FailureRouter, Original
from bot.splitting import BlankMessageError, has_visible_text, split_message
from resilience.context import request_context
from resilience.degradation import ItemKind, ItemState, QueueItem
from resilience.errors import MutexTimeoutError, QueueFullError, classify
from services.discord_io import Upload, is_permanent
from services.storage import Turn

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.streaming")

T = TypeVar("T")

PARTIAL = 2048
"""Added to a chunk's index in the mark of a message still being written (marks hold indices up to
4,095, so an answer streams into at most 2,048 messages)."""
NOTE_ROOM = 40
"""Characters kept free in each streamed message for a note (interrupted, stopped, long answer)."""
ROOM = marks.ROOM - NOTE_ROOM
"""Characters of answer text in one streamed message."""
WINDOW_EDITS, WINDOW_SECONDS = 5, 5.0
"""Discord's limit on edits in one channel: about 5 in 5 s (DESIGN.md, "Facts for the second wave")."""
LOOKBACK = 100
"""Messages after a question read to find the answer Regenerate replaces."""
# Channels whose messages the bot can edit by id (discord.PartialMessage's own list).
STREAMABLE = (
    discord.TextChannel,
    discord.Thread,
    discord.DMChannel,
    discord.VoiceChannel,
    discord.StageChannel,
    discord.PartialMessageable,
)
STOP, REGENERATE = "stop", "regenerate"  # the buttons a message shows


def is_partial(index: int) -> bool:
    """Whether a mark's chunk index is that of a message still being written."""
    return index >= PARTIAL


def streamed(item: QueueItem) -> bool:
    """Whether ``item``'s answer was (or is being) streamed into messages it must keep editing."""
    return isinstance(item.payload.get("stream"), dict)


def _recorded(item: QueueItem) -> list[int | None]:
    messages = (item.payload.get("stream") or {}).get("messages") or []
    return [int(m) if m is not None else None for m in messages]


@dataclass
class _Message:
    """One message of a streamed answer as far as this process knows it."""

    id: int | None  # None: gone (a moderator deleted it, or it was deleted as surplus)
    content: str | None = None  # what it shows; None: not known (taken over from the payload)
    buttons: str | None = "?"  # STOP, REGENERATE, None; "?" not known
    last_write: float = float("-inf")  # clock time of its last post or edit
    last_edit: float = float("-inf")
    files: tuple[str, ...] | None = None  # the names of its attachments; None: not known


@dataclass(frozen=True, slots=True)
class Posted:
    """What the drain found in a channel after a question: whether an answer to it is there (a
    final mark, or an unmarked reply), and every marked message of it by chunk index: (id, partial)."""

    answered: bool
    messages: Mapping[int, tuple[int, bool]]

    @property
    def partial(self) -> bool:
        return any(partial for _, partial in self.messages.values())


class StreamWriter:
    """Shows one answer on Discord while Gemini writes it; the ``StreamObserver`` of its stream.

    ``item`` is kept current: every write to its payload (the messages posted) replaces it, and the
    pipeline reads it back before it requeues or finishes the item.
    """

    def __init__(
        self,
        streaming: Streaming,
        item: QueueItem,
        inbound: Inbound,
        channel: discord.abc.Messageable,
        *,
        original: Original,
        prefix: str = "",
        long_chars: int | None = None,
        live: bool = True,
    ) -> None:
        app = streaming.app
        self._streaming = streaming
        self._app = app
        self._clock = app.clock
        self.item = item
        self.inbound = inbound
        self.channel = channel
        self.original = original
        self.prefix = prefix
        self.long_chars = long_chars
        self.interval = app.config.stream_edit_interval_seconds
        self.silence_seconds = app.config.stream_silence_seconds
        self.messages = [_Message(mid) for mid in _recorded(item)]
        self.stopped = False
        self._text = ""
        self._note: str | None = None
        self._nonce = str(item.payload.get("nonce", inbound.message_id))
        self._dirty = asyncio.Event()
        self._lock = asyncio.Lock()  # one Discord write of this answer at a time
        self._task: asyncio.Task[None] | None = None
        self._work: asyncio.Future[Any] | None = None
        self._halted = not live  # a writer for the final edits only shows no text as it comes
        self._posting = False  # a post was tried: Discord may have made the message (a lost answer)
        self._refused = False  # Discord refused a write for good (no permission): stop showing
        self._edits: deque[float] = deque(maxlen=WINDOW_EDITS)
        self._registered: set[int] = set()  # message ids under which Streaming knows this writer
        streaming.register(self)

    # -- the StreamObserver side (called by GeminiService.stream, must not block) ---------------

    def text(self, text: str) -> None:
        self._text = text
        self._note = None
        self._wake()

    def interrupted(self) -> None:
        self._note = texts.STREAM_INTERRUPTED
        self._wake()

    # -- the pipeline's side --------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether the answer has messages on Discord (posted now or by an earlier attempt), or may
        have one: a post whose answer was lost is sent again, under its nonce, by ``finalize``."""
        return self._posting or any(m.id is not None for m in self.messages)

    @property
    def generating(self) -> bool:
        """Whether Gemini is still writing this answer (a Stop can still stop it)."""
        return self._work is not None and not self._work.done()

    def ids(self) -> list[int]:
        return [m.id for m in self.messages if m.id is not None]

    async def run(self, work: Coroutine[Any, Any, T], stopped: Callable[[str], T]) -> T:
        """Await ``work`` (the generation), which a Stop cancels; then ``stopped(text so far)``."""
        self._work = future = asyncio.ensure_future(work)
        try:
            return await future
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.stopped and future.cancelled() and (task is None or not task.cancelling()):
                return stopped(self._text)
            raise
        finally:
            self._work = None

    def stop(self) -> bool:
        """Stop the generation (a click on Stop); False when it is not running any more."""
        work = self._work
        if work is None or work.done():
            return False
        self.stopped = True
        work.cancel()
        return True

    async def halt(self) -> QueueItem:
        """Stop showing new text (the generation is over): wait for a write in flight, end the task.

        Returns the item as its payload now is. Safe to call twice.
        """
        self._halted = True
        self._streaming.unregister(self)
        async with self._lock:
            task, self._task = self._task, None
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        return self.item

    def abandon(self) -> None:
        """The pipeline is being cancelled (shutting down): end the writing task, wait for nothing.
        A post cut short is found again by its nonce or its mark (the item stays claimed)."""
        self._halted = True
        self._streaming.unregister(self)
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def interrupt(self) -> QueueItem:
        """The answer failed (it goes back to the queue, or gets an explanation): what shows says
        ``(interrupted, retrying)``. Never raises but for cancellation; returns the item."""
        item = await self.halt()
        if not self.started or not self._text:
            return item
        self._note = texts.STREAM_INTERRUPTED
        try:  # each message edited at most once more, at its time; a failure gives up (no retry)
            async with self._lock:
                while (due := await self._write_due()) is not None:
                    await self._clock.sleep(max(0.0, due - self._clock.monotonic()))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("stream.note_not_shown", item=self.item.id, category=classify(exc).category.value)
        return self.item

    async def finalize(self, chunks: Sequence[str], files: AnswerFiles | None = None) -> None:
        """Make the answer's messages show ``chunks`` (the final text, split at ``ROOM``), each with
        its mark, ``files`` attached where they belong, a Regenerate button on the last one;
        delete the messages beyond them. Raises what Discord raised (the caller queues the rest:
        every step can be done again, the messages written so far are in ``item``)."""
        await self.halt()
        final = list(chunks)
        if self.stopped:
            final[-1] = f"{final[-1]}\n{texts.STREAM_STOPPED}"
        uploads = files.uploads() if files is not None else {}
        # A slash command's answer has no question message to ask again: no Regenerate on it.
        last = len(final) - 1 if not self.item.payload.get("interaction") else -1
        wanted = [
            (
                marks.mark(chunk, self.inbound.message_id, i),
                REGENERATE if i == last else None,
                uploads.get(i, ()),
            )
            for i, chunk in enumerate(final)
        ]
        async with self._lock:
            for i, (content, buttons, attached) in enumerate(wanted):
                if i >= len(self.messages):
                    await self._post(i, content, buttons, attached)
            for message in self.messages[len(wanted) :]:
                if message.id is not None:
                    await self._app.discord_io.delete(self._partial(message.id))
                    message.id = None
                    await self._record()
            for i, (content, buttons, attached) in enumerate(wanted):
                message = self.messages[i]
                if message.id is None:
                    continue  # deleted by someone meanwhile: not posted again (it would undo a moderator)
                if (message.content, message.buttons, message.files) == (content, buttons, _names(attached)):
                    continue
                await self._clock.sleep(
                    max(0.0, self._edit_due(message, final=True) - self._clock.monotonic())
                )
                await self._edit(i, content, buttons, files=attached)

    # -- writing --------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._halted:
            return
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"stream:{self.item.id}")
        self._dirty.set()

    async def _run(self) -> None:
        """Show the newest text whenever there is some, no faster than Discord allows."""
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                while not self._refused:
                    async with self._lock:
                        due = await self._show()
                    if due is None:
                        break
                    await self._clock.sleep(max(0.0, due - self._clock.monotonic()))
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug here must not fail the answer: finalize still writes the whole of it.
            log.exception("stream.writer_failed", item=self.item.id)

    def _shown_text(self) -> list[str]:
        """The chunks to show now: the text so far (at most LONG_ANSWER_CHARS of it), and the note."""
        note = self._note
        text = self._text
        if self.long_chars is not None and len(text) > self.long_chars:
            note = note or texts.stream_long_answer(len(text))
            text = text[: self.long_chars]
        visible = self.prefix + text
        if not has_visible_text(visible):
            return []
        try:
            chunks = split_message(visible, limit=ROOM)
        except BlankMessageError:
            return []
        if note:
            chunks[-1] = f"{chunks[-1]}\n{note}"
        return chunks

    async def _write_due(self) -> float | None:
        """Write what may be written now (a message not posted yet, an edit whose time has come);
        return the clock time when the rest may be, or None when every message shows what it
        should. Raises what Discord raised: the caller decides (the next flush, or giving up)."""
        chunks = self._shown_text()
        now = self._clock.monotonic()
        later: float | None = None
        for i, chunk in enumerate(chunks):
            content = marks.mark(chunk, self.inbound.message_id, PARTIAL + i)
            buttons = STOP if i == len(chunks) - 1 and not self._halted else None
            if i >= len(self.messages):
                await self._post(i, content, buttons, ())
                continue
            message = self.messages[i]
            if message.id is None or (message.content == content and message.buttons == buttons):
                continue
            due = self._edit_due(message, final=False)
            if due > now:
                later = due if later is None else min(later, due)
                continue
            await self._edit(i, content, buttons)
            now = self._clock.monotonic()
        return later

    async def _show(self) -> float | None:
        """``_write_due`` for the writing task: a write Discord failed is tried at the next flush,
        an interval later (the breaker in front fails it at once while Discord is down); a refusal
        for good (no permission here) ends the showing, and the final delivery says why."""
        if self._refused:
            return None
        try:
            return await self._write_due()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            category = classify(exc).category.value
            if is_permanent(exc):
                log.warning("stream.refused", item=self.item.id, category=category)
                self._refused = True
                return None
            log.info("stream.write_failed", item=self.item.id, category=category)
            return self._clock.monotonic() + self.interval

    def _edit_due(self, message: _Message, *, final: bool) -> float:
        """When ``message`` may next be edited: an interval after its last write (its last edit for
        the final text, which may follow a post at once), within the channel's edit window."""
        due = (message.last_edit if final else message.last_write) + self.interval
        if len(self._edits) == WINDOW_EDITS:
            due = max(due, self._edits[0] + WINDOW_SECONDS)
        return due

    async def _post(self, index: int, content: str, buttons: str | None, files: Sequence[Upload]) -> None:
        """Post chunk ``index`` (the first one as the reply) and record its id at once."""
        io = self._app.discord_io
        first = index == 0
        self._posting = True
        message = await io.send(
            self.channel,
            content,
            reply_to=self.original if first else None,
            mention_user=Snowflake(self.inbound.author_id) if first else None,
            nonce=f"s{self._nonce}.{index}"[-25:],
            files=files,
            view=_view(buttons),
        )
        now = self._clock.monotonic()
        self.messages.append(_Message(message.id, content, buttons, last_write=now, files=_names(files)))
        self._streaming.register(self)
        await self._record()

    async def _edit(
        self, index: int, content: str, buttons: str | None, *, files: Sequence[Upload] | None = None
    ) -> None:
        message = self.messages[index]
        assert message.id is not None
        try:
            await self._app.discord_io.edit(
                self._partial(message.id),
                content,
                mention_user=Snowflake(self.inbound.author_id) if index == 0 else None,
                view=_view(buttons),
                files=files,
            )
        except discord.NotFound as exc:
            if exc.code != 10008:
                raise
            # Someone deleted it: never posted again (that would undo a moderator).
            log.info("stream.message_deleted", item=self.item.id, chunk=index)
            message.id = None
            await self._record()
            return
        now = self._clock.monotonic()
        message.content, message.buttons = content, buttons
        message.last_write = message.last_edit = now
        if files is not None:
            message.files = _names(files)
        self._edits.append(now)

    def _partial(self, message_id: int) -> discord.PartialMessage:
        return discord.PartialMessage(channel=self.channel, id=message_id)  # type: ignore[arg-type]

    async def _record(self) -> None:
        """Write the answer's message ids to the item's payload (a failure is logged: the drain finds
        the messages by their marks)."""
        stream = {"messages": [m.id for m in self.messages]}
        try:
            self.item = await self._app.storage.update_payload(
                self.item.id, {**self.item.payload, "stream": stream}
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("stream.not_recorded", item=self.item.id, category=classify(exc).category.value)


def _names(files: Sequence[Upload]) -> tuple[str, ...]:
    return tuple(f.filename for f in files)


def _view(buttons: str | None) -> discord.ui.View | None:
    if buttons == STOP:
        return views.stop_buttons()
    if buttons == REGENERATE:
        return views.regenerate_buttons()
    return None


class Streaming:
    """The streamed answers of one application: opens their writers and knows the live ones."""

    def __init__(self, app: Application) -> None:
        self.app = app
        self._live: dict[int, StreamWriter] = {}  # message id -> the writer of the answer it shows

    def __len__(self) -> int:
        return len(self._live)

    def applies(self, item: QueueItem, channel: object, enabled: bool | None = None) -> bool:
        """Whether this answer streams: streaming is on (``enabled``, the server's setting; None: the
        bot's ``STREAMING``), or the item was streamed before (by a process or a setting that had it
        on), and the answer goes to a channel whose messages can be edited."""
        on = self.app.config.streaming if enabled is None else enabled
        return (on or streamed(item)) and isinstance(channel, STREAMABLE)

    def open(
        self,
        item: QueueItem,
        inbound: Inbound,
        channel: discord.abc.Messageable,
        *,
        original: Original,
        prefix: str,
        files: bool,
        enabled: bool | None = None,
    ) -> StreamWriter | None:
        """A writer for the answer to ``item``, or None when it is not streamed. ``prefix`` goes
        before the text (a late answer's recall of the question); ``files``: whether a long answer
        may become a file here (the messages then stop growing past LONG_ANSWER_CHARS); ``enabled``:
        the server's streaming setting (None: the bot's default)."""
        if not self.applies(item, channel, enabled):
            return None
        long_chars = self.app.config.long_answer_chars if files else None
        return StreamWriter(
            self,
            item,
            inbound,
            channel,
            original=original,
            prefix=prefix,
            long_chars=long_chars,
        )

    def resume(
        self, item: QueueItem, inbound: Inbound, channel: discord.abc.Messageable, *, original: Original
    ) -> StreamWriter:
        """A writer for the final edits of a streamed answer that waited in the queue."""
        return StreamWriter(self, item, inbound, channel, original=original, live=False)

    def register(self, writer: StreamWriter) -> None:
        """Note the messages ``writer`` shows while it writes (a click on Stop finds it by them)."""
        if not writer._halted:
            for message_id in writer.ids():
                self._live[message_id] = writer
                writer._registered.add(message_id)

    def unregister(self, writer: StreamWriter) -> None:
        for message_id in writer._registered:
            if self._live.get(message_id) is writer:
                del self._live[message_id]
        writer._registered.clear()

    def live(self, message_id: int) -> StreamWriter | None:
        """The writer of the answer being written in message ``message_id``, if any (in this process)."""
        return self._live.get(message_id)

    async def adopt(self, item: QueueItem, posted: Posted) -> QueueItem:
        """Take the marked messages a dead process posted but may not have recorded into ``item``'s
        ``stream.messages`` (the ids recorded win; a gap is a message nobody posted)."""
        recorded = _recorded(item)
        found = {i: mid for i, (mid, _) in posted.messages.items() if i < PARTIAL}
        fresh = {i: mid for i, mid in found.items() if i >= len(recorded)}
        if not fresh and streamed(item):
            return item
        messages: list[int | None] = list(recorded)
        for i in sorted(fresh):
            messages.extend([None] * (i - len(messages)))
            messages.append(fresh[i])
        log.info("stream.adopted", item=item.id, messages=len(fresh))
        payload = {**item.payload, "stream": {"messages": messages}}
        return await self.app.storage.update_payload(item.id, payload)

    async def on_stop(self, interaction: discord.Interaction) -> None:
        """A click on Stop: the asker (or a member who may manage messages) stops the answer."""
        message = interaction.message
        writer = self.live(message.id) if message is not None else None
        if writer is None or not writer.generating:
            await _tell(interaction, texts.stop_not_running())
            return
        if interaction.user.id != writer.inbound.author_id and not _may_manage(interaction):
            log.info("stream.stop_refused", user_id=interaction.user.id, item=writer.item.id)
            await _tell(interaction, texts.stop_refused())
            return
        # DEFERRED_UPDATE_MESSAGE: nothing changes yet; the writer's own edits follow.
        with contextlib.suppress(discord.HTTPException):
            await interaction.response.defer()
        if writer.stop():
            log.info("stream.stopped", user_id=interaction.user.id, item=writer.item.id)


class Answer(Protocol):
    """``Answerer.answer``: how the Regenerator answers (passed in: answering is above this module)."""

    def __call__(
        self,
        item: QueueItem,
        inbound: Inbound,
        *,
        channel: discord.abc.Messageable,
        original: Original,
        live: bool,
        history: list[Turn] | None = None,
    ) -> Awaitable[str]: ...


class Regenerator:
    """Regenerate: a new answer to the same question, replacing the old one by edit (the asker only).

    The click is accepted like a message (one transaction: the interaction id as processed, a work
    item for the question whose ``stream.messages`` are the old answer's messages, marked
    ``regenerate``), then answered under the conversation's lock like a live message: through the
    queue and the drain when Gemini or Discord fails, with the same promise. The question is asked
    again with the conversation as it was before its old answer.
    """

    def __init__(self, app: Application, router: FailureRouter, answer: Answer) -> None:
        self.app = app
        self.router = router
        self.answer = answer

    async def on_click(self, interaction: discord.Interaction) -> None:
        message = interaction.message
        mark = marks.read(message.content) if message is not None else None
        if message is None or mark is None or is_partial(mark[1]):
            await _tell(interaction, texts.regenerate_unknown())
            return
        question = _resolved(message, mark[0])
        if question is not None and question.author.id != interaction.user.id:
            await _tell(interaction, texts.regenerate_refused())
            return
        try:
            await interaction.response.defer()  # within Discord's 3 s; what follows may take longer
        except discord.HTTPException as exc:
            log.warning("regenerate.not_acknowledged", status=exc.status)
            return
        app = self.app
        started = app.clock.monotonic()
        outcome = "error"
        with request_context(
            collector=app.traces,
            route="regenerate",
            guild=interaction.guild_id,
            channel=interaction.channel_id,
            user=interaction.user.id,
        ):
            try:
                outcome = await self._regenerate(interaction, message, mark[0], question)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("regenerate.failed")
                await _follow_up(interaction, texts.bug("-"))
            finally:
                app.metrics.observe_message(outcome, app.clock.monotonic() - started)

    async def _regenerate(
        self,
        interaction: discord.Interaction,
        answer: discord.Message,
        question_id: int,
        question: discord.Message | None,
    ) -> str:
        app = self.app
        cfg = app.config
        channel = answer.channel
        if question is None:
            try:
                question = await app.discord_io.fetch_message(channel, question_id)
            except asyncio.CancelledError:
                raise
            except discord.NotFound:
                await _follow_up(interaction, texts.regenerate_question_gone())
                return "refused"
            except Exception as exc:
                log.info("regenerate.question_unreadable", category=classify(exc).category.value)
                await _follow_up(interaction, texts.regenerate_failed())
                return "error"
            if question.author.id != interaction.user.id:
                await _follow_up(interaction, texts.regenerate_refused())
                return "refused"
        inbound = Inbound(
            message_id=question.id,
            channel_id=channel.id,
            guild_id=interaction.guild_id,
            author_id=question.author.id,
            content=_clean(question.content, app.bot_user_id()),
        )
        wait = app.ratelimiter.check(inbound.author_id, inbound.guild_id)
        if wait is not None:
            await _follow_up(interaction, texts.cooldown(wait))
            return "rate_limited"
        over = app.usage.check(inbound.author_id, inbound.guild_id)
        if over is not None:
            await _follow_up(interaction, texts.quota_exhausted(over.scope, over.limit, over.resets_in))
            return "refused"
        messages = await self._old_answer(channel, question_id, answer.id)
        payload = inbound.payload(
            **collect(question, cfg).payload(),
            stream={"messages": messages},
            regenerate=True,
            nonce=str(interaction.id),
        )
        try:
            item = await app.storage.accept(
                interaction.id,
                ItemKind.INBOUND,
                inbound.key,
                payload,
                now=app.clock.time(),
                lease_seconds=lease_seconds(cfg),
                claim=True,
                caps=app.queue_caps,
            )
        except QueueFullError as exc:
            await _follow_up(interaction, texts.queue_full(exc.scope, exc.limit))
            return "refused"
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await _follow_up(interaction, texts.cannot_accept(classify(exc)))
            return "error"
        if item is None:
            return "ignored_duplicate"
        log.info("regenerate.accepted", item=item.id, question=question_id, messages=len(messages))
        if item.state is ItemState.PENDING:
            await _follow_up(interaction, texts.queued_busy(await self.router.position(item)))
            return "queued"
        try:
            async with app.mutex.acquire(
                inbound.key, cfg.mutex_acquire_timeout_seconds, holder=str(interaction.id)
            ):
                history = await app.storage.history_if_next(inbound.key, item.id)
                if history is None:  # older messages of this conversation go first
                    await self.router.requeue(item, "behind queued messages", count_attempt=False)
                    await _follow_up(interaction, texts.queued_busy(await self.router.position(item)))
                    return "queued"
                return await self.answer(
                    item,
                    inbound,
                    channel=channel,  # type: ignore[arg-type]  # a component's message is in a messageable
                    original=inbound.reference(),
                    live=True,
                    history=before(history, question_id),
                )
        except MutexTimeoutError:
            await self.router.requeue(item, "conversation busy", count_attempt=False)
            await _follow_up(interaction, texts.queued_busy(await self.router.position(item)))
            return "queued"

    async def _old_answer(self, channel: Any, question_id: int, clicked: int) -> list[int | None]:
        """The old answer's messages by chunk index (read back after the question through
        ``discord.read``); only the clicked one when the channel cannot be read."""
        me = self.app.bot_user_id()
        try:
            found = await self.app.discord_io.history(
                channel, after=discord.Object(id=question_id), limit=LOOKBACK
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.info("regenerate.history_unavailable", category=classify(exc).category.value)
            found = []
        chunks: dict[int, int] = {}
        for message in found:
            mark = marks.read(message.content) if message.author.id == me else None
            if mark is not None and mark[0] == question_id and not is_partial(mark[1]):
                chunks.setdefault(mark[1], message.id)
        if clicked not in chunks.values():
            chunks = {0: clicked}
        return [chunks.get(i) for i in range(max(chunks) + 1)]


def before(history: list[Turn], question_id: int) -> list[Turn]:
    """``history`` up to (not including) the question ``question_id`` and its old answer."""
    for i in range(len(history) - 1, -1, -1):
        if history[i].role == "user" and history[i].message_id == str(question_id):
            return history[:i]
    return history


def _resolved(message: discord.Message, question_id: int) -> discord.Message | None:
    """The question an answer replies to, as Discord sent it with the answer (no request)."""
    ref = message.reference
    resolved = ref.resolved if ref is not None else None
    if isinstance(resolved, discord.Message) and resolved.id == question_id:
        return resolved
    return None


def _clean(content: str, me: int | None) -> str:
    """A question's text without the bot's mention (as intake reads it)."""
    if me is not None:
        content = content.replace(f"<@{me}>", "").replace(f"<@!{me}>", "")
    return content.strip()


def _may_manage(interaction: discord.Interaction) -> bool:
    """Whether the clicking member may manage messages in the channel (Discord sends the member's
    permissions there with the interaction; in a DM nobody else is there)."""
    return interaction.guild_id is not None and interaction.permissions.manage_messages


async def _tell(interaction: discord.Interaction, text: str) -> None:
    """Answer a click with one private sentence; a failure is logged, never raised."""
    try:
        await interaction.response.send_message(
            text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none()
        )
    except discord.HTTPException as exc:
        log.warning("button.reply_failed", status=exc.status)


async def _follow_up(interaction: discord.Interaction, text: str) -> None:
    """One private sentence after the click was acknowledged; a failure is logged, never raised."""
    try:
        await interaction.followup.send(text, ephemeral=True, allowed_mentions=discord.AllowedMentions.none())
    except discord.HTTPException as exc:
        log.warning("button.reply_failed", status=exc.status)
