"""The Gemini emulator answers the real, unpatched google-genai client like the real API.

Every test drives ``google.genai.Client`` over loopback HTTP; nothing in the SDK is patched.
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from resilience.clock import FakeClock
from sandbox import responder
from sandbox.faults import FaultPlan
from sandbox.gemini import GeminiEmulator

MODEL = "gemini-2.0-flash"


@functools.cache
def ssl_context() -> ssl.SSLContext:
    """One TLS context for all clients: the SDK builds a fresh one (~150 ms) per client otherwise."""
    return ssl.create_default_context()


def make_client(
    emu: GeminiEmulator, *, key: str = "sandbox-key", timeout_ms: int = 5_000, version: str | None = None
) -> genai.Client:
    """A real SDK client pointed at the emulator, with the SDK's own retries off."""
    return genai.Client(api_key=key, http_options=types.HttpOptions(
        base_url=emu.base_url, timeout=timeout_ms, api_version=version,
        retry_options=types.HttpRetryOptions(attempts=1),
        async_client_args={"ssl": ssl_context()}, client_args={"verify": ssl_context()}))


@pytest.fixture
async def emu() -> AsyncIterator[GeminiEmulator]:
    """A started emulator on a loopback port, stopped after the test."""
    async with GeminiEmulator() as emulator:
        yield emulator


@pytest.fixture
async def client(emu: GeminiEmulator) -> AsyncIterator[genai.Client]:
    """A real google-genai client talking to ``emu``; closed after the test."""
    c = make_client(emu)
    yield c
    await c.aio.aclose()


async def stream_texts(client: genai.Client, contents: Any, model: str = MODEL) -> list[str | None]:
    return [chunk.text async for chunk in await client.aio.models.generate_content_stream(
        model=model, contents=contents)]


def detail(exc: errors.APIError, type_suffix: str) -> dict[str, Any]:
    """The first ``details`` entry whose ``@type`` ends with ``type_suffix``."""
    found = [d for d in exc.details["error"]["details"] if d["@type"].endswith(type_suffix)]
    assert found, exc.details
    return found[0]


# happy path


async def test_generate_content_returns_text_usage_and_model_version(emu, client):
    r = await client.aio.models.generate_content(model=MODEL, contents="hello")
    assert r.text == responder.CANNED["hello"]
    assert r.candidates[0].finish_reason == types.FinishReason.STOP
    usage = r.usage_metadata
    assert usage.prompt_token_count > 0 and usage.candidates_token_count > 0
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert r.model_version == MODEL + "-sandbox"


async def test_requests_are_recorded_with_route_parts_and_the_key_masked(emu, client):
    await client.aio.models.generate_content(model=MODEL, contents="hi there")
    rec = emu.requests[-1]
    assert (rec.method, rec.api_version, rec.model, rec.action) == ("POST", "v1", MODEL, "generateContent")
    assert rec.path == f"/v1/models/{MODEL}:generateContent"
    assert rec.headers["x-goog-api-key"] == "***"
    assert "sandbox-key" not in json.dumps(rec.headers)
    assert rec.body["contents"][0]["parts"][0]["text"] == "hi there"
    assert rec.outcome == "ok"


async def test_other_api_versions_are_served(emu):
    c = make_client(emu, version="v1beta")
    try:
        r = await c.aio.models.generate_content(model=MODEL, contents="hello")
    finally:
        await c.aio.aclose()
    assert r.text and emu.requests[-1].api_version == "v1beta"


async def test_echo_reports_earlier_turns_and_quotes_the_last_user_message(client):
    history = [
        types.Content(role="user", parts=[types.Part(text="first")]),
        types.Content(role="model", parts=[types.Part(text="answer")]),
        types.Content(role="user", parts=[types.Part(text="the second question")]),
    ]
    r = await client.aio.models.generate_content(model=MODEL, contents=history)
    assert r.text == "Echo (saw 2 earlier turns): «the second question»"


@pytest.mark.parametrize("n", [1, 7, 2000, 2001, 4500])
async def test_reply_with_n_characters_is_exactly_n_characters(client, n):
    r = await client.aio.models.generate_content(model=MODEL, contents=f"please reply with {n} characters")
    assert len(r.text) == n
    assert " " in r.text or n < 10


