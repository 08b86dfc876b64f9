"""The Discord emulator's incoming webhooks and presence updates, against real discord.py.

Webhooks: ``discord.Webhook.partial(id, token, session=...)`` posts through ``Route.BASE`` like any
REST call; the emulator answers as Discord's Execute Webhook does. Presence: ``change_presence``
sends gateway op 3, which the emulator records.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import discord
import pytest

from sandbox.discord_emu import DiscordEmulator
from sandbox.faults import FaultPlan
from tests.integration.harness import pointed_at
from tests.sandbox.test_discord_emulator import running


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator(faults=FaultPlan(), heartbeat_interval=0.1) as emulator:
        with pointed_at(emulator):
            yield emulator


async def test_a_webhook_posts_in_its_channel_as_itself_without_the_bots_token(emu: DiscordEmulator) -> None:
    channel = emu.channels["random"]
    hook = emu.add_webhook(channel, name="alerts")
    async with aiohttp.ClientSession() as session:
        webhook = discord.Webhook.partial(hook.id, hook.token, session=session)
        message = await webhook.send("**Alert**: gemini open", username="Bot alerts", wait=True)
    assert message.content == "**Alert**: gemini open"
    assert message.webhook_id == hook.id and message.author.name == "Bot alerts"
    [stored] = [m for m in emu.history(channel) if m.get("webhook_id") == str(hook.id)]
    assert stored["content"] == "**Alert**: gemini open"
    assert [m.content for m in hook.messages] == ["**Alert**: gemini open"]
    assert emu.sent_messages(channel) == []  # not a message the bot sent with its token
    [request] = emu.requests_for("webhook")
    assert request.status == 200 and "Authorization" not in str(request.json)


async def test_a_wrong_webhook_token_is_refused_like_discord(emu: DiscordEmulator) -> None:
    hook = emu.add_webhook(emu.channels["general"])
    async with aiohttp.ClientSession() as session:
        webhook = discord.Webhook.partial(hook.id, "not-the-token", session=session)
        with pytest.raises(discord.HTTPException) as info:
            await webhook.send("x", wait=True)
    assert info.value.status == 401 and info.value.code == 50027
    assert hook.messages == []


async def test_webhook_faults_target_webhooks_only(emu: DiscordEmulator) -> None:
    """``discord send`` down leaves the webhook route up, and a webhook fault leaves sends alone."""
    emu.faults.add("503", target="send")
    hook = emu.add_webhook(emu.channels["general"])
    async with aiohttp.ClientSession() as session:
        webhook = discord.Webhook.partial(hook.id, hook.token, session=session)
        await webhook.send("still here", wait=True)
        emu.faults.clear()
        emu.faults.add("error", target="webhook", status=403, code=50013)
        with pytest.raises(discord.Forbidden):
            await webhook.send("refused", wait=True)
    assert [m.content for m in hook.messages] == ["still here"]


async def test_presence_updates_are_recorded(emu: DiscordEmulator) -> None:
    async with running(emu) as run:
        text = "answers delayed: Gemini unavailable"
        await run.bot.change_presence(status=discord.Status.idle, activity=discord.CustomActivity(name=text))
        await emu.wait_until(lambda: emu.presence is not None and emu.presence.get("status") == "idle", 5)
        presence = emu.presence
        assert presence is not None
        [activity] = presence["activities"]
        assert activity["type"] == 4 and activity["state"] == text
        await run.bot.change_presence(status=discord.Status.online, activity=None)
        await emu.wait_until(lambda: emu.presence is not None and emu.presence.get("status") == "online", 5)
        assert emu.presence is not None and emu.presence["activities"] == []
