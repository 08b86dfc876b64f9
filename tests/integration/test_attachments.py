"""What people send: the real bot (discord.py, google-genai) against the emulators, with files.

Users post images, text files, PDFs, voice messages and files over a limit through the Discord
emulator (bytes on its loopback CDN, behind signed URLs that expire); each test checks what the
user saw and what Gemini received (the Gemini emulator's request log: the parts of each request).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

from bot import texts
from bot.texts import ACK_MARK
from resilience.breakers import BreakerState
from sandbox.gemini import GeminiEmulator, request_parts
from tests.bot.test_attachment_files import tiny_gif
from tests.integration.conftest import SpawnBot
from tests.integration.harness import Emulators, running_emulators
from tests.integration.test_drain import set_maintenance
from tests.integration.test_pipeline import Live, live_bot

PNG = b"\x89PNG\r\n\x1a\n" + bytes(300)
PDF = b"%PDF-1.4\n" + b"0" * 500
OGG = b"OggS" + bytes(400)
NOTES = b"Shopping list: apples, pears and a loaf of bread.\n"
QUIET = 0.4


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image(name: str = "cat.png", data: bytes = PNG) -> dict[str, Any]:
    return {"filename": name, "content_type": "image/png", "data": data}


def generate_requests(gemini: GeminiEmulator) -> list[Any]:
    return [r for r in gemini.requests if r.action == "generateContent"]


def last_turn(gemini: GeminiEmulator) -> list[dict[str, Any]]:
    return request_parts(generate_requests(gemini)[-1])[-1]


def spoken(live: Live, text: str, user: str = "normal") -> str:
    """``text`` as Gemini gets it in a server's channel: with who said it (bot.conversations)."""
    return f"{live.discord.world.user(user).username.title()} (<@{live.discord.users[user]}>): {text}"


def answers(live: Live, message_id: Any, channel: int | None = None) -> list[str]:
    return [m.content for m in live.replies_to(message_id, channel) if not m.content.startswith(ACK_MARK)]


# --- one message, many files ------------------------------------------------------------------


async def test_an_image_a_text_file_a_pdf_a_voice_message_and_a_too_large_file_in_one_message(
    tmp_path: Path,
) -> None:
    """Gemini gets the image, the PDF and the recording as inline parts and the text file as text
    with its name, before the question; the user gets the answer and one sentence naming the file
    over ATTACHMENT_MAX_FILE_BYTES and the limit."""
    big = b"\x89PNG\r\n\x1a\n" + bytes(3000)
    async with running_emulators() as emus, live_bot(
        emus, tmp_path / "data", ATTACHMENT_MAX_FILE_BYTES="2048"
    ) as live:
        msg = await live.say("what is in these?", attachments=[
            image("cat.png"),
            {"filename": "notes.txt", "content_type": "text/plain; charset=utf-8", "data": NOTES},
            {"filename": "report.pdf", "content_type": "application/pdf", "data": PDF},
            {"filename": "voice-message.ogg", "content_type": "audio/ogg", "data": OGG, "voice": True},
            image("huge.png", big),
        ])
        [answer] = await live.wait_replies(msg["id"])
        parts = last_turn(live.gemini)
        assert parts[0] == {"inline": "image/png", "bytes": len(PNG), "sha256": sha(PNG)}
        assert parts[1]["text"].startswith("[File notes.txt]\nShopping list: apples")
        assert parts[2] == {"inline": "application/pdf", "bytes": len(PDF), "sha256": sha(PDF)}
        assert parts[3] == {"inline": "audio/ogg", "bytes": len(OGG), "sha256": sha(OGG)}
        assert parts[4] == {"text": spoken(live, "what is in these?")}
        assert len(parts) == 5  # huge.png never reached Gemini
        text = answer.content
        assert f"I see an image of {len(PNG)} bytes, type image/png." in text
        assert "I read a text that begins «[File notes.txt] Shopping list:" in text
        assert f"I see a PDF document of {len(PDF)} bytes." in text
        assert f"I see audio of {len(OGG)} bytes, type audio/ogg." in text
        assert "«what is in these?»" in text
        assert text.count("huge.png") == 1
        assert texts.attachment_too_large("huge.png", len(big), 2048) in text
        assert "cat.png" not in text  # the files that were read need no sentence
        await asyncio.sleep(QUIET)
        assert len(live.replies_to(msg["id"])) == 1


