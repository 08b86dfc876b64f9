"""Daily token quotas (``bot.usage.UsageLedger``): decided from memory, per user and per guild, reset
at midnight UTC, and read back from SQLite (a real file) when the bot starts again."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot import texts
from bot.usage import QuotaExceeded, UsageLedger, seconds_to_reset
from resilience.clock import FakeClock
from services.gemini import Reply, ReplyKind
from services.storage import SqliteStore, usage_day

T0 = 1_700_000_000.0  # 22:13:20 UTC: 6,400 s to midnight


def reply(prompt: int = 60, output: int = 30, thought: int = 10, cached: int = 5) -> Reply:
    return Reply(
        ReplyKind.ANSWER, "text", "gemini-2.5-flash", "STOP", prompt, output,
        thought_tokens=thought, cached_tokens=cached,
    )


def ledger(store: SqliteStore, clock: FakeClock, user: int = 0, guild: int = 0) -> UsageLedger:
    return UsageLedger(store, user_daily=user, guild_daily=guild, clock=clock)


async def test_a_user_over_their_quota_is_refused_and_another_user_is_not(tmp_path: Path) -> None:
    clock = FakeClock(wall_start=T0)
    async with SqliteStore(tmp_path / "bot.sqlite3") as store:
        books = ledger(store, clock, user=150)
        await books.start()
        assert books.check(1, 9) is None
        record = books.record(1, 9, reply())
        assert record is not None and record.counted == 100 and record.day == usage_day(T0)
        assert books.check(1, 9) is None  # 100 of 150
        books.record(1, 9, reply())
        over = books.check(1, 9)
        assert over == QuotaExceeded("user", 150, 200, 6400.0)
        assert books.check(2, 9) is None  # another user, same guild
        assert books.check(1, None) is not None  # the same user in a DM: the quota is theirs
        assert texts.quota_exhausted(over.scope, over.limit, over.resets_in) == (
            "You have used today's allowance of 150 Gemini tokens, so I can't answer more today; "
            "it resets at midnight UTC, in 1.8 h."
        )


async def test_a_guild_quota_is_shared_by_its_members_and_leaves_dms_and_other_guilds_alone(
    tmp_path: Path,
) -> None:
    clock = FakeClock(wall_start=T0)
    async with SqliteStore(tmp_path / "bot.sqlite3") as store:
        books = ledger(store, clock, guild=150)
        books.record(1, 9, reply())
        books.record(2, 9, reply())
        assert books.check(3, 9) == QuotaExceeded("guild", 150, 200, 6400.0)
        assert books.check(3, 8) is None and books.check(1, None) is None
        assert "This server has used" in texts.quota_exhausted("guild", 150, 6400.0)
        assert books.used_today(guild_id=9) == 200 and books.used_today(user_id=1) is None


async def test_quotas_start_afresh_at_midnight_utc(tmp_path: Path) -> None:
    clock = FakeClock(wall_start=T0)
    async with SqliteStore(tmp_path / "bot.sqlite3") as store:
        books = ledger(store, clock, user=100)
        books.record(1, None, reply())
        assert books.check(1, None) is not None
        clock.advance(6400.0)  # midnight UTC
        assert books.check(1, None) is None and books.used_today(user_id=1) == 0
        assert seconds_to_reset(clock.time()) == 86400.0


async def test_without_quotas_nothing_is_tracked_but_usage_is_still_recorded(tmp_path: Path) -> None:
    clock = FakeClock(wall_start=T0)
    async with SqliteStore(tmp_path / "bot.sqlite3") as store:
        books = ledger(store, clock)
        for user in range(100):
            assert books.record(user, 9, reply()) is not None
            assert books.check(user, 9) is None
        assert books.health()["users_tracked"] == 0 and not books.enabled
        assert books.record(1, 9, reply(0, 0, 0, 0)) is None  # nothing to charge


async def test_todays_usage_is_read_back_at_start_so_a_restart_does_not_reset_a_quota(tmp_path: Path) -> None:
    clock = FakeClock(wall_start=T0)
    path = tmp_path / "bot.sqlite3"
    async with SqliteStore(path) as store:
        first = ledger(store, clock, user=150, guild=1000)
        record = first.record(1, 9, reply(prompt=150, output=0, thought=0))
        assert record is not None
        await store.record_usage(record)
        yesterday = first.record(2, 9, reply())
        assert yesterday is not None
        await store.record_usage(type(yesterday)(**{**_fields(yesterday), "day": yesterday.day - 1}))
    async with SqliteStore(path) as store:
        again = ledger(store, clock, user=150, guild=1000)
        assert again.check(1, 9) is None  # not loaded yet
        await again.start()
        assert again.loaded and again.check(1, 9) == QuotaExceeded("user", 150, 150, 6400.0)
        assert again.used_today(user_id=2) == 0 and again.used_today(guild_id=9) == 150


async def test_a_failed_read_at_start_is_logged_not_raised(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "bot.sqlite3")  # never started: every call fails
    books = ledger(store, FakeClock(wall_start=T0), user=10)
    await books.start()
    assert not books.loaded and books.check(1, None) is None


def test_quotas_cannot_be_negative() -> None:
    with pytest.raises(ValueError):
        UsageLedger(SqliteStore(Path("unused")), user_daily=-1, guild_daily=0, clock=FakeClock())


def _fields(record: object) -> dict[str, object]:
    return {name: getattr(record, name) for name in record.__slots__}  # type: ignore[attr-defined]


async def test_the_ledger_is_bounded_and_forgets_those_who_used_least(tmp_path: Path) -> None:
    clock = FakeClock(wall_start=T0)
    async with SqliteStore(tmp_path / "bot.sqlite3") as store:
        books = UsageLedger(store, user_daily=10_000, guild_daily=0, clock=clock, max_owners=10)
        books.record(99, None, reply(prompt=9_000, output=1_000, thought=0))  # at the quota
        for user in range(1, 11):
            books.record(user, None, reply(prompt=user, output=0, thought=0))
        assert books.tracked == 10 and books.forgotten == 1
        assert books.used_today(user_id=1) == 0  # the one that used least was forgotten
        assert books.check(99, None) is not None  # the one at its quota was kept
        assert books.used_today(user_id=10) == 10
