"""The catch-up's watch: which channels a reconnect reads, from where, and its bounds; and the
order in which a take-over hands missed and live messages over.

The catch-up itself (reads after a fresh IDENTIFY, handed to intake) runs against the Discord
emulator in ``tests/integration/test_catchup.py``.
"""

from __future__ import annotations

from datetime import UTC, datetime

import discord
import pytest

from bot.catchup import MAX_AGE, MAX_CHANNELS, Catchup, Watch
from resilience.clock import FakeClock


def snowflake_at(clock: FakeClock, seconds_ago: float = 0.0) -> int:
    """A message id stamped ``seconds_ago`` before the clock's wall time (Discord's id layout)."""
    return discord.utils.time_snowflake(datetime.fromtimestamp(clock.time() - seconds_ago, UTC))


def test_a_channel_is_watched_once_the_bot_is_active_there_and_seen_moves_its_mark() -> None:
    clock = FakeClock()
    watch = Watch(clock)
    first, later, unwatched = snowflake_at(clock, 10), snowflake_at(clock, 5), snowflake_at(clock, 1)
    watch.seen(7, unwatched)  # a channel the bot was never active in is not watched
    watch.active(1, first)
    watch.seen(1, later)
    watch.seen(1, first)  # an older id never moves the mark back
    assert len(watch) == 1
    assert watch.snapshot() == {1: later}


def test_the_least_recently_active_channel_leaves_first_when_the_watch_is_full() -> None:
    clock = FakeClock()
    watch = Watch(clock, max_channels=3)
    now = snowflake_at(clock)
    for channel in (1, 2, 3):
        watch.active(channel, now + channel)
    watch.active(1, now + 10)  # active again: the most recent now
    watch.seen(2, now + 11)  # only seen: not more recent
    watch.active(4, now + 12)
    assert sorted(watch.snapshot()) == [1, 3, 4]
    assert MAX_CHANNELS == 50 and len(Watch(clock)) == 0


def test_snapshot_skips_channels_idle_past_the_age_bound_and_reads_at_most_that_far_back() -> None:
    clock = FakeClock()
    watch = Watch(clock)
    watch.active(1, snowflake_at(clock, 2 * MAX_AGE))  # its last message is two hours old
    clock.advance(3000)
    watch.active(2, snowflake_at(clock, 25))
    clock.advance(MAX_AGE - 3005)  # channel 1 was active 3,595 s ago, channel 2 595 s ago
    # Channel 1's mark is older than an hour: it is read from an hour ago; channel 2 from its mark.
    assert watch.snapshot() == {1: snowflake_at(clock, MAX_AGE), 2: snowflake_at(clock, 620)}
    clock.advance(10)  # channel 1 has now been idle for more than an hour: not read at all
    assert list(watch.snapshot()) == [2]


def test_a_watch_needs_room_for_one_channel() -> None:
    with pytest.raises(ValueError, match="max_channels"):
        Watch(FakeClock(), max_channels=0)


class _App:
    """What ``Catchup`` uses of the application: its clock, a channel by id and history reads."""

    def __init__(self, clock: FakeClock, history: dict[int, list[object]]) -> None:
        self.clock = clock
        self._history = history
        self.discord_io = self

    async def channel(self, channel_id: int) -> int:
        return channel_id

    async def history(self, channel: int, *, after: object, limit: int) -> list[object]:
        return list(self._history.get(channel, []))


def _message(channel_id: int, message_id: int) -> discord.Message:
    class _Channel:
        id = channel_id

    class _Message:
        id = message_id
        channel = _Channel()

    return _Message()  # type: ignore[return-value]


async def test_taking_over_holds_live_messages_until_ready_then_each_channel_in_order() -> None:
    """A take-over with ``hold`` keeps every live message until ready; a read channel's missed
    messages go first, then its live ones; other channels' live ones go on in their order."""
    clock = FakeClock()
    missed = [_message(1, 10), _message(1, 11)]
    handled: list[tuple[int, int]] = []

    async def handle(message: discord.Message) -> None:
        handled.append((message.channel.id, message.id))

    catchup = Catchup(_App(clock, {1: missed}), handle, lambda m: True)  # type: ignore[arg-type]
    catchup.take_over({1: 5}, hold=True)
    live = [_message(1, 12), _message(2, 20), _message(2, 21)]
    assert all(catchup.defer(m) for m in live)
    assert handled == []
    catchup.ready()
    assert catchup._task is not None
    await catchup._task
    assert [m for m in handled if m[0] == 1] == [(1, 10), (1, 11), (1, 12)]
    assert [m for m in handled if m[0] == 2] == [(2, 20), (2, 21)]
    assert not catchup.defer(_message(2, 22))  # nothing held any more: handled live
    await catchup.close()