async def test_a_message_of_only_files_over_the_limits_gets_one_sentence_and_no_gemini_call(
    tmp_path: Path,
) -> None:
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as live:
        msg = await live.say("", attachments=[{"filename": "tool.exe", "content_type":
                                               "application/x-msdownload", "data": b"MZ" + bytes(50)}])
        [reply] = await live.wait_replies(msg["id"])
        assert reply.content == texts.attachment_unknown_type("tool.exe")
        assert generate_requests(live.gemini) == []


async def test_an_image_alone_is_answered_from_the_image(tmp_path: Path) -> None:
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as live:
        msg = await live.say("", attachments=[image()])
        [answer] = await live.wait_replies(msg["id"])
        assert answer.content.startswith(f"I see an image of {len(PNG)} bytes, type image/png.")
        assert last_turn(live.gemini) == [{"inline": "image/png", "bytes": len(PNG), "sha256": sha(PNG)}]


async def test_a_damaged_file_gets_a_sentence_and_the_rest_is_answered(tmp_path: Path) -> None:
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as live:
        msg = await live.say("and these?", attachments=[
            {"filename": "broken.png", "content_type": "image/png", "data": b"not a png at all"},
            {"filename": "report.pdf", "content_type": "application/pdf", "data": PDF},
        ])
        [answer] = await live.wait_replies(msg["id"])
        assert texts.attachment_damaged("broken.png", "image") in answer.content
        assert [p.get("inline") for p in last_turn(live.gemini)] == ["application/pdf", None]


async def test_a_gif_is_sent_as_its_first_frame_in_png(tmp_path: Path) -> None:
    gif = tiny_gif()
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as live:
        msg = await live.say("what colour?", attachments=[
            {"filename": "dot.gif", "content_type": "image/gif", "data": gif}])
        await live.wait_replies(msg["id"])
        [first, _] = last_turn(live.gemini)
        assert first["inline"] == "image/png"


# --- the Files API ------------------------------------------------------------------------------


async def test_files_past_the_inline_limit_go_through_the_files_api_and_the_answer_uses_them(
    tmp_path: Path,
) -> None:
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(5000)
    async with running_emulators() as emus, live_bot(
        emus, tmp_path / "data", GEMINI_INLINE_MAX_BYTES="1000"
    ) as live:
        msg = await live.say("watch this", attachments=[
            {"filename": "clip.mp4", "content_type": "video/mp4", "data": video}, image()])
        [answer] = await live.wait_replies(msg["id"], timeout=15)
        actions = [r.action for r in live.gemini.requests]
        assert actions[:2] == ["upload_start", "upload"]
        assert actions.count("files.get") >= 2  # PROCESSING, then ACTIVE
        parts = last_turn(live.gemini)
        assert parts[0]["file"].startswith(live.gemini.base_url + "/v1beta/files/")
        assert parts[1]["inline"] == "image/png"  # the small one stays inline
        assert f"I see a video of {len(video)} bytes, type video/mp4, from the Files API." in answer.content


async def test_an_upload_that_fails_queues_the_message_and_it_is_answered_with_the_file_after(
    tmp_path: Path,
) -> None:
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(3000)
    async with running_emulators() as emus, live_bot(
        emus, tmp_path / "data", GEMINI_INLINE_MAX_BYTES="1000", BREAKER_RESET_SECONDS="0.5",
        RETRY_MAX_ATTEMPTS="1",
    ) as live:
        live.gemini.faults.add("upload_500", target="files", count=1)
        msg = await live.say("watch", attachments=[
            {"filename": "clip.mp4", "content_type": "video/mp4", "data": video}])
        [ack] = await live.wait_replies(msg["id"])
        assert ack.content.startswith(ACK_MARK)
        await live.wait_replies(msg["id"], 2, timeout=15)
        [answer] = answers(live, msg["id"])
        assert "from the Files API" in answer
        assert live.app.board["gemini"].state is BreakerState.CLOSED  # an upload is not generation