def test_words_of_length_is_exact_for_every_small_length():
    for n in range(300):
        text = responder.words_of_length(n)
        assert len(text) == n, n
        assert text == text.strip()


async def test_code_request_returns_a_fenced_block(client):
    r = await client.aio.models.generate_content(model=MODEL, contents="write code for me")
    assert r.text.count("```") == 2 and "```python\n" in r.text


async def test_who_are_you_acknowledges_the_system_instruction(client):
    r = await client.aio.models.generate_content(
        model=MODEL, contents="Who are you?",
        config=types.GenerateContentConfig(system_instruction="You are Pirate Bot."))
    assert "You are Pirate Bot." in r.text
    r = await client.aio.models.generate_content(model=MODEL, contents="who are you")
    assert "no system instruction" in r.text


async def test_stream_sends_chunks_that_join_to_the_full_answer(emu, client):
    texts = await stream_texts(client, "reply with 130 characters")
    assert len(texts) == 4
    assert len("".join(texts)) == 130
    assert emu.requests[-1].action == "streamGenerateContent"


async def test_stream_last_chunk_carries_finish_reason_and_usage(client):
    chunks = [c async for c in await client.aio.models.generate_content_stream(
        model=MODEL, contents="reply with 90 characters")]
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert chunks[-1].usage_metadata.candidates_token_count > 0
    assert chunks[0].candidates[0].finish_reason is None


async def test_embed_content_returns_one_deterministic_vector_per_text(emu, client):
    a = await client.aio.models.embed_content(model="gemini-embedding-001", contents=["alpha", "beta"])
    b = await client.aio.models.embed_content(model="gemini-embedding-001", contents=["alpha"])
    assert len(a.embeddings) == 2 and len(a.embeddings[0].values) == 3072  # gemini-embedding-001's size
    assert a.embeddings[0].values == b.embeddings[0].values != a.embeddings[1].values
    assert emu.requests[-1].action == "batchEmbedContents"


# keys


async def test_wrong_key_gets_client_error_400_api_key_invalid(emu):
    bad = make_client(emu, key="not-the-key")
    try:
        with pytest.raises(errors.ClientError) as info:
            await bad.aio.models.generate_content(model=MODEL, contents="hi")
    finally:
        await bad.aio.aclose()
    assert (info.value.code, info.value.status) == (400, "INVALID_ARGUMENT")
    assert info.value.message == "API key not valid. Please pass a valid API key."
    assert detail(info.value, "ErrorInfo")["reason"] == "API_KEY_INVALID"
    assert emu.requests[-1].outcome == "invalid_key"


async def test_missing_key_gets_400_api_key_invalid(emu):
    async with aiohttp.ClientSession() as s, s.post(
            f"{emu.base_url}/v1/models/{MODEL}:generateContent", json={"contents": []}) as resp:
        body = await resp.json()
    assert resp.status == 400
    assert body["error"]["details"][0]["reason"] == "API_KEY_INVALID"


