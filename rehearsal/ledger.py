"""What every simulated user saw: the check behind "answered, queued, or told why; nothing lost".

A ``Ledger`` sends user messages through the Discord emulator (each carries a unique marker
the sandbox Gemini echoes back) and then reads the bot's replies from the emulator, the way a
user would: a reply (``message_reference``) to the question is an *acknowledgement* when it
starts with the ⏳ mark, an *answer* when it contains the question's marker, and otherwise a
*notice* (the bot saying why it will not answer: cooldown, maintenance, dead letter, ...).

Used by ``python -m rehearsal simulate`` and the chaos scenarios in ``tests/chaos``.
"""

from __future__ import annotations

import enum
import itertools
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bot.texts import ACK_MARK
from sandbox.discord_emu import DiscordEmulator, SentMessage


class Seen(enum.Enum):
    """What a user has seen so far in reply to one message."""

    ANSWERED_DIRECT = "answered_direct"  # an answer, with no "queued" acknowledgement before it
    ANSWERED_AFTER_QUEUE = "answered_after_queue"  # a "queued" acknowledgement, then the answer
    TOLD_WHY = "told_why"  # no answer, but a sentence saying why (the final word on it)
    QUEUED = "queued"  # only the "queued" acknowledgement so far
    NOTHING = "nothing"  # no reply at all yet

    @property
    def settled(self) -> bool:
        """The user has an answer or a reason: nothing more is owed."""
        return self in (Seen.ANSWERED_DIRECT, Seen.ANSWERED_AFTER_QUEUE, Seen.TOLD_WHY)


@dataclass
class Asked:
    """One message a simulated user sent, and every reply the bot made to it."""

    message_id: int
    channel_id: int
    author: str | int
    marker: str
    text: str
    sent_at: float
    acks: list[SentMessage] = field(default_factory=list)
    answers: list[SentMessage] = field(default_factory=list)
    notices: list[SentMessage] = field(default_factory=list)

    @property
    def seen(self) -> Seen:
        if self.answers:
            queued_first = bool(self.acks) and self.acks[0].at <= self.answers[0].at
            return Seen.ANSWERED_AFTER_QUEUE if queued_first else Seen.ANSWERED_DIRECT
        if self.notices:
            return Seen.TOLD_WHY
        return Seen.QUEUED if self.acks else Seen.NOTHING

    @property
    def duplicated(self) -> bool:
        """Answered more than once (every answer here fits in one Discord message)."""
        return len(self.answers) > 1

    def first_reply_seconds(self) -> float | None:
        """Time from sending to the first reply of any kind."""
        replies = [m.at for m in (*self.acks, *self.answers, *self.notices)]
        return min(replies) - self.sent_at if replies else None

    def answer_seconds(self) -> float | None:
        return self.answers[0].at - self.sent_at if self.answers else None

    def ack_seconds(self) -> float | None:
        return self.acks[0].at - self.sent_at if self.acks else None


@dataclass(frozen=True)
class Tally:
    """Counts over a ledger, plus latency percentiles in milliseconds."""

    sent: int
    seen: dict[str, int]
    duplicated: int
    out_of_order: int
    direct_ms: dict[str, float]
    ack_ms: dict[str, float]
    after_queue_ms: dict[str, float]

    @property
    def lost(self) -> int:
        """Messages that got neither an answer nor a reason (an acknowledgement alone is not enough)."""
        return self.seen.get(Seen.QUEUED.value, 0) + self.seen.get(Seen.NOTHING.value, 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent, **self.seen, "lost": self.lost, "duplicated": self.duplicated,
            "out_of_order": self.out_of_order, "direct_ms": self.direct_ms, "ack_ms": self.ack_ms,
            "after_queue_ms": self.after_queue_ms,
        }


