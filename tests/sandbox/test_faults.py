"""FaultPlan scheduling: which matching request a fault hits (``every``, ``count``, targets).

The plan is exercised directly (a pure schedule, no I/O) and once end to end: the Discord
emulator answering real HTTP requests, so "every third send fails" means the third request
on the wire.
"""

from __future__ import annotations

import aiohttp
import pytest

from sandbox.discord_emu import DiscordEmulator
from sandbox.faults import FaultPlan


def hits(plan: FaultPlan, requests: int, target: str = "send") -> list[bool]:
    """Which of ``requests`` consecutive requests to ``target`` a fault hit."""
    return [plan.pick(target) is not None for _ in range(requests)]


def test_every_third_matching_request_is_hit_and_the_others_pass() -> None:
    """``every=3`` hits requests 3, 6, 9 exactly: deterministic, no randomness involved."""
    plan = FaultPlan()
    plan.add("503", "send", every=3)
    assert hits(plan, 9) == [False, False, True] * 3


def test_every_counts_only_requests_to_its_target() -> None:
    """Requests to other routes neither trigger the fault nor advance its turn."""
    plan = FaultPlan()
    fault = plan.add("503", "send", every=2)
    seen = []
    for _ in range(3):
        seen.append(plan.pick("typing") is not None)
        seen.append(plan.pick("send") is not None)
    assert seen == [False, False, False, True, False, False]
    assert fault.hits == 1 and fault.matched == 3


def test_every_with_count_stops_after_count_hits() -> None:
    """``count`` counts hits, not matches: every=2, count=2 hits requests 2 and 4, then is gone."""
    plan = FaultPlan()
    plan.add("503", "send", every=2, count=2)
    assert hits(plan, 8) == [False, True, False, True, False, False, False, False]
    assert plan.active() == []


def test_a_request_skipped_by_every_falls_through_to_the_next_fault() -> None:
    """When it is not the ``every`` fault's turn, a later fault in the plan still applies."""
    plan = FaultPlan()
    plan.add("503", "send", every=2)
    plan.add("latency", "send", seconds=0.1)
    kinds = [f.kind if (f := plan.pick("send")) else None for _ in range(4)]
    assert kinds == ["latency", "503", "latency", "503"]


def test_every_must_be_positive_and_is_described() -> None:
    plan = FaultPlan()
    with pytest.raises(ValueError, match="every"):
        plan.add("503", "send", every=0)
    assert "every 3" in plan.add("503", "send", every=3).describe()


async def test_emulator_fails_every_third_send_on_the_wire() -> None:
    """Six POSTs to the send route: the 3rd and 6th get 503, the others create messages."""
    plan = FaultPlan()
    async with DiscordEmulator(faults=plan) as emu, aiohttp.ClientSession() as http:
        plan.add("503", "send", every=3)
        general = emu.channels["general"]
        url = f"{emu.api_base}/channels/{general}/messages"
        auth = {"Authorization": f"Bot {emu.token}"}
        statuses = []
        for n in range(6):
            async with http.post(url, json={"content": f"m{n}"}, headers=auth) as r:
                statuses.append(r.status)
        assert statuses == [200, 200, 503, 200, 200, 503]
        assert [m.content for m in emu.sent_messages(general)] == ["m0", "m1", "m3", "m4"]


async def test_drop_after_serves_the_request_then_cuts_the_connection() -> None:
    """``drop`` with ``after=True``: the message is posted, but the client gets no response (a
    resend with the same enforced nonce then returns that message instead of a second one)."""
    plan = FaultPlan()
    async with DiscordEmulator(faults=plan) as emu, aiohttp.ClientSession() as http:
        general = emu.channels["general"]
        url = f"{emu.api_base}/channels/{general}/messages"
        auth = {"Authorization": f"Bot {emu.token}"}
        body = {"content": "posted", "nonce": "n-1", "enforce_nonce": True}
        plan.add("drop", "send", count=1, after=True)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.post(url, json=body, headers=auth) as r:
                await r.read()
        assert [m.content for m in emu.sent_messages(general)] == ["posted"]
        assert emu.requests_for("send")[0].status is None
        async with http.post(url, json=body, headers=auth) as r:
            again = await r.json()
        assert int(again["id"]) == emu.sent_messages(general)[0].id
        assert len(emu.sent_messages(general)) == 1
