"""GeminiService with the tools Google runs, and Gemini's usage_metadata, against the real SDK and the
emulator: the request carries each tool as a Tool of its own, a grounded answer carries its sources,
code execution shows as fenced code and output, and every token kind reaches the Reply and metrics."""

from __future__ import annotations

import pytest
from google.genai import types

from sandbox.gemini import GeminiEmulator
from services.gemini import TOOLS, Source, answer_text, grounding_sources, to_reply, tool_config
from services.metrics import Metrics
from services.storage import Turn
from tests.services.test_gemini_service import MODEL, Harness

SOURCES = [
    Source("example.com", "https://example.com/search/who-won-the-euro-2024/1"),
    Source("example.org", "https://example.org/search/who-won-the-euro-2024/2"),
    Source("example.net", "https://example.net/search/who-won-the-euro-2024/3"),
]


def test_each_tool_is_a_tool_of_its_own_in_a_fixed_order_and_unknown_ones_are_refused() -> None:
    assert tool_config(["code_execution", "google_search"]) == [{"google_search": {}}, {"code_execution": {}}]
    assert tool_config([]) == []
    assert set(TOOLS) == {"google_search", "url_context", "code_execution"}
    with pytest.raises(ValueError, match="unknown tools"):
        tool_config(["web_browser"])


async def test_a_grounded_answer_carries_its_sources_and_no_tools_means_none_are_asked(
    emu: GeminiEmulator, harness: Harness
) -> None:
    service = await harness.service()
    reply = await service.generate("who won the euro 2024", tools=["google_search", "url_context"])
    assert emu.requests[-1].body["tools"] == [{"googleSearch": {}}, {"urlContext": {}}]
    assert reply.ok and list(reply.sources) == SOURCES
    plain = await service.generate("who won the euro 2024")
    assert "tools" not in emu.requests[-1].body and plain.sources == ()


async def test_pages_the_url_context_tool_read_are_sources_too(
    emu: GeminiEmulator, harness: Harness
) -> None:
    service = await harness.service()
    reply = await service.generate(
        "no search, but read https://docs.example/a and https://unreachable.example/b", tools=["url_context"]
    )
    assert reply.sources == (Source("docs.example", "https://docs.example/a"),)  # the unreachable one is not


async def test_code_execution_shows_the_code_and_its_output_as_fenced_blocks(
    emu: GeminiEmulator, harness: Harness
) -> None:
    service = await harness.service()
    reply = await service.generate("calculate the sum of 1 to 10", tools=["code_execution"])
    assert reply.text == (
        "I'll calculate that with code.\n"
        "```python\ntotal = sum(range(1, 10 + 1))\nprint(total)\n```\n"
        "Output:\n```\n55\n```\n"
        "The sum of 1 to 10 is 55."
    )
    failed = await service.generate("calculate this and fail", tools=["code_execution"])
    assert "The code failed (OUTCOME_FAILED):\n```\nTraceback" in failed.text


def candidate(*parts: types.Part, **fields: object) -> types.Candidate:
    return types.Candidate(content=types.Content(role="model", parts=list(parts)), **fields)  # type: ignore[arg-type]


def test_answer_text_is_response_text_without_tools_and_fences_code_that_holds_fences() -> None:
    plain = candidate(
        types.Part(text="Hello "), types.Part(text="thought", thought=True), types.Part(text="you")
    )
    response = types.GenerateContentResponse(candidates=[plain])
    assert answer_text(plain) == response.text == "Hello you"
    tricky = candidate(
        types.Part(text="See:"),
        types.Part(executable_code=types.ExecutableCode(code='print("```")', language=types.Language.PYTHON)),
        types.Part(code_execution_result=types.CodeExecutionResult(outcome=types.Outcome.OUTCOME_OK)),
    )
    assert answer_text(tricky) == 'See:\n````python\nprint("```")\n````\nOutput:\n```\n(no output)\n```\n'
    assert answer_text(types.Candidate()) is None


def test_grounding_sources_are_deduplicated_web_only_and_fall_back_to_the_host_for_a_title() -> None:
    web = types.GroundingChunk
    metadata = types.GroundingMetadata(grounding_chunks=[
        web(web=types.GroundingChunkWeb(uri="https://a.example/1", title="a.example")),
        web(web=types.GroundingChunkWeb(uri="https://a.example/1", title="again")),
        web(web=types.GroundingChunkWeb(uri="javascript:alert(1)", title="evil")),
        web(web=types.GroundingChunkWeb(uri="https://b.example/2")),
        web(),
    ])
    status = types.UrlRetrievalStatus
    ok, paywall = status.URL_RETRIEVAL_STATUS_SUCCESS, status.URL_RETRIEVAL_STATUS_PAYWALL
    context = types.UrlContextMetadata(url_metadata=[
        types.UrlMetadata(retrieved_url="https://c.example/", url_retrieval_status=ok),
        types.UrlMetadata(retrieved_url="https://d.example/", url_retrieval_status=paywall),
    ])
    answered = candidate(types.Part(text="x"), grounding_metadata=metadata, url_context_metadata=context)
    found = grounding_sources(answered)
    assert found == (
        Source("a.example", "https://a.example/1"),
        Source("b.example", "https://b.example/2"),
        Source("c.example", "https://c.example/"),
    )


async def test_every_token_kind_reaches_the_reply_and_the_metrics_by_model(
    emu: GeminiEmulator, harness: Harness
) -> None:
    metrics = Metrics(process_metrics=False)
    service = await harness.service(metrics=metrics)
    history = [Turn("user", "fact " * 1000, 1.0), Turn("model", "noted", 2.0)]
    first = await service.generate("think step by step: q1", history)
    second = await service.generate("think step by step: q2", history)
    assert first.thought_tokens == second.thought_tokens == 64
    assert first.cached_tokens == 0 and second.cached_tokens > 1000  # the persona and the long turn

    def sample(kind: str) -> float | None:
        return metrics.registry.get_sample_value("bot_gemini_tokens_total", {"kind": kind, "model": MODEL})

    assert sample("prompt") == first.prompt_tokens + second.prompt_tokens
    assert sample("output") == first.completion_tokens + second.completion_tokens
    assert sample("thought") == 128 and sample("cached") == second.cached_tokens


def test_a_refusal_still_carries_what_the_prompt_cost() -> None:
    blocked = types.GenerateContentResponse(
        prompt_feedback=types.GenerateContentResponsePromptFeedback(block_reason=types.BlockedReason.SAFETY),
        usage_metadata=types.GenerateContentResponseUsageMetadata(
            prompt_token_count=40, thoughts_token_count=3, cached_content_token_count=8
        ),
    )
    reply = to_reply(blocked, MODEL)
    assert not reply.ok and (reply.prompt_tokens, reply.thought_tokens, reply.cached_tokens) == (40, 3, 8)
