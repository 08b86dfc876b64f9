"""What bot processes sharing one database tell each other: operator actions, state changes and
heartbeats.

``Coordination`` is the interface the bot uses: ``notify(kind, payload)`` reaches every *other*
process (PostgreSQL's ``LISTEN/NOTIFY`` in ``services.pg_storage.PostgresStore``), whose handlers
``subscribe(kind, handler)`` registered; ``beat(state)`` records this process's state, and
``processes()`` lists every process with whether it is alive. ``LocalCoordination`` is the single
process of the SQLite default: nobody else to tell, and the only process it lists is itself.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from resilience.clock import Clock, SystemClock

Handler = Callable[[dict[str, Any]], Awaitable[None]]
"""Called with a notification's payload (a JSON object; ``origin`` is the sending process's id)."""

HEARTBEAT_SECONDS = 5.0
"""How often each bot process records itself alive with its state (``beat``)."""
GONE_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS
"""A process that lost its connection and has not beaten for this long is gone: its claims are
handed to the others (one whose connection merely dropped keeps beating through its pool)."""

MAX_PAYLOAD_BYTES = 7000
"""PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more; notifications carry names and
versions, never documents, so this is plenty."""


def default_process_name() -> str:
    """``host:pid``: what ``/status`` calls a process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One bot process as the others see it. ``alive``: it still holds its connection (its lock);
    ``this``: the process asking; ``state``: what its last heartbeat said (mode, breakers, ...)."""

    id: int
    name: str
    started_at: float
    beat_at: float
    stopped_at: float | None
    alive: bool
    this: bool
    state: dict[str, Any] = field(default_factory=dict)


class Coordination(Protocol):
    """Cross-process signals and heartbeats (see the module docstring)."""

    @property
    def process_id(self) -> int | None:
        """This process's id among the processes (None before start)."""
        ...

    def subscribe(self, kind: str, handler: Handler) -> None:
        """Call ``handler(payload)`` for each notification of ``kind`` another process sends."""
        ...

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        """Tell every other process (committed at once, or with the caller's transaction)."""
        ...

    async def beat(self, state: dict[str, Any], *, now: float | None = None) -> int:
        """Record this process as alive at ``now`` with ``state`` (shown by ``/status``), and hand
        back to pending the claims of processes that are gone; return how many."""
        ...

    async def processes(self) -> list[ProcessRecord]:
        """Every process of the last hour, this one included, oldest first."""
        ...


class LocalCoordination:
    """One process, no database to share: notifications reach nobody, the only process is this one."""

    def __init__(self, *, name: str | None = None, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or SystemClock()
        self.name = name or default_process_name()
        self._started_at = self._clock.time()
        self._beat_at = self._started_at
        self._state: dict[str, Any] = {}

    @property
    def process_id(self) -> int | None:
        return 0

    def subscribe(self, kind: str, handler: Handler) -> None:
        """Nothing to subscribe to: no other process sends anything."""

    async def notify(self, kind: str, payload: dict[str, Any]) -> None:
        """Nobody else to tell."""

    async def beat(self, state: dict[str, Any], *, now: float | None = None) -> int:
        self._beat_at = self._clock.time() if now is None else now
        self._state = dict(state)
        return 0  # no other process whose claims could be left

    async def processes(self) -> list[ProcessRecord]:
        return [
            ProcessRecord(
                0, self.name, self._started_at, self._beat_at, None, True, True, dict(self._state)
            )
        ]
