"""``python -m rehearsal simulate``: the real bot under load and injected faults, and a report on the promise.

The Discord and Gemini emulators run in this process; the unmodified bot runs as a child
(``python -m bot --env-file <absent> run``) pointed at them, with its data, stdout and stderr
in a data directory (a fresh temporary one unless ``--data-dir`` is given). Simulated users
(guild members added before the bot logs in) mention the bot in simulated channels at a
fixed rate, open loop, while a configurable share of Gemini calls fails with a mix of kinds
(by default 10 %: 40 % hangs past the client timeout, 30 % 503, 20 % 429, 10 % 500), a share
of Discord message sends fail with 503, and Gemini has one total outage mid-run. Then every
fault is healed, and the run waits (bounded) until each message is settled and the bot's
durable queue is empty. A :class:`~rehearsal.ledger.Ledger` classifies what each user saw.

*Accepted* means a message the bot took responsibility for: every simulated message
mentions the bot and reaches it over the gateway, so every one is owed an answer, an honest
"queued" (⏳) followed by the answer, or a reason (``told why``). *Lost*: neither an answer
nor a reason by the end; *duplicated*: answered more than once.

The resilience score (0-100)::

    0 if anything was lost or duplicated, else
    100 x (0.6 x A + 0.2 x Q + 0.2 x D)
    A = share of accepted messages that got their answer (directly or after queueing)
    Q = share of "queued" acknowledgements that arrived within 1 s (1 when none were needed)
    D = share of accepted messages answered directly (no "queued" first) within 5 s

A is the promise itself (a reason is honest, but an answer is what the user wanted); Q says
the honest "queued" comes at once; D says the queue is the exception and the normal answer
is prompt, so a bot that queues everything for minutes cannot score well. The exit code is 0
when nothing was lost or duplicated and the score is at least 85, else 1 (the report says
which condition failed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from rehearsal.ledger import Asked, Ledger, Seen, percentiles
from resilience.retries import RetryBudget
from sandbox.__main__ import SANDBOX_DISCORD_TOKEN, SANDBOX_GEMINI_KEY, bot_settings
from sandbox.discord_emu import DiscordEmulator
from sandbox.faults import Fault, FaultPlan
from sandbox.gemini import FAULT_KINDS, GeminiEmulator
from services.config import SETTING_NAMES
from services.datadir import make_private_dir

REPO_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_MIX = "timeout=40,503=30,429=20,500=10"
MIX_ALIASES = {"timeout": "hang"}  # the user's word -> the Gemini emulator's fault kind
SHORT_429_DELAY = "1s"  # most 429s: retried transparently after the hint
LONG_429_DELAY = "30s"  # above the bot's default hint cap (20 s): the message is queued
SCORE_PASS = 85.0
ACK_WITHIN_SECONDS = 1.0
DIRECT_WITHIN_SECONDS = 5.0
SCORE_DEFINITION = (
    "score = 0 if anything was lost or duplicated, else 100 x (0.6 A + 0.2 Q + 0.2 D); "
    "A = share of accepted messages answered (directly or after queueing), "
    f"Q = share of 'queued' acknowledgements within {ACK_WITHIN_SECONDS:g} s (1 if none), "
    f"D = share of accepted messages answered directly within {DIRECT_WITHIN_SECONDS:g} s"
)

# Variables of the operator's shell that must never reach the child: a real token or key
# would point a load test at real Discord/Gemini.
STRIPPED_PREFIXES = ("DISCORD_", "GEMINI_", "GOOGLE_", "ADMIN_")

POLL_SECONDS = 0.25
PROGRESS_SECONDS = 0.5
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


class SimulationError(Exception):
    """The simulation could not run (the bot did not start, died, or its API failed); ``logs`` says where."""

    def __init__(self, message: str, *, logs: dict[str, str] | None = None) -> None:
        where = f" (bot logs: {logs['stdout']}, {logs['stderr']})" if logs else ""
        super().__init__(message + where)
        self.logs = logs or {}


# --- options -----------------------------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, float]:
    """``"timeout=40,503=30"`` -> ``{"hang": 40.0, "503": 30.0}``; ``ValueError`` naming the problem."""
    mix: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, eq, weight_text = part.partition("=")
        name = name.strip().lower()
        kind = MIX_ALIASES.get(name, name)
        if not eq:
            raise ValueError(f"{part!r} is not KIND=WEIGHT (e.g. {DEFAULT_MIX})")
        if kind not in FAULT_KINDS or kind == "latency":
            kinds = ", ".join(["timeout", *(k for k in FAULT_KINDS if k != "latency")])
            raise ValueError(f"unknown fault kind {name!r}; known: {kinds}")
        try:
            weight = float(weight_text)
        except ValueError:
            raise ValueError(f"weight of {name!r} is not a number: {weight_text!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {name!r} must be a finite number >= 0, not {weight_text!r}")
        if kind in mix:
            raise ValueError(f"fault kind {name!r} appears twice")
        mix[kind] = weight
    if sum(mix.values()) <= 0:
        raise ValueError(f"the mix {text!r} has no positive weight (e.g. {DEFAULT_MIX})")
    return mix


@dataclass(frozen=True)
class SimulationOptions:
    """Everything a run needs; the CLI builds one from its arguments."""

    users: int = 50
    channels: int = 10
    messages: int | None = 5000  # stop after this many messages ...
    duration: float | None = None  # ... or after this many seconds (exactly one of the two)
    # Messages per second, open loop. Measured on the shared 2-core box: at 10/s the bot keeps
    # up (score ~89); at 20/s and above the queue left by the outage outgrows the drain.
    rate: float = 10.0
    gemini_error_rate: float = 0.10
    gemini_mix: dict[str, float] = field(default_factory=lambda: parse_mix(DEFAULT_MIX))
    discord_error_rate: float = 0.02
    outage: float = 5.0  # seconds of total Gemini outage mid-run; 0 = none
    long_429_share: float = 0.1  # share of the 429s whose retry hint is too long to wait out
    seed: int = 0
    data_dir: Path | None = None
    settle_timeout: float = 180.0
    gemini_timeout: float = 2.0
    progress: bool = False
    breaker_reset_seconds: float = 5.0

    def planned_seconds(self) -> float:
        """How long the traffic is meant to last."""
        if self.duration is not None:
            return self.duration
        assert self.messages is not None
        return self.messages / self.rate

    def child_settings(self) -> dict[str, str]:
        """Bot settings that differ from the defaults for a simulation (shown in the report)."""
        return {
            "GEMINI_TIMEOUT_SECONDS": f"{self.gemini_timeout:g}",
            # Simulated users keep sending far above the cooldown a real user meets: without
            # this the load would mostly be polite refusals.
            "USER_RATE_LIMIT_PER_MINUTE": "10000",
            "GUILD_RATE_LIMIT_PER_MINUTE": "100000",
            # Likewise the caps on one user's and one server's waiting messages (anti-abuse).
            "QUEUE_MAX_PENDING_PER_USER": "10000",
            "QUEUE_MAX_PENDING_PER_GUILD": "100000",
            # Half-open within seconds after the outage, so "heal -> empty queue" is measurable.
            "BREAKER_RESET_SECONDS": f"{self.breaker_reset_seconds:g}",
            "SHUTDOWN_GRACE_SECONDS": "3",
        }


# --- the score -----------------------------------------------------------------------------------------


def resilience_score(
    *, accepted: int, answered: int, lost: int, duplicated: int, acks: int, acks_in_time: int,
    direct_in_time: int,
) -> float:
    """The score defined in the module docstring (0-100, one decimal)."""
    if lost > 0 or duplicated > 0:
        return 0.0
    if accepted <= 0:
        return 0.0  # nothing measured is no evidence of anything
    a = answered / accepted
    q = acks_in_time / acks if acks else 1.0
    d = direct_in_time / accepted
    return round(100.0 * (0.6 * a + 0.2 * q + 0.2 * d), 1)


# --- the bot child -----------------------------------------------------------------------------------


def child_environment(
    emulator_settings: dict[str, str], data_dir: Path, settings: dict[str, str], admin_token: str
) -> dict[str, str]:
    """The child's environment: this process's, minus every bot setting and real credential, plus ours."""
    names = set(SETTING_NAMES)
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(STRIPPED_PREFIXES)}
    env.update(emulator_settings)
    env.update(
        HTTP_HOST="127.0.0.1",
        HTTP_PORT="0",
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
        DATA_DIR=str(data_dir),
        ADMIN_API_TOKEN=admin_token,
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p),
        PYTHONUNBUFFERED="1",  # log lines reach the files as they happen
    )
    env.update(settings)
    return env


class BotChild:
    """``python -m bot --env-file <absent> run`` with output in files; ``stop()`` on every exit path."""

    def __init__(self, env: dict[str, str], data_dir: Path) -> None:
        self.env = env
        self.data_dir = data_dir
        self.stdout_path = data_dir / "bot.stdout.log"
        self.stderr_path = data_dir / "bot.stderr.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def logs(self) -> dict[str, str]:
        return {"stdout": str(self.stdout_path), "stderr": str(self.stderr_path)}

    def start(self) -> None:
        absent = self.data_dir / ".env.absent"  # never read a developer's .env
        command = [sys.executable, "-m", "bot", "--env-file", str(absent), "run"]
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            # Its own session: a terminal's Ctrl-C reaches only us, and we stop it in order.
            self._proc = subprocess.Popen(command, cwd=self.data_dir, env=self.env, stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=err, start_new_session=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def log_lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (both streams)."""
        lines: list[dict[str, Any]] = []
        for path in (self.stdout_path, self.stderr_path):
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        record = json.loads(line)
                        if isinstance(record, dict):
                            lines.append(record)
        return lines

    async def http_port(self, timeout: float) -> int:  # noqa: ASYNC109
        """The HTTP API's port, from the child's ``http_api.listening`` log line."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for record in self.log_lines():
                if record.get("event") == "http_api.listening":
                    return int(record["port"])
            if not self.running:
                raise SimulationError(f"the bot exited with code {self.returncode} before listening",
                                      logs=self.logs)
            await asyncio.sleep(0.05)
        raise SimulationError(f"the bot did not log http_api.listening within {timeout:g} s", logs=self.logs)

    async def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:  # noqa: ASYNC109
        """SIGTERM, wait up to ``timeout`` (the loop stays free to serve its shutdown), then SIGKILL."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + timeout
                # Polling, not proc.wait(): the loop must stay free to serve the child's shutdown.
                while proc.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        finally:
            self.kill()  # also when this wait is itself interrupted (a second Ctrl-C)
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL and reap, if still running; safe at any time (the last resort on every path)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)


