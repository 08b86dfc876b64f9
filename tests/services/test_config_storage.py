"""The storage growth settings: queue caps and retention, with their defaults, ranges and docs."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
DEFAULTS = {
    "QUEUE_MAX_ITEMS": 10_000,
    "QUEUE_MAX_PENDING_PER_USER": 5,
    "QUEUE_MAX_PENDING_PER_GUILD": 50,
    "QUEUE_RETENTION_SECONDS": 7 * 86400.0,
    "HISTORY_RETENTION_SECONDS": 30 * 86400.0,
}


def test_the_caps_and_retentions_have_sane_defaults() -> None:
    config = load_config(environ={}, env_file=None)
    for name, value in DEFAULTS.items():
        assert getattr(config, name.lower()) == value, name


def test_the_caps_and_retentions_are_read_from_the_environment() -> None:
    config = load_config(
        environ={
            "QUEUE_MAX_ITEMS": "500",
            "QUEUE_MAX_PENDING_PER_USER": "2",
            "QUEUE_MAX_PENDING_PER_GUILD": "20",
            "QUEUE_RETENTION_SECONDS": "0",
            "HISTORY_RETENTION_SECONDS": "86400",
        },
        env_file=None,
    )
    caps = (config.queue_max_items, config.queue_max_pending_per_user, config.queue_max_pending_per_guild)
    assert caps == (500, 2, 20)
    assert (config.queue_retention_seconds, config.history_retention_seconds) == (0.0, 86400.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QUEUE_MAX_ITEMS", "0"),
        ("QUEUE_MAX_PENDING_PER_USER", "0"),
        ("QUEUE_MAX_PENDING_PER_GUILD", "-1"),
        ("QUEUE_MAX_PENDING_PER_USER", "2.5"),
        ("QUEUE_RETENTION_SECONDS", "-1"),
        ("HISTORY_RETENTION_SECONDS", "60"),  # under an hour: history would vanish mid-conversation
    ],
)
def test_a_cap_or_retention_out_of_range_is_reported_by_name(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ={name: value}, env_file=None)
    assert [p.name for p in info.value.problems] == [name]


def test_env_example_and_readme_document_each_setting_with_its_default() -> None:
    example = (REPO / ".env.example").read_text()
    readme = (REPO / "README.md").read_text()
    for name, value in DEFAULTS.items():
        assert f"\n{name}={int(value)}\n" in example, name
        assert f"`{name}`" in readme, name
