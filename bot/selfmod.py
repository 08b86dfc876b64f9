"""Guarded self-modification: an owner has Gemini change one plugin's file, checked before it runs.

Off unless ``SELF_MODIFY=1``; owners only (the commands check). ``propose`` asks Gemini for the
whole new text of one plugin file of the plugins folder (installed plugins and the core, ``bot/``
``services/`` ``resilience/``, are refused), then:

1. ``check_source``: the text parses, stays under ``MAX_SOURCE_BYTES``, imports only
   ``ALLOWED_IMPORTS``, and names none of ``FORBIDDEN_NAMES`` / ``FORBIDDEN_ATTRIBUTES`` nor a
   private attribute (no ``eval``/``exec``/``compile``/``__import__``/``open``, no ``os``,
   ``subprocess``, ``socket``: a plugin reaches files and the network only through the bot);
2. ``run_plugin_tests``: a copy of the plugins folder with the new file runs the plugin's tests
   (``<folder>/tests/test_<name>.py``; a plugin without tests is refused) in a subprocess, killed
   after ``SELF_MODIFY_TEST_TIMEOUT_SECONDS``;
3. the proposal is kept (``ProposalBook``, a JSON file in ``DATA_DIR``) with its diff, ready to
   apply. ``apply`` writes the file (only if it is still the one the proposal was made from),
   reloads the plugin atomically and puts the old file back if the reload fails; each applied
   change is recorded (who, when, the diff, the previous text), and ``revert`` puts the previous
   text back the same way.
"""

from __future__ import annotations

import ast
import asyncio
import difflib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from bot.plugins import PluginHost, PluginLoadError
from resilience.clock import Clock

log = structlog.get_logger("bot.selfmod")

MAX_SOURCE_BYTES = 64 * 1024
MAX_CHANGE_CHARS = 1000
KEEP_RECORDS = 50
TEST_OUTPUT_CHARS = 1500
REPO = Path(__file__).resolve().parents[1]
CORE_DIRS = tuple(REPO / d for d in ("bot", "services", "resilience"))

ALLOWED_IMPORTS = frozenset(
    {
        "__future__",
        "asyncio",
        "collections",
        "collections.abc",
        "dataclasses",
        "datetime",
        "enum",
        "functools",
        "itertools",
        "json",
        "math",
        "random",
        "re",
        "string",
        "textwrap",
        "time",
        "typing",
        "zoneinfo",
        "discord",
        "discord.app_commands",
        "discord.ext",
        "discord.ext.commands",
        "discord.ext.tasks",
        "discord.ui",
        "discord.utils",
        "structlog",
        "services.tools",  # the plugin API for functions Gemini may call (Tool, Safety)
    }
)
FORBIDDEN_NAMES = frozenset(
    {
        "eval",
        "exec",
        "compile",
        "__import__",
        "open",
        "breakpoint",
        "input",
        "globals",
        "locals",
        "vars",
        "getattr",
        "setattr",
        "delattr",
        "memoryview",
        "os",
        "sys",
        "subprocess",
        "socket",
        "importlib",
        "builtins",
        "__builtins__",
        "__loader__",
        "__spec__",
    }
)
# Ways out through allowed modules: asyncio's subprocesses and sockets, discord.py's HTTP session.
FORBIDDEN_ATTRIBUTES = frozenset({
    # asyncio's subprocesses, sockets, threads and the loop that has them all
    "create_subprocess_exec", "create_subprocess_shell", "subprocess", "subprocess_exec", "subprocess_shell",
    "open_connection", "start_server", "open_unix_connection", "start_unix_server", "create_connection",
    "create_server", "create_datagram_endpoint", "connect_accepted_socket", "sock_connect", "sock_sendall",
    "getaddrinfo", "run_in_executor", "to_thread", "get_event_loop", "get_running_loop",
    "new_event_loop", "events", "base_events", "unix_events", "selector_events",
    # modules an allowed module happens to import (discord.utils.os, json.codecs, ...)
    "os", "sys", "socket", "shutil", "importlib", "builtins", "ctypes", "pathlib", "io", "tempfile",
    "signal", "multiprocessing", "threading", "aiohttp", "urllib", "ssl", "pickle", "marshal", "inspect",
    "codecs", "gc", "platform", "runpy", "http", "ClientSession", "system", "popen", "eval", "exec",
})  # fmt: skip

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