class BotApi:
    """GETs on the child's loopback HTTP API."""

    def __init__(self, session: aiohttp.ClientSession, port: int) -> None:
        self.session = session
        self.base = f"http://127.0.0.1:{port}"

    async def ready(self) -> bool:
        async with self.session.get(self.base + "/ready") as response:
            return response.status == 200

    async def queue_pending(self) -> int | None:
        """Pending durable-queue items (None when the bot cannot read its queue right now)."""
        async with self.session.get(self.base + "/api/health/degradation") as response:
            body = await response.json()
        queue = body.get("queue")
        return None if queue is None else int(queue["pending"])

    async def metrics(self) -> str:
        async with self.session.get(self.base + "/metrics") as response:
            return await response.text()


# --- faults ---------------------------------------------------------------------------------------------


@dataclass
class InjectedFaults:
    """The faults put into the emulators' plans, kept so their hit counts can be read at the end."""

    gemini: list[tuple[str, Fault]] = field(default_factory=list)  # (report label, fault)
    discord: list[tuple[str, Fault]] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {"gemini": {}, "discord": {}}
        for side, faults in (("gemini", self.gemini), ("discord", self.discord)):
            for label, fault in faults:
                out[side][label] = out[side].get(label, 0) + fault.hits
        return out


def install_gemini_mix(
    plan: FaultPlan, error_rate: float, mix: dict[str, float], injected: InjectedFaults,
    long_429_share: float = 0.1,
) -> None:
    """Make ``error_rate`` of Gemini calls fail, split by ``mix``.

    The plan's first matching fault wins, so each fault gets the conditional probability
    ``p_i / (1 - sum of earlier p_j)``: the shares come out as asked. A 429 carries a 1 s
    retry hint, or (``long_429_share`` of them) a 30 s one the bot will not wait out.
    """
    total = sum(mix.values())
    entries: list[tuple[str, str, float, dict[str, Any]]] = []
    for kind, weight in mix.items():
        share = error_rate * weight / total
        label = "timeout" if kind == "hang" else kind
        if kind == "429":
            entries.append(("429 (1 s hint)", kind, share * (1 - long_429_share),
                            {"retry_delay": SHORT_429_DELAY}))
            entries.append(("429 (30 s hint)", kind, share * long_429_share, {"retry_delay": LONG_429_DELAY}))
        else:
            entries.append((label, kind, share, {}))
    remaining = 1.0
    for label, kind, share, params in entries:
        if share <= 0 or remaining <= 0:
            continue
        probability = min(1.0, share / remaining)
        remaining -= share
        injected.gemini.append((label, plan.add(kind, probability=probability, **params)))


