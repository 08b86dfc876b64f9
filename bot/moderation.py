"""The moderation log: where a server's managers see what Gemini blocked in their server.

A guild's managers may name a channel (``/settings set modlog_channel``). Each question Gemini
refused to read (``prompt_feedback.block_reason``), each answer it blocked (``finish_reason``
SAFETY and the other refusals) and each empty answer it ended with ``OTHER`` is recorded there in
one line: who asked, where, the case and the reason, the model. The message's text is quoted only
when the guild opted in (``modlog_text``): by default the log says that something was blocked, not
what. A record pings nobody, and a failure to post one is logged, never raised: the user's answer
(the sentence about the block) does not depend on it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import discord
import structlog

from bot.inbound import Inbound
from bot.settings import Effective
from resilience.errors import classify
from services.gemini import Reply, ReplyKind

if TYPE_CHECKING:
    from bot.app import Application

log = structlog.get_logger("bot.moderation")

QUOTE_CHARS = 1500
"""The most of a blocked message the log quotes (when the guild opted in)."""


def blocked(reply: Reply) -> str | None:
    """What was blocked, for the log: ``"question"``, ``"answer"``, ``"empty answer"``; None otherwise."""
    if reply.kind is ReplyKind.PROMPT_BLOCKED:
        return "question"
    if reply.kind is ReplyKind.SAFETY_BLOCKED:
        return "answer"
    if reply.kind is ReplyKind.EMPTY and reply.finish_reason == "OTHER":
        return "empty answer"
    return None


_CASES = {
    "question": "Gemini refused to read a question",
    "answer": "Gemini blocked its answer to a question",
    "empty answer": "Gemini ended without an answer to a question",
}


def record_line(inbound: Inbound, reply: Reply, what: str, *, quote: bool) -> str:
    """The log's line for one block; with ``quote``, the question's text after it."""
    reason = reply.block_reason if reply.kind is ReplyKind.PROMPT_BLOCKED else reply.finish_reason
    line = (
        f"🛡️ {_CASES[what]} from <@{inbound.author_id}> in <#{inbound.channel_id}>"
        f" (reason: {reason or 'none given'}; model `{reply.model}`)."
    )
    if quote and inbound.content:
        text = inbound.content[:QUOTE_CHARS] + ("…" if len(inbound.content) > QUOTE_CHARS else "")
        line += "\n" + "\n".join(f"> {row}" for row in text.splitlines())
    return line


async def record(app: Application, inbound: Inbound, reply: Reply, settings: Effective) -> bool:
    """Post the block in the guild's moderation log, if it has one; True when posted. Never raises."""
    what = blocked(reply)
    if what is None or settings.modlog_channel is None or inbound.guild_id is None:
        return False
    try:
        channel = await app.channel(settings.modlog_channel)
        if getattr(getattr(channel, "guild", None), "id", None) != inbound.guild_id:
            log.warning("moderation.log_elsewhere", channel_id=settings.modlog_channel)
            return False
        text = record_line(inbound, reply, what, quote=settings.modlog_text)
        await app.discord_io.send(channel, text, mention_user=None)
    except asyncio.CancelledError:
        raise
    except (discord.NotFound, discord.Forbidden) as exc:
        log.warning("moderation.log_unusable", channel_id=settings.modlog_channel, status=exc.status)
        return False
    except Exception as exc:
        log.warning("moderation.log_failed", category=classify(exc).category.value)
        return False
    log.info("moderation.logged", guild_id=inbound.guild_id, what=what)
    return True