class SelfModifyError(Exception):
    """A proposal, apply or revert was refused; the message says why, for the owner."""


class SelfModifyDisabledError(SelfModifyError):
    def __init__(self) -> None:
        super().__init__("self-modification is off (set SELF_MODIFY=1 to allow it)")


class PatchRefusedError(SelfModifyError):
    """The new text failed a check (``problems``)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("the patch is refused: " + "; ".join(problems))
        self.problems = problems


def check_source(source: str) -> list[str]:
    """What is wrong with a plugin file's new text (empty: nothing)."""
    size = len(source.encode())
    if size > MAX_SOURCE_BYTES:
        return [f"it is {size} bytes, over the {MAX_SOURCE_BYTES} allowed"]
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return [f"it does not parse: {exc.msg} (line {exc.lineno})"]
    problems: list[str] = []

    def refuse(node: ast.AST, why: str) -> None:
        problems.append(f"line {getattr(node, 'lineno', '?')}: {why}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name not in ALLOWED_IMPORTS:
                    refuse(node, f"imports {alias.name}, which is not allowed")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                refuse(node, "a relative import")
            elif module not in ALLOWED_IMPORTS:
                refuse(node, f"imports from {module}, which is not allowed")
            elif module == "__future__":
                continue
            for alias in node.names:
                if alias.name in FORBIDDEN_NAMES or alias.name.startswith("_"):
                    refuse(node, f"imports {alias.name}")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            refuse(node, f"uses {node.id}")
        elif isinstance(node, ast.Attribute):
            if node.attr.startswith("_"):
                refuse(node, f"reaches the private attribute {node.attr}")
            elif node.attr in FORBIDDEN_ATTRIBUTES:
                refuse(node, f"uses .{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "__" in node.value:
            refuse(node, "a string with a dunder (format strings reach attributes)")
    return problems


def extract_code(text: str) -> str:
    """The code of a model's answer: its first fenced block, else the whole text."""
    match = _FENCE.search(text)
    body = match.group(1) if match else text
    return body if body.endswith("\n") else body + "\n"


def unified_diff(old: str, new: str, path: str) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{path}", f"b/{path}"
        )
    )


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def change_prompt(path: str, change: str, source: str) -> str:
    """What Gemini is asked: the whole new file for one change, in words."""
    return (
        f"You maintain the Discord bot plugin file {path} (a discord.py extension).\n"
        f"Change requested: {change}\n"
        "Rules: keep its async setup(bot); import only from the standard library's asyncio, datetime, "
        "re, time, typing and the like, discord and structlog; no file, network or process access.\n"
        "Return the whole new file in one ```python code block and nothing else.\n"
        f"Current file:\n```python\n{source}```\n"
    )


@dataclass
class TestRun:
    passed: bool
    output: str
    timed_out: bool = False


async def run_plugin_tests(host: PluginHost, name: str, source: str, *, timeout: float) -> TestRun:  # noqa: ASYNC109
    """Run plugin ``name``'s tests against ``source`` as its file, in a subprocess on a copy of the
    plugins folder; the subprocess is killed after ``timeout`` seconds (a failure)."""
    plugin = host.get(name)
    assert plugin.path is not None
    folder = host.directory
    tests = folder / "tests" / f"test_{name}.py"
    if not tests.is_file():
        raise SelfModifyError(
            f"plugin {name!r} has no tests ({tests.relative_to(folder.parent)}): I change no untested plugin"
        )
    with tempfile.TemporaryDirectory(prefix="selfmod-") as tmp:
        copy = Path(tmp) / folder.name
        shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (copy / plugin.path.relative_to(folder)).write_text(source)
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
        # The copy's folder comes first on sys.path (pytest puts the tests' root dir there), so
        # the tests import the new file, and the bot's own packages from the repository.
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            tmp,
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=function",
            str(copy / "tests" / tests.name),
            cwd=tmp,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(timeout):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return TestRun(False, f"the tests ran over {timeout:g} s and were stopped", timed_out=True)
        text = out.decode(errors="replace")
        return TestRun(proc.returncode == 0, text[-TEST_OUTPUT_CHARS:])


