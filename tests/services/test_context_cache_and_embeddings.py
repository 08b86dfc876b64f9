"""Context caches for long personas and the embedder, with the real google-genai client against the
Gemini emulator (its ``cachedContents`` and ``batchEmbedContents``). Breakers run on a FakeClock and
retries sleep through it: nothing waits for real."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
from google import genai
from google.genai import errors

from resilience.breakers import Breaker, BreakerState
from resilience.clock import FakeClock
from resilience.errors import CircuitOpenError
from resilience.retries import RetryPolicy
from resilience.timeouts import AdaptiveTimeout
from sandbox.gemini import GeminiEmulator
from services.context_cache import ContextCache
from services.embeddings import Embedder
from services.gemini import GeminiService

MODEL = "gemini-2.5-flash"
LONG = "You are Ada, a patient tutor who explains with small examples. " * 80  # ~5,000 chars: ~1,250 tokens
OTHER = "You are Bo, a terse oracle who answers in riddles and never explains. " * 80


@pytest.fixture
async def gemini(emu: GeminiEmulator, fake_clock: FakeClock) -> AsyncIterator[GeminiService]:
    """A started GeminiService with a context cache (TTL 300 s), on the FakeClock."""
    service = GeminiService(
        api_key="sandbox-key",
        model=MODEL,
        base_url=emu.base_url,
        persona="short",
        breaker=Breaker("gemini", fake_clock, fail_max=5, reset_timeout=30),
        retry=RetryPolicy("gemini", max_attempts=1, sleep=fake_clock.sleep),
        timeout=AdaptiveTimeout(5.0, minimum=5.0, maximum=5.0),
        clock=fake_clock,
    )
    service.context_cache = ContextCache(lambda: service.sdk_client, ttl=300, clock=fake_clock)
    await service.start()
    yield service
    await service.stop()


def generations(emu: GeminiEmulator) -> list:
    return [r for r in emu.requests if r.action == "generateContent"]


async def test_a_long_persona_is_cached_once_and_requests_name_the_cache(emu, gemini) -> None:
    cache = gemini.context_cache
    first = await gemini.generate("hello", persona=LONG)
    second = await gemini.generate("hello again", persona=LONG)
    assert first.ok and second.ok
    [name] = cache.names()
    assert emu.caches.created == 1 and name in emu.caches.caches
    for request in generations(emu):
        assert request.body["cachedContent"] == name and "systemInstruction" not in request.body
        assert request.api_version == "v1beta"  # cachedContents are documented on v1beta only
    assert second.cached_tokens >= 1024
    # The emulated model read the cached persona as its system instruction.
    assert emu.caches.caches[name].system_instruction is not None


async def test_short_personas_and_requests_with_tools_keep_the_persona_inline(emu, gemini) -> None:
    await gemini.generate("hello", persona="You are short.")
    await gemini.generate("hello", persona=LONG, tools=["google_search"])
    assert emu.caches.created == 0
    assert all("systemInstruction" in r.body and "cachedContent" not in r.body for r in generations(emu))


async def test_a_persona_change_invalidates_the_old_cache(emu, gemini) -> None:
    cache = gemini.context_cache
    await gemini.generate("hello", persona=LONG)
    [old] = cache.names()
    assert cache.retain({LONG, "short"}) == []  # still in use: kept
    # The persona changed: the old one is in use nowhere, so its cache is deleted on Gemini's side.
    assert cache.retain({OTHER, "short"}) == [old]
    await cache.settle()
    assert old not in emu.caches.caches and emu.caches.deleted == 1
    await gemini.generate("hello", persona=OTHER)
    [new] = cache.names()
    assert new != old and generations(emu)[-1].body["cachedContent"] == new
    assert "riddles" in str(emu.caches.caches[new].system_instruction)


async def test_a_cache_is_made_again_near_the_end_of_its_ttl_and_a_vanished_one_is_bypassed(
    emu, gemini, fake_clock: FakeClock
) -> None:
    cache = gemini.context_cache
    await gemini.generate("hello", persona=LONG)
    [first] = cache.names()
    fake_clock.advance(250)  # less than a minute of its 300 s left
    await gemini.generate("hello", persona=LONG)
    [second] = cache.names()
    assert second != first
    await cache.settle()
    assert first not in emu.caches.caches  # the old one was deleted
    # Deleted behind the bot's back (or expired early): the request goes again with the persona inline.
    emu.caches.caches.clear()
    reply = await gemini.generate("hello", persona=LONG)
    assert reply.ok
    *_, refused, inline = generations(emu)
    assert refused.outcome == "cache_refused:403" and "systemInstruction" in inline.body
    assert cache.names() == []


async def test_a_cache_gemini_refuses_is_not_asked_for_again_for_a_while(emu, gemini, fake_clock) -> None:
    emu.caches._models = lambda: set()  # every create answers 404
    assert (await gemini.generate("hello", persona=LONG)).ok
    assert (await gemini.generate("hello", persona=LONG)).ok
    creates = [r for r in emu.requests if r.action == "createCachedContent"]
    assert len(creates) == 1


# -- embeddings --------------------------------------------------------------------------------


def embedder(emu: GeminiEmulator, client: genai.Client, clock: FakeClock, fail_max: int = 2) -> Embedder:
    return Embedder(
        lambda: client,
        model="gemini-embedding-001",
        dimensions=256,
        breaker=Breaker("gemini.embed", clock, fail_max=fail_max, reset_timeout=30),
        retry=RetryPolicy("gemini.embed", max_attempts=2, sleep=clock.sleep, rng=random.Random(1)),
    )


@pytest.fixture
async def client(emu: GeminiEmulator) -> AsyncIterator[genai.Client]:
    from services.gemini import close_client, new_client

    c = new_client("sandbox-key", emu.base_url, 5.0)
    yield c
    await close_client(c)


async def test_embeddings_are_normalised_deterministic_and_close_for_shared_words(
    emu, client, fake_clock
) -> None:
    e = embedder(emu, client, fake_clock)
    fact, question, other = await e.embed(
        ["My cat is called Zanzibar", "What is my cat called?", "Tell me about topic 7"], "RETRIEVAL_DOCUMENT"
    )
    assert len(fact) == 256 and abs(sum(x * x for x in fact) - 1.0) < 1e-6
    assert sum(a * b for a, b in zip(fact, question, strict=True)) > 0.7
    assert abs(sum(a * b for a, b in zip(fact, other, strict=True))) < 0.3
    assert (await e.embed(["My cat is called Zanzibar"], "RETRIEVAL_QUERY"))[0] == fact
    body = emu.requests[-1].body
    assert emu.requests[-1].action == "batchEmbedContents"
    assert (
        body["requests"][0]["taskType"] == "RETRIEVAL_QUERY"
        and body["requests"][0]["outputDimensionality"] == 256
    )


async def test_embedding_failures_open_their_own_breaker_which_then_fails_fast(
    emu, client, fake_clock
) -> None:
    e = embedder(emu, client, fake_clock)
    emu.faults.add("503", "embeddings")
    with pytest.raises(errors.ServerError):
        await e.embed(["one"], "RETRIEVAL_QUERY")  # two attempts, both counted
    assert e.breaker.state is BreakerState.OPEN and not e.available()
    before = len(emu.requests)
    with pytest.raises(CircuitOpenError):
        await e.embed(["two"], "RETRIEVAL_QUERY")
    assert len(emu.requests) == before  # nothing sent while open


async def test_a_persona_just_under_the_minimum_is_tried_once_and_not_again_for_a_day(
    emu, gemini, fake_clock
) -> None:
    persona = "x" * 4000  # a server's longest persona: 1,000 tokens, under Flash's 1,024
    assert (await gemini.generate("hello", persona=persona)).ok
    assert (await gemini.generate("hello", persona=persona)).ok
    fake_clock.advance(3600)
    assert (await gemini.generate("hello", persona=persona)).ok
    creates = [r for r in emu.requests if r.action == "createCachedContent"]
    assert [r.outcome for r in creates] == ["refused:400"]
    assert all("systemInstruction" in r.body for r in generations(emu))


async def test_stopping_the_service_deletes_the_caches_it_made(emu, gemini) -> None:
    await gemini.generate("hello", persona=LONG)
    assert len(emu.caches.caches) == 1
    await gemini.stop()
    assert emu.caches.caches == {} and gemini.context_cache.names() == []
