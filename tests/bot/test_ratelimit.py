"""RateLimiter (sliding-window limits per user and per guild), NoticeLimiter (how refusals are
answered) and TokenBucket (the drain's pace), each on an injected FakeClock."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.ratelimit import Feedback, NoticeLimiter, RateLimiter, TokenBucket
from resilience.clock import FakeClock

GUILD = 900
OTHER_GUILD = 901


def limiter(per_user: int = 3, per_guild: int = 100, *, window: float = 60.0, max_keys: int = 50_000,
            clock: FakeClock | None = None) -> tuple[RateLimiter, FakeClock]:
    clock = clock or FakeClock(start=0.0)
    return RateLimiter(per_user, per_guild, window=window, clock=clock, max_keys=max_keys), clock


def test_allows_n_per_window_then_refuses_with_the_exact_wait() -> None:
    """Three hits at t=0,10,20 pass; at t=30 the wait is exactly 30 s (until the t=0 hit expires)."""
    rl, clock = limiter(per_user=3)
    for _ in range(3):
        assert rl.check(1, GUILD) is None
        clock.advance(10)
    assert rl.check(1, GUILD) == pytest.approx(30.0)
    clock.advance(29.5)
    assert rl.check(1, GUILD) == pytest.approx(0.5)
    clock.advance(0.5)
    assert rl.check(1, GUILD) is None  # t=60: the t=0 hit has just left the window


def test_refused_messages_do_not_extend_the_cooldown() -> None:
    """Hammering while refused is not recorded: the wait keeps counting down to the same instant."""
    rl, clock = limiter(per_user=1)
    assert rl.check(1) is None
    waits = []
    for _ in range(5):
        clock.advance(10)
        waits.append(rl.check(1))
    assert waits == pytest.approx([50.0, 40.0, 30.0, 20.0, 10.0])
    clock.advance(10)
    assert rl.check(1) is None
    assert rl.status()["refused_user"] == 5


def test_window_slides_one_hit_at_a_time() -> None:
    """Hits at 0, 30, 45 (limit 3): at 50 wait 10; at 60 allowed; at 61 the wait is until 30+60."""
    rl, clock = limiter(per_user=3)
    for t in (0, 30, 45):
        clock.advance(t - clock.monotonic())
        assert rl.check(7) is None
    clock.advance(50 - clock.monotonic())
    assert rl.check(7) == pytest.approx(10.0)
    clock.advance(10)
    assert rl.check(7) is None
    clock.advance(1)
    assert rl.check(7) == pytest.approx(29.0)


def test_guild_limit_applies_across_many_users() -> None:
    """10 per guild: ten different users pass, the eleventh waits for the first guild hit to expire;
    the same user is still free in a DM and in another guild."""
    rl, clock = limiter(per_user=5, per_guild=10)
    for user in range(10):
        assert rl.check(user, GUILD) is None
        clock.advance(1)
    assert rl.check(99, GUILD) == pytest.approx(50.0)
    assert rl.check(99, None) is None
    assert rl.check(99, OTHER_GUILD) is None
    status = rl.status()
    assert status["refused_guild"] == 1 and status["allowed"] == 12


def test_a_refusal_by_the_guild_does_not_use_up_the_users_allowance() -> None:
    """A message refused by the guild limit is not counted against its user."""
    rl, _ = limiter(per_user=1, per_guild=1)
    assert rl.check(1, GUILD) is None
    assert rl.check(2, GUILD) == pytest.approx(60.0)
    assert rl.check(2, OTHER_GUILD) is None  # user 2's single allowance was still free


def test_dms_count_only_against_the_user() -> None:
    """DMs from many users never touch a guild limit; a user's DMs and guild messages share one limit."""
    rl, _ = limiter(per_user=2, per_guild=1)
    for user in range(50):
        assert rl.check(user, None) is None
    assert rl.status()["guilds_tracked"] == 0
    assert rl.check(0, None) is None  # user 0's second DM
    assert rl.check(0, GUILD) == pytest.approx(60.0)  # the user limit (2) is used up
    assert rl.check(1, GUILD) is None  # user 1 has one left, and the guild's one slot is free


def test_zero_disables_a_limit() -> None:
    """per_user=0 means no user limit; per_guild=0 means no guild limit."""
    rl, _ = limiter(per_user=0, per_guild=2)
    assert [rl.check(1, GUILD) for _ in range(3)][-1] == pytest.approx(60.0)
    rl2, _ = limiter(per_user=2, per_guild=0)
    assert [rl2.check(u, GUILD) for u in range(100)] == [None] * 100
    assert rl2.status()["guilds_tracked"] == 0


