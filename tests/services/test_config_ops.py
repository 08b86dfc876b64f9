"""The health and alert settings: ranges, the webhook URL (a secret), defaults."""

from __future__ import annotations

import pytest

from services.config import ConfigError, load_config, webhook_parts

HOOK = "https://discord.com/api/webhooks/123456789012345678/AbC-def_ghi.jkl"


def load(**env: str):  # type: ignore[no-untyped-def]
    return load_config(environ=env, env_file=None)


def test_alert_settings_parse_and_the_webhook_url_is_kept_secret() -> None:
    config = load(ALERT_CHANNEL_ID="42", ALERT_WEBHOOK_URL=HOOK, ALERT_DM_OWNERS="yes",
                  AVAILABILITY_SLO="0.995", HEALTH_INTERVAL_SECONDS="0.5")
    assert config.alert_channel_id == 42 and config.alert_dm_owners is True
    assert config.availability_slo == 0.995 and config.health_interval_seconds == 0.5
    assert webhook_parts(config.alert_webhook_url) == (123456789012345678, "AbC-def_ghi.jkl")
    assert "AbC-def" not in repr(config)
    assert config.redacted()["ALERT_WEBHOOK_URL"].startswith("<set, ")
    assert HOOK in config.secrets()


def test_a_loopback_webhook_url_of_the_sandbox_is_accepted() -> None:
    url = "http://127.0.0.1:8080/api/v10/webhooks/77/sandbox-token"
    assert webhook_parts(load(ALERT_WEBHOOK_URL=url).alert_webhook_url) == (77, "sandbox-token")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("ALERT_WEBHOOK_URL", "https://discord.com/channels/1/2"),
        ("ALERT_WEBHOOK_URL", "discord.com/api/webhooks/1/tok"),
        ("ALERT_CHANNEL_ID", "general"),
        ("ALERT_REPEAT_SECONDS", "10"),
        ("AVAILABILITY_SLO", "1"),
        ("HEALTH_INTERVAL_SECONDS", "0"),
        ("ALERT_ERROR_RATE", "2"),
    ],
)
def test_bad_values_are_reported_with_the_variable_and_never_echo_a_webhook_token(
    name: str, value: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(**{name: value})
    [problem] = info.value.problems
    assert problem.name == name
    if name == "ALERT_WEBHOOK_URL":
        assert value not in str(info.value)
