"""The Gemini emulator reads what a request sets: safety thresholds (blocking the question or the answer
as the real filters would), the temperature's range, and speaker labels of a shared conversation."""

from __future__ import annotations

from typing import Any

import pytest

from sandbox import responder
from sandbox.gemini import generation_problem, safety_block


def body(prompt: str, threshold: str | None = None, **config: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
    if threshold is not None:
        request["safetySettings"] = [
            {"category": c, "threshold": threshold}
            for c in ("HARM_CATEGORY_HARASSMENT", "HARM_CATEGORY_DANGEROUS_CONTENT")
        ]
    if config:
        request["generationConfig"] = config
    return request


@pytest.mark.parametrize(
    ("prompt", "threshold", "blocked"),
    [
        ("write an insult", None, None),  # the adjustable filters are off by default
        ("write an insult", "BLOCK_ONLY_HIGH", None),  # rated MEDIUM: let through
        ("write an insult", "BLOCK_MEDIUM_AND_ABOVE", "answer"),
        ("write an insult", "OFF", None),
        ("this is a threat", "BLOCK_ONLY_HIGH", "prompt"),  # rated HIGH: the question itself
        ("this is a threat", "BLOCK_NONE", None),
        ("a kind word", "BLOCK_LOW_AND_ABOVE", None),
    ],
)
def test_a_threshold_blocks_what_is_rated_at_or_above_it(
    prompt: str, threshold: str | None, blocked: str | None
) -> None:
    found = safety_block(body(prompt, threshold))
    assert (found[0] if found else None) == blocked
    if found:
        assert any(r.get("blocked") for r in found[1])


def test_a_temperature_outside_0_to_2_and_an_unknown_threshold_are_refused() -> None:
    assert generation_problem(body("hi", temperature=2.0)) is None
    assert "temperature must be in the range [0.0, 2.0], got 7" in str(
        generation_problem(body("hi", temperature=7))
    )
    assert generation_problem(body("hi", "BLOCK_SOME")) == "Invalid value at 'safety_settings[0].threshold'"


def test_speaker_labels_are_read_as_who_speaks_not_as_the_question() -> None:
    conversation = {
        "contents": [
            {"role": "user", "parts": [{"text": "Alice (<@1>): my pet is a cat"}]},
            {"role": "model", "parts": [{"text": "Nice."}]},
            {"role": "user", "parts": [{"text": "Bob (<@2>): hello"}]},
        ]
    }
    assert responder.reply(conversation) == responder.CANNED["hello"]
    conversation["contents"][-1]["parts"] = [{"text": "Bob (<@2>): who said cat"}]
    assert responder.reply(conversation) == "Alice (<@1>) said «my pet is a cat»."
    conversation["contents"][-1]["parts"] = [{"text": "Bob (<@2>): who am I?"}]
    assert responder.reply(conversation) == "You are Bob (<@2>)."
    assert responder.split_speaker("Note: (<@2>) not a label") == (None, "Note: (<@2>) not a label")
