"""Conversations: which history a message continues, who said each turn, and auto-threads.

- **Channels, threads, forum posts and DMs** are conversations of their own, by channel id
  (``bot.inbound.conversation_key``): a thread, and a forum post (a thread whose parent is a forum),
  never shares the history of its parent.
- **Reply chains** (as llmcord follows them): a reply to one of the bot's answers continues the
  conversation *that* answer belongs to, as it was at that answer, not the channel's latest
  history. Which question an answer answered is read from its invisible mark (``bot.marks``); when
  that exchange is still the latest of its conversation the reply simply continues it, otherwise it
  starts a branch of its own (``"<channel>:<reply id>"``, ``SqliteStore.branch``) holding that
  conversation up to the answer, and the replies to the branch's answers continue the branch. Each
  branch is bounded like any conversation (``HISTORY_MAX_MESSAGES``, ``HISTORY_MAX_CHARS``,
  retention), lives in SQLite (nothing here holds memory per branch) and is forgotten with its
  channel's ``/reset``.
- **Who said it**: in a server, every user turn is sent to Gemini as ``"Name (<@id>): text"``
  (``spoken``, ``attributed``), the current question too, so the model can tell the people of a
  channel apart; the speaker is stored with each turn (``Turn.speaker``). DMs have one person and
  are sent as they are.
- **Auto-threads**: where a channel's ``auto_thread`` setting is on, a mention is answered in a new
  public thread started from it and named after the question (``open_thread``); without Create
  Public Threads there, the bot says so in one sentence and answers in the channel.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import discord
import structlog

from bot import marks
from bot.inbound import Inbound, conversation_key
from resilience.errors import classify
from services.storage import Turn

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.conversations")

THREAD_EXISTS = 160004
"""Discord's JSON error code for "A thread has already been created for this message"."""
THREAD_NAME_CHARS = 100
"""Discord's longest channel (thread) name."""
MAX_NAME_CHARS = 40
"""A speaker's name in a label, at most (Discord's display names are at most 32)."""
NO_THREAD_PERMISSION = (
    "I can't open a thread for this here: I need the Create Public Threads permission in this channel, "
    "so I'm answering in the channel."
)
_MENTION = re.compile(r"<(@[!&]?|#)(\d+)>")
_MARKUP = re.compile(r"[`*_~|>#\[\]()]+")
# What a name may not hold inside a label: markup, and what would make it look like another label.
_NAME_NOISE = re.compile(r"[`*_~|<>#\[\]():@\n]+")


def speaker_label(name: str, user_id: int) -> str:
    """How a user is named to Gemini: their display name and their mention, e.g. ``Bob (<@123>)``."""
    clean = " ".join(_NAME_NOISE.sub(" ", name).split())[:MAX_NAME_CHARS] or "someone"
    return f"{clean} (<@{user_id}>)"


def spoken(text: str, speaker: str | None) -> str:
    """``text`` as Gemini reads a turn of a shared conversation: ``"<speaker>: <text>"``."""
    if not speaker or not text:
        return text
    return f"{speaker}: {text}"


def attributed(history: Sequence[Turn]) -> list[Turn]:
    """``history`` with each user turn's speaker in front of its text (``spoken``)."""
    return [
        Turn(t.role, spoken(t.text, t.speaker), t.created_at, t.message_id, t.speaker)
        if t.role == "user" and t.speaker
        else t
        for t in history
    ]


def for_gemini(inbound: Inbound, history: Sequence[Turn]) -> tuple[str, list[Turn]]:
    """The question and the history as Gemini gets them: in a server, every user turn with its
    speaker (``spoken``); in a DM, as they are."""
    if inbound.guild_id is None:
        return inbound.content, list(history)
    return spoken(inbound.content, inbound.speaker), attributed(history)


