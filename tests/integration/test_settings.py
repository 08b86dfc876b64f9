"""Per-server settings and models: ``/settings`` and ``/model`` through real discord.py against the
Discord emulator, answers through real google-genai against the Gemini emulator.

The guild has a category ``Study`` holding the channel ``python`` (with a thread, ``python-thread``)
and the forum ``help``; ``general`` is in no category. ``manager`` has Manage Server, ``normal``
does not. The bot's models: ``gemini-2.5-flash`` (the default), ``gemini-2.5-flash-lite`` (the
fallback) and ``gemini-2.5-pro`` (allowed).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from bot import marks, texts
from bot.operations import InvalidRequestError
from sandbox.discord_emu import ChannelRef, InteractionRecord
from sandbox.discord_state import MANAGE_GUILD
from tests.integration.harness import running_emulators
from tests.integration.test_pipeline import Live, live_bot
from tests.integration.test_slash_commands import only_text, run

DEFAULT_PERSONA = "You are the bot-wide default persona."
MODELS = {
    # A model's breaker stays open for the test's span however slow the machine (the default test
    # setting is 1 s, after which the next question would be the half-open probe).
    "BREAKER_RESET_SECONDS": "60",
    "GEMINI_MODEL": "gemini-2.5-flash",
    "GEMINI_FALLBACK_MODELS": "gemini-2.5-flash-lite",
    "GEMINI_ALLOWED_MODELS": "gemini-2.5-flash,gemini-2.5-flash-lite,gemini-2.5-pro",
}


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[Live]:
    """The bot in a guild with a category, a forum and threads (see the module docstring)."""
    async with running_emulators(heartbeat_interval=1.0) as emus:
        world = emus.discord.world
        world.add_member("manager", "mia", roles=[world.add_role("Manager", MANAGE_GUILD)])
        study = world.add_category("Study")
        python = world.add_text_channel("python", category=study)
        world.channels["python-thread"] = world.add_thread(python, "python-thread", owner="normal")
        world.add_forum_channel("help", category=study)
        world.add_text_channel("log")
        async with live_bot(emus, tmp_path / "data", BOT_PERSONA=DEFAULT_PERSONA, **MODELS) as bot:
            bot.bot.install_commands()
            await bot.bot.tree.sync()
            yield bot


def where(live: Live, name: str) -> ChannelRef:
    return ChannelRef(live.discord.channels[name])


async def settings(live: Live, sub: str, user: str = "manager", **options: Any) -> InteractionRecord:
    """Run ``/settings <sub>`` (channel names become channel options) and wait for its reply."""
    resolved = {k: where(live, v) if k == "where" else v for k, v in options.items()}
    return await run(live, "settings", {sub: resolved}, user=user)


async def ask(live: Live, text: str, channel: str = "general", **kw: Any) -> str:
    """Mention the bot in ``channel`` and return its answer without the invisible mark."""
    cid = live.discord.channels[channel] if channel != "dm" else live.discord.dm_channel("normal")
    msg = await live.say(text, channel=cid, mention=channel != "dm", **kw)
    [answer] = await live.wait_replies(msg["id"], channel=cid)
    return marks.strip(answer.content)


def generate_bodies(live: Live) -> list[dict[str, Any]]:
    return [r.body for r in live.gemini.requests if r.action == "generateContent"]


async def test_settings_resolve_thread_then_channel_then_category_then_server_then_default(
    live: Live,
) -> None:
    """Each level wins over the ones outside it; the persona reaches Gemini's system instruction
    (the emulator's "who are you" quotes it); ``/settings show`` names where each value is set."""
    assert (
        await ask(live, "who are you", "python-thread")
        == f"I follow my system instruction: «{DEFAULT_PERSONA}»"
    )

    await settings(live, "set", setting="persona", value="You are Server Bot.")
    assert (
        await ask(live, "who are you", "python-thread")
        == "I follow my system instruction: «You are Server Bot.»"
    )
    await settings(live, "set", setting="persona", value="You are Study Bot.", where="Study")
    assert (
        await ask(live, "who are you", "python-thread")
        == "I follow my system instruction: «You are Study Bot.»"
    )
    await settings(live, "set", setting="persona", value="You are Python Bot.", where="python")
    assert (
        await ask(live, "who are you", "python-thread")
        == "I follow my system instruction: «You are Python Bot.»"
    )
    done = await settings(live, "set", setting="persona", value="You are Thread Bot.", where="python-thread")
    thread = live.discord.channels["python-thread"]
    assert only_text(done) == f"Persona is now “You are Thread Bot.” (19 characters) in <#{thread}>."
    assert (
        await ask(live, "who are you", "python-thread")
        == "I follow my system instruction: «You are Thread Bot.»"
    )
    # Elsewhere the outer levels still apply: the channel, the category's forum, the server, a DM.
    assert await ask(live, "who are you", "python") == "I follow my system instruction: «You are Python Bot.»"
    assert (
        await ask(live, "who are you", "general") == "I follow my system instruction: «You are Server Bot.»"
    )
    assert await ask(live, "who are you", "dm") == f"I follow my system instruction: «{DEFAULT_PERSONA}»"
    post = await live.discord.create_forum_post(
        live.discord.channels["help"], title="Loops", content="who are you", mentions_bot=True
    )
    [answer] = await live.wait_replies(post["id"], channel=int(post["channel_id"]))
    assert marks.strip(answer.content) == "I follow my system instruction: «You are Study Bot.»"

    await settings(live, "set", setting="temperature", value="0.3", where="python")
    shown = only_text(await settings(live, "show", where="python-thread"))
    thread, python, study = (live.discord.channels[n] for n in ("python-thread", "python", "Study"))
    assert shown.startswith(f"Settings that apply in <#{thread}>")
    assert f"- **Persona**: “You are Thread Bot.” (19 characters) (set in <#{thread}>)" in shown
    assert f"- **Temperature**: 0.3 (set in <#{python}>)" in shown
    assert "- **Model**: `gemini-2.5-flash` (the bot's default)" in shown
    await settings(live, "reset", setting="persona", where="python-thread")
    await settings(live, "reset", setting="persona", where="python")
    shown = only_text(await settings(live, "show", where="python-thread"))
    assert f"- **Persona**: “You are Study Bot.” (18 characters) (set in <#{study}>)" in shown
    await settings(live, "reset", setting="persona", where="Study")
    assert "- **Persona**: “You are Server Bot.” (19 characters) (set for this server)" in only_text(
        await settings(live, "show", where="python-thread")
    )
    # The temperature set for python reached Gemini with its question (and only there).
    await ask(live, "hello again", "python-thread")
    assert generate_bodies(live)[-1]["generationConfig"]["temperature"] == 0.3
    await ask(live, "hello again", "general")
    assert "temperature" not in generate_bodies(live)[-1].get("generationConfig", {})


async def test_settings_are_saved_in_the_datastore_file_with_its_backups(live: Live, tmp_path: Path) -> None:
    """Saved in guild_settings (validated, with its timestamped backups), as a restarted bot reads it."""
    await settings(live, "set", setting="persona", value="You are Kept Bot.", where="python")
    await settings(live, "set", setting="max_output_tokens", value="512")
    stored = json.loads((tmp_path / "data" / "guild_settings.json").read_text())
    entry = stored["guilds"][str(live.discord.guild_id)]["settings"]
    assert entry == {
        "server": {"max_output_tokens": 512},
        "channels": {str(live.discord.channels["python"]): {"persona": "You are Kept Bot."}},
    }
    assert list((tmp_path / "data" / "backups").glob("guild_settings*"))


@pytest.mark.parametrize(
    ("setting", "value", "sentence"),
    [
        ("temperature", "7", "A temperature of 7 is out of range: use a number from 0 to 2."),
        (
            "model",
            "gemini-9-ultra",
            "I can't use the model 'gemini-9-ultra': this bot allows gemini-2.5-flash, "
            "gemini-2.5-flash-lite, gemini-2.5-pro.",
        ),
        ("persona", "x" * 5000, "A persona can be at most 4,000 characters long, and this one has 5,000."),
        (
            "max_output_tokens",
            "100000",
            "The longest answer is a whole number of tokens from 16 to 2,048 (this "
            "bot's ceiling, GEMINI_MAX_OUTPUT_TOKENS), not 100000.",
        ),
        (
            "safety",
            "strict",
            "'strict' is not a safety threshold: use one of off, block_none, block_only_high, "
            "block_medium_and_above, block_low_and_above.",
        ),
        ("chat", "on", "Chat is set per channel, forum, category or thread: name the place it applies to."),
    ],
)
async def test_a_bad_setting_value_is_refused_with_one_sentence_naming_the_limit(
    live: Live, tmp_path: Path, setting: str, value: str, sentence: str
) -> None:
    before = (tmp_path / "data" / "guild_settings.json").read_bytes()
    record = await settings(live, "set", setting=setting, value=value)
    [refusal] = record.followups
    assert refusal.ephemeral and refusal.content == sentence
    assert (tmp_path / "data" / "guild_settings.json").read_bytes() == before  # nothing saved


async def test_a_ten_thousand_character_persona_is_refused_by_the_operation_too(live: Live) -> None:
    """What the slash command refuses, the operation behind it (and the HTTP API) refuses the same way."""
    with pytest.raises(InvalidRequestError, match="at most 4,000 characters long, and this one has 10,000"):
        await live.bot.operations.guild_setting_set(live.discord.guild_id, "persona", "y" * 10_000)


async def test_a_member_without_manage_server_is_refused_in_one_private_sentence(live: Live) -> None:
    refused = await settings(live, "set", user="normal", setting="temperature", value="1")
    [sentence] = refused.followups
    assert sentence.ephemeral and sentence.content == texts.managers_only("settings")
    modal = await live.discord.send_interaction("settings", {"persona": {}}, user="normal")
    await live.discord.wait_until(lambda: modal.callback_type is not None)
    assert modal.callback_type == 4 and modal.modal is None and modal.ephemeral  # a sentence, no form
    assert only_text(modal) == texts.managers_only("settings")
    picked = await run(live, "model", {"model": "gemini-2.5-pro"}, user="normal")
    assert only_text(picked) == texts.managers_only("model")
    assert live.app.effective(live.discord.guild_id, ()).model == "gemini-2.5-flash"


async def test_the_persona_modal_saves_a_long_persona_that_reaches_gemini(live: Live) -> None:
    persona = "You are Ada, a patient Python tutor. " * 50  # 1,850 characters: too long for a chat line
    opened = await live.discord.send_interaction(
        "settings", {"persona": {"where": where(live, "python")}}, user="manager"
    )
    await live.discord.wait_until(lambda: opened.modal is not None)
    [field] = [c for row in opened.modal["components"] for c in row.get("components", [row.get("component")])]
    assert field["max_length"] == 4000 and field["style"] == 2  # a paragraph input
    submitted = await live.discord.submit_modal(opened, {field["custom_id"]: persona})
    await live.discord.wait_until(lambda: bool(submitted.followups))
    assert submitted.followups[0].ephemeral
    assert submitted.followups[0].content.startswith("Persona is now “You are Ada, a patient Python tutor.")
    answer = await ask(live, "who are you", "python")
    assert answer == f"I follow my system instruction: «{persona.strip()}»"
    assert generate_bodies(live)[-1]["systemInstruction"]["parts"][0]["text"] == persona.strip()
    # Opened again, the form holds the persona set there.
    again = await live.discord.send_interaction(
        "settings", {"persona": {"where": where(live, "python")}}, user="manager"
    )
    await live.discord.wait_until(lambda: again.modal is not None)
    [field] = [c for row in again.modal["components"] for c in row.get("components", [row.get("component")])]
    assert field["value"] == persona.strip()


async def test_model_autocomplete_lists_the_allowed_models(live: Live) -> None:
    typing = await live.discord.send_interaction("model", {"model": "pro"}, user="manager", focused="model")
    await live.discord.wait_until(lambda: typing.choices is not None)
    assert typing.choices == [{"name": "gemini-2.5-pro", "value": "gemini-2.5-pro"}]
    everything = await live.discord.send_interaction("model", {"model": ""}, user="normal", focused="model")
    await live.discord.wait_until(lambda: everything.choices is not None)
    assert [c["value"] for c in everything.choices or []] == [
        "gemini-2.5-flash",
        "gemini-2.5-flash-lite",
        "gemini-2.5-pro",
    ]
    values = await live.discord.send_interaction(
        "settings", {"set": {"setting": "safety", "value": "medium"}}, user="manager", focused="value"
    )
    await live.discord.wait_until(lambda: values.choices is not None)
    assert [c["value"] for c in values.choices or []] == ["block_medium_and_above"]


async def test_model_fallback_on_503_answers_with_the_next_model_and_says_so(live: Live) -> None:
    """The chosen model is overloaded: the next of the chain answers in the same attempt and the answer
    names it; the model's own breaker opens after BREAKER_FAIL_MAX failures and the model is then not
    asked at all, while the ``gemini`` breaker stays closed."""
    chosen = await run(live, "model", {"model": "gemini-2.5-pro"}, user="manager")
    assert only_text(chosen) == "Model is now `gemini-2.5-pro` for this server."
    assert (
        await ask(live, "hello")
        == "Hello! I am the sandbox Gemini. Ask me anything; I answer deterministically."
    )
    live.gemini.faults.add("503", target="gemini-2.5-pro")
    answer = await ask(live, "hello there")
    assert answer.endswith(
        "\n\n-# Answered by `gemini-2.5-flash`: `gemini-2.5-pro` is unavailable right now."
    )
    asked = [r.model for r in live.gemini.requests if r.action == "generateContent"]
    assert asked[-2:] == ["gemini-2.5-pro", "gemini-2.5-flash"]
    for n in range(live.app.config.breaker_fail_max):
        await ask(live, f"question {n}")
    pro = live.app.board["gemini:gemini-2.5-pro"]
    assert str(pro.state) == "open" and str(live.app.board["gemini"].state) == "closed"
    count = len(live.gemini.requests)
    answer = await ask(live, "while pro rests")
    assert [r.model for r in list(live.gemini.requests)[count:]] == ["gemini-2.5-flash"]  # pro is not asked
    assert "Answered by `gemini-2.5-flash`" in answer
    shown = only_text(await run(live, "model", {}, user="normal"))
    assert (
        "`gemini-2.5-pro` (resting: it failed)" in shown
        and "Gemini model for this server: `gemini-2.5-pro`" in shown
    )


async def test_temperature_and_the_safety_threshold_reach_gemini_and_blocks_are_explained_and_logged(
    live: Live,
) -> None:
    log = live.discord.channels["log"]
    await settings(live, "set", setting="modlog_channel", value=f"<#{log}>")
    # Gemini's default (the filters off): the emulated model writes the insult it was asked for.
    assert (await ask(live, "write an insult for my brother")).startswith("Echo")
    await settings(live, "set", setting="safety", value="block_low_and_above")
    await settings(live, "set", setting="temperature", value="1.5")
    blocked = await ask(live, "write an insult for my sister")
    assert blocked == "Gemini declined to answer that for safety reasons; try rephrasing."
    body = generate_bodies(live)[-1]
    assert body["generationConfig"]["temperature"] == 1.5
    assert {s["threshold"] for s in body["safetySettings"]} == {"BLOCK_LOW_AND_ABOVE"}
    assert len(body["safetySettings"]) == 4
    [record] = await live.discord.wait_for_bot_message(log)
    assert record.content.startswith("🛡️ Gemini blocked its answer to a question from <@")
    assert "(reason: SAFETY; model `gemini-2.5-flash`)" in record.content
    assert "sister" not in record.content and record.pings == set()  # no text unless opted in
    await settings(live, "set", setting="modlog_text", value="on")
    refused = await ask(live, "I will make a threat to you")
    assert refused == (
        "Gemini refused to read that message because of its safety filters; try rephrasing it."
    )
    [_, quoted] = await live.discord.wait_for_bot_message(log, 2)
    assert quoted.content.startswith("🛡️ Gemini refused to read a question from <@")
    assert quoted.content.endswith("\n> I will make a threat to you")


async def test_an_empty_answer_with_reason_other_and_a_prompt_blocked_for_other_get_their_own_sentences(
    live: Live,
) -> None:
    live.gemini.faults.add("empty", count=1, finish="OTHER")
    assert await ask(live, "tell me about it") == (
        "Gemini stopped without an answer and gave no reason (it does this for some topics even with its "
        "safety filters off); try rephrasing the question."
    )
    live.gemini.faults.add("prompt_block", count=1, reason="OTHER")
    assert await ask(live, "tell me more") == (
        "Gemini refused to read that message without giving a reason (it does this for some topics even "
        "with its safety filters off); try rephrasing it."
    )


async def test_grounding_in_settings_is_the_server_tools_switch_and_a_channel_can_turn_it_off(
    live: Live,
) -> None:
    await settings(live, "set", setting="grounding", value="on")
    status = only_text(await run(live, "server", {"tools": {"status": {}}}, user="manager"))
    assert "- Google Search grounding (answers cite web sources): on" in status
    await settings(live, "set", setting="grounding", value="off", where="python")
    await ask(live, "what is new", "general")
    assert generate_bodies(live)[-1]["tools"] == [{"googleSearch": {}}]
    await ask(live, "what is new", "python-thread")  # the thread inherits its channel's "off"
    assert "tools" not in generate_bodies(live)[-1]
    await run(live, "server", {"tools": {"off": {"tool": "google_search"}}}, user="manager")
    shown = only_text(await settings(live, "show", where="general"))
    assert "- **Search grounding**: off (the bot's default)" in shown


async def test_history_length_and_longest_answer_apply_and_streaming_is_kept_for_the_streaming_answers(
    live: Live,
) -> None:
    await settings(live, "set", setting="history", value="2", where="python")
    await settings(live, "set", setting="max_output_tokens", value="512", where="python")
    await settings(live, "set", setting="streaming", value="off", where="Study")
    for n in range(3):
        await ask(live, f"remember {n}", "python")
    assert "saw 2 earlier turns" in await ask(live, "what now", "python")  # the last exchange only
    assert generate_bodies(live)[-1]["generationConfig"]["maxOutputTokens"] == 512
    for n in range(2):
        await ask(live, f"remember {n}", "general")
    assert "saw 4 earlier turns" in await ask(live, "what now", "general")  # elsewhere: all of it
    assert generate_bodies(live)[-1]["generationConfig"]["maxOutputTokens"] == 2048
    python = live.discord.channels["python"]
    study = live.discord.channels["Study"]
    assert live.app.effective(live.discord.guild_id, (python, study)).streaming is False
    assert live.app.effective(live.discord.guild_id, (live.general,)).streaming is None  # the bot's default
    shown = only_text(await settings(live, "show", where="python"))
    assert f"- **Streaming**: off (set in <#{study}>)" in shown and "- **History**: 2 messages" in shown


async def test_in_a_dm_model_shows_the_default_and_choosing_one_is_refused(live: Live) -> None:
    dm = live.discord.dm_channel("manager")
    shown = only_text(await run(live, "model", {}, user="manager", channel_id=dm))
    assert shown.startswith("Gemini model here: `gemini-2.5-flash`.")
    refused = await run(live, "model", {"model": "gemini-2.5-pro"}, user="manager", channel_id=dm)
    assert only_text(refused) == texts.server_only("model")


async def test_the_servers_streaming_setting_decides_whether_an_answer_streams(live: Live) -> None:
    """The bot's default here is STREAMING=false (the harness); a server may turn it on for a category."""
    await settings(live, "set", setting="streaming", value="on", where="Study")
    await ask(live, "hello there", "python")  # in the category: streamed
    await ask(live, "hello there", "general")  # elsewhere: the bot's default, sent whole
    generations = {"generateContent", "streamGenerateContent"}
    actions = [r.action for r in live.gemini.requests if r.action in generations]
    assert actions == ["streamGenerateContent", "generateContent"]