# --- the run ----------------------------------------------------------------------------------------------


@dataclass
class Outage:
    """The total Gemini outage mid-run: it starts at ``at`` seconds into the traffic and ends only
    once the bot's ``gemini`` breaker has opened (read from its metrics) and ``seconds`` have
    passed, so it surely opens the breaker however slow the bot or the machine is. It outlives the
    traffic if it must; ``give_up`` seconds after it started it ends regardless (the report then
    shows that the breaker never opened)."""

    seconds: float
    at: float
    give_up: float
    fault: Fault | None = None
    started: float | None = None
    opened: bool = False
    next_look: float = 0.0  # the bot's metrics are read at most every POLL_SECONDS

    @property
    def running(self) -> bool:
        return self.fault is not None

    def begin(self, gemini: GeminiEmulator, injected: InjectedFaults, now: float) -> None:
        self.fault = gemini.faults.add("503")
        injected.gemini.append(("outage 503", self.fault))
        self.started = now

    async def check(self, api: BotApi, gemini: GeminiEmulator, watch: QueueWatch, now: float) -> None:
        """End the outage (and note the heal) once the breaker has opened and its time is up."""
        if self.fault is None or self.started is None:
            return
        if not self.opened and now >= self.next_look:
            self.next_look = now + POLL_SECONDS
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                samples = parse_metrics(await api.metrics())
                self.opened = any(
                    labels.get("breaker") == "gemini" and labels.get("to") == "open" and value > 0
                    for labels, value in samples.get("bot_breaker_transitions_total", [])
                )
        if (self.opened and now >= self.started + self.seconds) or now >= self.started + self.give_up:
            gemini.faults.remove(self.fault.id)
            self.fault = None
            watch.heal("outage", now)


