"""The invisible marks on answer chunks: read back exactly, never mistaken, invisible."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot import marks


@given(st.text(max_size=50), st.integers(0, 2**64 - 1), st.integers(0, 4095))
def test_a_mark_reads_back_as_its_question_and_chunk_and_strips_to_the_text(
    text: str, question: int, index: int
) -> None:
    marked = marks.mark(text, question, index)
    assert len(marked) == len(text) + marks.MARK_LENGTH
    assert marks.read(marked) == (question, index)
    assert marks.strip(marked) == text


@given(st.text(max_size=100))
def test_text_without_a_mark_reads_as_none(text: str) -> None:
    assert marks.read(text) is None or text.endswith("\u2063")
    if marks.read(text) is None:
        assert marks.strip(text) == text


def test_a_mark_is_invisible_format_characters_that_stripping_whitespace_keeps() -> None:
    marked = marks.mark("answer", 1579236306439897095, 2)
    tail = marked[len("answer"):]
    assert {unicodedata.category(c) for c in tail} == {"Cf"}
    assert marked.strip() == marked  # Discord trims whitespace; these are not whitespace
    assert marks.ROOM + marks.MARK_LENGTH == 2000


@pytest.mark.parametrize(("question", "index"), [(-1, 0), (2**64, 0), (1, -1), (1, 4096)])
def test_out_of_range_ids_and_indexes_are_refused(question: int, index: int) -> None:
    with pytest.raises(ValueError):
        marks.mark("x", question, index)
