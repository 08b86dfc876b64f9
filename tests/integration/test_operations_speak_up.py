"""Chaos-style: the real bot process through a Gemini outage tells its operators, once, and heals.

A Gemini outage (every call 503) opens the ``gemini`` breaker: the health assessment turns the bot
degraded with the reason, the Discord presence says "answers delayed: Gemini unavailable", the
alert channel gets the breaker-open alert once; after heal the queue is answered, the mode and
the presence go back to normal, the channel gets one "resolved", and the incident is recorded
with its MTTR. With ``discord.send`` down too, the alert goes out by the webhook (another route
into Discord) and waits in the durable queue for the channel, which gets it once Discord heals.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from bot.texts import ACK_MARK
from sandbox.discord_emu import DiscordEmulator, SentMessage
from tests.chaos.support import BotApi, started_bot
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators
from tests.integration.test_recovery_scripts import run, script_env

ALERT = "Alert: breaker gemini open"
RESOLVED = "Resolved: breaker gemini open"
DELAYED = "answers delayed: Gemini unavailable"

SETTINGS = {
    "HEALTH_INTERVAL_SECONDS": "0.3",
    "ALERT_BREAKER_OPEN_SECONDS": "1",
    "BREAKER_FAIL_MAX": "2",
    "RETRY_MAX_ATTEMPTS": "1",
    # Only the breaker rule is under test: a Gemini outage is also a high error rate.
    "ALERT_ERROR_RATE": "1",
}


def texts(messages: list[SentMessage]) -> list[str]:
    return [m.content for m in messages if not m.deleted]


def count(messages: list[SentMessage], needle: str) -> int:
    return sum(text.count(needle) for text in texts(messages))


def presence_state(discord: DiscordEmulator) -> tuple[str | None, str | None]:
    """(status, custom status text) the bot last set."""
    presence = discord.presence
    if presence is None:
        return None, None
    states = [a.get("state") for a in presence.get("activities") or [] if a.get("type") == 4]
    return presence.get("status"), states[0] if states else None


def question_channels(emulators: Emulators, n: int) -> list[int]:
    """``n`` channels to ask in (before the bot starts): each question is its own conversation, so
    each reaches Gemini at once instead of waiting behind the first."""
    return [emulators.discord.world.add_text_channel(f"questions-{i}") for i in range(n)]


async def ask(emulators: Emulators, channels: list[int]) -> list[dict[str, Any]]:
    return [
        await emulators.discord.send_user_message(channel, "normal", f"question {i}", mentions_bot=True)
        for i, channel in enumerate(channels)
    ]


async def answered(emulators: Emulators, asked: list[dict[str, Any]], timeout: float) -> None:
    """Every question got its answer (a reply that recalls it or answers it), not only an ack."""

    def done() -> bool:
        for question in asked:
            sent = emulators.discord.sent_messages(int(question["channel_id"]))
            replies = [
                m for m in sent if str((m.message_reference or {}).get("message_id")) == question["id"]
            ]
            if not any("question" in m.content and not m.content.startswith(ACK_MARK) for m in replies):
                return False
        return True

    await emulators.discord.wait_until(done, timeout)


async def degraded(api: BotApi) -> dict[str, Any]:
    body: dict[str, Any] = await api.get("/api/health/degradation")
    return body


async def test_a_gemini_outage_alerts_once_degrades_shows_presence_resolves_and_records_the_incident(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str], tmp_path: Path
) -> None:
    discord = emulators.discord
    alerts = discord.world.add_text_channel("ops-alerts")
    channels = question_channels(emulators, 3)
    env = {**bot_env, **SETTINGS, "ALERT_CHANNEL_ID": str(alerts)}
    async with started_bot(spawn_bot, emulators, env) as api:
        await discord.wait_until(lambda: presence_state(discord)[0] == "online", 10)
        emulators.gemini.faults.add("503")
        asked = await ask(emulators, channels)

        # Degraded, with the reason, in the API and in the presence.
        async def is_degraded() -> bool:
            body = await degraded(api)
            return body["mode"] == "degraded" and "Gemini unavailable" in body["reason"]

        await api.wait_until(is_degraded, 15)
        await discord.wait_until(lambda: presence_state(discord) == ("idle", DELAYED), 10)
        # The breaker-open alert in the configured channel, once, however long the outage lasts.
        await discord.wait_until(lambda: count(discord.sent_messages(alerts), ALERT) == 1, 15)
        await asyncio.sleep(2.0)  # several more assessments while it still fires
        assert count(discord.sent_messages(alerts), ALERT) == 1
        assert count(discord.sent_messages(alerts), RESOLVED) == 0
        body = await degraded(api)
        assert [a["key"] for a in body["assessment"]["alerts"]] == ["breaker_open:gemini"]

        emulators.gemini.faults.clear()
        await answered(emulators, asked, 30)
        await api.wait_queue_empty(30)

        async def is_normal() -> bool:
            return (await degraded(api))["mode"] == "normal"

        await api.wait_until(is_normal, 20)
        await discord.wait_until(lambda: presence_state(discord) == ("online", None), 10)
        await discord.wait_until(lambda: count(discord.sent_messages(alerts), RESOLVED) == 1, 15)
        assert count(discord.sent_messages(alerts), ALERT) == 1
        assert all(m.pings == set() for m in discord.sent_messages(alerts))

        # The incident, with its MTTR, and the queue it left worked off.
        async def settled() -> bool:
            report = await api.get("/api/health/incidents")
            rows = [r for r in report["incidents"] if r["dependency"] == "gemini"]
            return bool(rows) and all(r["settled_at"] is not None for r in rows)

        await api.wait_until(settled, 20)
        report = await api.get("/api/health/incidents")
        [gemini] = [d for d in report["dependencies"] if d["dependency"] == "gemini"]
        assert gemini["incidents"] >= 1 and gemini["open"] == 0
        assert gemini["mttr_seconds"] is not None and gemini["mttr_seconds"] > 0
        assert gemini["queued"] >= 1 and gemini["answered_after"] >= 1
        assert gemini["dead_lettered"] == 0
        assert "ServerError (503)" in report["incidents"][-1]["cause"] or any(
            "503" in r["cause"] for r in report["incidents"] if r["dependency"] == "gemini"
        )
        [degraded_row] = [d for d in report["dependencies"] if d["dependency"] == "degraded"]
        assert degraded_row["mttr_seconds"] is not None
        metrics = await api.metrics()
        assert any(v >= 1 for labels, v in metrics["bot_incidents_total"] if labels["dependency"] == "gemini")

        # The evidence script keeps the incidents too.
        result = await run("collect-recovery-metrics.sh", "--out", str(tmp_path), env=script_env(api.base))
        assert result.returncode == 0, result
        folder = Path(result.stdout.strip().splitlines()[-1])
        kept = json.loads((folder / "incidents.json").read_text())
        assert any(d["dependency"] == "gemini" and d["mttr_seconds"] for d in kept["dependencies"])
        api.proc.assert_clean_logs()


async def test_with_discord_send_down_too_the_alert_goes_by_webhook_and_waits_in_the_queue_for_the_channel(
    spawn_bot: SpawnBot, emulators: Emulators, bot_env: dict[str, str]
) -> None:
    discord = emulators.discord
    alerts = discord.world.add_text_channel("ops-alerts")
    hook = discord.add_webhook(alerts, name="alerts")
    channels = question_channels(emulators, 3)
    env = {**bot_env, **SETTINGS, "ALERT_CHANNEL_ID": str(alerts)}
    env["ALERT_WEBHOOK_URL"] = discord.webhook_url(hook)
    async with started_bot(spawn_bot, emulators, env) as api:
        emulators.gemini.faults.add("503")
        discord.faults.add("503", target="send")
        asked = await ask(emulators, channels)
        # By the webhook while the bot cannot send: the gemini alert (and discord.send's own).
        await discord.wait_until(lambda: count(hook.messages, ALERT) == 1, 20)
        assert count(discord.sent_messages(alerts), ALERT) == 0  # the channel's copy waits in the queue
        queue = (await degraded(api))["queue"]
        assert queue["depth"]["outbound"]["pending"] >= 1
        await asyncio.sleep(2.0)
        assert count(hook.messages, ALERT) == 1  # never a storm: one per alert, not one per assessment
        assert len(hook.messages) <= 4

        discord.faults.clear()
        emulators.gemini.faults.clear()
        await answered(emulators, asked, 40)
        # The queued alert reaches the channel once Discord takes messages again, then its resolution.
        await discord.wait_until(lambda: count(discord.sent_messages(alerts), RESOLVED) == 1, 30)
        await discord.wait_until(lambda: count(hook.messages, RESOLVED) == 1, 10)
        channel = texts(discord.sent_messages(alerts))
        assert count(discord.sent_messages(alerts), ALERT) == 1
        first_alert = next(i for i, t in enumerate(channel) if ALERT in t)
        first_resolved = next(i for i, t in enumerate(channel) if RESOLVED in t)
        assert first_alert < first_resolved  # in order: the resolution never overtakes the alert
        await api.wait_queue_empty(30)
        api.proc.assert_clean_logs()