@dataclass
class QueueWatch:
    """Polls the bot's queue; for each heal, notes when the queue first read empty after it."""

    api: BotApi
    heals: list[tuple[str, float]] = field(default_factory=list)  # (what healed, monotonic time)
    emptied: dict[str, float] = field(default_factory=dict)  # what healed -> seconds to empty
    pending: int | None = None
    max_pending: int = 0

    def heal(self, what: str, at: float | None = None) -> None:
        self.heals.append((what, time.monotonic() if at is None else at))

    async def poll_once(self) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
            self.pending = await self.api.queue_pending()
        if self.pending is None:
            return
        self.max_pending = max(self.max_pending, self.pending)
        if self.pending == 0:
            now = time.monotonic()
            for what, at in self.heals:
                self.emptied.setdefault(what, now - at)

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(POLL_SECONDS)


class Progress:
    """One updating stderr line: sent / settled / queued (acknowledged only) / waiting (no reply yet),
    the sending rate and the elapsed time."""

    def __init__(self, ledger: Ledger, total: int | None, out: TextIO, enabled: bool) -> None:
        self.ledger = ledger
        self.total = total
        self.out = out
        self.enabled = enabled
        self.started = time.monotonic()
        self.phase = "sending"

    def line(self) -> str:
        self.ledger.update()
        seen = Counter(a.seen for a in self.ledger.asked.values())
        sent = len(self.ledger.asked)
        settled = sum(n for s, n in seen.items() if s.settled)
        elapsed = time.monotonic() - self.started
        target = f"/{self.total}" if self.total else ""
        width = 10
        done = settled / self.total if self.total else 0.0
        bar = f"[{'#' * int(width * done):.<{width}}] " if self.total else ""
        text = (
            f"{self.phase:<8} {bar}{sent}{target} sent {settled} settled {seen[Seen.QUEUED]} queued"
            f" {seen[Seen.NOTHING]} waiting {sent / elapsed if elapsed else 0:.0f}/s {elapsed:.0f} s "
        )
        # A line wider than the terminal wraps, and "\r" then rewrites only its last part.
        return "\r" + text[: max(20, shutil.get_terminal_size().columns - 1)]

    def show(self) -> None:
        if self.enabled:
            self.out.write(self.line())
            self.out.flush()

    def finish(self) -> None:
        if self.enabled:
            self.show()
            self.out.write("\n")
            self.out.flush()

    async def run(self) -> None:
        while True:
            self.show()
            await asyncio.sleep(PROGRESS_SECONDS)


async def simulate(options: SimulationOptions, *, progress_out: TextIO = sys.stderr) -> dict[str, Any]:
    """Run one simulation and return its report (see :func:`format_report` for the table).

    Raises :class:`SimulationError` when the bot cannot be run; the child is stopped on
    every way out, cancellation included.
    """
    if options.data_dir is not None:
        data_dir = options.data_dir.resolve()
        make_private_dir(data_dir)
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="bot-simulate-"))
    started = time.monotonic()
    cpu_started = time.process_time()
    children_cpu = _children_cpu()
    rng = random.Random(options.seed)
    injected = InjectedFaults()
    async with (
        DiscordEmulator(token=SANDBOX_DISCORD_TOKEN,
                        faults=FaultPlan(rng=random.Random(options.seed + 1))) as discord,
        GeminiEmulator(api_key=SANDBOX_GEMINI_KEY, seed=options.seed) as gemini,
    ):
        users = [f"sim{i}" for i in range(options.users)]
        for key in users:
            discord.world.add_member(key, f"simuser{key[3:]}")
        channels = [discord.world.add_text_channel(f"sim-{j}") for j in range(options.channels)]
        settings = options.child_settings()
        child = BotChild(
            child_environment(bot_settings(discord, gemini), data_dir, settings, secrets.token_urlsafe(24)),
            data_dir,
        )
        try:
            child.start()
            port = await child.http_port(START_TIMEOUT)
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                api = BotApi(session, port)
                await _wait_ready(api, child)
                body = await _drive(options, discord, gemini, api, child, users, channels, rng, injected,
                                    progress_out)
        finally:
            code = await child.stop()
    body["bot_exit_code"] = code
    body["wall_seconds"] = round(time.monotonic() - started, 1)
    # The child is reaped by now, so its CPU time is in RUSAGE_CHILDREN: the cost of a message.
    bot_cpu = _children_cpu() - children_cpu
    body["cpu_seconds"] = {
        "bot": round(bot_cpu, 1),
        "bot_ms_per_message": round(1000 * bot_cpu / body["accepted"], 1) if body["accepted"] else None,
        "simulator": round(time.process_time() - cpu_started, 1),  # emulators, ledger, progress
    }
    body["settings"] = _settings_view(options, settings)
    body["data_dir"] = str(data_dir)
    body["bot_logs"] = child.logs
    return body


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def _wait_ready(api: BotApi, child: BotChild) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if not child.running:
            raise SimulationError(f"the bot exited with code {child.returncode} while starting",
                                  logs=child.logs)
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            if await api.ready():
                return
        await asyncio.sleep(0.1)
    raise SimulationError(f"the bot was not ready within {START_TIMEOUT:g} s", logs=child.logs)


