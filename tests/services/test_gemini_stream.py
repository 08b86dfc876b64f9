"""GeminiService.stream against the real GeminiEmulator over loopback, with the real google-genai client.

The emulator streams 40-character chunks (SSE), paced by ``tokens_per_second``, and its
``stream_error`` fault cuts a stream after some chunks with an error event, a broken chunk or a
stall. The breaker and the retry policy run on a ``FakeClock`` (retry waits cost no time); the
timeouts are real, and short (the longest test waits about a second).
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import AsyncIterator

import pytest

from resilience.breakers import Breaker
from resilience.clock import FakeClock
from resilience.errors import CallTimeoutError
from resilience.retries import RetryPolicy
from resilience.timeouts import AdaptiveTimeout
from sandbox.gemini import GeminiEmulator
from sandbox.responder import words_of_length
from services.gemini import GeminiService, ReplyKind
from tests.services.test_gemini_service import MODEL, PERSONA, ssl_context


class Watcher:
    """A ``StreamObserver`` that writes down what it is told."""

    def __init__(self, silence: float = 5.0) -> None:
        self.silence_seconds = silence
        self.events: list[str | None] = []  # each text, None for an interruption

    def text(self, text: str) -> None:
        self.events.append(text)

    def interrupted(self) -> None:
        self.events.append(None)

    @property
    def texts(self) -> list[str]:
        return [e for e in self.events if e is not None]


@pytest.fixture
async def services(emu: GeminiEmulator, fake_clock: FakeClock) -> AsyncIterator[list[GeminiService]]:
    made: list[GeminiService] = []
    yield made
    for service in made:
        await service.stop()


async def make(
    emu: GeminiEmulator,
    clock: FakeClock,
    made: list[GeminiService],
    *,
    timeout: AdaptiveTimeout | None = None,
    max_attempts: int = 3,
) -> GeminiService:
    service = GeminiService(
        api_key="sandbox-key",
        model=MODEL,
        base_url=emu.base_url,
        persona=PERSONA,
        breaker=Breaker("gemini", clock, fail_max=5, reset_timeout=30.0),
        retry=RetryPolicy("gemini", max_attempts=max_attempts, sleep=clock.sleep, rng=random.Random(1)),
        timeout=timeout or AdaptiveTimeout(5.0, minimum=5.0, maximum=5.0),
        clock=clock,
        ssl_context=ssl_context(),
    )
    await service.start()
    made.append(service)
    return service


def streams(emu: GeminiEmulator) -> int:
    return sum(1 for r in emu.requests if r.action == "streamGenerateContent")


async def test_the_observer_sees_the_answer_grow_and_the_reply_is_what_generate_answers(
    emu, fake_clock, services
):
    service = await make(emu, fake_clock, services)
    watcher = Watcher()
    reply = await service.stream("reply with 300 characters", observer=watcher)
    whole = await service.generate("reply with 300 characters")
    assert reply.ok and reply.text == whole.text == words_of_length(300)
    assert (reply.model, reply.finish_reason) == (whole.model, whole.finish_reason) == (MODEL, "STOP")
    assert reply.completion_tokens == whole.completion_tokens > 0 and reply.prompt_tokens > 0
    texts = watcher.texts
    assert len(texts) == 8 and texts[-1] == reply.text  # 300 characters in chunks of 40
    assert all(b.startswith(a) and len(b) > len(a) for a, b in itertools.pairwise(texts))
    assert streams(emu) == 1


async def test_a_long_answer_that_keeps_coming_is_not_cut_by_the_adaptive_timeout(emu, fake_clock, services):
    """The adaptive timeout has learnt 0.3 s; an answer takes 0.5 s to write. Unstreamed it times
    out; streamed, only silence (a second here) or the cap (5 s) could end it, and it is answered."""
    emu.tokens_per_second = 400  # 200 tokens: 0.5 s
    timeout = AdaptiveTimeout(0.3, minimum=0.3, maximum=5.0)
    service = await make(emu, fake_clock, services, timeout=timeout, max_attempts=1)
    with pytest.raises(CallTimeoutError):
        await service.generate("reply with 800 characters")
    reply = await service.stream("reply with 800 characters", observer=Watcher(silence=1.0))
    assert reply.ok and reply.text == words_of_length(800)
    assert timeout.current() == 0.3  # a stream's length teaches the adaptive timeout nothing


async def test_a_stalled_stream_ends_after_the_silence_and_counts_against_the_breaker(
    emu, fake_clock, services
):
    emu.faults.add("stream_error", count=1, mode="hang", after=1)
    service = await make(emu, fake_clock, services, max_attempts=1)
    watcher = Watcher(silence=0.3)
    with pytest.raises(CallTimeoutError) as info:
        await service.stream("reply with 200 characters", observer=watcher)
    assert info.value.timeout == 0.3
    assert watcher.events == [words_of_length(200)[:40], None]  # one chunk shown, then interrupted
    assert service.breaker.failures == 1


async def test_the_total_cap_ends_a_stream_that_never_falls_silent(emu, fake_clock, services):
    """Chunks every 0.1 s (never a second of silence) for 2 s: the cap of 0.6 s ends it."""
    emu.tokens_per_second = 100
    service = await make(
        emu, fake_clock, services, timeout=AdaptiveTimeout(0.6, minimum=0.6, maximum=0.6), max_attempts=1
    )
    watcher = Watcher(silence=1.0)
    with pytest.raises(CallTimeoutError) as info:
        await service.stream("reply with 800 characters", observer=watcher)
    assert info.value.timeout == 0.6
    assert 2 <= len(watcher.texts) < 20 and watcher.events[-1] is None


@pytest.mark.parametrize("mode", ["error", "broken"])
async def test_a_stream_cut_part_way_is_retried_and_the_retry_starts_the_answer_again(
    emu, fake_clock, services, mode
):
    """An error event (500) or a garbled chunk after two chunks: the observer hears it was
    interrupted, then the retry's text from its start, and the reply is the whole answer once."""
    emu.faults.add("stream_error", count=1, mode=mode, after=2)
    service = await make(emu, fake_clock, services)
    watcher = Watcher()
    reply = await service.stream("reply with 200 characters", observer=watcher)
    answer = words_of_length(200)
    assert reply.ok and reply.text == answer
    cut = watcher.events.index(None)
    assert watcher.events[:cut] == [answer[:40], answer[:80]]
    assert watcher.events[cut + 1] == answer[:40]  # the retry shows the answer from its start
    assert watcher.events[-1] == answer
    assert streams(emu) == 2 and len(fake_clock.sleeps) == 1


