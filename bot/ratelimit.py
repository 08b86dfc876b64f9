"""Per-user and per-guild message rate limits: a sliding-window log with bounded memory.

Why a sliding-window log rather than a token bucket: the cooldown notice promises "N
messages per minute", and the log keeps exactly that promise (at most ``N`` accepted hits
in any ``window``-second span), with an exact wait to quote. A token bucket would let a
burst of ``N`` be followed by refills, up to ``2N - 1`` in one window. The log costs at
most ``N`` floats per key, and the configured limits are small (a few per user, tens per
guild).

Memory is bounded: each scope (users, guilds) keeps at most ``max_keys`` keys in a map
ordered by last accepted hit. Every call drops a couple of idle keys from the front (their
hits have all expired, so nothing is lost); when more than ``max_keys`` keys are active at
once, the least recently active one is evicted, which forgets its hits (the only leniency,
and only under a flood of distinct senders).

Two more limits live here. ``NoticeLimiter`` decides how a refused message is answered, so that
a flood of refused messages cannot become a flood of posts: per user and window, one notice per
kind of refusal, then a few reactions, then silence. ``TokenBucket`` paces the drain: queued
messages reach Gemini at a bounded rate after maintenance or an outage.
"""

from __future__ import annotations

from collections import OrderedDict
from enum import StrEnum
from typing import Any

from resilience.clock import Clock

# Idle keys dropped per call: more than one, so the sweep outpaces new keys.
_SWEEP_PER_CALL = 2


class _Scope:
    """One sliding-window log per key, ordered by last accepted hit (idlest first)."""

    __slots__ = ("evicted", "limit", "logs", "max_keys", "window")

    def __init__(self, limit: int, window: float, max_keys: int) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        # OrderedDict, not dict: popping a plain dict's oldest key scans the deleted slots before
        # it (18 us per call under a flood of new keys); popitem(last=False) is O(1).
        self.logs: OrderedDict[int, list[float]] = OrderedDict()
        self.evicted = 0

    def wait(self, key: int, now: float) -> float:
        """Seconds until ``key`` may send again (0.0: now); drops its expired hits."""
        log = self.logs.get(key)
        if log is None:
            return 0.0
        horizon = now - self.window
        expired = 0
        while expired < len(log) and log[expired] <= horizon:
            expired += 1
        if expired:
            del log[:expired]
        if len(log) < self.limit:
            return 0.0
        return log[0] + self.window - now

    def record(self, key: int, now: float) -> None:
        """Add an accepted hit and move ``key`` to the most-recently-active end."""
        log = self.logs.get(key)
        if log is None:
            self.logs[key] = [now]
            if len(self.logs) > self.max_keys:
                self.logs.popitem(last=False)
                self.evicted += 1
        else:
            log.append(now)
            self.logs.move_to_end(key)

    def sweep(self, now: float) -> None:
        """Drop up to a few idle keys from the least-recently-active end."""
        horizon = now - self.window
        for _ in range(_SWEEP_PER_CALL):
            if not self.logs:
                return
            log = next(iter(self.logs.values()))
            if log and log[-1] > horizon:
                return  # the front is the idlest key: if it is live, every key is
            self.logs.popitem(last=False)


class RateLimiter:
    """At most ``per_user`` messages per user and ``per_guild`` per guild in any ``window`` seconds.

    ``check(user_id, guild_id)`` returns None and records the hit when both limits allow the
    message, else the seconds until it would be allowed (refused messages are not recorded,
    so a user who keeps trying is not locked out for longer). DMs (``guild_id=None``) only
    count against the user's limit. A limit of 0 disables that scope. Time comes from
    ``clock.monotonic()``. At most ``max_keys`` users and ``max_keys`` guilds are tracked.
    """

    def __init__(
        self,
        per_user: int,
        per_guild: int,
        *,
        window: float = 60.0,
        clock: Clock,
        max_keys: int = 50_000,
    ) -> None:
        if per_user < 0 or per_guild < 0:
            raise ValueError("per_user and per_guild must not be negative (0 disables a limit)")
        if window <= 0:
            raise ValueError("window must be positive")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._clock = clock
        self._window = window
        self._users = _Scope(per_user, window, max_keys)
        self._guilds = _Scope(per_guild, window, max_keys)
        self.allowed = 0
        self.refused_user = 0
        self.refused_guild = 0

    @property
    def window(self) -> float:
        """The span, in seconds, each limit counts over."""
        return self._window

    def check(self, user_id: int, guild_id: int | None = None) -> float | None:
        """None (allowed, hit recorded) or the seconds to wait before the next message is allowed."""
        now = self._clock.monotonic()
        users, guilds = self._users, self._guilds
        user_wait = users.wait(user_id, now) if users.limit else 0.0
        guild_wait = guilds.wait(guild_id, now) if guild_id is not None and guilds.limit else 0.0
        if user_wait > 0.0 or guild_wait > 0.0:
            if user_wait >= guild_wait:
                self.refused_user += 1
            else:
                self.refused_guild += 1
            return max(user_wait, guild_wait)
        if users.limit:
            users.record(user_id, now)
            users.sweep(now)
        if guild_id is not None and guilds.limit:
            guilds.record(guild_id, now)
            guilds.sweep(now)
        self.allowed += 1
        return None

    def set_limits(self, per_user: int, per_guild: int) -> None:
        """Change the limits at run time (an operator shedding load); the hits already counted stay."""
        if per_user < 0 or per_guild < 0:
            raise ValueError("per_user and per_guild must not be negative (0 disables a limit)")
        self._users.limit = per_user
        self._guilds.limit = per_guild

    def reset(self, user_id: int | None = None) -> None:
        """Forget one user's hits (an admin lifting a cooldown), or every hit when ``user_id`` is None."""
        if user_id is None:
            self._users.logs.clear()
            self._guilds.logs.clear()
        else:
            self._users.logs.pop(user_id, None)

    def status(self) -> dict[str, Any]:
        """Limits, keys tracked and counters, for operators (no user ids)."""
        return {
            "per_user": self._users.limit,
            "per_guild": self._guilds.limit,
            "window": self._window,
            "users_tracked": len(self._users.logs),
            "guilds_tracked": len(self._guilds.logs),
            "max_keys": self._users.max_keys,
            "allowed": self.allowed,
            "refused_user": self.refused_user,
            "refused_guild": self.refused_guild,
            "evicted": self._users.evicted + self._guilds.evicted,
        }


