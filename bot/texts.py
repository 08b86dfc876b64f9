"""What the bot says to users when it is not (yet) answering: one place for every sentence."""

from __future__ import annotations

import datetime as dt

from resilience.errors import Classification

# Acknowledgements start with this mark, so a restarted bot can tell "I only said it was
# queued" apart from "I answered" when it looks back at a channel's history.
ACK_MARK = "\u23f3"  # hourglass


# Refusals (intake): the first of a kind per user and window gets its sentence below; the next
# few get this reaction instead (the reason was just given), the rest nothing (ratelimit.NoticeLimiter).
COOLDOWN = "cooldown"
TOO_LONG = "too_long"
ATTACHMENTS_REFUSED = "attachments_refused"
EMPTY_MENTION = "empty_mention"
QUEUE_FULL = "queue_full"
QUOTA = "quota"
_REFUSAL_REACTIONS = {
    QUOTA: "\U0001faab",  # low battery: today's allowance is used up
    QUEUE_FULL: "\U0001f6a7",  # construction: the queue is full
    COOLDOWN: "\U0001f422",  # turtle: slow down
    TOO_LONG: "\U0001f4cf",  # ruler: too long
    ATTACHMENTS_REFUSED: "\U0001f4ce",  # paperclip: files I did not read
    EMPTY_MENTION: "\u2753",
}


def refusal_reaction(kind: str) -> str:
    """The reaction that stands in for a refusal's sentence already given in this window."""
    return _REFUSAL_REACTIONS[kind]


def queued(verdict: Classification, position: int) -> str:
    """The honest "queued" acknowledgement, with the queue position and, when known, when."""
    where = f" (position {position} in the queue)" if position > 0 else ""
    when = ""
    if verdict.retry_after is not None and verdict.retry_after >= 60:
        when = f" I expect to be able to answer in about {_human(verdict.retry_after)}."
    return (
        f"{ACK_MARK} {verdict.user_message} I saved your message{where} and will answer it here"
        f" as soon as I can.{when}"
    )


def queued_busy(position: int) -> str:
    where = f" (position {position} in the queue)" if position > 0 else ""
    return (
        f"{ACK_MARK} I'm still working on earlier messages in this conversation. I saved yours{where}"
        " and will answer it here in order."
    )


def maintenance(message: str, *, queued_position: int | None) -> str:
    if queued_position is None:
        return f"\U0001f6e0 {message}"
    where = f" (position {queued_position})" if queued_position > 0 else ""
    return f"{ACK_MARK} \U0001f6e0 {message} I saved your message{where} and will answer it when I'm back."


def queued_load(position: int) -> str:
    """New messages are queued while the bot sheds load (an operator's ``load_shed``)."""
    where = f" (position {position} in the queue)" if position > 0 else ""
    return (
        f"{ACK_MARK} I'm answering a lot of messages right now. I saved yours{where} and will answer it"
        " here shortly."
    )


def queue_full(scope: str, limit: int) -> str:
    """Why a message was not saved: a cap on waiting messages (``QueueFullError.scope``) is reached."""
    if scope == "user":
        why = f"You already have {limit} message{'s' if limit != 1 else ''} waiting for an answer"
        then = "once I've answered those"
    elif scope == "guild":
        why = f"This server already has {limit} messages waiting for an answer"
        then = "once I've caught up"
    else:
        why = "Too many messages are waiting for an answer right now"
        then = "in a little while"
    return f"{why}, so I didn't save this one. Please send it again {then}."


def quota_exhausted(scope: str, limit: int, resets_in: float) -> str:
    """Why a message was not answered: a daily token quota (``bot.usage.QuotaExceeded``) is used up."""
    whose = "You have" if scope == "user" else "This server has"
    return (
        f"{whose} used today's allowance of {limit:,} Gemini tokens, so I can't answer more today; "
        f"it resets at midnight UTC, in {_human(resets_in)}."
    )


def history_left_out(kept: int) -> str:
    """Said once per conversation when older turns no longer fit what is sent to Gemini."""
    if kept == 0:
        return (
            "-# This conversation is long, so I answered this message on its own; earlier ones no longer fit."
        )
    what = "message" if kept == 1 else f"{kept} messages"
    return f"-# This conversation is long, so I'm using the last {what} of it; older ones I no longer see."


def cooldown(wait: float) -> str:
    return (
        f"You're sending messages faster than I can keep up with. Please wait {_human(wait)} and try again."
    )


def too_long(length: int, limit: int) -> str:
    return (
        f"Your message is {length:,} characters long; I can read at most {limit:,}. "
        "Please shorten it or split it up."
    )


# Attachments (bot/attachments.py): one sentence per file left out, naming it and the limit.


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    return f"{n} GB"


def attachment_too_large(name: str, size: int, limit: int) -> str:
    return f"I left out {name}: it is {_size(size)} and I read files of at most {_size(limit)}."


def attachment_total_too_large(name: str, limit: int) -> str:
    return f"I left out {name}: with the files before it, it goes past the {_size(limit)} I read per message."


def attachment_too_many(name: str, limit: int) -> str:
    return f"I left out {name}: I read at most {limit} file{'s' if limit != 1 else ''} per message."


def attachment_unknown_type(name: str) -> str:
    return (
        f"I left out {name}: I can't read that type of file (I read images, text and code files, PDFs, "
        "audio and short videos)."
    )