async def _drive(
    options: SimulationOptions, discord: DiscordEmulator, gemini: GeminiEmulator, api: BotApi,
    child: BotChild, users: list[str], channels: list[int], rng: random.Random, injected: InjectedFaults,
    progress_out: TextIO,
) -> dict[str, Any]:
    """Send the traffic under faults, heal, settle, and gather every figure."""
    if options.gemini_error_rate > 0:
        install_gemini_mix(gemini.faults, options.gemini_error_rate, options.gemini_mix, injected,
                           options.long_429_share)
    if options.discord_error_rate > 0:
        fault = discord.faults.add("503", "send", probability=options.discord_error_rate)
        injected.discord.append(("send 503", fault))

    ledger = Ledger(discord, prefix="s")
    watch = QueueWatch(api)
    progress = Progress(ledger, options.messages, progress_out, options.progress)
    outage = None
    if options.outage > 0:
        give_up = options.outage + options.settle_timeout
        outage = Outage(options.outage, at=options.planned_seconds() / 2, give_up=give_up)
    tasks = [asyncio.create_task(watch.run(), name="simulate-queue-watch"),
             asyncio.create_task(progress.run(), name="simulate-progress")]
    try:
        begin = time.monotonic()
        n = 0
        while True:
            now = time.monotonic()
            elapsed = now - begin
            if options.messages is not None and n >= options.messages:
                break
            if options.duration is not None and elapsed >= options.duration:
                break
            if outage is not None and outage.started is None and elapsed >= outage.at:
                outage.begin(gemini, injected, now)
            if outage is not None and outage.running:
                await outage.check(api, gemini, watch, now)
            if not child.running:
                raise SimulationError(f"the bot exited with code {child.returncode} mid-run", logs=child.logs)
            delay = begin + n / options.rate - now
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            await ledger.ask(rng.choice(channels), rng.choice(users), f"question {n} from the simulation")
            n += 1
        send_seconds = time.monotonic() - begin

        # An outage still running goes on until it has opened the breaker and lasted its time.
        while outage is not None and outage.running:
            await outage.check(api, gemini, watch, time.monotonic())
            if not child.running:
                raise SimulationError(f"the bot exited with code {child.returncode} mid-run", logs=child.logs)
            await asyncio.sleep(POLL_SECONDS)
        # Heal everything, then wait for the promise to settle.
        gemini.faults.clear()
        discord.faults.clear()
        watch.heal("end of traffic")
        progress.phase = "settling"
        settle_started = time.monotonic()
        deadline = settle_started + options.settle_timeout
        while time.monotonic() < deadline:
            await watch.poll_once()
            if not ledger.unsettled() and watch.pending == 0:
                break
            if not child.running:
                raise SimulationError(f"the bot exited with code {child.returncode} while settling",
                                      logs=child.logs)
            await asyncio.sleep(POLL_SECONDS)
        await asyncio.sleep(0.5)  # a reply still in flight shows up as a duplicate, not as nothing
        settle_seconds = time.monotonic() - settle_started
        metrics_text = await api.metrics()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        progress.finish()
    return _figures(ledger, watch, injected, metrics_text, send_seconds, settle_seconds, begin)


# --- figures and the report -----------------------------------------------------------------------------


