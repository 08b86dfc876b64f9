"""A user message as the bot keeps it: what intake, answering, routing and the drain share.

``Inbound`` is also the queue payload of an inbound item; ``accept`` is the durable point of
no return (``SqliteStore.accept``): the message id is recorded as processed and the work item
stored in one transaction, so after ``kill -9`` the drain finds it and answers it, and a
replayed gateway event is never answered twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import discord

from resilience.degradation import ItemKind, QueueItem

if TYPE_CHECKING:
    from bot.app import Application
    from services.config import Config

LEASE_MARGIN = 30.0


def conversation_key(channel_id: int) -> str:
    """One conversation per channel, thread or DM channel."""
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

    def payload(self, **extra: Any) -> dict[str, Any]:
        return {
            "message_id": self.message_id,
            "channel_id": self.channel_id,
            "guild_id": self.guild_id,
            "author_id": self.author_id,
            "content": self.content,
            **extra,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Inbound:
        return cls(
            message_id=int(payload["message_id"]),
            channel_id=int(payload["channel_id"]),
            guild_id=None if payload.get("guild_id") is None else int(payload["guild_id"]),
            author_id=int(payload["author_id"]),
            content=str(payload["content"]),
        )

    @property
    def key(self) -> str:
        return conversation_key(self.channel_id)

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


async def accept(
    app: Application, inbound: Inbound, *, claim: bool, extra: dict[str, Any]
) -> QueueItem | None:
    """Accept a message durably (see ``SqliteStore.accept``); None when it was seen before.

    Raises ``QueueFullError`` (nothing stored) when a cap on waiting messages is reached.
    """
    return await app.storage.accept(
        inbound.message_id,
        ItemKind.INBOUND,
        inbound.key,
        inbound.payload(**extra),
        now=app.clock.time(),
        lease_seconds=lease_seconds(app.config),
        claim=claim,
        caps=app.queue_caps,
    )