def test_reset_lifts_one_users_cooldown() -> None:
    """reset(user) forgets that user's hits only; reset() forgets everyone's."""
    rl, _ = limiter(per_user=1)
    assert rl.check(1) is None and rl.check(2) is None
    rl.reset(1)
    assert rl.check(1) is None
    assert rl.check(2) == pytest.approx(60.0)
    rl.reset()
    assert rl.check(2) is None


def test_bad_settings_are_rejected() -> None:
    """Negative limits, a non-positive window or max_keys < 1 raise ValueError."""
    clock = FakeClock()
    for kwargs in ({"per_user": -1, "per_guild": 1}, {"per_user": 1, "per_guild": -1}):
        with pytest.raises(ValueError):
            RateLimiter(**kwargs, clock=clock)
    with pytest.raises(ValueError):
        RateLimiter(1, 1, window=0, clock=clock)
    with pytest.raises(ValueError):
        RateLimiter(1, 1, clock=clock, max_keys=0)


def test_memory_stays_bounded_under_100k_distinct_users() -> None:
    """100k distinct users inside one window: at most max_keys are tracked (the least recently active
    are evicted, so a flood cannot grow memory without bound)."""
    rl, clock = limiter(per_user=3, per_guild=1_000_000, max_keys=50_000)
    for user in range(100_000):
        assert rl.check(user, GUILD) is None
        clock.advance(0.0001)
    status = rl.status()
    assert status["users_tracked"] == 50_000
    assert status["evicted"] == 50_000
    assert rl.check(99_999, GUILD) is None  # the most recent users are still tracked...
    assert rl.check(99_999, GUILD) is None
    assert rl.check(99_999, GUILD) is not None  # ...and limited


def test_a_tracked_user_costs_a_few_hundred_bytes() -> None:
    """Measured with tracemalloc: a full limiter of 5,000 users at their limit of 3 stays under 2 MB
    (so the default 50,000 keys per scope stay around 20 MB at worst)."""
    rl, clock = limiter(per_user=3, per_guild=0, max_keys=5_000)
    tracemalloc.start()
    try:
        for user in range(10_000):
            for _ in range(3):
                rl.check(user)
            clock.advance(0.0001)
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rl.status()["users_tracked"] == 5_000
    assert current < 2_000_000, current


def test_idle_keys_are_swept_as_time_passes() -> None:
    """Users who went quiet for a whole window are dropped by later calls, without any eviction."""
    rl, clock = limiter(per_user=3, per_guild=0, window=60.0)
    for user in range(1_000):
        rl.check(user)
    clock.advance(61)
    for user in range(1_000, 1_600):
        rl.check(user)
    status = rl.status()
    assert status["users_tracked"] == 600  # each call swept up to two idle users: all 1,000 are gone
    assert status["evicted"] == 0


@settings(max_examples=150, deadline=None)
@given(
    per_user=st.integers(1, 4),
    per_guild=st.integers(1, 6),
    events=st.lists(
        st.tuples(st.floats(0, 30, allow_nan=False), st.integers(0, 3), st.sampled_from([None, 1, 2])),
        max_size=60,
    ),
)
def test_matches_a_brute_force_model(
    per_user: int, per_guild: int, events: list[tuple[float, int, int | None]]
) -> None:
    """Any sequence of messages gets the same verdicts and waits as a model that rescans all history."""
    window = 60.0
    rl, clock = limiter(per_user=per_user, per_guild=per_guild, window=window)
    accepted: list[tuple[float, int, int | None]] = []
    for dt, user, guild in events:
        clock.advance(dt)
        now = clock.monotonic()
        live = [a for a in accepted if a[0] > now - window]
        user_hits = sorted(t for t, u, _ in live if u == user)
        waits = []
        if len(user_hits) >= per_user:
            waits.append(user_hits[-per_user] + window - now)
        if guild is not None:
            guild_hits = sorted(t for t, _, g in live if g == guild)
            if len(guild_hits) >= per_guild:
                waits.append(guild_hits[-per_guild] + window - now)
        expected = max(waits) if waits else None
        got = rl.check(user, guild)
        if expected is not None and abs(expected) < 1e-9 and got is None:
            # The hit expires at this very instant: ``now - window`` and the hit's time differ only
            # in floating-point rounding, so either verdict is right (hypothesis found 1.0385 +
            # 30 + 30 with a 60 s window).
            expected = None
        if expected is None:
            assert got is None
            accepted.append((now, user, guild))
        else:
            assert got == pytest.approx(expected)


