"""GeminiService per request: a server's options (model, temperature, output ceiling, safety threshold)
and a breaker per model, with the next model of the chain answering when one is overloaded. The real
google-genai client against the Gemini emulator on loopback; breakers and retries on a FakeClock."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

from resilience.breakers import Breaker, BreakerState
from resilience.clock import FakeClock
from resilience.errors import CircuitOpenError
from resilience.retries import RetryPolicy
from resilience.timeouts import AdaptiveTimeout
from sandbox.gemini import GeminiEmulator
from services.gemini import (
    HARM_CATEGORIES,
    GeminiService,
    GenerationOptions,
    ReplyKind,
    model_breaker_name,
)
from tests.services.test_gemini_service import ssl_context

FLASH, LITE, PRO = "gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.5-pro"


@pytest.fixture
async def service(emu: GeminiEmulator, fake_clock: FakeClock) -> AsyncIterator[GeminiService]:
    """Flash first, then Flash-Lite; Pro allowed too; each model with a breaker that opens after 2."""
    breakers = {
        m: Breaker(model_breaker_name(m), fake_clock, fail_max=2, reset_timeout=30.0)
        for m in (FLASH, LITE, PRO)
    }
    svc = GeminiService(
        api_key="sandbox-key",
        model=FLASH,
        fallback_models=(LITE,),
        allowed_models=(PRO,),
        model_breakers=breakers,
        base_url=emu.base_url,
        persona="Default.",
        max_output_tokens=2048,
        breaker=Breaker("gemini", fake_clock, fail_max=3, reset_timeout=30.0),
        retry=RetryPolicy("gemini", max_attempts=1, sleep=fake_clock.sleep, rng=random.Random(1)),
        timeout=AdaptiveTimeout(2.0, minimum=2.0, maximum=2.0),
        clock=fake_clock,
        ssl_context=ssl_context(),
    )
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


def bodies(emu: GeminiEmulator) -> list[tuple[str | None, dict[str, object]]]:
    return [(r.model, r.body) for r in emu.requests if r.action == "generateContent"]


async def test_options_reach_the_request_and_the_chosen_model_answers(
    emu: GeminiEmulator, service: GeminiService
) -> None:
    options = GenerationOptions(
        model=PRO, temperature=0.4, max_output_tokens=256, safety_threshold="block_only_high"
    )
    reply = await service.generate("hello", persona="You are Pro.", options=options)
    assert reply.ok and reply.model == PRO
    [(model, body)] = bodies(emu)
    assert model == PRO
    assert body["generationConfig"] == {"maxOutputTokens": 256, "temperature": 0.4}
    assert body["safetySettings"] == [
        {"category": c, "threshold": "BLOCK_ONLY_HIGH"} for c in HARM_CATEGORIES
    ]
    assert body["systemInstruction"]["parts"] == [{"text": "You are Pro."}]


async def test_a_server_can_lower_the_output_ceiling_but_never_raise_it(
    emu: GeminiEmulator, service: GeminiService
) -> None:
    await service.generate("hello", options=GenerationOptions(max_output_tokens=60_000))
    assert bodies(emu)[-1][1]["generationConfig"] == {"maxOutputTokens": 2048}


async def test_a_model_outside_the_allowed_ones_is_ignored_for_the_default_chain(
    emu: GeminiEmulator, service: GeminiService
) -> None:
    reply = await service.generate("hello", options=GenerationOptions(model="gemini-2.0-flash"))
    assert reply.model == FLASH and [m for m, _ in bodies(emu)] == [FLASH]


async def test_an_overloaded_model_hands_the_same_attempt_to_the_next_and_rests_behind_its_breaker(
    emu: GeminiEmulator, service: GeminiService
) -> None:
    emu.faults.add("503", target=PRO)
    for _ in range(2):
        reply = await service.generate("hello", options=GenerationOptions(model=PRO))
        assert reply.ok and reply.model == FLASH
    assert [m for m, _ in bodies(emu)] == [PRO, FLASH, PRO, FLASH]
    assert service.model_breakers[PRO].state is BreakerState.OPEN
    assert service.breaker.state is BreakerState.CLOSED and service.breaker.failures == 0
    reply = await service.generate("hello", options=GenerationOptions(model=PRO))
    assert reply.model == FLASH and [m for m, _ in bodies(emu)][-1:] == [FLASH]  # Pro not asked
    assert service.health()["model_breakers"][PRO] == "open"


async def test_a_per_minute_429_also_moves_to_the_next_model_but_a_500_does_not(
    emu: GeminiEmulator, service: GeminiService
) -> None:
    emu.faults.add("429", target=FLASH, count=1, retry_delay="1s")
    assert (await service.generate("hello")).model == LITE
    emu.faults.add("500", target=FLASH, count=1)
    with pytest.raises(Exception) as info:
        await service.generate("hello")
    assert getattr(info.value, "code", None) == 500
    assert [m for m, _ in bodies(emu)][-1] == FLASH  # not handed on: a 500 is retried as before


async def test_when_every_model_is_overloaded_only_the_gemini_breaker_counts_it(
    emu: GeminiEmulator, service: GeminiService
) -> None:
    """An outage of Gemini as a whole is counted (and alerted about) once, by the ``gemini`` breaker:
    a model's breaker counts only failures where another model answered."""
    emu.faults.add("503")
    for _ in range(2):
        with pytest.raises(Exception) as info:
            await service.generate("hello", options=GenerationOptions(model=PRO))
        assert getattr(info.value, "code", None) == 503
    assert [m for m, _ in bodies(emu)] == [PRO, FLASH, LITE] * 2
    assert service.breaker.failures == 2
    for model in (PRO, FLASH, LITE):
        breaker = service.model_breakers[model]
        assert breaker.failures == 0 and breaker.state is BreakerState.CLOSED


