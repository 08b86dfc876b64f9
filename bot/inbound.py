"""A user message as the bot keeps it: what intake, answering, routing and the drain share.

``Inbound`` is also the queue payload of an inbound item; ``Application.accept`` (``bot.app``) is
the durable point of no return (``SqliteStore.accept``): the message id is recorded as processed
and the work item stored in one transaction, so after ``kill -9`` the drain finds it and answers
it, and a replayed gateway event is never answered twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord

if TYPE_CHECKING:
    from services.config import Config

LEASE_MARGIN = 30.0


def conversation_key(channel_id: int) -> str:
    """One conversation per channel, thread (a forum post too) or DM channel; a reply to an earlier
    answer may continue a branch of it instead (``bot.conversations``)."""
    return str(channel_id)


def backoff(attempts: int) -> float:
    """Seconds before a queued item is tried again after ``attempts`` counted failures."""
    return float(min(300, 2 ** min(attempts + 1, 9)))


def lease_seconds(config: Config) -> float:
    """How long a live claim outlives a crash: the longest its holder may wait and work, plus a margin."""
    return config.processing_timeout_seconds + config.mutex_acquire_timeout_seconds + LEASE_MARGIN


@dataclass(frozen=True, slots=True)
class Inbound:
    """What the pipeline and the drain need of a user message; also the queue payload."""

    message_id: int
    channel_id: int
    guild_id: int | None
    author_id: int
    content: str
    # Who asked, as Gemini is told (``bot.conversations.speaker_label``); the conversation it
    # continues when not its channel's own (a reply branch); where its settings are looked up
    # (``bot.settings.scope_chain``: the channel, its parent, its category).
    speaker: str | None = None
    conversation: str | None = None
    scopes: tuple[int, ...] = ()

    def payload(self, **extra: Any) -> dict[str, Any]:
        data: dict[str, Any] = {
            "message_id": self.message_id,
            "channel_id": self.channel_id,
            "guild_id": self.guild_id,
            "author_id": self.author_id,
            "content": self.content,
        }
        if self.speaker is not None:
            data["speaker"] = self.speaker
        if self.conversation is not None:
            data["conversation"] = self.conversation
        if self.scopes:
            data["scopes"] = list(self.scopes)
        return {**data, **extra}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Inbound:
        speaker = payload.get("speaker")
        conversation = payload.get("conversation")
        return cls(
            message_id=int(payload["message_id"]),
            channel_id=int(payload["channel_id"]),
            guild_id=None if payload.get("guild_id") is None else int(payload["guild_id"]),
            author_id=int(payload["author_id"]),
            content=str(payload["content"]),
            speaker=None if speaker is None else str(speaker),
            conversation=None if conversation is None else str(conversation),
            scopes=tuple(int(s) for s in payload.get("scopes") or ()),
        )

    @property
    def key(self) -> str:
        return self.conversation or conversation_key(self.channel_id)

    @property
    def chain(self) -> tuple[int, ...]:
        """Where this message's settings are looked up (its channel alone for an item queued by an
        older version)."""
        return self.scopes or ((self.channel_id,) if self.guild_id is not None else ())

    def reference(self) -> discord.MessageReference:
        """A reply reference to the original message that does not fail if it was deleted."""
        return discord.MessageReference(
            message_id=self.message_id,
            channel_id=self.channel_id,
            guild_id=self.guild_id,
            fail_if_not_exists=False,
        )


class Snowflake:
    """A bare id, enough for ``AllowedMentions(users=[...])``."""

    __slots__ = ("id",)

    def __init__(self, id: int) -> None:
        self.id = id
