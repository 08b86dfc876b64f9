"""The emulators' side of attachments: Discord's CDN (signed URLs that expire, fresh ones on a
re-read) and users' files, and Gemini's inline parts and Files API, driven by the real clients
(aiohttp for the CDN as a browser would, discord.py's REST client, google-genai)."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator

import aiohttp
import discord
import pytest
from google import genai
from google.genai import errors, types

from sandbox.discord_emu import DiscordEmulator
from sandbox.discord_state import IS_VOICE_MESSAGE
from sandbox.gemini import GeminiEmulator, request_parts

PNG = b"\x89PNG\r\n\x1a\n" + bytes(200)
V1BETA = types.HttpOptions(api_version="v1beta")


@pytest.fixture
async def emu() -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator() as emulator:
        yield emulator


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes, str]:
    async with http.get(url) as response:
        return response.status, await response.read(), response.headers.get("Content-Type", "")


async def rest_message(emu: DiscordEmulator, channel: int, message_id: str) -> dict:
    """GET the message through discord.py's own REST client (as the bot re-reads it)."""
    client = discord.http.HTTPClient(aiohttp.TCPConnector(limit=1))
    old = discord.http.Route.BASE
    discord.http.Route.BASE = emu.api_base
    try:
        await client.static_login(emu.token)
        return await client.get_message(channel, int(message_id))  # type: ignore[return-value]
    finally:
        discord.http.Route.BASE = old
        await client.close()


# --- Discord: the CDN and users' files --------------------------------------------------------


async def test_a_users_file_is_served_from_a_signed_cdn_url_with_its_bytes_and_type(emu, http) -> None:
    msg = await emu.send_user_message(
        emu.channels["general"], content="look",
        attachments=[{"filename": "cat.png", "content_type": "image/png", "data": PNG}],
    )
    [attachment] = msg["attachments"]
    assert attachment["size"] == len(PNG) and attachment["content_type"] == "image/png"
    url = attachment["url"]
    assert url.startswith(f"http://127.0.0.1:{emu.port}/attachments/{emu.channels['general']}/")
    assert all(f"{key}=" in url for key in ("ex", "is", "hm"))
    assert await fetch(http, url) == (200, PNG, "image/png")
    assert [r.route for r in emu.requests][-1] == "cdn"


async def test_an_expired_url_is_404_and_re_reading_the_message_gives_a_fresh_one(emu, http) -> None:
    channel = emu.channels["general"]
    msg = await emu.send_user_message(
        channel, attachments=[{"filename": "a.png", "content_type": "image/png", "data": PNG}]
    )
    old_url = msg["attachments"][0]["url"]
    emu.world.cdn_clock = lambda: time.time() + 2 * 86400  # two days later
    status, body, _ = await fetch(http, old_url)
    assert (status, body) == (404, b"This content is no longer available.")
    fresh = await rest_message(emu, channel, msg["id"])
    new_url = fresh["attachments"][0]["url"]
    assert new_url != old_url
    assert (await fetch(http, new_url))[:2] == (200, PNG)
    history = emu.world.history(channel)  # the stored copy keeps the URL it was posted with
    assert history[-1]["attachments"][0]["url"] == old_url


async def test_a_tampered_signature_and_a_deleted_messages_file_are_404(emu, http) -> None:
    channel = emu.channels["general"]
    msg = await emu.send_user_message(
        channel, attachments=[{"filename": "a.png", "content_type": "image/png", "data": PNG}]
    )
    url = msg["attachments"][0]["url"]
    assert (await fetch(http, url.replace("hm=", "hm=0")))[0] == 404
    assert (await fetch(http, url))[0] == 200
    await emu.delete_message(channel, int(msg["id"]))
    assert (await fetch(http, url))[0] == 404


async def test_a_voice_message_has_its_flag_and_its_recordings_duration_and_waveform(emu) -> None:
    msg = await emu.send_user_message(
        emu.dm_channel("normal"),
        attachments=[{"filename": "voice-message.ogg", "content_type": "audio/ogg",
                      "data": b"OggS" + bytes(60), "voice": True, "duration": 2.5}],
    )
    assert msg["flags"] & IS_VOICE_MESSAGE
    [attachment] = msg["attachments"]
    assert attachment["duration_secs"] == 2.5 and attachment["waveform"]


async def test_cdn_faults_target_cdn_and_then_it_serves_again(emu, http) -> None:
    msg = await emu.send_user_message(
        emu.channels["general"], attachments=[{"filename": "a.png", "content_type": "image/png", "data": PNG}]
    )
    emu.faults.add("503", target="cdn", count=1)
    assert (await fetch(http, msg["attachments"][0]["url"]))[0] == 503
    assert (await fetch(http, msg["attachments"][0]["url"]))[0] == 200


async def test_an_embed_image_behind_the_media_proxy_is_served_unsigned(emu, http) -> None:
    url = emu.world.media_proxy_url(PNG, "image/png", "chart.png")
    msg = await emu.send_user_message(emu.channels["general"], embeds=[
        {"type": "image", "url": "https://example.com/chart.png",
         "thumbnail": {"url": "https://example.com/chart.png", "proxy_url": url}}])
    assert msg["embeds"][0]["thumbnail"]["proxy_url"] == url
    assert (await fetch(http, url))[:2] == (200, PNG)


# --- Gemini: inline parts and the Files API ----------------------------------------------------


