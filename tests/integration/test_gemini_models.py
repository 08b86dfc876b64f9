"""A configured Gemini model that does not exist (a typo, a retired model, a ``-latest`` alias on
API version v1): the real bot process against the emulator, which answers such names 404
NOT_FOUND like the real API.

The bot starts anyway and warns which model is missing; it answers from the next model that
exists, asks Gemini about the missing one once (not once per message), never opens the ``gemini``
breaker over it, and when no model is left tells each user why instead of queueing forever.
"""

from __future__ import annotations

import socket

from rehearsal.ledger import Ledger, Seen
from tests.chaos.support import assert_promise_kept, started_bot
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators

RETIRED = "gemini-1.5-flash"  # retired by Google: the emulator, like the real API, answers 404
GONE_SENTENCE = "The Gemini model I'm set up to use doesn't exist"
# The operator's lines about the missing model are ERROR level on purpose: they need a fix.
OPERATOR_LINES = ("gemini.model_not_found", "gemini.no_model_available")


def generate_requests(emulators: Emulators, model: str) -> int:
    return sum(1 for r in emulators.gemini.requests if r.action == "generateContent" and r.model == model)


async def test_a_retired_primary_is_reported_at_start_and_the_fallback_answers_everyone(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    env = {**bot_env, "GEMINI_MODEL": RETIRED, "GEMINI_FALLBACK_MODELS": "gemini-2.5-flash"}
    ledger = Ledger(emulators.discord, prefix="r")
    discord = emulators.discord
    async with started_bot(spawn_bot, emulators, env) as api:
        warning = await api.proc.wait_for_log(lambda r: r.get("event") == "gemini.model_missing")
        assert (warning["level"], warning["model"]) == ("warning", RETIRED)
        assert warning["setting"] == "GEMINI_MODEL"
        channels = [discord.channels["general"], discord.channels["random"]]
        first = await ledger.ask(channels[0], "normal", "hello there")
        await ledger.wait_for(lambda: bool(first.answers), timeout=15)
        asked = [first] + [await ledger.ask(channels[n % 2], "normal", "hello there") for n in range(5)]
        await ledger.wait_for(lambda: all(a.answers for a in asked), timeout=15)
        assert all(a.seen is Seen.ANSWERED_DIRECT for a in asked), [ledger.describe(a) for a in asked]
        assert generate_requests(emulators, RETIRED) == 1  # remembered: not asked once per message
        assert generate_requests(emulators, "gemini-2.5-flash") == 6
        assert (await api.breakers())["gemini"] == "closed"
        assert_promise_kept(ledger, [api.proc], allow=OPERATOR_LINES)
        assert await api.proc.terminate() == 0


async def test_with_no_model_left_every_user_is_told_why_and_nothing_is_queued(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """Six messages while the only model is retired (BREAKER_FAIL_MAX is 5): each user gets the
    sentence, not a "queued" acknowledgement; the breaker stays closed, the queue holds nothing,
    and the operator's log names the model."""
    env = {**bot_env, "GEMINI_MODEL": RETIRED}
    ledger = Ledger(emulators.discord, prefix="n")
    discord = emulators.discord
    async with started_bot(spawn_bot, emulators, env) as api:
        channels = [discord.channels["general"], discord.channels["random"]]
        first = await ledger.ask(channels[0], "normal", "hello there")
        await ledger.wait_for(lambda: bool(first.notices), timeout=15)
        asked = [first] + [await ledger.ask(channels[n % 2], "normal", "hello there") for n in range(5)]
        await ledger.wait_for(lambda: all(a.notices for a in asked), timeout=15)
        for a in asked:
            assert a.seen is Seen.TOLD_WHY and not a.acks, ledger.describe(a)
            assert GONE_SENTENCE in a.notices[0].content, a.notices[0].content
        assert generate_requests(emulators, RETIRED) == 1
        assert (await api.breakers())["gemini"] == "closed"
        assert (await api.queue())["queue"]["pending"] == 0
        lines = {r.get("event"): r for r in api.proc.logs() if r.get("event") in OPERATOR_LINES}
        assert lines["gemini.model_not_found"]["model"] == RETIRED
        assert lines["gemini.no_model_available"]["missing"] == [RETIRED]
        assert_promise_kept(ledger, [api.proc], allow=OPERATOR_LINES)
        assert await api.proc.terminate() == 0


async def test_the_bot_starts_when_gemini_cannot_be_reached_and_says_the_models_were_not_checked(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    with socket.socket() as probe:  # bound, never listening: connections are refused at once
        probe.bind(("127.0.0.1", 0))
        env = {**bot_env, "GEMINI_BASE_URL": f"http://127.0.0.1:{probe.getsockname()[1]}"}
        async with started_bot(spawn_bot, emulators, env) as api:
            line = await api.proc.wait_for_log(lambda r: r.get("event") == "gemini.models_unchecked")
            assert line["level"] == "warning" and line["models"] == ["gemini-2.5-flash"]
            assert "could not check: connection" in line["detail"]
            assert not [r for r in api.proc.logs() if r.get("event") == "gemini.model_missing"]
            api.proc.assert_clean_logs()
            assert await api.proc.terminate() == 0