class Ledger:
    """The messages sent through one Discord emulator and the bot's replies to them."""

    def __init__(self, discord: DiscordEmulator, *, prefix: str = "q") -> None:
        self.discord = discord
        self.asked: dict[int, Asked] = {}
        self._prefix = prefix
        self._numbers = itertools.count(1)
        self._read = 0  # how far into the emulator's sent log the replies were sorted
        self.unmatched: list[SentMessage] = []  # bot messages that reply to none of ours

    async def ask(
        self, channel_id: int, author: str | int = "normal", text: str = "", *, mentions_bot: bool = True,
        reference_message_id: int | None = None,
    ) -> Asked:
        """Send ``text`` (prefixed with a unique marker) as ``author``; the bot must answer it."""
        marker = f"[{self._prefix}{next(self._numbers)}]"
        body = f"{marker} {text}".strip()
        sent_at = time.monotonic()
        data = await self.discord.send_user_message(
            channel_id, author, body, mentions_bot=mentions_bot, reference_message_id=reference_message_id
        )
        asked = Asked(int(data["id"]), channel_id, author, marker, body, sent_at)
        self.asked[asked.message_id] = asked
        self.update()
        return asked

    def update(self) -> None:
        """Sort the bot's new messages into the acknowledgements, answers and notices they are."""
        new = self.discord.sent_log(self._read)
        self._read += len(new)
        for message in new:
            ref = (message.message_reference or {}).get("message_id")
            asked = self.asked.get(int(ref)) if ref is not None else None
            if asked is None:
                self.unmatched.append(message)
            elif message.content.startswith(ACK_MARK):
                asked.acks.append(message)
            elif asked.marker in message.content:
                asked.answers.append(message)
            else:
                asked.notices.append(message)

    def unsettled(self) -> list[Asked]:
        """Messages still owed an answer or a reason."""
        self.update()
        return [a for a in self.asked.values() if not a.seen.settled]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:  # noqa: ASYNC109
        """Wait until ``predicate()`` holds over up-to-date replies; raises ``TimeoutError``."""

        def ready() -> bool:
            self.update()
            return predicate()

        await self.discord.wait_until(ready, timeout=timeout)

    async def wait_settled(self, timeout: float) -> list[Asked]:  # noqa: ASYNC109
        """Wait until every message has an answer or a reason; return those that still do not."""
        try:
            await self.discord.wait_until(lambda: not self.unsettled(), timeout=timeout)
        except TimeoutError:
            pass
        return self.unsettled()

    def out_of_order(self) -> list[int]:
        """Channels whose answers did not come in the order their questions were sent."""
        self.update()
        bad = []
        by_channel: dict[int, list[Asked]] = {}
        for asked in self.asked.values():
            by_channel.setdefault(asked.channel_id, []).append(asked)
        for channel, items in by_channel.items():
            answered = [a for a in items if a.answers]
            by_answer = sorted(answered, key=lambda a: a.answers[0].at)
            if [a.message_id for a in by_answer] != [a.message_id for a in answered]:
                bad.append(channel)
        return bad

    def tally(self) -> Tally:
        self.update()
        items = list(self.asked.values())
        seen = Counter(a.seen.value for a in items)
        return Tally(
            sent=len(items),
            seen={s.value: seen.get(s.value, 0) for s in Seen},
            duplicated=sum(a.duplicated for a in items),
            out_of_order=len(self.out_of_order()),
            direct_ms=percentiles(
                [a.answer_seconds() for a in items if a.seen is Seen.ANSWERED_DIRECT]
            ),
            ack_ms=percentiles([a.ack_seconds() for a in items if a.acks]),
            after_queue_ms=percentiles(
                [a.answer_seconds() for a in items if a.seen is Seen.ANSWERED_AFTER_QUEUE]
            ),
        )

    def describe(self, asked: Asked) -> str:
        """One line for an assertion message: the question and what the bot said to it."""
        said = [f"{kind}:{m.content[:60]!r}" for kind, ms in
                (("ack", asked.acks), ("answer", asked.answers), ("notice", asked.notices)) for m in ms]
        return f"{asked.marker} in {asked.channel_id} -> {asked.seen.value} {said}"


def percentiles(seconds: list[float | None]) -> dict[str, float]:
    """p50/p95/p99/max in milliseconds (empty dict when there are no values)."""
    values = sorted(s * 1000 for s in seconds if s is not None)
    if not values:
        return {}
    if len(values) == 1:
        return {"p50": values[0], "p95": values[0], "p99": values[0], "max": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "max": values[-1]}