@pytest.fixture
async def gemini() -> AsyncIterator[GeminiEmulator]:
    async with GeminiEmulator(api_key="k") as emulator:
        yield emulator


@pytest.fixture
async def client(gemini: GeminiEmulator) -> AsyncIterator[genai.Client]:
    c = genai.Client(api_key="k", http_options=types.HttpOptions(
        base_url=gemini.base_url, api_version="v1", retry_options=types.HttpRetryOptions(attempts=1)))
    yield c
    await c.aio.aclose()


async def upload(client: genai.Client, data: bytes, mime: str) -> types.File:
    config = types.UploadFileConfig(mime_type=mime, display_name="x", http_options=V1BETA)
    return await client.aio.files.upload(file=io.BytesIO(data), config=config)


async def test_inline_parts_are_answered_from_what_was_received_and_logged_without_their_bytes(
    gemini, client
) -> None:
    contents: list = [{"role": "user", "parts": [
        types.Part.from_bytes(data=PNG, mime_type="image/png"),
        types.Part.from_bytes(data=b"%PDF-1.4 hello", mime_type="application/pdf"),
        {"text": "what are these"}]}]
    response = await client.aio.models.generate_content(model="gemini-2.5-flash", contents=contents)
    assert response.text is not None
    lines = response.text.split("\n")
    assert lines[0] == f"I see an image of {len(PNG)} bytes, type image/png."
    assert lines[1] == "I see a PDF document of 14 bytes."
    assert "«what are these»" in lines[2]
    [row] = request_parts(gemini.requests[-1])
    assert row[0]["inline"] == "image/png" and row[0]["bytes"] == len(PNG)
    assert "data" not in str(gemini.requests[-1].body)  # the log keeps sizes and digests only


async def test_the_resumable_upload_then_processing_then_active_then_usable_in_generate_content(
    gemini, client
) -> None:
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(1000)
    file = await upload(client, video, "video/mp4")
    assert file.state == types.FileState.PROCESSING and file.name and file.uri
    assert [r.action for r in gemini.requests] == ["upload_start", "upload"]
    start = gemini.requests[0]
    assert start.headers["X-Goog-Upload-Protocol"] == "resumable" and start.path == "/upload/v1beta/files"
    states = [(await client.aio.files.get(name=file.name, config={"http_options": V1BETA})).state
              for _ in range(3)]
    assert states == [types.FileState.PROCESSING, types.FileState.ACTIVE, types.FileState.ACTIVE]
    assert file.expiration_time is not None and file.expiration_time.timestamp() > time.time() + 47 * 3600
    response = await client.aio.models.generate_content(model="gemini-2.5-flash", contents=[
        {"role": "user", "parts": [types.Part.from_uri(file_uri=file.uri, mime_type="video/mp4"),
                                   {"text": "describe"}]}])
    assert response.text is not None
    expected = f"I see a video of {len(video)} bytes, type video/mp4, from the Files API."
    assert response.text.startswith(expected)


async def test_an_upload_fault_is_one_500_with_no_hidden_retry(gemini, client) -> None:
    gemini.faults.add("upload_500", target="files", count=1)
    with pytest.raises(errors.ServerError) as caught:
        await upload(client, PNG, "image/png")
    assert caught.value.code == 500
    assert [r.action for r in gemini.requests] == ["upload_start"]
    assert (await upload(client, PNG, "image/png")).state == types.FileState.ACTIVE


async def test_a_stuck_file_stays_processing_and_cannot_be_used(gemini, client) -> None:
    gemini.faults.add("stuck_processing", target="files", count=1)
    file = await upload(client, PNG, "image/png")
    for _ in range(5):
        got = await client.aio.files.get(name=file.name or "", config={"http_options": V1BETA})
        assert got.state == types.FileState.PROCESSING
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model="gemini-2.5-flash", contents=[
            {"role": "user", "parts": [types.Part.from_uri(file_uri=file.uri or "", mime_type="image/png")]}])
    assert caught.value.code == 400 and caught.value.status == "FAILED_PRECONDITION"


async def test_an_expired_file_is_403_for_get_and_for_generate_content(gemini, client) -> None:
    file = await upload(client, PNG, "image/png")
    gemini.expire_files()
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.files.get(name=file.name or "", config={"http_options": V1BETA})
    assert caught.value.code == 403 and "may not exist" in (caught.value.message or "")
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model="gemini-2.5-flash", contents=[
            {"role": "user", "parts": [types.Part.from_uri(file_uri=file.uri or "", mime_type="image/png"),
                                       {"text": "and this?"}]}])
    assert caught.value.code == 403


async def test_the_file_expired_fault_lets_the_upload_succeed_and_the_file_vanish(gemini, client) -> None:
    gemini.faults.add("file_expired", target="files", count=1)
    file = await upload(client, PNG, "image/png")
    assert file.state == types.FileState.ACTIVE
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model="gemini-2.5-flash", contents=[
            {"role": "user", "parts": [types.Part.from_uri(file_uri=file.uri or "", mime_type="image/png"),
                                       {"text": "see?"}]}])
    assert caught.value.code == 403


async def test_files_are_served_on_v1beta_only(gemini, client) -> None:
    config = types.UploadFileConfig(mime_type="image/png", http_options=types.HttpOptions(api_version="v1"))
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.files.upload(file=io.BytesIO(PNG), config=config)
    assert caught.value.code == 404