async def test_unknown_method_gets_404(emu):
    async with aiohttp.ClientSession() as s, s.post(
            f"{emu.base_url}/v1/models/{MODEL}:frobnicate", json={},
            headers={"x-goog-api-key": "sandbox-key"}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["status"] == "NOT_FOUND"


# models: only the ones the emulator knows, like the real API


async def test_an_unknown_or_retired_model_is_404_not_found_with_the_real_sentence(emu, client):
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(model="gemini-1.5-flash", contents="hi")
    assert (info.value.code, info.value.status) == (404, "NOT_FOUND")
    assert info.value.message == (
        "models/gemini-1.5-flash is not found for API version v1, or is not supported for generateContent. "
        "Call ListModels to see the list of available models and their supported methods.")
    assert "details" not in info.value.details["error"]
    with pytest.raises(errors.ClientError) as streamed:
        await stream_texts(client, "hi", model="gemini-1.5-flash")
    assert streamed.value.code == 404
    assert [r.outcome for r in emu.requests] == ["not_found", "not_found"]


async def test_models_get_of_an_unknown_model_is_404(emu, client):
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.get(model="gemini-1.5-flash")
    assert (info.value.code, info.value.status) == (404, "NOT_FOUND")
    assert info.value.message == "Model is not found: models/gemini-1.5-flash for api version v1"
    assert (emu.requests[-1].action, emu.requests[-1].outcome) == ("get", "not_found")


async def test_latest_aliases_exist_on_v1beta_only(emu, client):
    """The SDK's default API version is v1, where "-latest" names are unknown; v1beta serves them."""
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(model="gemini-flash-latest", contents="hello")
    assert info.value.code == 404 and "for API version v1," in info.value.message
    assert emu.requests[-1].api_version == "v1"
    beta = make_client(emu, version="v1beta")
    try:
        r = await beta.aio.models.generate_content(model="gemini-flash-latest", contents="hello")
        listed = [m.name async for m in await beta.aio.models.list()]
        got = await beta.aio.models.get(model="gemini-flash-latest")
    finally:
        await beta.aio.aclose()
    assert r.text and r.model_version == "gemini-2.5-flash" + "-sandbox"
    assert "models/gemini-flash-latest" in listed and got.name == "models/gemini-flash-latest"
    assert "models/gemini-flash-latest" not in [m.name async for m in await client.aio.models.list()]


async def test_a_model_answers_only_the_methods_it_supports(emu, client):
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(model="gemini-embedding-001", contents="hi")
    assert info.value.code == 404
    with pytest.raises(errors.ClientError):
        await client.aio.models.embed_content(model=MODEL, contents=["alpha"])


async def test_the_model_list_is_configurable(emu, client):
    emu.models = {"custom-model"}
    assert (await client.aio.models.generate_content(model="custom-model", contents="hello")).text
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(model=MODEL, contents="hello")
    assert info.value.code == 404
    assert [m.name async for m in await client.aio.models.list()] == ["models/custom-model"]


async def test_a_wrong_key_is_refused_before_the_model_is_looked_up(emu):
    bad = make_client(emu, key="not-the-key")
    try:
        with pytest.raises(errors.ClientError) as info:
            await bad.aio.models.generate_content(model="gemini-1.5-flash", contents="hi")
    finally:
        await bad.aio.aclose()
    assert info.value.code == 400 and emu.requests[-1].outcome == "invalid_key"


# faults -> what the SDK raises or returns


async def test_429_is_client_error_with_retry_info_and_per_minute_quota(emu, client):
    emu.faults.add("429", count=1, retry_delay="7s")
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert (info.value.code, info.value.status) == (429, "RESOURCE_EXHAUSTED")
    assert detail(info.value, "RetryInfo")["retryDelay"] == "7s"
    quota = detail(info.value, "QuotaFailure")["violations"][0]["quotaId"]
    assert quota == "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    assert emu.requests[-1].outcome == "fault:429"


async def test_daily_quota_is_429_with_a_per_day_quota_failure_and_a_short_retry_hint(emu, client):
    """Like the real API, a used-up daily quota still says "retry in 22s" (not the time to the reset)."""
    emu.faults.add("quota_daily", count=1)
    with pytest.raises(errors.ClientError) as info:
        await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert (info.value.code, info.value.status) == (429, "RESOURCE_EXHAUSTED")
    violation = detail(info.value, "QuotaFailure")["violations"][0]
    assert violation["quotaId"] == "GenerateRequestsPerDayPerProjectPerModel-FreeTier"
    assert violation["quotaDimensions"]["model"] == MODEL
    assert detail(info.value, "RetryInfo")["retryDelay"] == "22s"
    assert "Please retry in 22s" in info.value.message


async def test_daily_quota_hint_and_limit_can_be_set_or_the_hint_left_out(emu, client):
    emu.faults.add("quota_daily", count=1, retry_delay="47s", limit=0)
    emu.faults.add("quota_daily", count=1, retry_delay="none")
    with pytest.raises(errors.ClientError) as first:
        await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert detail(first.value, "RetryInfo")["retryDelay"] == "47s"
    assert detail(first.value, "QuotaFailure")["violations"][0]["quotaValue"] == "0"
    assert "limit: 0," in first.value.message
    with pytest.raises(errors.ClientError) as second:
        await client.aio.models.generate_content(model=MODEL, contents="hi")
    types_sent = [d["@type"] for d in second.value.details["error"]["details"]]
    assert not [t for t in types_sent if t.endswith("RetryInfo")]


@pytest.mark.parametrize(("kind", "status"), [("500", "INTERNAL"), ("503", "UNAVAILABLE"),
                                              ("504", "DEADLINE_EXCEEDED")])
async def test_json_5xx_faults_are_server_errors_with_google_status(emu, client, kind, status):
    emu.faults.add(kind, count=1)
    with pytest.raises(errors.ServerError) as info:
        await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert (info.value.code, info.value.status) == (int(kind), status)
    if kind == "503":
        assert info.value.message == "The model is overloaded. Please try again later."


async def test_502_html_body_is_a_server_error_carrying_the_html(emu, client):
    emu.faults.add("502", count=1)
    with pytest.raises(errors.ServerError) as info:
        await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert info.value.code == 502 and info.value.status == "Bad Gateway"
    assert info.value.message.startswith("<!DOCTYPE html>")


async def test_hang_makes_the_sdk_raise_timeout_error(emu):
    emu.faults.add("hang", count=1)
    c = make_client(emu, timeout_ms=100)
    started = time.perf_counter()
    try:
        with pytest.raises(TimeoutError):
            await c.aio.models.generate_content(model=MODEL, contents="hi")
        assert time.perf_counter() - started < 2.0
        r = await c.aio.models.generate_content(model=MODEL, contents="hello")  # the next one is fine
        assert r.text
    finally:
        await c.aio.aclose()


async def test_malformed_json_makes_the_sdk_raise_json_decode_error(emu, client):
    emu.faults.add("malformed_json", count=1)
    with pytest.raises(json.JSONDecodeError):
        await client.aio.models.generate_content(model=MODEL, contents="hi")


async def test_stream_error_event_raises_server_error_after_the_first_chunk(emu, client):
    emu.faults.add("stream_error", count=1)
    got: list[str | None] = []
    with pytest.raises(errors.ServerError) as info:
        async for chunk in await client.aio.models.generate_content_stream(
                model=MODEL, contents="reply with 200 characters"):
            got.append(chunk.text)
    assert len(got) == 1 and info.value.code == 500


async def test_broken_stream_chunk_raises_unknown_api_response_error(emu, client):
    emu.faults.add("stream_error", count=1, mode="broken", after=2)
    got: list[str | None] = []
    with pytest.raises(errors.UnknownApiResponseError):
        async for chunk in await client.aio.models.generate_content_stream(
                model=MODEL, contents="reply with 200 characters"):
            got.append(chunk.text)
    assert len(got) == 2


async def test_safety_block_is_not_an_exception_text_none_finish_safety(emu, client):
    emu.faults.add("safety", count=1)
    r = await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert r.text is None
    assert r.candidates[0].finish_reason == types.FinishReason.SAFETY
    assert any(rating.blocked for rating in r.candidates[0].safety_ratings)


async def test_safety_block_in_a_stream_is_one_chunk_with_finish_safety(emu, client):
    emu.faults.add("safety", count=1)
    chunks = [c async for c in await client.aio.models.generate_content_stream(model=MODEL, contents="x")]
    assert len(chunks) == 1 and chunks[0].text is None
    assert chunks[0].candidates[0].finish_reason == types.FinishReason.SAFETY


async def test_prompt_block_has_block_reason_and_no_candidates(emu, client):
    emu.faults.add("prompt_block", count=1)
    r = await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert r.text is None and not r.candidates
    assert r.prompt_feedback.block_reason == types.BlockedReason.SAFETY


async def test_empty_candidates_give_text_none(emu, client):
    emu.faults.add("empty", count=1)
    r = await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert r.text is None and r.candidates == []


async def test_drop_closes_the_connection_and_the_sdk_raises_a_connection_error(emu, client):
    emu.faults.add("drop", count=1)
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.aio.models.generate_content(model=MODEL, contents="hi")
    r = await client.aio.models.generate_content(model=MODEL, contents="hello")
    assert r.text


async def test_latency_delays_the_answer(emu, client):
    emu.faults.add("latency", count=1, seconds=0.04)
    started = time.perf_counter()
    r = await client.aio.models.generate_content(model=MODEL, contents="hello")
    assert r.text and time.perf_counter() - started >= 0.04
    assert emu.requests[-1].outcome == "fault:latency"


def test_latency_distribution_draws_are_seeded_and_in_range():
    a = GeminiEmulator(seed=3)
    b = GeminiEmulator(seed=3)
    params = {"dist": "uniform", "low": 0.1, "high": 0.5}
    draws = [a._latency(params) for _ in range(20)]
    assert draws == [b._latency(params) for _ in range(20)]
    assert all(0.1 <= d <= 0.5 for d in draws) and len(set(draws)) > 1


# schedules and targets


async def test_fault_hits_only_its_target_model(emu, client):
    emu.faults.add("503", target="gemini-2.5-pro")
    r = await client.aio.models.generate_content(model="gemini-2.5-flash", contents="hello")
    assert r.text
    with pytest.raises(errors.ServerError):
        await client.aio.models.generate_content(model="gemini-2.5-pro", contents="hello")


async def test_count_schedule_fails_exactly_the_next_n_requests(emu, client):
    emu.faults.add("503", count=2)
    outcomes = []
    for _ in range(4):
        try:
            await client.aio.models.generate_content(model=MODEL, contents="hi")
            outcomes.append("ok")
        except errors.ServerError:
            outcomes.append("503")
    assert outcomes == ["503", "503", "ok", "ok"]
    assert emu.faults.active() == []


async def _pattern(seed: int, n: int) -> list[str]:
    async with GeminiEmulator(faults=FaultPlan(rng=random.Random(seed))) as emu:
        emu.faults.add("500", probability=0.5)
        c = make_client(emu)
        out = []
        try:
            for _ in range(n):
                try:
                    await c.aio.models.generate_content(model=MODEL, contents="hi")
                    out.append("ok")
                except errors.ServerError:
                    out.append("500")
        finally:
            await c.aio.aclose()
    return out


async def test_probability_schedule_is_reproducible_with_a_seeded_rng():
    first = await _pattern(7, 20)
    assert first == await _pattern(7, 20)
    assert 3 <= first.count("500") <= 17


async def test_duration_schedule_heals_when_the_injected_clock_passes_the_deadline():
    clock = FakeClock()
    async with GeminiEmulator(faults=FaultPlan(clock=clock.monotonic)) as emu:
        emu.faults.add("503", duration=30.0)
        c = make_client(emu)
        try:
            with pytest.raises(errors.ServerError):
                await c.aio.models.generate_content(model=MODEL, contents="hi")
            clock.advance(29.0)
            with pytest.raises(errors.ServerError):
                await c.aio.models.generate_content(model=MODEL, contents="hi")
            clock.advance(1.5)
            assert (await c.aio.models.generate_content(model=MODEL, contents="hello")).text
        finally:
            await c.aio.aclose()


# lifecycle


async def test_starts_fast_and_stops_with_a_hanging_request_in_flight_leaking_no_tasks():
    before = asyncio.all_tasks()
    started = time.perf_counter()
    emu = GeminiEmulator()
    await emu.start()
    assert time.perf_counter() - started < 0.5
    emu.faults.add("hang")
    c = make_client(emu, timeout_ms=10_000)
    call = asyncio.create_task(c.aio.models.generate_content(model=MODEL, contents="hi"))
    for _ in range(100):  # bounded wait for the request to arrive
        if emu.requests:
            break
        await asyncio.sleep(0.005)
    assert emu.requests and emu.requests[-1].outcome == "fault:hang"
    stopping = time.perf_counter()
    await emu.stop()
    assert time.perf_counter() - stopping < 1.0
    with pytest.raises(aiohttp.ClientConnectionError):
        await asyncio.wait_for(call, 2.0)
    await c.aio.aclose()
    await emu.stop()  # a second stop is a no-op
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == before


async def test_base_url_before_start_is_an_error():
    with pytest.raises(RuntimeError):
        _ = GeminiEmulator().base_url


async def test_a_hung_request_is_released_on_the_server_when_the_client_gives_up(emu):
    before = asyncio.all_tasks()
    emu.faults.add("hang", count=1)
    c = make_client(emu, timeout_ms=100)
    try:
        with pytest.raises(TimeoutError):
            await c.aio.models.generate_content(model=MODEL, contents="hi")
        for _ in range(100):  # bounded: the server notices the closed connection within a few ticks
            if asyncio.all_tasks() == before:
                break
            await asyncio.sleep(0.005)
        assert asyncio.all_tasks() == before
    finally:
        await c.aio.aclose()


# other endpoints the SDK offers


async def test_models_get_list_and_count_tokens_are_served(emu, client):
    model = await client.aio.models.get(model="gemini-2.5-flash")
    assert model.name == "models/gemini-2.5-flash" and model.input_token_limit > 0
    names = [m.name async for m in await client.aio.models.list()]
    assert "models/gemini-2.5-flash" in names
    counted = await client.aio.models.count_tokens(model=MODEL, contents="hello world how are you")
    assert counted.total_tokens == responder.count_tokens("hello world how are you")


async def test_models_get_honours_error_faults(emu, client):
    emu.faults.add("503", count=1)
    with pytest.raises(errors.ServerError):
        await client.aio.models.get(model=MODEL)


async def test_stalled_stream_is_cut_by_the_client_timeout_after_the_first_chunk(emu):
    emu.faults.add("stream_error", count=1, mode="hang")
    c = make_client(emu, timeout_ms=150)
    got: list[str | None] = []
    try:
        with pytest.raises(TimeoutError):
            async for chunk in await c.aio.models.generate_content_stream(
                    model=MODEL, contents="reply with 200 characters"):
                got.append(chunk.text)
    finally:
        await c.aio.aclose()
    assert len(got) == 1


async def test_max_output_tokens_truncates_the_answer_with_finish_max_tokens(client):
    config = types.GenerateContentConfig(max_output_tokens=10)
    r = await client.aio.models.generate_content(
        model=MODEL, contents="reply with 500 characters", config=config)
    assert len(r.text) == 40 and r.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    chunks = [c async for c in await client.aio.models.generate_content_stream(
        model=MODEL, contents="reply with 500 characters", config=config)]
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.MAX_TOKENS


async def test_max_tokens_fault_is_a_candidate_without_text(emu, client):
    emu.faults.add("max_tokens", count=1)
    r = await client.aio.models.generate_content(model=MODEL, contents="hi")
    assert r.text is None and r.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert r.usage_metadata.thoughts_token_count > 0


async def test_request_log_keeps_only_the_newest_entries():
    async with GeminiEmulator(max_requests=3, models=[f"m{n}" for n in range(5)]) as emu:
        async with aiohttp.ClientSession() as s:
            for n in range(5):
                async with s.post(f"{emu.base_url}/v1/models/m{n}:generateContent", json={"contents": []},
                                  headers={"x-goog-api-key": emu.api_key}) as resp:
                    assert resp.status == 200
        assert [r.model for r in emu.requests] == ["m2", "m3", "m4"]


async def test_a_prompt_fault_hits_only_questions_containing_its_text(emu, client):
    emu.faults.add("503", prompt="Write An Essay")
    ok = await client.aio.models.generate_content(model=MODEL, contents="hello")
    assert ok.text.startswith("Hello!")
    with pytest.raises(errors.ServerError) as info:
        await client.aio.models.generate_content(model=MODEL, contents="please write an essay on rivers")
    assert info.value.code == 503
    assert [r.outcome for r in emu.requests] == ["ok", "fault:503"]


async def test_tokens_per_second_makes_a_long_answer_take_as_long_as_writing_it(emu, client):
    """200 tokens at 1,000 tokens/s: at least 0.2 s, plain and streamed; a short answer stays quick."""
    emu.tokens_per_second = 1000
    loop = asyncio.get_running_loop()
    started = loop.time()
    r = await client.aio.models.generate_content(model=MODEL, contents="reply with 800 characters")
    assert len(r.text) == 800 and loop.time() - started >= 0.2
    started = loop.time()
    chunks = [c.text async for c in await client.aio.models.generate_content_stream(
        model=MODEL, contents="reply with 800 characters")]
    assert "".join(chunks) == r.text and loop.time() - started >= 0.2
