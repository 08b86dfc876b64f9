"""One channel rate-limited by Discord for 40 s while the others keep being answered, in-process.

The Discord emulator gives #general's sends a bucket of one message per 40 s (every answer carries
Discord's X-RateLimit headers; past the limit it answers 429 with ``retry_after``). A 429 is Discord
asking for a slower pace on one route of one channel: it must not open the ``discord.send`` breaker
that every channel shares, and the answer it holds back must be queued and delivered once the
window is over, exactly once.

The 40 s pass on a stepped event loop (:class:`SteppedLoop`): the application's clock, the
emulator's buckets and discord.py's own rate-limit timers all read the loop's time, so moving it
moves all three together, and no test waits 40 s.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from bot.texts import ACK_MARK
from rehearsal.ledger import Ledger
from resilience.breakers import BreakerState
from resilience.degradation import ItemKind, ItemState
from sandbox.discord_state import RateLimits
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import live_bot

WINDOW = 40.0
STEP = 1.0  # shorter than every timeout in the bot (the storage's 5 s, a mutex's 2 s), so no timer in
# flight expires early: moving the loop 1 s at a time is 1 s passing, as far as the bot can tell


class SteppedLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock a test moves forward: timers due by then fire, as if the time had passed."""

    def __init__(self) -> None:
        super().__init__()
        self.offset = 0.0

    def time(self) -> float:
        return super().time() + self.offset

    async def advance(self, seconds: float) -> None:
        """Move time forward ``seconds`` in steps of ``STEP``, letting what became due run after each."""
        moved = 0.0
        while moved < seconds:
            step = min(STEP, seconds - moved)
            self.offset += step
            moved += step
            await asyncio.sleep(0.02)


class LoopClock:
    """The application's clock (``resilience.clock.Clock``), read from the running loop's time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._wall_offset = time.time() - loop.time()

    def monotonic(self) -> float:
        return self._loop.time()

    def time(self) -> float:
        return self._loop.time() + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def test_a_channel_throttled_for_40_s_is_answered_after_the_window_while_the_others_flow(
    tmp_path: Path,
) -> None:
    with asyncio.Runner(loop_factory=SteppedLoop) as runner:
        runner.run(throttled_channel(tmp_path))


async def throttled_channel(tmp_path: Path) -> None:
    """#general's first answer uses its window; the second answer gets Discord's 429 (40 s, more
    than discord.py waits), so it is queued with that delay, and the user is told so where Discord
    lets us (at first it does not: the acknowledgement is refused by the same bucket). Meanwhile
    questions in #random, the thread and a DM are answered at once, and ``discord.send`` never
    leaves closed. After the 40 s the queued answer meets another 429 (45 s): that is no attempt
    of the answer's (QUEUE_MAX_ATTEMPTS=1 would dead-letter it otherwise); the acknowledgement gets
    through this time. After those 45 s the answer arrives, once; nothing was lost."""
    loop = asyncio.get_running_loop()
    assert isinstance(loop, SteppedLoop)
    async with running_emulators() as emus:
        discord = emus.discord
        discord.rate_limits = RateLimits(loop.time)
        general = discord.channels["general"]
        discord.rate_limits.set("send", 1, WINDOW, channel_id=general)
        async with live_bot(emus, tmp_path / "data", clock=LoopClock(loop), QUEUE_MAX_ATTEMPTS="1") as live:
            transitions: list[tuple[str, BreakerState, BreakerState]] = []
            live.app.board.add_listener(lambda name, old, new: transitions.append((name, old, new)))
            ledger = Ledger(discord)
            elsewhere = [discord.channels["random"], discord.thread_id, discord.dm_channel("normal")]

            first = await ledger.ask(general, "normal", "uses the window")
            await ledger.wait_for(lambda: bool(first.answers), 5)
            held = await ledger.ask(general, "admin", "held by the rate limit")
            others = [await ledger.ask(channel, "normal", "not held") for channel in elsewhere]
            await ledger.wait_for(lambda: all(a.answers for a in others), 5)
            # the held answer's send and then its acknowledgement's, both refused
            await discord.wait_until(lambda: sum(r.status == 429 for r in discord.requests) == 2, 5)

            assert held.answers == [] and held.acks == []
            [item] = [i for i in await live.app.storage.list(ItemState.PENDING)]
            assert item.kind is ItemKind.OUTBOUND and item.attempts == 0
            assert item.next_attempt_at > live.app.clock.time() + WINDOW - 5
            # Told where Discord lets us: the acknowledgement was tried, and refused by the same bucket.
            refused = [r for r in discord.requests_for("send") if r.status == 429]
            assert [str(r.json["content"]).startswith(ACK_MARK) for r in refused] == [False, True]
            assert all(r.rate_limited == "user" for r in refused)

            discord.faults.add("429", "send", count=1, retry_after=45.0)  # still throttled at first
            await loop.advance(WINDOW)
            await ledger.wait_for(lambda: bool(held.acks), 10)
            assert held.answers == []
            await loop.advance(45.0)
            await ledger.wait_for(lambda: bool(held.answers), 10)
            unsettled = await ledger.wait_settled(5)
            await asyncio.sleep(0.3)  # a repeat, if any, would show by now
            ledger.update()

            breaker = live.app.board["discord.send"]
            assert breaker.state is BreakerState.CLOSED and breaker.failures == 0
            assert [t for t in transitions if t[0] == "discord.send"] == []
            assert live.app.discord_io.errors[("send", "rate_limited")] >= 1
            assert [i.state for i in await live.app.storage.list()] == [ItemState.DONE] * 5
    assert not unsettled, [ledger.describe(a) for a in unsettled]
    tally = ledger.tally()
    assert (tally.lost, tally.duplicated) == (0, 0), tally.as_dict()
    assert [len(a.answers) for a in ledger.asked.values()] == [1] * 5
    assert held.acks[0].content.startswith(f"{ACK_MARK} Discord is rate-limiting me"), held.acks[0].content
    in_general = [r for r in discord.requests_for("send") if f"/channels/{general}/" in r.path]
    # the first answer; the held answer and its acknowledgement refused; the answer refused again
    # (the fault), the acknowledgement posted; the answer posted
    assert [r.status for r in in_general] == [200, 429, 429, 429, 200, 200]
