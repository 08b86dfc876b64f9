"""Fault schedules shared by both emulators.

A ``Fault`` names what goes wrong (``kind`` plus free-form ``params``), which requests it
hits (``target``: a model name, a route name, or ``"*"``), and for how long: the next
``count`` matching requests, until a deadline, with a probability, on every ``every``-th
matching request only (deterministic, e.g. "every third send fails"), or any mix of these.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Fault:
    kind: str
    target: str = "*"
    params: dict[str, Any] = field(default_factory=dict)
    count: int | None = None          # remaining matching requests; None = unlimited
    until: float | None = None        # monotonic deadline; None = no deadline
    probability: float = 1.0
    id: int = 0
    hits: int = 0
    every: int | None = None          # hit only every Nth matching request; None = every one
    matched: int = 0                  # matching requests seen (for ``every``)

    def describe(self) -> str:
        parts = [f"#{self.id} {self.kind} on {self.target}"]
        if self.params:
            parts.append(" ".join(f"{k}={v}" for k, v in self.params.items()))
        if self.count is not None:
            parts.append(f"next {self.count}")
        if self.until is not None:
            parts.append(f"until +{max(0.0, self.until - time.monotonic()):.0f}s")
        if self.probability < 1.0:
            parts.append(f"p={self.probability:g}")
        if self.every is not None:
            parts.append(f"every {self.every}")
        return ", ".join(parts)


class FaultPlan:
    """An ordered list of active faults; the first live match wins and is consumed."""

    def __init__(self, *, rng: random.Random | None = None, clock: Callable[[], float] = time.monotonic):
        self._faults: list[Fault] = []
        self._ids = itertools.count(1)
        self._rng = rng or random.Random(0)
        self._clock = clock

    def add(
        self,
        kind: str,
        target: str = "*",
        *,
        count: int | None = None,
        duration: float | None = None,
        probability: float = 1.0,
        every: int | None = None,
        **params: Any,
    ) -> Fault:
        """Schedule a fault; ``every=3`` hits matching requests 3, 6, 9, ... (``count`` counts hits)."""
        if count is not None and count < 1:
            raise ValueError("count must be at least 1")
        if not 0.0 < probability <= 1.0:
            raise ValueError("probability must be in (0, 1]")
        if every is not None and every < 1:
            raise ValueError("every must be at least 1")
        until = self._clock() + duration if duration is not None else None
        fault = Fault(kind, target, dict(params), count, until, probability, next(self._ids), every=every)
        self._faults.append(fault)
        return fault

    def remove(self, fault_id: int) -> bool:
        before = len(self._faults)
        self._faults = [f for f in self._faults if f.id != fault_id]
        return len(self._faults) != before

    def clear(self) -> None:
        self._faults.clear()

    def active(self) -> list[Fault]:
        self._prune()
        return list(self._faults)

    def pick(
        self,
        *targets: str,
        kinds: Collection[str] | None = None,
        accept: Callable[[Fault], bool] | None = None,
    ) -> Fault | None:
        """Return the fault that hits a request to any of ``targets``, consuming one count.

        ``kinds``, when given, limits the match to those fault kinds, so a peer with two
        surfaces (REST and a gateway) never consumes a ``"*"`` fault meant for the other.
        ``accept``, when given, must also say yes (a peer's own condition on the request, such
        as the Gemini emulator's ``prompt=`` parameter).
        """
        self._prune()
        for fault in self._faults:
            if fault.target != "*" and fault.target not in targets:
                continue
            if kinds is not None and fault.kind not in kinds:
                continue
            if accept is not None and not accept(fault):
                continue
            if fault.every is not None:
                fault.matched += 1
                if fault.matched % fault.every:
                    continue  # not its turn: the request goes on to later faults, or is served
            if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                continue
            fault.hits += 1
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
            return fault
        return None

    def _prune(self) -> None:
        now = self._clock()
        self._faults = [f for f in self._faults if f.until is None or f.until > now]
