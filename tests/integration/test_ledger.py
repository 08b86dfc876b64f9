"""The ledger sorts the bot's replies the way a user reads them: answer, "queued" then answer, or a reason."""

from __future__ import annotations

import asyncio
from pathlib import Path

from rehearsal.ledger import Ledger, Seen, percentiles
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import live_bot


async def test_the_ledger_tells_direct_queued_and_refused_answers_apart_and_counts_the_unanswered(
    tmp_path: Path,
) -> None:
    async with running_emulators(heartbeat_interval=1.0) as emus, live_bot(
        emus, tmp_path / "data", MAX_INPUT_CHARS="200", RETRY_MAX_ATTEMPTS="1"
    ) as live:
        ledger = Ledger(live.discord)
        general = live.general
        direct = await ledger.ask(general, "normal", "hello there")
        too_long = await ledger.ask(general, "normal", "x" * 300)
        assert await ledger.wait_settled(10) == []

        live.gemini.faults.add("503")
        queued = await ledger.ask(live.discord.channels["random"], "normal", "are you there?")
        await ledger.wait_for(lambda: bool(queued.acks), 10)
        assert queued.seen is Seen.QUEUED and ledger.tally().lost == 1  # owed an answer still
        live.gemini.faults.clear()
        assert await ledger.wait_settled(15) == []
        await asyncio.sleep(0.2)  # nothing more arrives for a settled message

        assert direct.seen is Seen.ANSWERED_DIRECT
        assert too_long.seen is Seen.TOLD_WHY and "at most 200" in too_long.notices[0].content
        assert queued.seen is Seen.ANSWERED_AFTER_QUEUE
        tally = ledger.tally()
        assert (tally.sent, tally.lost, tally.duplicated, tally.out_of_order) == (3, 0, 0, 0)
        assert tally.seen["answered_direct"] == 1 and tally.seen["answered_after_queue"] == 1
        assert tally.seen["told_why"] == 1
        assert 0 < tally.direct_ms["p50"] < 5000 and tally.ack_ms["p50"] > 0


def test_percentiles_are_in_milliseconds_and_skip_missing_values() -> None:
    figures = percentiles([0.001 * i for i in range(1, 101)] + [None])
    assert round(figures["p50"], 1) == 50.5 and figures["max"] == 100.0
    assert percentiles([None]) == {}