async def test_a_file_stuck_in_processing_is_waited_for_a_bounded_time_then_queued(tmp_path: Path) -> None:
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(3000)
    async with running_emulators() as emus, live_bot(
        emus, tmp_path / "data", GEMINI_INLINE_MAX_BYTES="1000", PROCESSING_TIMEOUT_SECONDS="4",
    ) as live:
        live.gemini.faults.add("stuck_processing", target="files", count=1)
        msg = await live.say("watch", attachments=[
            {"filename": "clip.mp4", "content_type": "video/mp4", "data": video}])
        started = time.monotonic()
        [ack] = await live.wait_replies(msg["id"], timeout=10)
        assert ack.content.startswith(ACK_MARK)
        assert time.monotonic() - started < 6  # max wait: half the processing timeout
        gets = [r for r in live.gemini.requests if r.action == "files.get"]
        assert 1 <= len(gets) <= 3


# --- durability ---------------------------------------------------------------------------------


async def test_a_gemini_outage_with_files_queued_is_answered_with_them_after_it_heals(tmp_path: Path) -> None:
    async with running_emulators() as emus, live_bot(
        emus, tmp_path / "data", RETRY_MAX_ATTEMPTS="1", BREAKER_FAIL_MAX="1", BREAKER_RESET_SECONDS="0.5"
    ) as live:
        live.gemini.faults.add("503")
        msgs = []
        for n in range(2):
            msgs.append(await live.say(f"look {n}", attachments=[
                image(f"pic{n}.png", PNG + bytes([n])),
                {"filename": f"n{n}.txt", "content_type": "text/plain", "data": NOTES}]))
        for m in msgs:
            [ack] = await live.wait_replies(m["id"])
            assert ack.content.startswith(ACK_MARK)
        live.gemini.faults.clear()
        for n, m in enumerate(msgs):
            await live.wait_replies(m["id"], 2, timeout=15)
            [answer] = answers(live, m["id"])
            assert f"I see an image of {len(PNG) + 1} bytes, type image/png." in answer
            assert f"look {n}" in answer
        ok = [r for r in generate_requests(live.gemini) if r.outcome == "ok"]
        for n, request in enumerate(ok):
            parts = request_parts(request)[-1]
            assert parts[0]["sha256"] == sha(PNG + bytes([n]))
            assert parts[1]["text"].startswith(f"[File n{n}.txt]")


async def test_a_queued_message_whose_file_was_deleted_is_answered_with_the_spooled_copy(
    tmp_path: Path,
) -> None:
    """The first try downloaded the image and failed on Gemini; the user deleted the message's
    file before the drain's answer: the spool still has it."""
    async with running_emulators() as emus, live_bot(
        emus, tmp_path / "data", RETRY_MAX_ATTEMPTS="1", BREAKER_RESET_SECONDS="0.5"
    ) as live:
        live.gemini.faults.add("503", count=1)
        msg = await live.say("keep this", attachments=[image()])
        [ack] = await live.wait_replies(msg["id"])
        assert ack.content.startswith(ACK_MARK)
        live.discord.world.blobs.clear()  # the CDN no longer has it
        await live.wait_replies(msg["id"], 2, timeout=15)
        [answer] = answers(live, msg["id"])
        assert f"I see an image of {len(PNG)} bytes" in answer
        assert list((tmp_path / "data" / "spool").iterdir())


async def test_without_spool_a_deleted_file_is_named_and_the_text_still_answered(tmp_path: Path) -> None:
    async with running_emulators() as emus, live_bot(
        emus, tmp_path / "data", ATTACHMENT_SPOOL_MAX_BYTES="0", MAINTENANCE_QUEUE_MESSAGES="true"
    ) as live:
        set_maintenance(live, "brb")
        msg = await live.say("and this one?", attachments=[image()])
        await live.wait_replies(msg["id"])
        await live.discord.delete_message(live.general, int(msg["id"]))
        set_maintenance(live, None)
        await live.discord.wait_until(lambda: len(live.sent()) >= 2, 15)
        answer = live.sent()[-1].content
        assert texts.attachment_gone("cat.png") in answer
        assert "and this one?" in answer


