"""The answer cache and the offline answers: keys, bounds, TTL on a FakeClock; the memory block's budget."""

from __future__ import annotations

from bot.answer_cache import AnswerCache, context_key, question_key
from bot.history import estimate_tokens
from bot.memory import render
from resilience.clock import FakeClock
from services.gemini import GenerationOptions, Reply, ReplyKind
from services.memory_store import Memory
from services.storage import Turn

OPTIONS = GenerationOptions(model="gemini-2.5-flash")


def reply(text: str) -> Reply:
    return Reply(ReplyKind.ANSWER, text, "gemini-2.5-flash", prompt_tokens=10, completion_tokens=5)


def key(prompt: str = "hi", history: list[Turn] | None = None, persona: str = "p") -> str:
    return context_key(prompt=prompt, history=history or [], persona=persona, tools=(), options=OPTIONS)


def test_the_key_changes_with_any_part_of_the_context() -> None:
    base = key()
    assert base == key()
    assert base != key(prompt="hi!")
    assert base != key(persona="q")
    assert base != key(history=[Turn("user", "earlier", 1.0)])
    assert base != context_key(
        prompt="hi", history=[], persona="p", tools=("google_search",), options=OPTIONS
    )
    assert base != context_key(
        prompt="hi", history=[], persona="p", tools=(), options=GenerationOptions(model="gemini-2.5-pro")
    )


def test_a_hit_costs_no_tokens_and_entries_expire_after_the_ttl(fake_clock: FakeClock) -> None:
    cache = AnswerCache(max_entries=100, ttl=60, clock=fake_clock)
    cache.put(1, key(), reply("answer"))
    hit = cache.get(1, key())
    assert hit is not None and hit.text == "answer" and hit.prompt_tokens == hit.completion_tokens == 0
    assert cache.get(2, key()) is None  # another guild's
    fake_clock.advance(61)
    assert cache.get(1, key()) is None
    assert cache.status()["hits"] == 1 and cache.status()["misses"] == 2


def test_refusals_are_never_cached(fake_clock: FakeClock) -> None:
    cache = AnswerCache(max_entries=100, ttl=60, clock=fake_clock)
    cache.put(1, key(), Reply(ReplyKind.SAFETY_BLOCKED, "", "m", user_message="no"))
    assert cache.get(1, key()) is None


def test_the_cache_is_bounded_in_all_and_per_guild(fake_clock: FakeClock) -> None:
    cache = AnswerCache(max_entries=100, ttl=600, clock=fake_clock)
    for n in range(15):
        cache.put(1, key(str(n)), reply(str(n)))  # one guild: at most a tenth (10)
    assert cache.status()["answers"] == 10
    assert cache.get(1, key("0")) is None and cache.get(1, key("14")) is not None
    for guild in range(2, 40):
        for n in range(5):
            cache.put(guild, key(str(n)), reply(str(n)))
    assert cache.status()["answers"] == 100  # the least recently used went


def test_offline_answers_match_the_same_question_whatever_its_case_and_end(fake_clock: FakeClock) -> None:
    cache = AnswerCache(max_entries=100, ttl=60, clock=fake_clock)
    cache.put_offline(1, "Pick a number", reply("I pick 7."))
    fake_clock.advance(3600)  # older than the answer cache's TTL: still offered, dated
    found = cache.offline(1, "  pick A number?! ")
    assert (
        found is not None and found.reply.text == "I pick 7." and found.stored_at == fake_clock.time() - 3600
    )
    assert cache.offline(1, "pick a numbers") is None and cache.offline(2, "Pick a number") is None
    assert question_key("What's   UP?") == "what's up"


def memory(n: int, text: str, said_at: float) -> Memory:
    return Memory(n, "user", 1, 1, None, text, "", said_at, score=1.0 - n / 100)


def test_the_memory_block_keeps_the_best_memories_within_its_token_budget_oldest_first() -> None:
    best = [memory(1, "a" * 200, 3.0), memory(2, "b" * 200, 1.0), memory(3, "c" * 200, 2.0)]
    block = render(best, max_tokens=150)  # the header and two lines of ~60 tokens
    assert block.startswith("<memory>\n") and block.endswith("</memory>\n\n")
    assert "a" * 200 in block and "b" * 200 in block and "c" * 200 not in block
    assert block.index("b" * 200) < block.index("a" * 200)  # shown in the order they were said
    assert estimate_tokens(block) <= 150
    assert render(best, max_tokens=20) == ""