def attachment_kind_off(name: str, kind: str) -> str:
    return f"I left out {name}: I'm set up not to read {kind}s here."


def attachment_damaged(name: str, kind: str) -> str:
    return f"I left out {name}: it doesn't look like a valid {kind} (the file may be damaged)."


def attachment_rejected(name: str) -> str:
    return f"I left out {name}: Gemini could not process it."


def attachments_unreadable(names: list[str]) -> str:
    them = "it" if len(names) == 1 and names[0] != "the earlier files" else "them"
    return f"Gemini could not read {', '.join(names)}, so I answered without {them}."


def attachment_gone(name: str) -> str:
    return f"I couldn't get {name} from Discord any more (it was deleted), so I answered without it."


def attachment_text_cut(name: str, limit: int) -> str:
    return f"I read only the first {limit:,} characters of {name}."


def attachments_refused(sentences: list[str] | tuple[str, ...]) -> str:
    """The reply to a message with nothing to read but files left out."""
    return " ".join(sentences)


def file_no_longer_available(kind: str, name: str) -> str:
    """What Gemini is told in place of an earlier turn's file that cannot be had any more."""
    return f"[{kind} {name} is no longer available]"


def empty_mention() -> str:
    return "Hi! Ask me anything: mention me with your question, reply to one of my messages, or DM me."


def no_answer() -> str:
    return "Gemini gave me no answer to that; please try rephrasing it."


def bug(trace_id: str) -> str:
    return f"Sorry, something went wrong on my side and I couldn't answer. (trace id `{trace_id}`)"


def cannot_accept(verdict: Classification) -> str:
    return (
        f"{verdict.user_message} I also can't save messages right now, so please try again in a little while."
    )


def owners_only() -> str:
    return (
        "`/admin` changes the bot for every server, so it is for the bot's owners only; "
        "server managers can use `/server` for their own server."
    )


def managers_only(command: str = "server") -> str:
    return f"`/{command}` changes this server's settings, so it needs the Manage Server permission here."


def server_only(command: str = "server") -> str:
    return f"`/{command}` works only in a server, on that server's settings."


def reset_refused() -> str:
    return (
        "Only members who can manage messages here can make me forget this shared conversation; "
        "in a DM with me you can always reset our own."
    )


def private_answer_undeliverable() -> str:
    """Said in the channel of a private /ask whose answer the asker's DMs refused: no question, no answer."""
    return (
        "I couldn't send you the private answer to your `/ask`: you don't accept direct messages from me. "
        "Allow direct messages from this server's members and ask again, or ask without `private`."
    )


# Streamed answers (bot/streaming.py) and their buttons (bot/views.py).

STOP_LABEL = "Stop"
REGENERATE_LABEL = "Regenerate"
STREAM_INTERRUPTED = "-# (interrupted, retrying)"
"""Under a streamed answer whose writing failed part-way: what shows is not the whole answer."""
STREAM_STOPPED = "-# (stopped)"
"""Under a streamed answer someone stopped: what shows is all there will be."""


def stream_long_answer(chars: int) -> str:
    """Under a streamed answer that grew past LONG_ANSWER_CHARS: the rest comes as a file."""
    return f"-# \U0001f4ce A long answer ({chars:,} characters so far): all of it will come as `answer.md`."


def stop_refused() -> str:
    return "Only the person who asked, or someone who can manage messages here, can stop this answer."


def stop_not_running() -> str:
    return "That answer isn't being written right now, so there is nothing to stop."


def regenerate_refused() -> str:
    return "Only the person who asked can get a new answer to this question."


def regenerate_unknown() -> str:
    return "I can't tell which question this message answers, so I can't answer it again."


def regenerate_question_gone() -> str:
    return "The question was deleted, so I can't answer it again."


def regenerate_failed() -> str:
    return "I couldn't read the question again right now; please try again in a little while."


def late_answer_prefix(original: str) -> str:
    quoted = original.strip().replace("\n", " ")
    if len(quoted) > 120:
        quoted = quoted[:117] + "..."
    return f"You asked earlier: > {quoted}\n\n"


def dead_letter(attempts: int) -> str:
    return (
        f"Sorry, I tried {attempts} times to answer your message and could not. "
        "Please ask again later; an operator has been notified."
    )


def expired(age_seconds: float) -> str:
    return (
        f"Sorry, your message waited {_human(age_seconds)} for an answer, "
        "which is too long to still be useful. Please ask again."
    )


def _human(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def duration(seconds: float) -> str:
    """A duration for people: 45 s, 12 min, 3.5 h, 2.0 d (status views, alerts, incidents)."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


CACHED_MARK = "\U0001f4e6"  # package: an answer from the cache, not a fresh one
CACHED_ANSWER_CHARS = 1400


def cached_answer(text: str, stored_at: float) -> str:
    """An earlier answer to the same question, offered while Gemini is down (``bot.answer_cache``):
    marked as cached and dated, after the "queued" acknowledgement (which must come first: it starts
    with ``ACK_MARK``)."""
    when = dt.datetime.fromtimestamp(stored_at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = text if len(text) <= CACHED_ANSWER_CHARS else text[: CACHED_ANSWER_CHARS - 1].rstrip() + "…"
    return (
        f"{CACHED_MARK} Meanwhile, a cached answer to the same question, from {when} (it may be out of "
        f"date):\n\n{body}"
    )