@dataclass
class Proposal:
    """One change asked for, and what became of it."""

    id: str
    plugin: str
    path: str  # relative to the plugins folder's parent, e.g. plugins/remind.py
    change: str
    by: str
    at: float
    state: str  # ready, refused, applied, rejected, failed, reverted
    diff: str = ""
    reason: str = ""
    old_sha: str = ""
    new_source: str = ""
    previous_source: str = ""  # kept while applied: what revert puts back
    decided_by: str | None = None
    decided_at: float | None = None
    tests: str = ""


@dataclass
class ProposalBook:
    """Proposals and applied changes, kept in a JSON file (newest ``KEEP_RECORDS``)."""

    path: Path
    _records: dict[str, Proposal] = field(default_factory=dict)
    _read: bool = False

    def _load(self) -> None:
        if self._read:
            return
        self._read = True
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("selfmod.records_unreadable", path=str(self.path), error=repr(exc))
            return
        self._records = {r["id"]: Proposal(**r) for r in data.get("proposals", [])}

    def get(self, proposal_id: str) -> Proposal:
        self._load()
        try:
            return self._records[proposal_id]
        except KeyError:
            raise SelfModifyError(f"there is no proposal {proposal_id}") from None

    def all(self) -> list[Proposal]:
        self._load()
        return list(self._records.values())

    def save(self, proposal: Proposal) -> None:
        self._load()
        self._records[proposal.id] = proposal
        kept = sorted(self._records.values(), key=lambda p: p.at)[-KEEP_RECORDS:]
        self._records = {p.id: p for p in kept}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps({"proposals": [asdict(p) for p in kept]}, indent=1))


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old file or the new, never half."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


Ask = Any  # async (prompt: str) -> str: the model's answer text (GeminiService.generate, wrapped)