def _told_why_kind(asked: Asked) -> str:
    """A cheap label for the reason the bot gave, from its wording (bot/texts.py)."""
    text = asked.notices[0].content if asked.notices else ""
    for prefix, kind in (
        ("You're sending messages faster", "cooldown"),
        ("Sorry, I tried", "dead_letter"),
        ("Sorry, your message waited", "expired"),
        ("Sorry, something went wrong", "bug"),
        ("Gemini gave me no answer", "no_answer"),
        ("Your message is", "too_long"),
    ):
        if text.startswith(prefix):
            return kind
    return "other"


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus exposition -> sample name -> [(labels, value)]."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def _figures(
    ledger: Ledger, watch: QueueWatch, injected: InjectedFaults, metrics_text: str, send_seconds: float,
    settle_seconds: float, begin: float,
) -> dict[str, Any]:
    tally = ledger.tally()
    items = list(ledger.asked.values())
    accepted = tally.sent
    answered = tally.seen[Seen.ANSWERED_DIRECT.value] + tally.seen[Seen.ANSWERED_AFTER_QUEUE.value]
    ack_times = [s for a in items if (s := a.ack_seconds()) is not None]
    first_times = [a.first_reply_seconds() for a in items]
    score_inputs = {
        "accepted": accepted,
        "answered": answered,
        "lost": tally.lost,
        "duplicated": tally.duplicated,
        "acks": len(ack_times),
        "acks_in_time": sum(s <= ACK_WITHIN_SECONDS for s in ack_times),
        "direct_in_time": sum(a.seen is Seen.ANSWERED_DIRECT and (a.answer_seconds() or 0.0)
                              <= DIRECT_WITHIN_SECONDS for a in items),
    }
    score = resilience_score(**score_inputs)

    samples = parse_metrics(metrics_text)
    transitions: dict[str, dict[str, int]] = {}
    for labels, value in samples.get("bot_breaker_transitions_total", []):
        if value:
            transitions.setdefault(labels["breaker"], {})[f"{labels['from']}->{labels['to']}"] = int(value)
    retries = {labels["outcome"]: int(value) for labels, value in samples.get("bot_retries_total", [])
               if labels.get("dependency") == "gemini"}
    by_code = Counter[str]()
    for labels, value in samples.get("bot_gemini_requests_total", []):
        by_code[labels["code"]] += int(value)
    attempts = sum(by_code.values())
    calls = attempts - retries.get("retried", 0)
    budget = RetryBudget()  # the defaults bot/app.py builds the Gemini budget with
    run_seconds = time.monotonic() - begin
    allowance = budget.max_tokens + budget.ratio * calls + budget.min_per_second * run_seconds
    outcomes = {labels["outcome"]: int(value) for labels, value in samples.get("bot_messages_total", [])
                if value}
    heal_seconds = [round(s, 2) for s in watch.emptied.values()]

    verdict = []
    if tally.lost:
        verdict.append(f"{tally.lost} lost")
    if tally.duplicated:
        verdict.append(f"{tally.duplicated} duplicated")
    if score < SCORE_PASS:
        verdict.append(f"score {score} < {SCORE_PASS:g}")
    return {
        "accepted": accepted,
        "answered_direct": tally.seen[Seen.ANSWERED_DIRECT.value],
        "answered_after_queue": tally.seen[Seen.ANSWERED_AFTER_QUEUE.value],
        "told_why": tally.seen[Seen.TOLD_WHY.value],
        "told_why_kinds": dict(Counter(_told_why_kind(a) for a in items if a.seen is Seen.TOLD_WHY)),
        "lost": tally.lost,
        "lost_examples": [ledger.describe(a) for a in ledger.unsettled()[:5]],
        "duplicated": tally.duplicated,
        "out_of_order_channels": tally.out_of_order,
        "unmatched_bot_messages": len(ledger.unmatched),
        "latency_ms": {
            "direct_answer": _rounded(tally.direct_ms),
            "ack": _rounded(tally.ack_ms),
            "answer_after_queue": _rounded(tally.after_queue_ms),
            "first_reply": _rounded(percentiles(first_times)),
        },
        "breaker_transitions": transitions,
        "retries": {
            "spent": retries.get("retried", 0),
            "denied_by_budget": retries.get("denied_by_budget", 0),
            "hint_too_long": retries.get("hint_too_long", 0),
            "gemini_calls": calls,
            "gemini_attempts": attempts,
            "gemini_attempts_by_code": {code: n for code, n in sorted(by_code.items()) if n},
            "budget_allowance": round(allowance, 1),
            "budget_rule": (f"{budget.max_tokens:g} + {budget.ratio:g} x calls + "
                            f"{budget.min_per_second:g}/s x {run_seconds:.0f} s"),
        },
        "heal_to_empty_queue_seconds": {
            "each": {what: round(s, 2) for what, s in watch.emptied.items()},
            "not_reached": [what for what, _ in watch.heals if what not in watch.emptied],
            "mean": round(sum(heal_seconds) / len(heal_seconds), 2) if heal_seconds else None,
        },
        "queue_max_pending": watch.max_pending,
        "faults_injected": injected.counts(),
        # Faults are live only while traffic is sent: a bot that falls behind makes most of its
        # calls after the heal, and this share shows it.
        "gemini_faulted_share_of_attempts": round(
            sum(injected.counts()["gemini"].values()) / attempts, 4) if attempts else None,
        "bot_outcomes": outcomes,
        "send_seconds": round(send_seconds, 1),
        "settle_seconds": round(settle_seconds, 1),
        "messages_per_second": round(accepted / send_seconds, 1) if send_seconds > 0 else None,
        "score": score,
        "score_inputs": score_inputs,
        "score_definition": SCORE_DEFINITION,
        "passed": not verdict,
        "failed_because": verdict,
    }


