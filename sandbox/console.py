"""A terminal chat against the sandbox: type as a Discord user, read the bot's replies.

Plain lines become messages from the current user in the current channel (mentioning the
bot in guild channels); ``/ask ...`` and ``/admin ...`` become INTERACTION_CREATE events;
``:``-commands switch identity and channel and inject faults into either emulator. The
console only drives the emulators' public methods; the bot is a separate process (or task)
connected to them like it would be to the real services.
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import sys
import threading
from collections.abc import AsyncIterator, Callable, Collection, Iterable
from typing import Any, Protocol, TextIO

from sandbox.discord_emu import EPHEMERAL, GATEWAY_FAULT_KINDS, REST_FAULT_KINDS
from sandbox.faults import Fault, FaultPlan
from sandbox.gemini import FAULT_KINDS as GEMINI_FAULT_KINDS

HELP = """\
Type a line to send it as the current user in the current channel.
  /ask QUESTION               slash command /ask (free text becomes its first option)
  /admin SUB [key=value ...]  admin slash command with a subcommand, e.g. /admin status
  :user admin|normal          act as the admin or the normal member
  :channel NAME               general, random, thread, dm (or any channel the emulator knows)
  :mention on|off             mention the bot in guild channels (default on)
  :fault gemini KIND [MODEL] [next N | 30s | 2m | p=0.5] [key=value ...]
      KIND: 429 quota_daily 500 502 503 504 hang latency malformed_json stream_error
            safety prompt_block empty max_tokens drop      e.g. :fault gemini 503 30s
      params: 429 retry_delay=5s, latency seconds=2 (or dist=uniform low=1 high=3),
              stream_error mode=error|broken|hang after=N
      MODEL embeddings: the memory's embedding calls only      e.g. :fault gemini 503 embeddings
  :fault discord [ROUTE] KIND [next N | 30s | p=0.5] [key=value ...]
      ROUTE: send edit react typing interaction gateway ...   e.g. :fault discord send 500 next 3
      KIND: 429 500 502 503 504 latency drop close disconnect reconnect invalid_session silent
            unavailable
  :heal [gemini|discord]      remove all faults
  :faults                     list active faults
  :log [N]                    the last N requests each emulator received (default 5)
  :help                       this text
  :quit                       leave"""

DISCORD_FAULT_KINDS = REST_FAULT_KINDS | GATEWAY_FAULT_KINDS


class DiscordPeer(Protocol):
    """What the console uses of ``sandbox.discord_emu.DiscordEmulator`` (its public methods only)."""

    faults: FaultPlan

    @property
    def channels(self) -> dict[str, int]: ...

    @property
    def thread_id(self) -> int: ...

    @property
    def users(self) -> dict[str, int]: ...

    def dm_channel(self, user: str | int) -> int: ...

    async def send_user_message(
        self, channel_id: int, author: str | int = ..., content: str = ..., *, mentions_bot: bool = ...
    ) -> dict[str, Any]: ...

    async def send_interaction(
        self, name: str, options: dict[str, Any] | None = ..., *, user: str | int = ...,
        channel_id: int | None = ...,
    ) -> Any: ...

    def sent_messages(self, channel_id: int) -> list[Any]: ...

    @property
    def requests(self) -> Iterable[Any]: ...


class GeminiPeer(Protocol):
    """What the console needs from the Gemini emulator."""

    faults: FaultPlan

    @property
    def requests(self) -> Iterable[Any]: ...


class CommandError(Exception):
    """A console command could not be understood; ``str(exc)`` is shown to the person."""


def parse_duration(token: str) -> float | None:
    """``"30s"`` -> 30.0, ``"2m"`` -> 120.0, ``"500ms"`` -> 0.5; None if not a duration."""
    units = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))
    for suffix, scale in units:
        number = token[: -len(suffix)]
        if token.endswith(suffix) and number.replace(".", "", 1).isdigit():
            return float(number) * scale
    return None


def parse_value(text: str) -> Any:
    """Turn ``"3"``/``"0.5"``/``"true"`` into numbers and booleans; anything else stays text."""
    lowered = text.lower()
    if lowered in ("true", "on", "yes"):
        return True
    if lowered in ("false", "off", "no"):
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            continue
    return text


def parse_fault(words: list[str], known_kinds: Iterable[str]) -> dict[str, Any]:
    """Parse ``[target] KIND [target] [next N | 30s | p=0.5] [key=value ...]`` into ``FaultPlan.add`` kwargs.

    The target (a route or a model name; ``"*"`` when absent) may come before or right after
    the kind; a bare number after the kind is the ``code`` param (for gateway closes).
    """
    kinds = set(known_kinds)
    if not words:
        raise CommandError("which fault? try :help")
    if words[0] in kinds:
        target, kind, rest = "*", words[0], words[1:]
    elif len(words) > 1 and words[1] in kinds:
        target, kind, rest = words[0], words[1], words[2:]
    else:
        raise CommandError(f"unknown fault kind in {' '.join(words)!r}; known: {', '.join(sorted(kinds))}")
    spec: dict[str, Any] = {"kind": kind, "target": target, "params": {}}
    i = 0
    while i < len(rest):
        word = rest[i]
        if word == "next" and i + 1 < len(rest) and rest[i + 1].isdigit():
            spec["count"] = int(rest[i + 1])
            i += 2
            continue
        if (seconds := parse_duration(word)) is not None:
            spec["duration"] = seconds
        elif word.startswith("p="):
            spec["probability"] = float(word[2:])
        elif "=" in word:
            key, _, value = word.partition("=")
            spec["params"][key] = parse_value(value)
        elif word.isdigit():
            spec["params"]["code"] = int(word)
        elif spec["target"] == "*" and i == 0:
            spec["target"] = word  # the target may also follow the kind: ":fault gemini 503 MODEL"
        else:
            raise CommandError(f"cannot read {word!r}: use 'next N', a duration like 30s, p=0.5 or key=value")
        i += 1
    return spec


def parse_slash(
    line: str, *, groups: Collection[str], positional: dict[str, str]
) -> tuple[str, dict[str, Any]]:
    """Turn ``/name [sub] [key=value ...] [free text]`` into a command name and its options.

    Options are a flat ``{name: value}`` map; for a command in ``groups`` the first word is a
    subcommand and the map is ``{sub: {name: value}}``. Free text goes to the option named in
    ``positional`` for the command (or subcommand), ``"text"`` by default.
    """
    try:
        words = shlex.split(line[1:])
    except ValueError as exc:
        raise CommandError(f"cannot parse {line!r}: {exc}") from exc
    if not words:
        raise CommandError("which command?")
    name, rest = words[0], words[1:]
    sub = None
    if name in groups:
        if not rest:
            raise CommandError(f"/{name} needs a subcommand, e.g. /{name} status")
        sub, rest = rest[0], rest[1:]
    options: dict[str, Any] = {}
    free: list[str] = []
    for word in rest:
        key, eq, value = word.partition("=")
        if eq and key.isidentifier():
            options[key] = parse_value(value)
        else:
            free.append(word)
    if free:
        options = {positional.get(sub or name, "text"): " ".join(free)} | options
    if sub is not None:
        return name, {sub: options}
    return name, options


def message_view(message: Any) -> dict[str, Any]:
    """A recorded message (``SentMessage`` or a payload dict) as a plain dict for rendering."""
    if isinstance(message, dict):
        return message
    return {
        "id": message.id, "content": message.content, "embeds": message.embeds, "flags": message.flags,
        "message_reference": message.message_reference, "deleted": getattr(message, "deleted", False),
    }


def render_message(message: dict[str, Any], label: str, *, author: str = "bot", edited: bool = False) -> str:
    """A bot message as terminal text: content, reply marker, embeds as indented blocks."""
    head = f"[{label}] {author}"
    if message.get("message_reference"):
        head += " (reply)"
    if edited:
        head += " (edited)"
    if message.get("deleted"):
        head += " (deleted)"
    if (message.get("flags") or 0) & EPHEMERAL:
        head += " (only you can see this)"
    lines = [f"{head}: {message.get('content') or ''}".rstrip()]
    for embed in message.get("embeds") or []:
        for key in ("title", "description"):
            if embed.get(key):
                lines.extend(f"  | {line}" for line in str(embed[key]).splitlines())
        for field in embed.get("fields") or []:
            lines.append(f"  | {field.get('name', '')}: {field.get('value', '')}")
        if (embed.get("footer") or {}).get("text"):
            lines.append(f"  | -- {embed['footer']['text']}")
    return "\n".join(lines)


async def stdin_lines(stream: TextIO | None = None) -> AsyncIterator[str]:
    """Lines typed on stdin, read on a daemon thread so a blocked read never holds up exit."""
    source = stream or sys.stdin
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def pump() -> None:
        try:
            for raw in iter(source.readline, ""):
                loop.call_soon_threadsafe(queue.put_nowait, raw.rstrip("\n"))
            loop.call_soon_threadsafe(queue.put_nowait, None)
        except RuntimeError:  # the loop closed (the chat is over) while this thread waited for input
            return

    threading.Thread(target=pump, name="console-stdin", daemon=True).start()
    while (line := await queue.get()) is not None:
        yield line


class Console:
    """The terminal chat: reads lines from ``lines``, writes to ``out``, drives both emulators.

    ``run()`` processes lines until ``:quit`` or the end of input while a watcher prints the
    bot's messages as the Discord emulator records them (polled every ``poll_interval``
    seconds; ``show_new()`` does one pass on demand).
    """

    def __init__(
        self,
        discord: DiscordPeer,
        gemini: GeminiPeer,
        lines: AsyncIterator[str],
        out: TextIO,
        *,
        user: str = "normal",
        channel: str = "general",
        poll_interval: float = 0.2,
        groups: Collection[str] = frozenset({"admin"}),
        positional: dict[str, str] | None = None,
    ) -> None:
        self.discord = discord
        self.gemini = gemini
        self.lines = lines
        self.out = out
        self.user = user
        self.channel = channel
        self.mention = True
        self.poll_interval = poll_interval
        self.groups = groups
        self.positional = positional if positional is not None else {"ask": "question"}
        self.interactions: list[Any] = []
        self._shown: dict[str, str] = {}  # message id -> content rendered last time
        self._dm_labels: dict[int, str] = {}  # only DMs the person opened, so polling creates none
        self._awaiting: dict[str, int] = {}  # id of a message addressed to the bot -> its channel id

    # channels

    def channel_id(self, name: str | None = None) -> int:
        """Resolve a channel name (``general``, ``thread``, ``dm``) to its id."""
        name = name or self.channel
        if name == "thread":
            return self.discord.thread_id
        if name == "dm":
            cid = self.discord.dm_channel(self.user)
            self._dm_labels[cid] = f"DM {self.user}"
            return cid
        if name not in self.discord.channels:
            raise CommandError(f"no channel {name!r}; known: {', '.join(self.known_channels())}")
        return self.discord.channels[name]

    def known_channels(self) -> list[str]:
        return [*self.discord.channels, "thread", "dm"]

    def _labels(self) -> dict[int, str]:
        labels = {cid: f"#{name}" for name, cid in self.discord.channels.items()}
        labels[self.discord.thread_id] = "#general > thread"
        return labels | self._dm_labels

    # output

    def write(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def show_new(self) -> int:
        """Print bot messages, edits and interaction responses not shown yet; return how many."""
        printed = 0
        for cid, label in self._labels().items():
            for sent in self.discord.sent_messages(cid):
                view = message_view(sent)
                printed += self._show_once(f"m{view['id']}", view, label)
        for record in self.interactions:
            for n, (kind, data) in enumerate(list(getattr(record, "events", []))):
                shown = self._interaction_view(kind, data)
                if shown is not None:
                    printed += self._show_once(f"i{record.id}.{n}", shown, f"/{record.name}")
        return printed

    def _show_once(self, key: str, view: dict[str, Any], label: str) -> int:
        fingerprint = f"{view.get('content')}|{view.get('embeds')}|{view.get('deleted')}"
        if self._shown.get(key) == fingerprint:
            return 0
        edited = key in self._shown
        self._shown[key] = fingerprint
        self.write(render_message(view, label, edited=edited))
        return 1

    @staticmethod
    def _interaction_view(kind: str, data: dict[str, Any] | None) -> dict[str, Any] | None:
        """What a person sees for one interaction event; None for events shown elsewhere."""
        if data is None:
            return None
        if kind == "callback" and int(data.get("type", 0)) == 5:
            flags = int((data.get("data") or {}).get("flags") or 0)
            return {"content": "(thinking...)", "flags": flags}
        if kind in ("callback_message", "edit_original", "edit_followup"):
            return data
        if kind == "followup" and int(data.get("flags") or 0) & EPHEMERAL:
            return data  # non-ephemeral follow-ups land in the channel and show there
        return None

    def unanswered(self) -> int:
        """How many messages typed here to the bot (mention or DM) have no reply from it yet."""
        for mid, cid in list(self._awaiting.items()):
            refs = (message_view(m).get("message_reference") or {} for m in self.discord.sent_messages(cid))
            if any(str(ref.get("message_id")) == mid for ref in refs):
                del self._awaiting[mid]
        return len(self._awaiting)

    async def wait_answered(self, timeout: float, *, give_up: Callable[[], bool] = lambda: False) -> int:  # noqa: ASYNC109
        """Print replies until every message to the bot has one, ``timeout`` passes or ``give_up()``.

        Returns how many are still unanswered. A reply that says "queued" counts: it is an answer.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.unanswered() and not give_up() and loop.time() < deadline:
            self.show_new()
            await asyncio.sleep(self.poll_interval)
        self.show_new()
        return self.unanswered()

    async def _watch(self) -> None:
        while True:
            try:
                self.show_new()
            except Exception as exc:  # a half-built emulator state must not kill the chat
                self.write(f"(watcher: {exc!r})")
            await asyncio.sleep(self.poll_interval)

    # input

    async def run(self) -> None:
        """Process lines until ``:quit`` or end of input, printing bot messages meanwhile."""
        self.write(f"sandbox chat as {self.user} in #{self.channel}. :help for commands.")
        watcher = asyncio.create_task(self._watch(), name="console-watch")
        try:
            async for line in self.lines:
                if not await self.handle(line):
                    break
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            self.show_new()

    async def handle(self, line: str) -> bool:
        """Act on one typed line; False means quit. Mistakes are reported, never raised."""
        line = line.strip()
        if not line:
            return True
        try:
            if line.startswith(":"):
                return self._command(line[1:].split())
            if line.startswith("/"):
                await self._slash(line)
            else:
                await self._say(line)
        except CommandError as exc:
            self.write(f"! {exc}")
        except Exception as exc:  # an emulator refusing the event is news, not a crash
            self.write(f"! {type(exc).__name__}: {exc}")
        return True

    async def _say(self, text: str) -> None:
        cid = self.channel_id()
        mention = self.mention and self.channel != "dm"
        sent = await self.discord.send_user_message(cid, self.user, text, mentions_bot=mention)
        if mention or self.channel == "dm":
            self._awaiting[str(sent["id"])] = cid

    async def _slash(self, line: str) -> None:
        name, options = parse_slash(line, groups=self.groups, positional=self.positional)
        cid = self.channel_id()
        record = await self.discord.send_interaction(name, options, user=self.user, channel_id=cid)
        self.interactions.append(record)
        self.write(f"(sent /{name} as {self.user})")

    def _command(self, words: list[str]) -> bool:
        if not words:
            raise CommandError("empty command; :help lists them")
        name, args = words[0], words[1:]
        if name in ("quit", "q", "exit"):
            return False
        if name == "help":
            self.write(HELP)
        elif name == "user":
            if len(args) != 1 or args[0] not in self.discord.users or args[0] == "bot":
                users = ", ".join(k for k in self.discord.users if k != "bot")
                raise CommandError(f"usage: :user NAME (one of {users})")
            self.user = args[0]
            self.write(f"(you are now {self.user})")
        elif name == "channel":
            if len(args) != 1:
                raise CommandError(f"usage: :channel NAME (one of {', '.join(self.known_channels())})")
            self.channel_id(args[0])  # validates
            self.channel = args[0]
            self.write(f"(now in {args[0]})")
        elif name == "mention":
            if args not in (["on"], ["off"]):
                raise CommandError("usage: :mention on|off")
            self.mention = args[0] == "on"
            self.write(f"(mentioning the bot: {args[0]})")
        elif name == "fault":
            self._fault(args)
        elif name == "heal":
            self._heal(args)
        elif name == "faults":
            self._list_faults()
        elif name == "log":
            if len(args) > 1 or (args and not args[0].isdigit()):
                raise CommandError("usage: :log [N]")
            self._log(int(args[0]) if args else 5)
        else:
            raise CommandError(f"unknown command :{name}; :help lists them")
        return True

    def _plans(self) -> dict[str, FaultPlan]:
        return {"gemini": self.gemini.faults, "discord": self.discord.faults}

    def _fault(self, args: list[str]) -> Fault:
        if not args or args[0] not in ("gemini", "discord"):
            raise CommandError("usage: :fault gemini|discord ... (see :help)")
        kinds = GEMINI_FAULT_KINDS if args[0] == "gemini" else DISCORD_FAULT_KINDS
        spec = parse_fault(args[1:], kinds)
        params = spec.pop("params")
        try:
            fault = self._plans()[args[0]].add(**spec, **params)
        except (TypeError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        self.write(f"(fault {args[0]} {fault.describe()})")
        return fault

    def _heal(self, args: list[str]) -> None:
        plans = self._plans()
        names = args or list(plans)
        for name in names:
            if name not in plans:
                raise CommandError("usage: :heal [gemini|discord]")
            plans[name].clear()
        self.write(f"(healed {', '.join(names)})")

    def _list_faults(self) -> None:
        shown = False
        for name, plan in self._plans().items():
            for fault in plan.active():
                self.write(f"  {name}: {fault.describe()}")
                shown = True
        if not shown:
            self.write("  (no active faults)")

    def _log(self, n: int) -> None:
        for rec in list(self.gemini.requests)[-n:]:
            self.write(f"  gemini  {rec.method} {rec.model or '-'}:{rec.action or '-'} -> {rec.outcome}")
        for req in list(self.discord.requests)[-n:]:
            outcome = "dropped" if req.status is None else req.status
            fault = f" ({req.fault})" if req.fault else ""
            self.write(f"  discord {req.method} {req.route} -> {outcome}{fault}")
