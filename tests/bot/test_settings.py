"""``bot.settings``: resolving a server's settings from memory, and reading the values managers type."""

from __future__ import annotations

import timeit
from typing import Any

import pytest

from bot.settings import (
    DEFAULT,
    SERVER,
    SETTINGS,
    InvalidSettingError,
    SettingsCache,
    fallback_note,
    parse,
    recent,
)
from services.config import load_config
from services.datastore import validate_guild_settings
from services.gemini import GenerationOptions

GUILD, CATEGORY, CHANNEL, THREAD, OTHER = 10, 20, 30, 40, 50
CONFIG = load_config(
    environ={
        "BOT_PERSONA": "Default persona.",
        "GEMINI_MODEL": "gemini-2.5-flash",
        "GEMINI_FALLBACK_MODELS": "gemini-2.5-flash-lite",
        "GEMINI_ALLOWED_MODELS": "gemini-2.5-flash,gemini-2.5-flash-lite,gemini-2.5-pro",
        "GEMINI_MAX_OUTPUT_TOKENS": "4096",
        "HISTORY_MAX_MESSAGES": "30",
    },
    env_file=None,
)


def cache(guild: dict[str, Any]) -> SettingsCache:
    data = {"guilds": {str(GUILD): guild}}
    assert validate_guild_settings(data) == []  # only shapes the DataStore accepts
    settings = SettingsCache(CONFIG)
    settings.load(data)
    return settings


def test_each_setting_resolves_thread_then_channel_then_category_then_server_then_default() -> None:
    settings = cache(
        {
            "settings": {
                "server": {"persona": "Server.", "temperature": 0.1, "history": 5},
                "channels": {
                    str(CATEGORY): {"persona": "Category.", "temperature": 0.2},
                    str(CHANNEL): {"persona": "Channel."},
                    str(THREAD): {"persona": "Thread.", "model": "gemini-2.5-pro"},
                },
            }
        }
    )
    chain = (THREAD, CHANNEL, CATEGORY)
    effective = settings.effective(GUILD, chain)
    assert (effective.persona, effective.model, effective.temperature, effective.history) == (
        "Thread.",
        "gemini-2.5-pro",
        0.2,
        5,
    )
    assert settings.effective(GUILD, chain[1:]).persona == "Channel."
    assert settings.effective(GUILD, chain[2:]).persona == "Category."
    assert settings.effective(GUILD, (OTHER,)).persona == "Server."
    assert settings.effective(GUILD, ()).temperature == 0.1
    assert settings.effective(None, chain).persona == "Default persona."  # a DM: the bot's defaults
    assert settings.effective(999, chain).model == "gemini-2.5-flash"  # a guild that set nothing
    sources = {e.setting.name: e.source for e in settings.explain(GUILD, chain)}
    assert sources["persona"] == THREAD and sources["temperature"] == CATEGORY
    assert sources["history"] == SERVER and sources["safety"] == DEFAULT
    assert [e.setting.name for e in settings.explain(GUILD, chain)] == list(SETTINGS)


def test_the_effective_settings_make_the_gemini_request_options() -> None:
    settings = cache({"settings": {"server": {"safety": "block_only_high", "max_output_tokens": 512}}})
    assert settings.effective(GUILD).options() == GenerationOptions(
        model="gemini-2.5-flash", temperature=None, max_output_tokens=512, safety_threshold="block_only_high"
    )


def test_an_older_servers_persona_key_is_its_server_persona() -> None:
    assert cache({"persona": "Legacy."}).effective(GUILD).persona == "Legacy."
    both = cache({"persona": "Legacy.", "settings": {"server": {"persona": "New."}}})
    assert both.effective(GUILD).persona == "New."


def test_grounding_for_the_server_is_the_tools_search_switch_and_a_channel_may_override_it() -> None:
    settings = cache(
        {
            "tools": {"google_search": True, "code_execution": True},
            "settings": {"channels": {str(CHANNEL): {"grounding": False}}},
        }
    )
    assert settings.effective(GUILD).tools == ("google_search", "code_execution")
    assert settings.effective(GUILD, (CHANNEL,)).tools == ("code_execution",)
    off = cache({"settings": {"channels": {str(CHANNEL): {"grounding": True}}}})
    assert off.effective(GUILD).tools == () and off.effective(GUILD, (CHANNEL,)).tools == ("google_search",)


def test_a_stored_model_no_longer_allowed_falls_back_to_the_default_and_ceilings_hold() -> None:
    """The configuration may change under stored settings: they never exceed what it allows now."""
    settings = cache(
        {"settings": {"server": {"model": "gemini-1.0-pro", "max_output_tokens": 60000, "history": 500}}}
    )
    effective = settings.effective(GUILD)
    assert (effective.model, effective.max_output_tokens, effective.history) == ("gemini-2.5-flash", 4096, 30)


class _Channel:
    def __init__(self, id: int, category_id: int | None = None) -> None:
        self.id = id
        self.category_id = category_id


def test_chat_channels_count_for_their_category_and_cost_a_lookup_or_two() -> None:
    settings = cache({"chat_channels": [CATEGORY]})
    assert settings.is_chat(GUILD, _Channel(CHANNEL, CATEGORY))
    assert not settings.is_chat(GUILD, _Channel(OTHER))
    assert not settings.is_chat(999, _Channel(CHANNEL, CATEGORY))
    chat = _Channel(CHANNEL, CATEGORY)
    per_call = min(timeit.repeat(lambda: settings.is_chat(GUILD, chat), number=10_000, repeat=5)) / 10_000
    assert per_call < 5e-6  # the hot path's budget for a message not for the bot, with room to spare