def _rounded(figures: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in figures.items()}


def _settings_view(options: SimulationOptions, child_settings: dict[str, str]) -> dict[str, Any]:
    return {
        "users": options.users,
        "channels": options.channels,
        "messages": options.messages,
        "duration": options.duration,
        "rate": options.rate,
        "gemini_error_rate": options.gemini_error_rate,
        "gemini_mix": {("timeout" if k == "hang" else k): v for k, v in options.gemini_mix.items()},
        "discord_error_rate": options.discord_error_rate,
        "outage_seconds": options.outage,
        "long_429_share": options.long_429_share,
        "seed": options.seed,
        "bot_settings": child_settings,
    }


def format_report(report: dict[str, Any]) -> str:
    """The terminal table."""
    s = report["settings"]
    mix = ", ".join(f"{k}={v:g}" for k, v in s["gemini_mix"].items())
    rows: list[tuple[str, str]] = []

    def row(name: str, value: Any) -> None:
        rows.append((name, str(value)))

    def lat(figures: dict[str, float]) -> str:
        if not figures:
            return "-"
        cuts = " / ".join(f"{figures[k]:.0f}" for k in ("p50", "p95", "p99"))
        return f"{cuts}  (max {figures['max']:.0f})"

    row("accepted (owed an answer or a reason)", report["accepted"])
    row("answered directly", report["answered_direct"])
    row("answered after queueing", report["answered_after_queue"])
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(report["told_why_kinds"].items()))
    row("told why", f"{report['told_why']}" + (f"  ({kinds})" if kinds else ""))
    row("LOST", report["lost"])
    row("DUPLICATED", report["duplicated"])
    row("channels answered out of order", report["out_of_order_channels"])
    for name, key in (("direct answers", "direct_answer"), ("acknowledgements", "ack"),
                      ("answers after queueing", "answer_after_queue"), ("first reply", "first_reply")):
        row(f"latency ms p50/p95/p99: {name}", lat(report["latency_ms"][key]))
    trans = report["breaker_transitions"]
    row("breaker transitions", "; ".join(
        f"{b}: " + ", ".join(f"{t} x{n}" for t, n in sorted(ts.items())) for b, ts in sorted(trans.items())
    ) or "none")
    r = report["retries"]
    row("Gemini retries spent / budget allowance",
        f"{r['spent']} / {r['budget_allowance']:g}  ({r['budget_rule']}; denied {r['denied_by_budget']}, "
        f"hint too long {r['hint_too_long']}, {r['gemini_calls']} calls)")
    heal = report["heal_to_empty_queue_seconds"]
    each = ", ".join(f"{k} {v:g} s" for k, v in heal["each"].items())
    missing = ", ".join(heal["not_reached"])
    row("heal -> empty queue (mean)", (f"{heal['mean']:g} s  ({each})" if heal["mean"] is not None else "-")
        + (f"  not reached: {missing}" if missing else ""))
    row("queue depth (max seen)", report["queue_max_pending"])
    faults = report["faults_injected"]
    share = report["gemini_faulted_share_of_attempts"]
    attempts = report["retries"]["gemini_attempts"]
    of_all = f"  ({share:.1%} of all {attempts} attempts)" if share is not None else ""
    gemini_faults = ", ".join(f"{k} {v}" for k, v in faults["gemini"].items()) or "none"
    row("faults injected: Gemini", gemini_faults + of_all)
    row("faults injected: Discord", ", ".join(f"{k} {v}" for k, v in faults["discord"].items()) or "none")
    row("messages/second sent", report["messages_per_second"])
    cpu = report["cpu_seconds"]
    row("CPU seconds: bot / simulator", f"{cpu['bot']:g} ({cpu['bot_ms_per_message']} ms per message) / "
        f"{cpu['simulator']:g}")
    row("traffic / settle / wall seconds",
        f"{report['send_seconds']:g} / {report['settle_seconds']:g} / {report['wall_seconds']:g}")
    row("RESILIENCE SCORE", f"{report['score']:g}  ({'PASS' if report['passed'] else 'FAIL: '}"
        f"{', '.join(report['failed_because'])})")
    width = max(len(name) for name, _ in rows)
    bot = ", ".join(f"{k}={v}" for k, v in s["bot_settings"].items())
    target = f"{s['messages']} messages" if s["messages"] is not None else f"{s['duration']:g} s"
    lines = [
        f"Simulation: {target} at {s['rate']:g}/s from {s['users']} users in {s['channels']} channels, "
        f"seed {s['seed']}",
        f"Gemini errors {s['gemini_error_rate']:.0%} of calls ({mix}; 429s carry a 1 s retry hint, "
        f"{s['long_429_share']:.0%} of them 30 s),",
        f"Discord sends failing {s['discord_error_rate']:.0%} (503), Gemini outage {s['outage_seconds']:g} s "
        "mid-run",
        f"Bot settings changed for the run: {bot} (simulated users ignore the cooldown a real user "
        "would meet; rate-limited messages would count as told why)",
        "",
    ]
    lines += [f"  {name.ljust(width)}  {value}" for name, value in rows]
    lines += ["", f"Score: {report['score_definition']}.",
              f"Bot logs: {report['bot_logs']['stdout']} and {report['bot_logs']['stderr']}"]
    if report["lost_examples"]:
        lines.append("Lost, e.g.: " + "; ".join(report["lost_examples"]))
    return "\n".join(lines)