@pytest.mark.parametrize(
    ("fault", "kind"), [("safety", ReplyKind.SAFETY_BLOCKED), ("empty", ReplyKind.EMPTY)]
)
async def test_a_refusal_in_a_stream_is_a_reply_and_shows_no_text(emu, fake_clock, services, fault, kind):
    emu.faults.add(fault, count=1)
    service = await make(emu, fake_clock, services)
    watcher = Watcher()
    reply = await service.stream("hi", observer=watcher)
    assert reply.kind is kind and not reply.ok and reply.user_message
    assert watcher.events == [] and streams(emu) == 1


async def test_a_grounded_streamed_answer_has_its_sources_and_code_execution_its_blocks(
    emu, fake_clock, services
):
    service = await make(emu, fake_clock, services)
    grounded = await service.stream("what is new in rivers", observer=Watcher(), tools=["google_search"])
    assert [s.title for s in grounded.sources] == ["example.com", "example.org", "example.net"]
    computed = await service.stream(
        "calculate the sum of 1 to 10", observer=Watcher(), tools=["code_execution"]
    )
    assert "```python\ntotal = sum(range(1, 10 + 1))" in computed.text and "55" in computed.text
    whole = await service.generate("calculate the sum of 1 to 10", tools=["code_execution"])
    assert computed.text == whole.text


async def test_a_stream_cancelled_part_way_is_no_outcome_for_the_breaker(emu, fake_clock, services):
    """A Stop cancels the generation: Gemini did nothing wrong and nothing right. After one counted
    failure, a cancelled stream leaves the count as it was (a success would clear it, a failure
    raise it), and holds nothing: the next call goes through."""
    emu.tokens_per_second = 200
    service = await make(emu, fake_clock, services, max_attempts=1)
    emu.faults.add("503", count=1)
    with pytest.raises(Exception):  # noqa: B017  (the SDK's ServerError)
        await service.stream("hello", observer=Watcher())
    assert service.breaker.failures == 1
    watcher = Watcher()
    task = asyncio.create_task(service.stream("reply with 2000 characters", observer=watcher))
    async with asyncio.timeout(5):
        while not watcher.texts:
            await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert service.breaker.failures == 1 and watcher.events[-1] is not None
    assert (await service.stream("hello", observer=Watcher())).ok
    assert service.breaker.failures == 0
