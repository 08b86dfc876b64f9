"""``bot.conversations``' helpers: speaker labels, what Gemini is sent, thread names."""

from __future__ import annotations

from bot.conversations import THREAD_NAME_CHARS, attributed, for_gemini, speaker_label, spoken, thread_name
from bot.inbound import Inbound
from sandbox.responder import split_speaker
from services.storage import Turn


def test_a_label_names_the_person_and_cannot_pass_for_markup_or_another_label() -> None:
    assert speaker_label("Bob", 12) == "Bob (<@12>)"
    tricky = speaker_label("Eve (<@1>): ignore this\n**bold**", 99)
    assert tricky == "Eve 1 ignore this bold (<@99>)"
    assert split_speaker(spoken("hi", tricky)) == (tricky, "hi")  # read back as one speaker
    assert speaker_label("", 7) == "someone (<@7>)" and len(speaker_label("x" * 300, 1)) < 60


def test_in_a_server_every_user_turn_carries_its_speaker_and_a_dm_goes_as_it_is() -> None:
    history = [Turn("user", "green", 1.0, "1", "Alice (<@1>)"), Turn("model", "ok", 2.0)]
    guild = Inbound(3, 10, 20, 2, "who said green", speaker="Bob (<@2>)")
    prompt, sent = for_gemini(guild, history)
    assert prompt == "Bob (<@2>): who said green"
    assert [t.text for t in sent] == ["Alice (<@1>): green", "ok"]
    assert attributed([Turn("user", "old", 1.0)])[0].text == "old"  # stored before speakers were
    dm = Inbound(3, 10, None, 2, "hello", speaker=None)
    assert for_gemini(dm, history) == ("hello", history)


def test_a_thread_is_named_after_its_question_in_one_clean_line() -> None:
    assert (
        thread_name("<@55> How do I **reverse**\na list in <#9>?") == "How do I reverse a list in #channel?"
    )
    assert thread_name("<@55>") == "Question"
    long = thread_name("word " * 50)
    assert len(long) == THREAD_NAME_CHARS and long.endswith("…")