@pytest.mark.parametrize(
    ("name", "text", "value"),
    [
        ("temperature", " 0.7 ", 0.7),
        ("model", "gemini-2.5-pro", "gemini-2.5-pro"),
        ("max_output_tokens", "1,024", 1024),
        ("safety", "medium", "block_medium_and_above"),
        ("safety", "OFF", "off"),
        ("history", "0", 0),
        ("grounding", "yes", True),
        ("auto_thread", "off", False),
        ("modlog_channel", "<#123456>", 123456),
        ("persona", "  Be brief.  ", "Be brief."),
    ],
)
def test_values_managers_type_are_read(name: str, text: str, value: Any) -> None:
    assert parse(name, text, SettingsCache(CONFIG).limits) == value


@pytest.mark.parametrize(
    ("name", "text", "sentence"),
    [
        ("temperature", "7", "a temperature of 7 is out of range: use a number from 0 to 2"),
        ("temperature", "warm", "'warm' is not a number: the temperature is a number from 0 to 2"),
        ("temperature", "nan", "a temperature of nan is out of range: use a number from 0 to 2"),
        (
            "model",
            "gpt-4",
            "I can't use the model 'gpt-4': this bot allows gemini-2.5-flash, "
            "gemini-2.5-flash-lite, gemini-2.5-pro",
        ),
        ("persona", "x" * 10_000, "a persona can be at most 4,000 characters long, and this one has 10,000"),
        ("persona", "   ", "a persona needs some text: it is the instruction Gemini follows"),
        (
            "max_output_tokens",
            "8",
            "the longest answer is a whole number of tokens from 16 to 4,096 (this "
            "bot's ceiling, GEMINI_MAX_OUTPUT_TOKENS), not 8",
        ),
        (
            "history",
            "31",
            "the history is a whole number of earlier messages from 0 to 30 (what this bot keeps, "
            "HISTORY_MAX_MESSAGES), not 31",
        ),
        ("grounding", "maybe", "'maybe' is neither on nor off: use on or off"),
        ("colour", "red", "there is no setting 'colour'; the settings are " + ", ".join(SETTINGS)),
    ],
)
def test_a_bad_value_is_refused_with_one_sentence_naming_the_limit(
    name: str, text: str, sentence: str
) -> None:
    with pytest.raises(InvalidSettingError) as info:
        parse(name, text, SettingsCache(CONFIG).limits)
    assert str(info.value) == sentence


def test_recent_keeps_the_newest_turns_and_the_fallback_note_names_the_model() -> None:
    assert recent([1, 2, 3, 4], 2) == [3, 4] and recent([1, 2], 5) == [1, 2] and recent([1, 2], 0) == []
    assert fallback_note("gemini-2.5-flash", "gemini-2.5-pro") == (
        "-# Answered by `gemini-2.5-flash`: `gemini-2.5-pro` is unavailable right now."
    )
    assert fallback_note("gemini-2.5-pro", "gemini-2.5-pro") == "" == fallback_note("x", None)


def test_the_datastore_refuses_settings_of_the_wrong_shape() -> None:
    problems = validate_guild_settings(
        {
            "guilds": {
                "1": {
                    "settings": {
                        "server": {"temperature": 7, "chat": True},
                        "channels": {"abc": {"modlog_channel": 5}, "2": {"persona": "p" * 4001}},
                    }
                }
            }
        }
    )
    assert problems == [
        "guild_settings.guilds['1'].settings.server: unknown setting 'chat'",
        "guild_settings.guilds['1'].settings.server.temperature: expected a number from 0 to 2, got 7",
        "guild_settings.guilds['1'].settings.channels['abc']: channel id must be a string of digits",
        "guild_settings.guilds['1'].settings.channels['abc']: unknown setting 'modlog_channel'",
        "guild_settings.guilds['1'].settings.channels['2'].persona: expected a string of 1 to 4000 "
        f"characters, got {'p' * 4001!r}"[:300],
    ]


def test_functions_are_read_as_names_and_levels_and_admin_needs_the_servers_own_choice() -> None:
    limits = SettingsCache(CONFIG).limits
    assert parse("functions", "read, react  create_thread", limits) == ["read", "react", "create_thread"]
    assert parse("functions", "off", SettingsCache(CONFIG).limits) == []
    with pytest.raises(InvalidSettingError, match="name the functions"):
        parse("functions", "Rm -rf", SettingsCache(CONFIG).limits)
    # Nothing set: the bot's default, which cannot grant admin tools (functions_by_guild False).
    default = load_config(environ={"TOOLS_DEFAULT": "read,admin"}, env_file=None)
    bare = SettingsCache(default)
    bare.load({"guilds": {str(GUILD): {}}})
    assert bare.effective(GUILD, (CHANNEL,)).functions == ("read", "admin")
    assert not bare.effective(GUILD, (CHANNEL,)).functions_by_guild
    stored = {"server": {"functions": ["read"]}, "channels": {str(CHANNEL): {"functions": ["admin"]}}}
    own = cache({"settings": stored})
    here = own.effective(GUILD, (CHANNEL,))
    assert here.functions == ("admin",) and here.functions_by_guild
    assert own.effective(GUILD, (OTHER,)).functions == ("read",)
