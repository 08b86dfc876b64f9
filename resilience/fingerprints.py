"""The error aggregator: failures grouped by fingerprint, over sliding windows, in bounded memory.

A fingerprint is what an operator asks "is this the same problem?" about: the failure's
category (``resilience.errors.classify``), the exception type, the dependency it came from
(``gemini``, ``discord.send``, ``storage``, ...) and the route it hit (``message``, ``drain``,
``/ask``). Never a message, a URL or a user's text: two failures with the same four fields are
one group however their messages differ, so the group count stays small and nothing a user
wrote is kept.

Each group keeps its total, first and last seen (wall clock), counts over the last 5 minutes,
hour and day (minute buckets for the hour, hour buckets for the day: at most 84 small
buckets), the users and guilds it affected (exact up to ``max_ids`` each, then "at least"),
and the trace ids of its latest occurrences (``samples``). Memory is bounded: at most
``max_groups`` groups, the least recently seen one is forgotten first (``evicted`` counts
them), and groups not seen for ``retention`` seconds are dropped.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from resilience.clock import Clock
from resilience.errors import classify

WINDOWS: tuple[tuple[str, float], ...] = (("5m", 300.0), ("1h", 3600.0), ("24h", 86400.0))
"""The sliding windows each group is counted over: label and seconds."""
MAX_FIELD = 80  # characters kept of each fingerprint field (type names and routes are short)
# Idle groups dropped per record: more than one, so the sweep outpaces new groups.
_SWEEP_PER_RECORD = 2


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What makes two failures the same problem."""

    category: str
    error: str
    dependency: str
    route: str

    @property
    def id(self) -> str:
        """A short stable id (12 hex characters) to name the group in commands and links."""
        text = "\x1f".join((self.category, self.error, self.dependency, self.route))
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    @classmethod
    def of(cls, exc: BaseException, *, dependency: str | None, route: str | None) -> Fingerprint:
        """The fingerprint of ``exc`` raised in ``dependency`` while serving ``route``."""
        return cls(
            classify(exc).category.value,
            type(exc).__name__[:MAX_FIELD],
            (dependency or "-")[:MAX_FIELD],
            (route or "-")[:MAX_FIELD],
        )


