"""Message splitting: Discord's 2,000-character limit without broken fences or words."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.splitting import DISCORD_LIMIT, BlankMessageError, has_visible_text, split_message


def _balanced(chunk: str) -> bool:
    """True when the chunk ends outside any code block (CommonMark fence rules)."""
    open_marker = ""
    for line in chunk.split("\n"):
        m = re.match(r"^ {0,3}(`{3,}|~{3,})(.*)$", line)
        if not m:
            continue
        marker, info = m.group(1), m.group(2).strip()
        if not open_marker:
            open_marker = marker
        elif marker[0] == open_marker[0] and len(marker) >= len(open_marker) and not info:
            open_marker = ""
    return not open_marker


def _shows_something(text: str) -> bool:
    """The test's own oracle: a non-blank line that is not a fence's opening or closing line."""
    open_marker = ""
    for line in text.split("\n"):
        m = re.match(r"^ {0,3}(`{3,}|~{3,})(.*)$", line)
        if m:
            marker, info = m.group(1), m.group(2).strip()
            if not open_marker and not (marker[0] == "`" and "`" in info):
                open_marker = marker
                continue
            if open_marker and marker[0] == open_marker[0] and len(marker) >= len(open_marker) and not info:
                open_marker = ""
                continue
        if line.strip():
            return True
    return False


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"\s+", text) if w and not w.startswith(("```", "~~~"))]


def test_short_text_is_one_message() -> None:
    assert split_message("hello") == ["hello"]


@pytest.mark.parametrize(
    "text",
    ["", "\n\n", "   ", " \n\t\n ", "```python", "```", "```python\n```", "~~~\n\n~~~", "```py\n   \n```"],
)
def test_text_that_shows_nothing_is_refused_not_split_into_no_message_or_a_blank_one(text: str) -> None:
    """Discord rejects a blank message, and a bare fence (an answer of just "```python") shows
    nothing: both are an explicit BlankMessageError, never [] (which a caller would "send")."""
    assert not has_visible_text(text)
    with pytest.raises(BlankMessageError):
        split_message(text)


def test_an_empty_code_block_after_text_adds_no_chunk_of_its_own() -> None:
    """A chunk holding only fences or whitespace is dropped: every message shows something."""
    text = "w " * 40 + "\n" + " " * 59 + "\n```py\n```"
    chunks = split_message(text, limit=60)
    assert chunks and all(_shows_something(c) for c in chunks), chunks


def test_a_code_block_with_content_is_visible() -> None:
    assert has_visible_text("```python\nprint(1)\n```")
    assert has_visible_text("```x```")  # an inline code span, not a fence
    assert split_message("```python\nprint(1)") == ["```python\nprint(1)\n```"]


def test_six_thousand_characters_with_code_blocks_keep_fences_intact() -> None:
    prose = " ".join(["word"] * 300)
    code = "\n".join(f"print({i})  # line {i}" for i in range(150))
    text = f"{prose}\n```python\n{code}\n```\n{prose}\n```\n{code}\n```\n{prose}"
    assert len(text) > 6000
    chunks = split_message(text)
    assert len(chunks) >= 4
    for chunk in chunks:
        assert len(chunk) <= DISCORD_LIMIT
        assert _balanced(chunk), chunk[:80]
    # A chunk that starts inside a code block reopens it with its language.
    reopened = [c for c in chunks[1:] if c.startswith("```python")]
    assert reopened
    assert _words("\n".join(chunks)) == _words(text)


def test_words_are_not_broken_when_avoidable() -> None:
    text = " ".join(f"w{i:04d}" for i in range(1000))
    chunks = split_message(text, limit=500)
    for chunk in chunks:
        assert len(chunk) <= 500
        for word in chunk.split():
            assert re.fullmatch(r"w\d{4}", word)


def test_one_huge_word_is_cut_hard_rather_than_overflowing() -> None:
    chunks = split_message("x" * 4500)
    assert len(chunks) == 3
    assert all(len(c) <= DISCORD_LIMIT for c in chunks)
    assert "".join(chunks) == "x" * 4500


_PARTS = st.lists(
    st.one_of(
        st.text(alphabet="abc def\n", min_size=0, max_size=300),
        st.text(alphabet=" \t\n", min_size=0, max_size=80),  # blank lines and runs of spaces
        st.just("```py"),
        st.just("```"),
        st.just("~~~"),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(_PARTS, st.integers(min_value=60, max_value=400))
def test_property_every_chunk_fits_and_is_balanced(parts: list[str], limit: int) -> None:
    text = "\n".join(parts)
    if not _shows_something(text):
        return  # refused: the next property
    chunks = split_message(text, limit=limit)
    for chunk in chunks:
        assert len(chunk) <= limit
    # Even an unterminated block in the input is closed in every chunk.
    assert all(_balanced(c) for c in chunks)
    assert _words("\n".join(chunks)) == _words(text)


@settings(max_examples=300, deadline=None)
@given(_PARTS, st.integers(min_value=60, max_value=400))
def test_property_non_empty_input_gives_at_least_one_non_blank_chunk_or_an_explicit_refusal(
    parts: list[str], limit: int
) -> None:
    """Text that shows something comes out as one or more chunks, each showing something (so never
    blank); text that shows nothing (blanks, bare fences) raises BlankMessageError."""
    text = "\n".join(parts)
    if not _shows_something(text):
        with pytest.raises(BlankMessageError):
            split_message(text, limit=limit)
        return
    chunks = split_message(text, limit=limit)
    assert chunks
    for chunk in chunks:
        assert chunk.strip(), repr(chunk)
        assert _shows_something(chunk), repr(chunk)
