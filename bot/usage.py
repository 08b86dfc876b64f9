"""Token accounting and daily quotas: what each Gemini call cost, whom it is charged to, who may ask.

Every answer's ``usage_metadata`` (prompt, output, thought and cached tokens; ``services.gemini.Reply``)
becomes a ``UsageRecord`` charged to the asker, their guild (none in a DM) and the model, on the UTC
day of the answer. The record is written to SQLite in the transaction that finishes the item
(``SqliteStore.finish``), or stores its turns when a long answer is staged: recording usage adds
no write of its own to a message's path.

Quotas (``QUOTA_USER_TOKENS_PER_DAY``, ``QUOTA_GUILD_TOKENS_PER_DAY``; 0 = unlimited) count a UTC
day's prompt, output and thought tokens. ``UsageLedger.check`` decides from memory (no I/O): the
ledger keeps today's totals of the users and guilds it has seen, read once from SQLite when the
service starts (``usage_by_owner``) and reset at midnight UTC. Only a scope with a quota is kept in
memory, so with quotas off the ledger holds nothing; at most ``MAX_OWNERS`` users and guilds each.
A message is checked at the door (intake, ``/ask``): one already accepted is answered even if an
earlier answer used the rest of the quota, so a quota can be overrun by the answers in flight
when it ran out (one per conversation at most).
What a user uses never counts against another user (a guild's quota is shared by its members by
design).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from resilience.clock import Clock
from resilience.errors import classify
from services.gemini import Reply
from services.storage import SECONDS_PER_DAY, UsageRecord, usage_day
from services.storage_protocol import Storage

log = structlog.get_logger("bot.usage")

Scope = Literal["user", "guild"]

MAX_OWNERS = 100_000
"""Users (and, apart, guilds) whose totals of the day the ledger keeps at most. Past it, the tenth
that used least is forgotten (their next answers count from zero): memory stays bounded under a
flood of distinct users, and those nearest their quota are the ones kept."""


@dataclass(frozen=True, slots=True)
class QuotaExceeded:
    """A message refused for a used-up daily quota: whose (``scope``), the quota, what was used, and
    seconds until it resets (midnight UTC)."""

    scope: Scope
    limit: int
    used: int
    resets_in: float


def seconds_to_reset(now: float) -> float:
    """Seconds from wall-clock ``now`` to the next midnight UTC, when daily quotas start afresh."""
    return (usage_day(now) + 1) * SECONDS_PER_DAY - now


class UsageLedger:
    """Today's counted tokens per user and guild in memory, for quota checks without I/O; a
    registry service (``start`` reads today's totals once)."""

    name = "usage"
    depends_on: tuple[str, ...] = ("storage",)

    def __init__(
        self,
        storage: Storage,
        *,
        user_daily: int,
        guild_daily: int,
        clock: Clock,
        max_owners: int = MAX_OWNERS,
    ) -> None:
        if user_daily < 0 or guild_daily < 0:
            raise ValueError("daily quotas must be 0 (unlimited) or positive")
        if max_owners < 10:
            raise ValueError("max_owners must be at least 10")
        self.max_owners = max_owners
        self.forgotten = 0
        self._storage = storage
        self.user_daily = user_daily
        self.guild_daily = guild_daily
        self._clock = clock
        self._day = usage_day(clock.time())
        self._users: dict[int, int] = {}
        self._guilds: dict[int, int] = {}
        self.loaded = False

    @property
    def tracked(self) -> int:
        """How many users and guilds today's totals hold (for the memory view)."""
        return len(self._users) + len(self._guilds)

    @property
    def enabled(self) -> bool:
        """Whether any quota is set (otherwise the ledger tracks nothing)."""
        return bool(self.user_daily or self.guild_daily)

    # -- service protocol ------------------------------------------------------------------

    async def start(self) -> None:
        """Read today's totals (one query), when a quota is set. A failure is logged, not raised:
        the bot still starts and counts today's usage from this start on."""
        if not self.enabled or self.loaded:
            return
        day = usage_day(self._clock.time())
        try:
            users, guilds = await self._storage.usage_by_owner(day)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("usage.load_failed", category=classify(exc).category.value)
            return
        self._roll(day)
        for user_id, tokens in users.items():
            self._add(self._users, user_id, tokens)
        for guild_id, tokens in guilds.items():
            if guild_id:
                self._add(self._guilds, guild_id, tokens)
        self.loaded = True

    async def stop(self) -> None:
        """Nothing to close."""

    def health(self) -> dict[str, Any]:
        return {
            "ok": True,
            "quotas": {"user_daily": self.user_daily, "guild_daily": self.guild_daily},
            "day": self._day,
            "users_tracked": len(self._users),
            "guilds_tracked": len(self._guilds),
            "forgotten": self.forgotten,
            "loaded": self.loaded or not self.enabled,
        }

    # -- the door and the books ----------------------------------------------------------------

    def check(self, user_id: int, guild_id: int | None) -> QuotaExceeded | None:
        """Whether ``user_id`` (asking in ``guild_id``) has a daily quota left; no I/O, no await.

        The user's own quota is checked first: one user over theirs never refuses another.
        """
        if not self.enabled:
            return None
        now = self._clock.time()
        self._roll(usage_day(now))
        if self.user_daily:
            used = self._users.get(user_id, 0)
            if used >= self.user_daily:
                return QuotaExceeded("user", self.user_daily, used, seconds_to_reset(now))
        if self.guild_daily and guild_id is not None:
            used = self._guilds.get(guild_id, 0)
            if used >= self.guild_daily:
                return QuotaExceeded("guild", self.guild_daily, used, seconds_to_reset(now))
        return None

    def record(self, user_id: int, guild_id: int | None, reply: Reply) -> UsageRecord | None:
        """The usage of ``reply`` charged to ``user_id`` (and ``guild_id``) today, counted towards their
        quotas now; None when Gemini reported no tokens. The caller stores it (``SqliteStore.finish``)."""
        if not (reply.prompt_tokens or reply.completion_tokens or reply.thought_tokens):
            return None
        now = self._clock.time()
        record = UsageRecord(
            day=usage_day(now),
            user_id=user_id,
            guild_id=guild_id,
            model=reply.model,
            prompt=reply.prompt_tokens,
            output=reply.completion_tokens,
            thought=reply.thought_tokens,
            cached=reply.cached_tokens,
        )
        self.count(record)
        return record

    def count(self, record: UsageRecord) -> None:
        """Add ``record`` to today's totals (when it is of today and a quota needs it)."""
        if not self.enabled:
            return
        self._roll(usage_day(self._clock.time()))
        if record.day != self._day:
            return
        if self.user_daily:
            self._add(self._users, record.user_id, record.counted)
        if self.guild_daily and record.guild_id is not None:
            self._add(self._guilds, record.guild_id, record.counted)

    def used_today(self, user_id: int | None = None, guild_id: int | None = None) -> int | None:
        """Today's counted tokens of a user or guild as the ledger knows them (None: not tracked)."""
        if user_id is not None:
            return self._users.get(user_id, 0) if self.user_daily else None
        if guild_id is not None:
            return self._guilds.get(guild_id, 0) if self.guild_daily else None
        return None

    def _add(self, totals: dict[int, int], owner: int, tokens: int) -> None:
        totals[owner] = totals.get(owner, 0) + tokens
        if len(totals) > self.max_owners:
            # Forget the tenth that used least: O(n log n) once per max_owners / 10 new owners.
            least = sorted(totals, key=totals.__getitem__)[: max(1, self.max_owners // 10)]
            for key in least:
                del totals[key]
            self.forgotten += len(least)

    def _roll(self, day: int) -> None:
        """A new UTC day: every quota starts afresh."""
        if day != self._day:
            self._day = day
            self._users.clear()
            self._guilds.clear()