def thread_name(question: str, fallback: str = "Question") -> str:
    """A thread's name from its question: one line, mentions and markup removed, at most 100 characters."""
    text = _MENTION.sub(lambda m: "\x00channel" if m.group(1) == "#" else "", question)
    text = " ".join(_MARKUP.sub(" ", text).split()).replace("\x00", "#")
    if not text:
        return fallback
    if len(text) > THREAD_NAME_CHARS:
        text = text[: THREAD_NAME_CHARS - 1].rstrip() + "…"
    return text


class Conversations:
    """Finds the conversation of a message (reply branches) and opens auto-threads; one per application."""

    def __init__(self, app: Application, *, bot_user_id: Callable[[], int | None]) -> None:
        self.app = app
        self._bot_user_id = bot_user_id

    async def branch_of(self, message: discord.Message) -> str | None:
        """The conversation a reply to one of the bot's answers continues (``SqliteStore.branch``), or
        None: not such a reply, the answer's question is no longer stored, or storage failed (the
        channel's own conversation then goes on, as before branches existed)."""
        ref = message.reference
        resolved = ref.resolved if ref is not None else None
        me = self._bot_user_id()
        if not isinstance(resolved, discord.Message) or me is None or resolved.author.id != me:
            return None
        marked = marks.read(resolved.content)
        question = marked[0] if marked is not None else None
        if question is None and resolved.reference is not None:
            question = resolved.reference.message_id  # an answer is a reply to its question
        if question is None:
            return None
        base = conversation_key(message.channel.id)
        try:
            key = await self.app.storage.branch(question, f"{base}:{message.id}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("conversation.branch_unavailable", category=classify(exc).category.value)
            return None
        if key is None or not (key == base or key.startswith(f"{base}:")):
            return None  # never another channel's conversation
        return None if key == base else key

    def wants_thread(self, message: discord.Message) -> bool:
        """Whether an auto-thread may start from ``message``: a mention in a text channel of a server
        (not in a thread, a forum post or a DM), not a reply to the bot (that continues its chain)."""
        me = self._bot_user_id()
        if message.guild is None or me is None or not isinstance(message.channel, discord.TextChannel):
            return False
        if not any(user.id == me for user in message.mentions):
            return False
        resolved = message.reference.resolved if message.reference is not None else None
        return not (isinstance(resolved, discord.Message) and resolved.author.id == me)

    async def open_thread(
        self, message: discord.Message, question: str
    ) -> tuple[discord.Thread | None, bool]:
        """A new public thread started from ``message``, named after ``question``; or ``(None,
        missing)`` when it cannot be opened: ``missing`` is True when the bot lacks Create Public
        Threads there (by discord.py's cache, or Discord's 403), False for any other failure."""
        channel = message.channel
        guild = message.guild
        me = guild.me if guild is not None else None
        if me is not None and isinstance(channel, discord.TextChannel):
            if not channel.permissions_for(me).create_public_threads:
                log.info("conversation.thread_refused", channel_id=channel.id, reason="no_permission")
                return None, True
        try:
            thread = await self.app.discord_io.create_thread(message, thread_name(question))
        except asyncio.CancelledError:
            raise
        except discord.Forbidden:
            log.info("conversation.thread_refused", channel_id=channel.id, reason="forbidden")
            return None, True
        except discord.HTTPException as exc:
            if exc.code != THREAD_EXISTS:
                log.warning(
                    "conversation.thread_failed", channel_id=channel.id, status=exc.status, code=exc.code
                )
                return None, False
            # Opened before (by a process that died before accepting the message, which Discord now
            # delivers again): the thread has the message's id, so the answer goes there.
            try:
                existing = await self.app.channel(message.id)
            except asyncio.CancelledError:
                raise
            except Exception:
                return None, False
            return (existing, False) if isinstance(existing, discord.Thread) else (None, False)
        except Exception as exc:
            log.warning(
                "conversation.thread_failed", channel_id=channel.id, category=classify(exc).category.value
            )
            return None, False
        log.info("conversation.thread_opened", channel_id=channel.id, thread_id=thread.id)
        return thread, False
