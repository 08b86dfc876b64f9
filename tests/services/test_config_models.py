"""The settings of a server's choices: the models it may pick, the default temperature and safety filter."""

from __future__ import annotations

import pytest

from services.config import ConfigError, load_config


def test_the_allowed_models_start_with_the_default_chain() -> None:
    config = load_config(
        environ={
            "GEMINI_MODEL": "gemini-2.5-flash",
            "GEMINI_FALLBACK_MODELS": "gemini-2.5-flash-lite",
            "GEMINI_ALLOWED_MODELS": "gemini-2.5-pro,gemini-2.5-flash,gemini-2.5-flash-lite",
            "GEMINI_TEMPERATURE": "0.7",
            "GEMINI_SAFETY_THRESHOLD": "BLOCK_ONLY_HIGH",
        },
        env_file=None,
    )
    assert config.allowed_models() == ("gemini-2.5-flash", "gemini-2.5-flash-lite", "gemini-2.5-pro")
    assert (config.gemini_temperature, config.gemini_safety_threshold) == (0.7, "block_only_high")
    assert load_config(environ={}, env_file=None).allowed_models() == ("gemini-2.5-flash",)


@pytest.mark.parametrize(
    ("environ", "name", "problem"),
    [
        (
            {"GEMINI_ALLOWED_MODELS": "gemini-2.5-pro"},
            "GEMINI_ALLOWED_MODELS",
            "does not list gemini-2.5-flash",
        ),
        (
            {"GEMINI_ALLOWED_MODELS": ",".join(f"m{n}" for n in range(25)) + ",gemini-2.5-flash"},
            "GEMINI_ALLOWED_MODELS",
            "names more than 20 models",
        ),
        ({"GEMINI_TEMPERATURE": "7"}, "GEMINI_TEMPERATURE", "7 is out of range"),
        (
            {"GEMINI_SAFETY_THRESHOLD": "strict"},
            "GEMINI_SAFETY_THRESHOLD",
            "'strict' is not one of off, block_none",
        ),
    ],
)
def test_a_bad_choice_is_reported_by_name(environ: dict[str, str], name: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ=environ, env_file=None)
    [found] = info.value.problems
    assert found.name == name and found.problem.startswith(problem)