async def test_with_every_model_resting_the_call_fails_fast_as_an_open_circuit(
    emu: GeminiEmulator, service: GeminiService
) -> None:
    for breaker in service.model_breakers.values():
        breaker.force_open(30.0, reason="operator")
    with pytest.raises(CircuitOpenError) as info:
        await service.generate("hello")
    assert info.value.name == model_breaker_name(FLASH) and bodies(emu) == []
    service.model_breakers[LITE].reset()
    assert (await service.generate("hello")).model == LITE
    assert service.breaker.failures == 0  # resting models say nothing about Gemini


@pytest.mark.parametrize(
    ("fault", "params", "kind", "sentence"),
    [
        (
            "empty",
            {"finish": "OTHER"},
            ReplyKind.EMPTY,
            "Gemini stopped without an answer and gave no reason",
        ),
        (
            "prompt_block",
            {"reason": "OTHER"},
            ReplyKind.PROMPT_BLOCKED,
            "Gemini refused to read that message without giving a reason",
        ),
        (
            "prompt_block",
            {"reason": "BLOCKLIST"},
            ReplyKind.PROMPT_BLOCKED,
            "Gemini refused to read that message because it contains terms it blocks",
        ),
        (
            "prompt_block",
            {},
            ReplyKind.PROMPT_BLOCKED,
            "Gemini refused to read that message because of its safety",
        ),
        ("safety", {}, ReplyKind.SAFETY_BLOCKED, "Gemini declined to answer that for safety reasons"),
        ("empty", {}, ReplyKind.EMPTY, "Gemini came back with an empty answer"),
    ],
)
async def test_each_kind_of_block_gets_its_own_sentence(
    emu: GeminiEmulator,
    service: GeminiService,
    fault: str,
    params: dict[str, str],
    kind: ReplyKind,
    sentence: str,
) -> None:
    emu.faults.add(fault, count=1, **params)
    reply = await service.generate("tell me")
    assert reply.kind is kind and reply.user_message is not None and reply.user_message.startswith(sentence)


async def test_the_emulator_refuses_a_temperature_gemini_refuses(
    emu: GeminiEmulator, service: GeminiService
) -> None:
    """The emulator is as strict as the API: a temperature of 7 never gets through (the bot refuses it
    earlier, with a sentence; this keeps the emulator honest)."""
    with pytest.raises(Exception) as info:
        await service.generate("hello", options=GenerationOptions(temperature=7))
    assert getattr(info.value, "code", None) == 400
