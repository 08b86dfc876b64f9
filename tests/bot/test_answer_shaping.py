"""How an answer is shaped for chat: long ones and big code blocks as files (``bot.long_answers``),
sources as one line of links (``bot.grounding``), history cut to a token budget (``bot.history``)."""

from __future__ import annotations

import pytest

from bot import grounding, long_answers, texts
from bot.history import LeftOutNotes, estimate_tokens, fit
from bot.long_answers import ANSWER_FILE, AnswerFile, AnswerFiles, Shaped, extension, extract_code, shape
from bot.splitting import split_message
from sandbox.responder import prose_and_code, words_of_length
from services.datastore import GUILD_TOOLS
from services.gemini import Source
from services.storage import Turn

# -- long answers ------------------------------------------------------------------------------


def test_an_answer_over_the_threshold_is_its_opening_plus_the_whole_as_answer_md() -> None:
    first = "Rivers shape the land. They carve valleys over millions of years."
    text = first + "\n\n" + words_of_length(20_000)
    shaped = shape(
        text, long_chars=6000, code_chars=1500, appendix="-# Sources: x", file_appendix="## Sources"
    )
    [answer] = shaped.files
    assert answer.name == ANSWER_FILE
    assert answer.text.startswith(text.rstrip()) and answer.text.rstrip().endswith("## Sources")
    assert shaped.text.startswith(first + "\n\n")
    assert "The whole answer (20,067 characters) is in the attached `answer.md`." in shaped.text
    assert shaped.text.endswith("\n\n-# Sources: x")
    assert len(shaped.text) < 500
    assert split_message(shaped.text) == [shaped.text]  # one chat message


def test_an_answer_at_the_threshold_stays_in_chat() -> None:
    text = words_of_length(6000)
    assert shape(text, long_chars=6000, code_chars=1500) == Shaped(text)


def test_a_long_opening_paragraph_is_cut_at_a_sentence_and_an_answer_opening_with_code_has_none() -> None:
    sentence = "This sentence is about forty characters. "
    para = sentence * 60  # 2,460 characters, no blank line
    cut = long_answers.opening(para)
    assert len(cut) <= long_answers.OPENING_CHARS and cut.endswith("characters.")
    assert long_answers.opening("```python\nx = 1\n```\nthen text") == ""
    shaped = shape("```python\n" + "x = 1\n" * 2000 + "```", long_chars=6000, code_chars=1500)
    assert shaped.text.startswith("\U0001f4ce The whole answer")
    no_sentence = long_answers.opening("word " * 400)
    assert no_sentence.endswith("\u2026") and len(no_sentence) <= long_answers.OPENING_CHARS + 1


def test_code_blocks_over_the_threshold_become_files_named_for_their_language() -> None:
    big_py = "\n".join(f"x_{i} = {i}" for i in range(200))
    small_js = "console.log(1);"
    big_rust = "\n".join(f"let v{i} = {i};" for i in range(200))
    text = (
        f"Intro.\n```python\n{big_py}\n```\nMiddle.\n```js\n{small_js}\n```\n"
        f"```rust\n{big_rust}\n```\n```\n{big_py}\n```\nEnd."
    )
    body, files = extract_code(text, 500)
    assert [f.name for f in files] == ["snippet-1.py", "snippet-2.rs", "snippet-3.txt"]
    assert files[0].text == big_py + "\n" and files[1].text == big_rust + "\n"
    assert "\U0001f4ce `snippet-1.py` (200 lines of python, attached)" in body
    assert "\U0001f4ce `snippet-3.txt` (200 lines, attached)" in body
    assert f"```js\n{small_js}\n```" in body  # a small block stays
    assert "x_150" not in body and body.startswith("Intro.") and body.endswith("End.")


def test_at_most_ten_code_files_and_an_unclosed_block_stays_as_it_was() -> None:
    block = "```python\n" + "y = 1\n" * 100 + "```"
    body, files = extract_code("\n".join([block] * 12), 100)
    assert len(files) == long_answers.MAX_FILES == 10
    assert body.count("```python") == 2
    unclosed = "text\n```python\n" + "z = 1\n" * 100
    assert extract_code(unclosed, 100) == (unclosed, ())


def test_extensions_for_common_languages() -> None:
    assert [extension(x) for x in ("Python", "ts", "c++", "bash", "yml", "", "brainfuck")] == [
        "py", "ts", "cpp", "sh", "yaml", "txt", "txt",
    ]


