"""Message splitting: Discord's 2,000-character limit without broken fences or words."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.splitting import DISCORD_LIMIT, split_message


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


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"\s+", text) if w and not w.startswith(("```", "~~~"))]


def test_short_text_is_one_message() -> None:
    assert split_message("hello") == ["hello"]


def test_empty_text_is_no_message() -> None:
    assert split_message("\n\n") == []


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


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(alphabet="abc def\n", min_size=0, max_size=300),
            st.just("```py"),
            st.just("```"),
            st.just("~~~"),
        ),
        min_size=1,
        max_size=40,
    ),
    st.integers(min_value=60, max_value=400),
)
def test_property_every_chunk_fits_and_is_balanced(parts: list[str], limit: int) -> None:
    text = "\n".join(parts)
    chunks = split_message(text, limit=limit)
    for chunk in chunks:
        assert len(chunk) <= limit
    # Even an unterminated block in the input is closed in every chunk.
    assert all(_balanced(c) for c in chunks)
    assert _words("\n".join(chunks)) == _words(text)
