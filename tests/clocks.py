"""Clocks for tests that run a whole bot in-process.

``FakeClock`` (``resilience.clock``) suits code that only reads time and sleeps when told: its
``sleep`` advances virtual time at once. A running bot has background loops (the drain's
interval, the typing renewals) that would spin on such a sleep, pushing virtual time forward
as fast as the machine runs. :class:`SteppedClock` keeps the loops on real sleeps and gives every
decision that reads the clock (rate limits, notice windows, the drain's pace, queue stamps)
only the time the test set: a test steps it exactly, however loaded the machine.
"""

from __future__ import annotations

import asyncio
import time

from resilience.clock import FakeClock


class SteppedClock(FakeClock):
    """Virtual time that moves only by ``advance``; ``sleep`` waits for real and moves nothing.

    Wall time starts at the real time of creation, so queue stamps and logs look ordinary.
    """

    def __init__(self, start: float = 1_000.0) -> None:
        super().__init__(start=start, wall_start=time.time())

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        await asyncio.sleep(max(0.0, seconds))
