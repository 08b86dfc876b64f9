"""File uploads on create message, like Discord: the real discord.py sends multipart/form-data
(``payload_json`` plus ``files[n]``), the emulator stores the bytes and answers with attachments."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import discord
import pytest

from sandbox import discord_emu
from sandbox.discord_emu import DiscordEmulator
from sandbox.faults import FaultPlan
from tests.integration.harness import pointed_at
from tests.sandbox.test_discord_emulator import running


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator(faults=FaultPlan(), heartbeat_interval=0.1) as emulator:
        with pointed_at(emulator):
            yield emulator


def file(name: str, data: bytes) -> discord.File:
    return discord.File(io.BytesIO(data), filename=name)


async def test_uploaded_files_are_stored_and_returned_as_attachments(emu: DiscordEmulator) -> None:
    channel_id = emu.channels["general"]
    answer = "# The answer\n\n" + "x" * 20_000 + "\n"
    async with running(emu) as run:
        channel = run.bot.get_channel(channel_id)
        assert isinstance(channel, discord.TextChannel)
        message = await channel.send(
            "the opening", files=[file("answer.md", answer.encode()), file("snippet-1.py", b"x = 1\n")]
        )
        [fetched] = [m async for m in channel.history(limit=1)]
    [sent] = emu.sent_messages(channel_id)
    assert sent.files == {"answer.md": answer.encode(), "snippet-1.py": b"x = 1\n"}
    assert sent.attachments == ["answer.md", "snippet-1.py"]
    for seen in (message, fetched):  # the create response, and the history
        assert [(a.filename, a.size, a.content_type) for a in seen.attachments] == [
            ("answer.md", len(answer.encode()), "text/markdown; charset=utf-8"),
            ("snippet-1.py", 6, "text/x-python; charset=utf-8"),
        ]
        assert all(a.url.startswith("https://cdn.discordapp.com/attachments/") for a in seen.attachments)


async def test_a_file_resent_under_the_same_nonce_is_not_posted_twice(emu: DiscordEmulator) -> None:
    channel_id = emu.channels["general"]
    async with running(emu) as run:
        channel = run.bot.get_channel(channel_id)
        assert isinstance(channel, discord.TextChannel)
        first = await channel.send("answer", nonce="42.0", files=[file("answer.md", b"whole")])
        again = await channel.send("answer", nonce="42.0", files=[file("answer.md", b"whole")])
    assert again.id == first.id and [a.filename for a in again.attachments] == ["answer.md"]
    assert len(emu.sent_messages(channel_id)) == 1


async def test_a_file_over_the_upload_limit_gets_413_request_entity_too_large(
    emu: DiscordEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(discord_emu, "MAX_UPLOAD_BYTES", 1024)
    channel_id = emu.channels["general"]
    async with running(emu) as run:
        channel = run.bot.get_channel(channel_id)
        assert isinstance(channel, discord.TextChannel)
        with pytest.raises(discord.HTTPException) as info:
            await channel.send("too big", files=[file("big.bin", b"\0" * 1025)])
        await channel.send("fits", files=[file("small.bin", b"\0" * 1024)])
    assert info.value.status == 413 and info.value.code == 40005
    assert [m.content for m in emu.sent_messages(channel_id)] == ["fits"]


async def test_an_upload_without_attach_files_is_refused_with_missing_permissions(
    emu: DiscordEmulator,
) -> None:
    random_id = emu.channels["random"]
    emu.world.set_overwrite(random_id, emu.bot_user_id, deny=discord_emu.ATTACH_FILES)
    async with running(emu) as run:
        channel = run.bot.get_channel(random_id)
        assert isinstance(channel, discord.TextChannel)
        assert not channel.permissions_for(channel.guild.me).attach_files  # discord.py sees it too
        with pytest.raises(discord.Forbidden) as info:
            await channel.send("with a file", files=[file("answer.md", b"x")])
        await channel.send("text only")
    assert info.value.code == 50013
    assert [m.content for m in emu.sent_messages(random_id)] == ["text only"]
