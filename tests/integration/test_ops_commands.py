"""The operators' view in Discord: ``/admin incidents``, availability in ``/status`` for owners,
and every slash command counted by name and outcome (real discord.py against the emulator)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_pipeline import Live
from tests.integration.test_slash_commands import live, only_text, run

__all__ = ["live"]  # the fixture, used by name


async def counted(live: Live, command: str, outcome: str, expected: float) -> None:
    """The frame counts a command when it ends, just after its last reply: wait for it."""
    await live.discord.wait_until(lambda: command_count(live, command, outcome) == expected, 5)


def command_count(live: Live, command: str, outcome: str) -> float:
    body = live.app.metrics.render()[0].decode()
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            if s.name == "bot_commands_total" and s.labels == {"command": command, "outcome": outcome}:
                return s.value
    raise AssertionError(f"no bot_commands_total for {command} {outcome}")


async def test_admin_incidents_lists_the_breaker_episode_with_its_mttr(live: Live) -> None:
    gemini = live.app.board["gemini"]
    gemini.force_open(60, reason="test outage")
    gemini.reset()
    record = await run(live, "admin", {"incidents": {}}, user="owner")
    text = only_text(record)
    assert record.ephemeral
    assert text.startswith("`gemini`: 1 incident, MTTR 0 s"), text
    assert "forced open: test outage" in text
    await counted(live, "admin incidents", "ok", 1)


async def test_admin_incidents_is_refused_to_a_member_and_counted_as_refused(live: Live) -> None:
    record = await run(live, "admin", {"incidents": {}}, user="normal")
    assert "owners" in only_text(record)
    await counted(live, "admin incidents", "refused", 1)


async def test_status_shows_availability_to_owners_only(live: Live) -> None:
    answered = await run(live, "ask", {"prompt": "hello"})
    assert answered.followups
    record = await run(live, "status", user="owner")
    [embed] = record.followups[0].embeds
    fields = {f["name"]: f["value"] for f in embed["fields"]}
    value = fields["Availability (owners)"]
    assert "Objective: 99.9% of messages answered within 30 s" in value
    assert "Today: 100% of 1 answered within 30 s; error budget left 100%." in value
    record = await run(live, "status", user="normal")
    [embed] = record.followups[0].embeds
    assert "Availability (owners)" not in {f["name"] for f in embed["fields"]}
    await counted(live, "status", "ok", 2)
    await counted(live, "ask", "ok", 1)