# --- the command line --------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _number(low: float, high: float | None = None, *, low_open: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            bound = f"> {low:g}" if low_open else f">= {low:g}"
            raise argparse.ArgumentTypeError(
                f"must be {bound}" + (f" and <= {high:g}" if high is not None else "") + f", not {text}"
            )
        return value

    return parse


def _mix(text: str) -> dict[str, float]:
    try:
        return parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``simulate`` subcommand."""
    parser = subparsers.add_parser(
        "simulate",
        help="run the bot against the emulators under load and injected faults, and report",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
    )
    defaults = SimulationOptions()
    parser.add_argument("--users", type=_positive_int, default=defaults.users, help="simulated users (50)")
    parser.add_argument("--channels", type=_positive_int, default=defaults.channels,
                        help="simulated channels (10)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--messages", type=_positive_int, help="messages to send (default 5000)")
    amount.add_argument("--duration", type=_number(0, low_open=True), help="seconds of traffic instead")
    parser.add_argument("--rate", type=_number(0, 10_000, low_open=True), default=defaults.rate,
                        help=f"messages per second (default {defaults.rate:g})")
    parser.add_argument("--gemini-error-rate", type=_number(0, 1), default=defaults.gemini_error_rate,
                        help="share of Gemini calls that fail (0.10)")
    parser.add_argument("--gemini-mix", type=_mix, default=parse_mix(DEFAULT_MIX),
                        help=f"how they fail, KIND=WEIGHT,... (default {DEFAULT_MIX}); kinds: timeout "
                             "and the Gemini emulator's fault kinds")
    parser.add_argument("--discord-error-rate", type=_number(0, 1), default=defaults.discord_error_rate,
                        help="share of the bot's Discord message sends answered 503 (0.02)")
    parser.add_argument("--outage", type=_number(0), default=defaults.outage,
                        help="seconds of total Gemini outage mid-run, 0 for none (5)")
    parser.add_argument("--long-429-share", type=_number(0, 1), default=defaults.long_429_share,
                        help="share of the 429s whose 30 s retry hint the bot will not wait out (0.1)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed for users, channels and faults")
    parser.add_argument("--data-dir", type=Path,
                        help="the bot's data and logs (default: a new temporary directory)")
    parser.add_argument("--settle-timeout", type=_number(0, low_open=True), default=defaults.settle_timeout,
                        help="seconds to wait after the traffic for every answer (180)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="the progress line on stderr (default: when stderr is a terminal)")
    parser.set_defaults(func=main)


async def _simulate_until_signalled(options: SimulationOptions) -> dict[str, Any]:
    """``simulate``, with SIGTERM treated like Ctrl-C: cancel, so the child is stopped, not orphaned."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not on Windows / not the main thread
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await simulate(options)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)


def main(args: argparse.Namespace) -> int:
    """The ``simulate`` subcommand: run, print the report, return 0 on a pass, 1 on a fail."""
    options = SimulationOptions(
        users=args.users,
        channels=args.channels,
        messages=None if args.duration is not None else (args.messages or 5000),
        duration=args.duration,
        rate=args.rate,
        gemini_error_rate=args.gemini_error_rate,
        gemini_mix=args.gemini_mix,
        discord_error_rate=args.discord_error_rate,
        outage=args.outage,
        long_429_share=args.long_429_share,
        seed=args.seed,
        data_dir=args.data_dir,
        settle_timeout=args.settle_timeout,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
    )
    try:
        report = asyncio.run(_simulate_until_signalled(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nsimulation interrupted; the bot was stopped", file=sys.stderr)
        return 130
    except SimulationError as exc:
        print(f"simulation failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if not report["passed"]:
        print(f"simulate: FAIL ({', '.join(report['failed_because'])})", file=sys.stderr)
        return 1
    return 0