class _Group:
    """One fingerprint's counts; every collection in it is bounded."""

    __slots__ = ("first_seen", "guilds", "hours", "last_seen", "minutes", "samples", "total", "users")

    def __init__(self, now: float, samples: int) -> None:
        self.total = 0
        self.first_seen = now
        self.last_seen = now
        self.minutes: deque[list[int]] = deque(maxlen=60)  # [minute number, count], oldest first
        self.hours: deque[list[int]] = deque(maxlen=24)  # [hour number, count]
        self.users: set[int] = set()
        self.guilds: set[int] = set()
        self.samples: deque[str] = deque(maxlen=samples)

    def count(self, now: float) -> None:
        self.total += 1
        self.last_seen = now
        _bump(self.minutes, int(now // 60))
        _bump(self.hours, int(now // 3600))

    def windows(self, now: float) -> dict[str, int]:
        minute, hour = int(now // 60), int(now // 3600)
        counts: dict[str, int] = {}
        for label, seconds in WINDOWS:
            if seconds <= 3600:
                span = int(seconds // 60)
                counts[label] = sum(n for m, n in self.minutes if m > minute - span)
            else:
                span = int(seconds // 3600)
                counts[label] = sum(n for h, n in self.hours if h > hour - span)
        return counts


def _bump(buckets: deque[list[int]], number: int) -> None:
    if buckets and buckets[-1][0] == number:
        buckets[-1][1] += 1
    else:
        buckets.append([number, 1])


class ErrorAggregator:
    """Failures grouped by :class:`Fingerprint`, newest activity last; bounded (see the module).

    ``record_exception`` is what the request context calls when a span or a request ends in an
    exception; ``snapshot`` is what the admin views read. Time comes from ``clock.time()``.
    """

    def __init__(
        self,
        *,
        clock: Clock,
        max_groups: int = 256,
        max_ids: int = 50,
        samples: int = 5,
        retention: float = 86400.0,
    ) -> None:
        if max_groups < 1 or max_ids < 0 or samples < 0 or retention <= 0:
            raise ValueError(
                "max_groups must be at least 1, max_ids and samples not negative, retention positive"
            )
        self.clock = clock
        self.max_groups = max_groups
        self.max_ids = max_ids
        self.samples = samples
        self.retention = retention
        self._groups: OrderedDict[Fingerprint, _Group] = OrderedDict()
        self.total = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._groups)

    def record(
        self,
        fingerprint: Fingerprint,
        *,
        user: int | None = None,
        guild: int | None = None,
        trace_id: str | None = None,
    ) -> None:
        """Count one failure of ``fingerprint`` (affecting ``user`` in ``guild``, seen in ``trace_id``)."""
        now = self.clock.time()
        self.total += 1
        groups = self._groups
        group = groups.get(fingerprint)
        if group is None:
            group = groups[fingerprint] = _Group(now, self.samples)
            if len(groups) > self.max_groups:
                groups.popitem(last=False)
                self.evicted += 1
        else:
            groups.move_to_end(fingerprint)
        group.count(now)
        if isinstance(user, int) and (user in group.users or len(group.users) < self.max_ids):
            group.users.add(user)
        if isinstance(guild, int) and (guild in group.guilds or len(group.guilds) < self.max_ids):
            group.guilds.add(guild)
        if trace_id is not None and self.samples:
            group.samples.append(trace_id)
        self._sweep(now, _SWEEP_PER_RECORD)

    def record_exception(
        self,
        exc: BaseException,
        *,
        dependency: str | None,
        route: str | None,
        user: Any = None,
        guild: Any = None,
        trace_id: str | None = None,
    ) -> Fingerprint:
        """Classify ``exc`` into its fingerprint and record it; return the fingerprint."""
        fingerprint = Fingerprint.of(exc, dependency=dependency, route=route)
        self.record(
            fingerprint,
            user=user if isinstance(user, int) else None,
            guild=guild if isinstance(guild, int) else None,
            trace_id=trace_id,
        )
        return fingerprint

    def snapshot(self, *, limit: int = 50) -> list[dict[str, Any]]:
        """The groups seen within the retention, busiest in the last hour first (then most recent).

        Each: ``id``, the four fingerprint fields, ``count`` (since first seen), ``windows``
        (``{"5m": n, "1h": n, "24h": n}``), ``first_seen``/``last_seen`` (wall clock), ``users``
        and ``guilds`` (distinct, capped at ``max_ids``: ``users_capped`` says "at least"), and
        ``sample_trace_ids`` (newest last).
        """
        now = self.clock.time()
        self._sweep(now, len(self._groups))
        rows: list[dict[str, Any]] = []
        for fingerprint, group in self._groups.items():
            windows = group.windows(now)
            rows.append(
                {
                    "id": fingerprint.id,
                    "category": fingerprint.category,
                    "error": fingerprint.error,
                    "dependency": fingerprint.dependency,
                    "route": fingerprint.route,
                    "count": group.total,
                    "windows": windows,
                    "first_seen": group.first_seen,
                    "last_seen": group.last_seen,
                    "users": len(group.users),
                    "users_capped": len(group.users) >= self.max_ids,
                    "guilds": len(group.guilds),
                    "guilds_capped": len(group.guilds) >= self.max_ids,
                    "sample_trace_ids": list(group.samples),
                }
            )
        rows.sort(key=lambda r: (r["windows"]["1h"], r["last_seen"]), reverse=True)
        return rows[: max(0, limit)]

    def status(self) -> dict[str, Any]:
        """Totals for the views: failures recorded, groups kept, groups forgotten, the bounds."""
        return {
            "recorded": self.total,
            "groups": len(self._groups),
            "max_groups": self.max_groups,
            "evicted": self.evicted,
            "retention": self.retention,
        }

    def _sweep(self, now: float, at_most: int) -> None:
        """Drop groups last seen more than ``retention`` ago, from the least recently seen end."""
        horizon = now - self.retention
        groups = self._groups
        for _ in range(at_most):
            if not groups:
                return
            group = next(iter(groups.values()))
            if group.last_seen > horizon:
                return
            groups.popitem(last=False)