class SelfModifier:
    """Proposals to change plugin files: ask, check, test, keep; apply and revert them."""

    def __init__(
        self,
        host: PluginHost,
        book: ProposalBook,
        *,
        ask: Ask,
        clock: Clock,
        enabled: bool,
        test_timeout: float,
    ) -> None:
        self.host = host
        self.book = book
        self._ask = ask
        self._clock = clock
        self.enabled = enabled
        self.test_timeout = test_timeout
        self._lock = asyncio.Lock()

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise SelfModifyDisabledError()

    def plugin_file(self, name: str) -> Path:
        """The file of a plugin of the plugins folder that may be changed, or ``SelfModifyError``."""
        plugin = self.host.get(name)
        if plugin.source != "folder" or plugin.path is None:
            raise SelfModifyError(
                f"plugin {name!r} is installed, not in the plugins folder: I change only the folder's"
            )
        path = plugin.path.resolve()
        folder = self.host.directory
        if not path.is_relative_to(folder) or any(path.is_relative_to(core) for core in CORE_DIRS):
            raise SelfModifyError(f"{path} is core code, not a plugin file: refused")
        if folder in CORE_DIRS or any(folder.is_relative_to(core) for core in CORE_DIRS):
            raise SelfModifyError(f"the plugins folder {folder} is inside the core: refused")
        return path

    def _rel(self, path: Path) -> str:
        return str(path.relative_to(self.host.directory.parent))

    async def propose(self, name: str, change: str, *, by: str) -> Proposal:
        """Ask for, check and test a change to plugin ``name``; the proposal is kept whatever its fate
        (``state`` ready, or refused with its ``reason``)."""
        self._check_enabled()
        change = " ".join(change.split())[:MAX_CHANGE_CHARS]
        path = self.plugin_file(name)
        old = path.read_text()
        proposal = Proposal(
            id=uuid.uuid4().hex[:12],
            plugin=name,
            path=self._rel(path),
            change=change,
            by=by,
            at=self._clock.time(),
            state="refused",
            old_sha=sha(old),
        )
        answer = await self._ask(change_prompt(proposal.path, change, old))
        new = extract_code(answer)
        proposal.diff = unified_diff(old, new, proposal.path)
        problems = check_source(new)
        if new == old:
            problems.append("it changes nothing")
        if problems:
            proposal.reason = "; ".join(problems)
        else:
            run = await run_plugin_tests(self.host, name, new, timeout=self.test_timeout)
            proposal.tests = run.output
            if run.passed:
                proposal.state, proposal.new_source = "ready", new
            else:
                proposal.reason = "the plugin's tests " + ("ran too long" if run.timed_out else "failed")
        self.book.save(proposal)
        log.info(
            "selfmod.proposed",
            id=proposal.id,
            plugin=name,
            by=by,
            state=proposal.state,
            reason=proposal.reason,
        )
        return proposal

    async def apply(self, proposal_id: str, *, by: str) -> Proposal:
        """Write a ready proposal's file and reload its plugin; on a failed reload the old file is
        put back (the old code kept running) and the proposal is marked failed."""
        self._check_enabled()
        async with self._lock:
            proposal = self.book.get(proposal_id)
            if proposal.state != "ready":
                raise SelfModifyError(f"proposal {proposal_id} is {proposal.state}, not ready to apply")
            path = self.plugin_file(proposal.plugin)
            old = path.read_text()
            if sha(old) != proposal.old_sha:
                raise SelfModifyError(f"{proposal.path} changed since the proposal was made: propose again")
            # The checks again: the book is a file on disk, and only checked text is ever written.
            problems = check_source(proposal.new_source)
            if problems:
                raise PatchRefusedError(problems)
            try:
                await self._replace(proposal.plugin, path, old, proposal.new_source)
            except PluginLoadError as exc:
                proposal.state, proposal.reason = "failed", str(exc)
                proposal.decided_by, proposal.decided_at = by, self._clock.time()
                self.book.save(proposal)
                raise SelfModifyError(f"the new code failed to load, so the old file is back: {exc}") from exc
            proposal.state, proposal.previous_source, proposal.new_source = (
                "applied",
                old,
                proposal.new_source,
            )
            proposal.decided_by, proposal.decided_at = by, self._clock.time()
            self.book.save(proposal)
            log.info("selfmod.applied", id=proposal.id, plugin=proposal.plugin, by=by)
            return proposal

    async def reject(self, proposal_id: str, *, by: str) -> Proposal:
        async with self._lock:
            proposal = self.book.get(proposal_id)
            if proposal.state != "ready":
                raise SelfModifyError(
                    f"proposal {proposal_id} is {proposal.state}, not waiting for a decision"
                )
            proposal.state, proposal.new_source = "rejected", ""
            proposal.decided_by, proposal.decided_at = by, self._clock.time()
            self.book.save(proposal)
            log.info("selfmod.rejected", id=proposal.id, plugin=proposal.plugin, by=by)
            return proposal

    async def revert(self, name: str, *, by: str) -> Proposal:
        """Undo the last applied change to plugin ``name``: its previous file back, reloaded."""
        async with self._lock:
            applied = [p for p in self.book.all() if p.plugin == name and p.state == "applied"]
            if not applied:
                raise SelfModifyError(f"no applied change to plugin {name!r} to revert")
            proposal = max(applied, key=lambda p: p.decided_at or 0.0)
            path = self.plugin_file(name)
            current = path.read_text()
            if sha(current) != sha(proposal.new_source):
                raise SelfModifyError(f"{proposal.path} changed since that change was applied: not reverting")
            try:
                await self._replace(name, path, current, proposal.previous_source)
            except PluginLoadError as exc:
                raise SelfModifyError(
                    f"the previous code failed to load, so the file is unchanged: {exc}"
                ) from exc
            proposal.state = "reverted"
            proposal.decided_by, proposal.decided_at = by, self._clock.time()
            self.book.save(proposal)
            log.info("selfmod.reverted", id=proposal.id, plugin=name, by=by)
            return proposal

    async def _replace(self, name: str, path: Path, old: str, new: str) -> None:
        """Write ``new`` and reload the plugin (load it if it was not loaded); ``old`` back on failure."""
        write_atomically(path, new)
        plugin = self.host.get(name)
        try:
            if plugin.state == "loaded":
                await self.host.reload(name)
            else:
                await self.host.load(name)
        except PluginLoadError:
            write_atomically(path, old)
            raise