async def test_kill_9_after_accepting_an_image_and_a_restart_after_its_url_expired_answers_once_with_it(
    emulators: Emulators, bot_env: dict[str, str], spawn_bot: SpawnBot
) -> None:
    """The child accepts the message while Gemini hangs; SIGKILL; the CDN's clock passes two days
    (every URL handed out so far expired); a new child re-reads the message for a fresh URL and
    answers once, and Gemini's request log shows the image."""
    discord, gemini = emulators.discord, emulators.gemini
    env = {**bot_env, "RETRY_MAX_ATTEMPTS": "1", "ATTACHMENT_SPOOL_MAX_BYTES": "0"}
    first = spawn_bot(env=env)
    await first.wait_ready(emulators, timeout=20)
    gemini.faults.add("hang")
    channel = discord.channels["general"]
    msg = await discord.send_user_message(channel, "normal", "what is it", mentions_bot=True,
                                          attachments=[image()])
    await discord.wait_until(lambda: any(r.action == "generateContent" for r in gemini.requests), 10)
    assert first.kill() == -9
    await discord.wait_until(lambda: not discord.connected, timeout=5)
    gemini.faults.clear()
    discord.world.cdn_clock = lambda: time.time() + 2 * 86400
    second = spawn_bot(env=env)
    await second.wait_ready(emulators, timeout=20)

    def answered() -> list[Any]:
        return [m for m in discord.sent_messages(channel)
                if str((m.message_reference or {}).get("message_id")) == msg["id"]
                and not m.content.startswith(ACK_MARK)]

    await discord.wait_until(lambda: bool(answered()), 20)
    await asyncio.sleep(1.2)
    [answer] = answered()
    assert f"I see an image of {len(PNG)} bytes, type image/png." in answer.content
    assert "what is it" in answer.content
    cdn = [r for r in discord.requests if r.route == "cdn"]
    assert [r.status for r in cdn][:2] == [200, 404] and cdn[-1].status == 200
    assert any(r.route == "message" for r in discord.requests)  # the re-read for a fresh URL
    ok = [r for r in gemini.requests if r.action == "generateContent" and r.outcome == "ok"]
    assert request_parts(ok[-1])[-1][0] == {"inline": "image/png", "bytes": len(PNG), "sha256": sha(PNG)}
    second.assert_clean_logs()


# --- history and replies ------------------------------------------------------------------------


async def test_a_later_question_sees_the_earlier_image_again(tmp_path: Path) -> None:
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as live:
        first = await live.say("remember this picture", attachments=[image()])
        await live.wait_replies(first["id"])
        second = await live.say("what was in it?")
        await live.wait_replies(second["id"])
        turns = request_parts(generate_requests(live.gemini)[-1])
        assert turns[0][0] == {"inline": "image/png", "bytes": len(PNG), "sha256": sha(PNG)}
        assert turns[0][1] == {"text": spoken(live, "remember this picture")}
        assert turns[-1] == [{"text": spoken(live, "what was in it?")}]


async def test_an_earlier_image_that_is_gone_is_named_as_no_longer_available(tmp_path: Path) -> None:
    async with running_emulators() as emus, live_bot(
        emus, tmp_path / "data", ATTACHMENT_SPOOL_MAX_BYTES="0"
    ) as live:
        first = await live.say("remember this picture", attachments=[image()])
        await live.wait_replies(first["id"])
        await live.discord.delete_message(live.general, int(first["id"]))
        second = await live.say("what was in it?")
        await live.wait_replies(second["id"])
        turns = request_parts(generate_requests(live.gemini)[-1])
        assert turns[0][0] == {"text": "[image cat.png is no longer available]"}


async def test_an_earlier_file_uploaded_to_gemini_is_sent_again_by_its_uri(tmp_path: Path) -> None:
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(3000)
    async with running_emulators() as emus, live_bot(
        emus, tmp_path / "data", GEMINI_INLINE_MAX_BYTES="1000"
    ) as live:
        first = await live.say("keep this clip", attachments=[
            {"filename": "clip.mp4", "content_type": "video/mp4", "data": video}])
        await live.wait_replies(first["id"], timeout=15)
        uploads = sum(1 for r in live.gemini.requests if r.action == "upload_start")
        second = await live.say("what happened in it?")
        await live.wait_replies(second["id"])
        turns = request_parts(generate_requests(live.gemini)[-1])
        assert turns[0][0]["file"].startswith(live.gemini.base_url + "/v1beta/files/")
        assert sum(1 for r in live.gemini.requests if r.action == "upload_start") == uploads