class Feedback(StrEnum):
    """How a refused message is answered (``NoticeLimiter.decide``)."""

    NOTICE = "notice"  # the sentence that says why (and, for a cooldown, how long to wait)
    REACT = "react"  # a reaction on the message: "refused, for the reason already given"
    SILENT = "silent"  # nothing: the user was told and shown enough in this window


class _Refused:
    """One user's recent refusals: when each kind was last noticed, and the reactions given."""

    __slots__ = ("last", "noticed", "reactions")

    def __init__(self) -> None:
        self.noticed: dict[str, float] = {}
        self.reactions: list[float] = []
        self.last = 0.0


class NoticeLimiter:
    """How a refused message is answered: a flood of refusals costs a bounded number of writes.

    Per user, in any ``window`` seconds: the first refusal of each kind (``"cooldown"``,
    ``"too_long"``, ...) gets its notice; later refusals get a reaction, at most ``reactions``
    per user (all kinds together); the rest get nothing. A notice is allowed again once the
    previous notice of that kind is ``window`` seconds old. ``decide`` neither awaits nor
    yields, so concurrent refusals of one user get exactly one notice. Time comes from
    ``clock.monotonic()``. Memory: at most ``max_keys`` users, ordered by last refusal; idle ones
    are swept, and under a flood of distinct users the least recently refused is forgotten
    (which lets that user have one notice more).
    """

    def __init__(self, *, window: float, reactions: int, clock: Clock, max_keys: int = 50_000) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        if reactions < 0:
            raise ValueError("reactions must not be negative")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._window = window
        self._reactions = reactions
        self._clock = clock
        self._max_keys = max_keys
        self._users: OrderedDict[int, _Refused] = OrderedDict()
        self.counts: dict[Feedback, int] = dict.fromkeys(Feedback, 0)
        self.evicted = 0

    def decide(self, user_id: int, kind: str) -> Feedback:
        """Record a refusal of ``kind`` for ``user_id`` and say how to answer it."""
        now = self._clock.monotonic()
        horizon = now - self._window
        self._sweep(horizon)  # first, so idle users make room before anyone is evicted
        users = self._users
        entry = users.get(user_id)
        if entry is None:
            entry = users[user_id] = _Refused()
            if len(users) > self._max_keys:
                users.popitem(last=False)
                self.evicted += 1
        else:
            users.move_to_end(user_id)
        entry.last = now
        noticed = entry.noticed.get(kind)
        if noticed is None or noticed <= horizon:
            entry.noticed[kind] = now
            return self._count(Feedback.NOTICE)
        reactions = entry.reactions
        expired = 0
        while expired < len(reactions) and reactions[expired] <= horizon:
            expired += 1
        if expired:
            del reactions[:expired]
        if len(reactions) < self._reactions:
            reactions.append(now)
            return self._count(Feedback.REACT)
        return self._count(Feedback.SILENT)

    def _count(self, feedback: Feedback) -> Feedback:
        self.counts[feedback] += 1
        return feedback

    def _sweep(self, horizon: float) -> None:
        """Drop a few users whose last refusal left the window (front: the longest idle)."""
        for _ in range(_SWEEP_PER_CALL):
            if not self._users:
                return
            if next(iter(self._users.values())).last > horizon:
                return
            self._users.popitem(last=False)

    def __len__(self) -> int:
        """Users tracked now (at most ``max_keys``)."""
        return len(self._users)

    def status(self) -> dict[str, Any]:
        """Counters for operators (no user ids)."""
        return {
            "window": self._window,
            "reactions_per_window": self._reactions,
            "users_tracked": len(self._users),
            "max_keys": self._max_keys,
            "evicted": self.evicted,
            **{feedback.value: n for feedback, n in self.counts.items()},
        }


class TokenBucket:
    """At most ``rate`` takes per second on average, in bursts of at most one second's worth.

    The bucket holds ``max(1, rate)`` tokens and starts full; ``available()`` says how many whole
    tokens there are now, ``take(n)`` spends them. Refilled from ``clock.monotonic()``: no sleeps,
    so a ``FakeClock`` steps it exactly (advance one second, get ``rate`` more).
    """

    def __init__(self, rate: float, *, clock: Clock) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._clock = clock
        self._tokens = self.capacity
        self._stamp = clock.monotonic()

    def available(self) -> int:
        """Whole tokens now."""
        self._refill()
        return int(self._tokens + 1e-9)  # 0.1 + 0.2 steps must not lose a token to rounding

    def take(self, n: int) -> None:
        """Spend ``n`` tokens (at most ``available()``)."""
        self._refill()
        self._tokens = max(0.0, self._tokens - n)

    def _refill(self) -> None:
        now = self._clock.monotonic()
        if now > self._stamp:
            self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