def test_the_prose_and_code_answer_keeps_its_blocks_inline_under_the_default_code_threshold() -> None:
    """The emulator's "reply with N characters of code" blocks are about 1,300 characters each."""
    body, files = extract_code(prose_and_code(3000), 1500)
    assert files == () and body == prose_and_code(3000)


def test_answer_files_survive_the_queue_payload_and_attach_to_the_last_chunk() -> None:
    shaped = Shaped("text", (AnswerFile("answer.md", "# all\n"), AnswerFile("snippet-1.py", "x = 1\n")))
    files = long_answers.attach(shaped, ["a", "b", "c"], first=2)
    assert files is not None and files.at == 4
    assert AnswerFiles.from_payload(files.payload()) == files
    uploads = files.uploads()
    assert list(uploads) == [4] and [u.filename for u in uploads[4]] == ["answer.md", "snippet-1.py"]
    assert uploads[4][0].data == b"# all\n"
    assert long_answers.attach(Shaped("text"), ["a"]) is None
    assert AnswerFiles.from_payload(None) is None and AnswerFiles.from_payload({"files": "x"}) is None


# -- sources -----------------------------------------------------------------------------------


def test_sources_are_one_line_of_links_and_only_the_first_may_show_a_preview() -> None:
    sources = [Source(f"site{n}.example", f"https://site{n}.example/page") for n in range(1, 8)]
    line = grounding.sources_line(sources)
    assert line.startswith("-# Sources: [site1.example](https://site1.example/page) \u00b7 ")
    assert "[site2.example](<https://site2.example/page>)" in line
    assert line.count("](") == grounding.MAX_SOURCES and "site6" not in line
    assert "\n" not in line
    assert grounding.sources_line([]) == ""


def test_source_titles_cannot_carry_markdown_links_or_mentions() -> None:
    nasty = Source("[click](https://evil) @everyone <@&1> **bold**\nnext", "https://ok.example/a")
    line = grounding.sources_line([nasty])
    assert line == "-# Sources: [click everyone &1 bold next](https://ok.example/a)"
    long_title = grounding.clean_title("t" * 200)
    assert len(long_title) == grounding.MAX_TITLE_CHARS and long_title.endswith("\u2026")


def test_sources_with_unusable_addresses_are_left_out() -> None:
    sources = [
        Source("long", "https://x.example/" + "a" * 600),
        Source("space", "https://x.example/a b"),
        Source("fine", "https://fine.example/"),
    ]
    assert grounding.sources_line(sources) == "-# Sources: [fine](https://fine.example/)"
    assert grounding.sources_markdown(sources[2:]) == "## Sources\n\n- [fine](https://fine.example/)"


def test_the_guild_tools_the_settings_accept_are_the_tools_gemini_gets() -> None:
    assert set(grounding.TOOL_NAMES) == GUILD_TOOLS == set(grounding.TOOL_LABELS)


# -- history in tokens -------------------------------------------------------------------------


def turns(*sizes: int) -> list[Turn]:
    return [Turn("user" if i % 2 == 0 else "model", "x" * size, float(i)) for i, size in enumerate(sizes)]


def test_history_is_cut_to_the_token_budget_newest_first_whole_turns_only() -> None:
    history = turns(400, 400, 400, 400)  # 100 tokens + 4 each
    kept, left_out = fit(history, 250)
    assert kept == history[2:] and left_out == 2
    assert fit(history, 10_000) == (history, 0)
    assert fit(history, 0) == ([], 4)
    assert fit([], 100) == ([], 0)
    assert estimate_tokens("abcd") == 1 and estimate_tokens("abcde") == 2 and estimate_tokens("") == 0


def test_the_left_out_note_is_said_once_per_conversation_and_the_memory_is_bounded() -> None:
    notes = LeftOutNotes(max_keys=2)
    assert notes.first_time("a") and not notes.first_time("a")
    assert notes.first_time("b") and notes.first_time("c")
    assert len(notes) == 2 and notes.first_time("a")  # "a" was forgotten: told once more
    assert "last 3 messages" in texts.history_left_out(3) and texts.history_left_out(3).startswith("-# ")


@pytest.mark.parametrize("kept", [0, 1])
def test_the_left_out_note_reads_well_with_few_messages_kept(kept: int) -> None:
    note = texts.history_left_out(kept)
    assert "last 0" not in note and "1 messages" not in note