# -- NoticeLimiter -------------------------------------------------------------------------


def notices(
    reactions: int = 3, *, window: float = 60.0, max_keys: int = 50_000
) -> tuple[NoticeLimiter, FakeClock]:
    clock = FakeClock(start=0.0)
    return NoticeLimiter(window=window, reactions=reactions, clock=clock, max_keys=max_keys), clock


def test_a_flood_of_refusals_gets_one_notice_then_a_few_reactions_then_silence() -> None:
    """20 refusals of one user at once: 1 notice, 3 reactions, 16 silent."""
    nl, _ = notices(reactions=3)
    got = [nl.decide(1, "cooldown") for _ in range(20)]
    assert got == [Feedback.NOTICE] + [Feedback.REACT] * 3 + [Feedback.SILENT] * 16
    assert nl.status()["notice"] == 1 and nl.status()["react"] == 3 and nl.status()["silent"] == 16


def test_a_new_notice_is_allowed_once_the_window_has_passed() -> None:
    """The next notice of a kind comes when the last one is a window old, not a moment before;
    reactions count over the same sliding window."""
    nl, clock = notices(reactions=1)
    assert nl.decide(1, "cooldown") is Feedback.NOTICE
    assert nl.decide(1, "cooldown") is Feedback.REACT
    clock.advance(59.9)
    assert nl.decide(1, "cooldown") is Feedback.SILENT
    clock.advance(0.1)
    assert nl.decide(1, "cooldown") is Feedback.NOTICE
    assert nl.decide(1, "cooldown") is Feedback.REACT  # the first reaction (t=0) has left the window


def test_each_kind_gets_its_own_notice_and_users_are_independent() -> None:
    """A too-long notice does not use up the cooldown notice; another user gets their own;
    reactions are counted per user across kinds."""
    nl, _ = notices(reactions=1)
    assert nl.decide(1, "too_long") is Feedback.NOTICE
    assert nl.decide(1, "cooldown") is Feedback.NOTICE
    assert nl.decide(1, "too_long") is Feedback.REACT
    assert nl.decide(1, "cooldown") is Feedback.SILENT
    assert nl.decide(2, "cooldown") is Feedback.NOTICE


def test_notice_limiter_memory_is_bounded_and_idle_users_are_swept() -> None:
    """At most max_keys users (the least recently refused are forgotten); users idle for a window go."""
    nl, clock = notices(max_keys=100)
    for user in range(1_000):
        nl.decide(user, "cooldown")
    assert len(nl) == 100 and nl.evicted == 900
    clock.advance(61)
    for user in range(1_000, 1_040):
        nl.decide(user, "cooldown")
    assert len(nl) == 60  # each call swept two idle users before adding its own
    assert nl.evicted == 900


def test_notice_limiter_rejects_bad_settings() -> None:
    clock = FakeClock()
    with pytest.raises(ValueError):
        NoticeLimiter(window=0, reactions=1, clock=clock)
    with pytest.raises(ValueError):
        NoticeLimiter(window=60, reactions=-1, clock=clock)
    with pytest.raises(ValueError):
        NoticeLimiter(window=60, reactions=1, clock=clock, max_keys=0)


# -- TokenBucket ---------------------------------------------------------------------------


def test_token_bucket_starts_full_and_refills_rate_per_clock_second() -> None:
    """rate 3: 3 at once, then none until the clock moves; each second gives 3 more, never more
    than one second's worth however long it was idle."""
    clock = FakeClock(start=0.0)
    bucket = TokenBucket(3, clock=clock)
    assert bucket.available() == 3
    bucket.take(3)
    assert bucket.available() == 0
    starts = []
    for _ in range(5):
        clock.advance(1.0)
        n = bucket.available()
        bucket.take(n)
        starts.append(n)
    assert starts == [3] * 5
    clock.advance(3600)
    assert bucket.available() == 3


def test_token_bucket_counts_fractions_of_a_second() -> None:
    """Steps of a tenth of a second add up exactly; a rate under 1 still allows one at a time."""
    clock = FakeClock(start=0.0)
    bucket = TokenBucket(10, clock=clock)
    bucket.take(10)
    taken = 0
    for _ in range(30):
        clock.advance(0.1)
        n = bucket.available()
        bucket.take(n)
        taken += n
    assert taken == 30
    slow = TokenBucket(0.25, clock=clock)
    assert slow.available() == 1
    slow.take(1)
    clock.advance(3.9)
    assert slow.available() == 0
    clock.advance(0.1)
    assert slow.available() == 1
    with pytest.raises(ValueError):
        TokenBucket(0, clock=clock)
