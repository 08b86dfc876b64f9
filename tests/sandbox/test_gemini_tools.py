"""The Gemini emulator's tools and usage, read by the real, unpatched google-genai client.

Google Search grounding (``groundingMetadata``), URL context (``urlContextMetadata``) and code
execution (``executableCode`` / ``codeExecutionResult`` parts) appear only when a request asks
for the tool, as with the real API; a ``Tool`` naming two tool types is refused like the real
API refuses it; thinking and implicit caching show in ``usage_metadata``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from sandbox.gemini import GeminiEmulator
from tests.sandbox.test_gemini_emulator import make_client

MODEL = "gemini-2.5-flash"
SEARCH: list[Any] = [types.Tool(google_search=types.GoogleSearch())]


@pytest.fixture
async def emu() -> AsyncIterator[GeminiEmulator]:
    async with GeminiEmulator() as emulator:
        yield emulator


@pytest.fixture
async def client(emu: GeminiEmulator) -> AsyncIterator[genai.Client]:
    c = make_client(emu, version="v1")
    yield c
    await c.aio.aclose()


async def ask(
    client: genai.Client, text: str, tools: list[Any] | None = None
) -> types.GenerateContentResponse:
    config = types.GenerateContentConfig(tools=tools) if tools else None
    return await client.aio.models.generate_content(model=MODEL, contents=text, config=config)


async def test_search_grounding_returns_sources_only_when_the_tool_is_asked_for(
    emu: GeminiEmulator, client: genai.Client
) -> None:
    grounded = await ask(client, "who won the euro 2024", SEARCH)
    assert emu.requests[-1].body["tools"] == [{"googleSearch": {}}]
    metadata = grounded.candidates[0].grounding_metadata
    assert metadata is not None and metadata.web_search_queries == ["who won the euro 2024"]
    webs = [chunk.web for chunk in metadata.grounding_chunks or [] if chunk.web is not None]
    assert [(w.title, w.uri) for w in webs] == [
        ("example.com", "https://example.com/search/who-won-the-euro-2024/1"),
        ("example.org", "https://example.org/search/who-won-the-euro-2024/2"),
        ("example.net", "https://example.net/search/who-won-the-euro-2024/3"),
    ]
    [support] = metadata.grounding_supports or []
    assert support.grounding_chunk_indices == [0, 1, 2] and support.segment is not None
    assert support.segment.text == grounded.text
    assert metadata.search_entry_point is not None and metadata.search_entry_point.rendered_content

    plain = await ask(client, "who won the euro 2024")
    assert "tools" not in emu.requests[-1].body and plain.candidates[0].grounding_metadata is None
    unsearched = await ask(client, "no search: what is two plus two", SEARCH)
    assert unsearched.candidates[0].grounding_metadata is None  # the model chose not to search


async def test_url_context_reports_each_url_of_the_prompt_with_its_retrieval_status(
    client: genai.Client,
) -> None:
    tools: list[Any] = [types.Tool(url_context=types.UrlContext())]
    response = await ask(client, "compare https://a.example/x and https://unreachable.example/y", tools)
    metadata = response.candidates[0].url_context_metadata
    assert metadata is not None
    assert [(m.retrieved_url, m.url_retrieval_status) for m in metadata.url_metadata or []] == [
        ("https://a.example/x", types.UrlRetrievalStatus.URL_RETRIEVAL_STATUS_SUCCESS),
        ("https://unreachable.example/y", types.UrlRetrievalStatus.URL_RETRIEVAL_STATUS_ERROR),
    ]
    assert (await ask(client, "no links here", tools)).candidates[0].url_context_metadata is None


async def test_code_execution_answers_with_code_and_its_result_parts(client: genai.Client) -> None:
    tools: list[Any] = [types.Tool(code_execution=types.ToolCodeExecution())]
    response = await ask(client, "calculate the sum of 1 to 10", tools)
    parts = response.candidates[0].content.parts or []
    assert [p.text is not None for p in parts] == [True, False, False, True]
    code, result = parts[1].executable_code, parts[2].code_execution_result
    assert code is not None and code.language == types.Language.PYTHON
    assert code.code == "total = sum(range(1, 10 + 1))\nprint(total)\n"
    assert result is not None and result.outcome == types.Outcome.OUTCOME_OK and result.output == "55\n"
    assert response.executable_code == code.code and response.code_execution_result == "55\n"
    failed = await ask(client, "calculate something that will fail", tools)
    [outcome] = [p.code_execution_result.outcome for p in failed.candidates[0].content.parts or []
                 if p.code_execution_result is not None]
    assert outcome == types.Outcome.OUTCOME_FAILED
    without = await ask(client, "calculate the sum of 1 to 10")
    assert [p.text is not None for p in without.candidates[0].content.parts or []] == [True]


async def test_a_tool_with_two_tool_types_or_an_unknown_one_is_refused_like_the_real_api(
    emu: GeminiEmulator, client: genai.Client
) -> None:
    with pytest.raises(errors.ClientError) as both:
        both_in_one = types.Tool(google_search=types.GoogleSearch(), url_context=types.UrlContext())
        await ask(client, "hello", [both_in_one])
    assert both.value.code == 400
    assert "one_of 'tool_type' has more than one initialized field: googleSearch, urlContext" in str(
        both.value.message
    )
    # The SDK refuses an unknown tool itself; the API's own answer, over plain HTTP:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}], "tools": [{"webBrowser": {}}]}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{emu.base_url}/v1/models/{MODEL}:generateContent",
            json=body,
            headers={"x-goog-api-key": emu.api_key},
        ) as response:
            assert response.status == 400
            error = (await response.json())["error"]
    assert error["status"] == "INVALID_ARGUMENT"
    assert error["message"] == (
        "Invalid JSON payload received. Unknown name \"webBrowser\" at 'tools[0]': Cannot find field."
    )


async def test_thinking_tokens_are_reported_and_billed_in_the_total(client: genai.Client) -> None:
    usage = (await ask(client, "think step by step: is 7 prime")).usage_metadata
    assert usage is not None and usage.thoughts_token_count == 64
    written = (usage.prompt_token_count or 0) + (usage.candidates_token_count or 0)
    assert usage.total_token_count == written + 64
    plain = (await ask(client, "is 7 prime")).usage_metadata
    assert plain is not None and plain.thoughts_token_count is None


def conversation(earlier: str, question: str) -> list[types.Content]:
    return [
        types.Content(role="user", parts=[types.Part(text=earlier)]),
        types.Content(role="model", parts=[types.Part(text="noted")]),
        types.Content(role="user", parts=[types.Part(text=question)]),
    ]


async def test_implicit_caching_reports_a_repeated_prefix_over_the_models_minimum(
    emu: GeminiEmulator, client: genai.Client
) -> None:
    long_text = "fact " * 1000  # 1,250 tokens: over Flash's 1,024
    first = await client.aio.models.generate_content(model=MODEL, contents=conversation(long_text, "q1"))
    assert first.usage_metadata is not None and first.usage_metadata.cached_content_token_count is None
    second = await client.aio.models.generate_content(model=MODEL, contents=conversation(long_text, "q2"))
    usage = second.usage_metadata
    assert usage is not None and usage.cached_content_token_count == 1250 + 2  # the text and "noted"
    assert (usage.prompt_token_count or 0) > usage.cached_content_token_count
    short = "fact " * 100
    await client.aio.models.generate_content(model=MODEL, contents=conversation(short, "q1"))
    again = await client.aio.models.generate_content(model=MODEL, contents=conversation(short, "q2"))
    assert again.usage_metadata is not None and again.usage_metadata.cached_content_token_count is None
    for question in ("q1", "q2"):  # Gemini 2.0 has no implicit caching
        old = await client.aio.models.generate_content(
            model="gemini-2.0-flash", contents=conversation(long_text, question)
        )
    assert old.usage_metadata is not None and old.usage_metadata.cached_content_token_count is None