async def test_a_reply_to_a_message_with_an_image_carries_it(tmp_path: Path) -> None:
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as live:
        posted = await live.say("just my cat", attachments=[image()], mention=False)
        reply = await live.say("what breed is this?", reference_message_id=int(posted["id"]))
        [answer] = await live.wait_replies(reply["id"])
        assert f"I see an image of {len(PNG)} bytes" in answer.content
        assert last_turn(live.gemini)[0]["sha256"] == sha(PNG)


async def test_a_reply_chain_quoting_an_image_carries_it(tmp_path: Path) -> None:
    """user: image -> bot: answer -> user replies to the answer: the image comes from two hops up."""
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as live:
        posted = await live.say("look", attachments=[image()])
        [answer] = await live.wait_replies(posted["id"])
        await live.app.storage.forget(str(live.general))  # not from the history: from the chain
        follow = await live.say("and its colour?", reference_message_id=answer.id, mention=False)
        [second] = await live.wait_replies(follow["id"])
        assert f"I see an image of {len(PNG)} bytes" in second.content
        assert any(r.route == "message" for r in live.discord.requests)


async def test_an_embeds_image_and_a_sticker_are_read(tmp_path: Path) -> None:
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as live:
        url = live.discord.world.media_proxy_url(PNG, "image/png", "chart.png")
        msg = await live.say("this chart", embeds=[{"type": "image", "url": "https://example.com/chart.png",
                                                    "thumbnail": {"url": "https://example.com/chart.png",
                                                                  "proxy_url": url}}],
                             stickers=[{"id": "1", "name": "wave", "format_type": 1}])
        await live.wait_replies(msg["id"])
        parts = last_turn(live.gemini)
        assert parts[0] == {"text": "[The user sent the sticker(s): wave]"}
        assert parts[1]["sha256"] == sha(PNG)



async def test_an_earlier_gemini_file_that_vanished_before_its_expiry_is_sent_again_from_its_bytes(
    tmp_path: Path,
) -> None:
    """Gemini answers 403 for a file URI it no longer has: the bot sends that file again, once,
    from its bytes (re-uploaded), and the question is answered."""
    video = b"\x00\x00\x00\x18ftypmp42" + bytes(3000)
    async with running_emulators() as emus, live_bot(
        emus, tmp_path / "data", GEMINI_INLINE_MAX_BYTES="1000"
    ) as live:
        first = await live.say("keep this clip", attachments=[
            {"filename": "clip.mp4", "content_type": "video/mp4", "data": video}])
        await live.wait_replies(first["id"], timeout=15)
        live.gemini.expire_files()
        second = await live.say("what happened in it?")
        [answer] = await live.wait_replies(second["id"], timeout=15)
        outcomes = [r.outcome for r in generate_requests(live.gemini)]
        assert outcomes == ["ok", "file_refused:403", "ok"]
        assert sum(1 for r in live.gemini.requests if r.action == "upload_start") == 2
        assert "saw 2 earlier turns" in answer.content


async def test_a_file_gemini_cannot_read_is_named_and_the_question_answered_without_it(
    tmp_path: Path,
) -> None:
    """Gemini refuses the request with the file (400 INVALID_ARGUMENT: a PNG damaged inside): the
    question is asked again without it, once, and the answer says which file was left out."""
    async with running_emulators() as emus, live_bot(emus, tmp_path / "data") as live:
        live.gemini.faults.add("400", count=1)
        msg = await live.say("what about this?", attachments=[image()])
        [answer] = await live.wait_replies(msg["id"])
        assert texts.attachments_unreadable(["cat.png"]) in answer.content
        assert "«what about this?»" in answer.content
        requests = generate_requests(live.gemini)
        assert [r.outcome for r in requests] == ["fault:400", "ok"]
        assert request_parts(requests[-1])[-1] == [{"text": spoken(live, "what about this?")}]
