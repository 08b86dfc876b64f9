"""Plugins: discord.py extensions loaded at start-up through the service registry, and on demand.

A plugin is a module (``name.py``) or package (``name/``) in the plugins folder (``PLUGINS_DIR``,
default the repository's ``plugins`` package), or a module installed under the entry-point group
``gemini_bot.plugins``, with an ``async def setup(bot)`` like any discord.py extension. ``bot``
is the ``GeminiBot`` (a ``commands.Bot``): ``bot.add_cog`` adds its slash commands (app commands
of the cog) and listeners; ``bot.app`` is the application (``bot.app``) with the services a plugin
may use (``app.storage``, ``app.clock``, ``app.queue_notice`` for durable delivery, and
``app.tools`` for model-callable tools where the tool registry is built).

``PluginHost`` is a registry service (``name = "plugins"``, started after storage, Gemini and
Discord I/O): a plugin that fails to load is reported and skipped, unless it is required
(``REQUIRED_PLUGINS``), which fails the start-up (the registry rolls back). Reload is
discord.py's ``reload_extension``: if the new code fails to import or set up, the previous
module is set up again, so the old version keeps working. After each change the slash commands
are synced with Discord, at most once per ``COMMAND_SYNC_INTERVAL_SECONDS`` (``CommandSyncer``).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import sys
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from discord.ext import commands

from resilience.clock import Clock

log = structlog.get_logger("bot.plugins")

ENTRY_POINT_GROUP = "gemini_bot.plugins"
DEFAULT_DIR = Path(__file__).resolve().parents[1] / "plugins"
# Folders inside the plugins folder that are not plugins.
NOT_PLUGINS = frozenset({"tests", "__pycache__"})


class PluginError(Exception):
    """A plugin operation failed; ``name`` is the plugin."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


class UnknownPluginError(PluginError):
    """No plugin of that name in the folder or the entry points."""

    def __init__(self, name: str) -> None:
        super().__init__(name, f"there is no plugin called {name!r}")


class PluginStateError(PluginError):
    """The plugin is not in the state the operation needs (loaded, or not loaded)."""


class PluginLoadError(PluginError):
    """The plugin's code failed to import or set up (``original`` is why); nothing of it stays."""

    def __init__(self, name: str, original: BaseException) -> None:
        cause = original.__cause__ or original
        super().__init__(name, f"plugin {name!r} failed to load: {type(cause).__name__}: {cause}")
        self.original = original


@dataclass
class Plugin:
    """One plugin found: where its code is and how it is doing."""

    name: str
    module: str  # the extension's module name, e.g. "plugins.remind"
    source: str  # "folder" or "entry point"
    path: Path | None = None  # the file (a module) or __init__.py (a package) of a folder plugin
    state: str = "not loaded"  # loaded, failed, unloaded, not loaded
    error: str | None = None
    loaded_at: float | None = None
    required: bool = False


class CommandSyncer:
    """Syncs the slash commands with Discord after a change, at most once per ``interval`` seconds.

    Changes meanwhile are published together by the one sync waiting for its turn. A change made
    while a sync is in flight gets a sync of its own afterwards (the one in flight may have read the
    command tree before it).
    """

    def __init__(self, sync: Callable[[], Awaitable[None]], *, interval: float, clock: Clock) -> None:
        self._sync = sync
        self._interval = interval
        self._clock = clock
        self._last: float | None = None
        self._waiting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.syncs = 0

    def request(self) -> None:
        """Sync soon: now, or once ``interval`` has passed since the last sync."""
        if self._waiting is not None and not self._waiting.done():
            return  # the sync waiting for its turn will publish this change too
        now = self._clock.monotonic()
        delay = 0.0 if self._last is None else max(0.0, self._last + self._interval - now)
        task = asyncio.create_task(self._run(delay))
        self._waiting = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, delay: float) -> None:
        if delay > 0:
            await self._clock.sleep(delay)
        self._waiting = None  # from here on, a new change needs a sync of its own
        self._last = self._clock.monotonic()
        self.syncs += 1
        try:
            await self._sync()
        except Exception as exc:  # commands keep working where they were synced before
            log.warning("plugins.sync_failed", error=repr(exc))

    async def close(self) -> None:
        """Cancel the syncs still waiting or running (idempotent)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5.0)


@dataclass
class PluginHost:
    """Finds plugins, loads them at start-up (a registry service) and loads, unloads and reloads
    them on an owner's command; ``attach`` gives it the discord.py bot to host them in."""

    folder: Path | None = None
    enabled: tuple[str, ...] | None = None  # None: every plugin found
    required: frozenset[str] = frozenset()
    load_timeout: float = 10.0
    clock: Clock | None = None
    entry_points: Callable[[], Iterable[importlib.metadata.EntryPoint]] | None = None
    name: str = "plugins"
    depends_on: tuple[str, ...] = ("storage", "gemini", "discord_io")
    _bot: commands.Bot | None = field(default=None, repr=False)
    _on_change: Callable[[], None] | None = field(default=None, repr=False)
    _plugins: dict[str, Plugin] = field(default_factory=dict, repr=False)
    # Why the plugins folder could not be read (its plugins are then not found), else None.
    problem: str | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    @property
    def start_timeout(self) -> float:
        """The registry's bound on ``start``: every plugin's own bound, and a margin."""
        count = len(self.enabled) if self.enabled is not None else len(self.discover())
        return self.load_timeout * max(1, count) + 5.0

    def attach(self, bot: commands.Bot, *, on_change: Callable[[], None] | None = None) -> None:
        """Host the plugins in ``bot``; ``on_change()`` runs after each load, unload or reload."""
        self._bot = bot
        self._on_change = on_change

    # -- where plugins are -----------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return (self.folder or DEFAULT_DIR).resolve()

    @property
    def package(self) -> str:
        return self.directory.name

    def discover(self) -> dict[str, Plugin]:
        """Every plugin in the folder and the entry points, by name (the folder wins a clash)."""
        found: dict[str, Plugin] = {}
        for ep in self._entry_points():
            found[ep.name] = Plugin(ep.name, ep.module, "entry point")
        directory = self.directory
        self.problem = None
        try:
            if directory.is_dir():
                self._importable(directory)
            elif self.folder is not None:
                raise PluginError("*", f"the plugins folder {directory} does not exist")
        except PluginError as exc:
            self.problem = str(exc)
            log.error("plugins.folder_unusable", folder=str(directory), error=self.problem)
        if directory.is_dir() and self.problem is None:
            for child in sorted(directory.iterdir()):
                name = child.stem if child.suffix == ".py" else child.name
                if name.startswith("_") or name in NOT_PLUGINS or not name.isidentifier():
                    continue
                if child.suffix == ".py" and child.is_file():
                    path = child
                elif child.is_dir() and (child / "__init__.py").is_file():
                    path = child / "__init__.py"
                else:
                    continue
                if name in found:
                    log.warning("plugins.name_clash", plugin=name, kept="folder", dropped=found[name].module)
                found[name] = Plugin(name, f"{self.package}.{name}", "folder", path=path)
        for name, old in self._plugins.items():  # keep what is known of plugins seen before
            if name in found:
                found[name].state, found[name].error, found[name].loaded_at = (
                    old.state,
                    old.error,
                    old.loaded_at,
                )
            elif old.state == "loaded":
                found[name] = old  # its file is gone, its code still runs
        for plugin in found.values():
            plugin.required = plugin.name in self.required
        self._plugins = found
        return found

    def _entry_points(self) -> Iterable[importlib.metadata.EntryPoint]:
        if self.entry_points is not None:
            return self.entry_points()
        return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)

    def _importable(self, directory: Path) -> None:
        """Make the folder importable as its package: its parent on ``sys.path`` when needed."""
        if not (directory / "__init__.py").is_file():
            raise PluginError(
                "*", f"the plugins folder {directory} has no __init__.py (it must be a package)"
            )
        spec = importlib.util.find_spec(directory.name) if directory.name not in sys.modules else None
        module = sys.modules.get(directory.name)
        locations = (
            list(spec.submodule_search_locations or [])
            if spec is not None
            else (list(getattr(module, "__path__", [])) if module is not None else [])
        )
        if not locations:
            sys.path.append(str(directory.parent))
            return
        if all(Path(loc).resolve() != directory for loc in locations):
            raise PluginError(
                "*",
                f"the plugins folder's name {directory.name!r} is already a package at {locations[0]}; "
                "rename the folder",
            )

    # -- the registry service ----------------------------------------------------------------

    async def start(self) -> None:
        """Load the enabled plugins; a required one that fails fails the start (the others are skipped)."""
        if self._bot is None:
            log.info("plugins.no_bot", note="no discord client: plugins are not loaded")
            return
        found = self.discover()
        if self.problem is not None and self.required:
            raise PluginError("*", self.problem)
        names = list(found) if self.enabled is None else list(self.enabled)
        missing = sorted(n for n in {*names, *self.required} if n not in found)
        for name in missing:
            if name in self.required:
                raise UnknownPluginError(name)
            log.warning("plugins.not_found", plugin=name)
        for name in names:
            if name not in found:
                continue
            try:
                await self.load(name, notify=False)
            except PluginError as exc:
                if name in self.required:
                    raise
                log.warning("plugins.skipped", plugin=name, error=str(exc))
        log.info("plugins.started", loaded=self.loaded())

    async def stop(self) -> None:
        """Unload every loaded plugin, the last loaded first (their ``cog_unload`` stops their loops)."""
        bot = self._bot
        if bot is None:
            return
        for plugin in reversed([p for p in self._plugins.values() if p.state == "loaded"]):
            if plugin.module not in bot.extensions:  # commands.Bot.close() unloads extensions itself
                plugin.state = "unloaded"
                continue
            try:
                await bot.unload_extension(plugin.module)
            except Exception as exc:
                log.warning("plugins.unload_failed", plugin=plugin.name, error=repr(exc))
            plugin.state = "unloaded"

    def health(self) -> dict[str, Any]:
        failed = {p.name: p.error for p in self._plugins.values() if p.state == "failed"}
        required_down = [n for n in self.required if self._state(n) != "loaded"]
        return {
            "ok": self._bot is None or not required_down,
            "loaded": self.loaded(),
            "failed": failed,
            **({"problem": self.problem} if self.problem else {}),
        }

    # -- the operations (/admin plugin ...) -------------------------------------------------------

    def loaded(self) -> list[str]:
        return [p.name for p in self._plugins.values() if p.state == "loaded"]

    def listing(self) -> list[Plugin]:
        """Every plugin found, and those loaded whose file is gone, by name."""
        self.discover()
        return sorted(self._plugins.values(), key=lambda p: p.name)

    def get(self, name: str) -> Plugin:
        plugin = self._plugins.get(name) or self.discover().get(name)
        if plugin is None:
            raise UnknownPluginError(name)
        return plugin

    async def load(self, name: str, *, notify: bool = True) -> Plugin:
        """Import and set up a plugin not loaded; ``PluginLoadError`` leaves nothing of it behind."""
        async with self._lock:
            plugin = self.get(name)
            if plugin.state == "loaded":
                raise PluginStateError(name, f"plugin {name!r} is already loaded (reload it instead)")
            bot = self._need_bot()
            _forget_bytecode(plugin)
            try:
                await self._bounded(bot.load_extension(plugin.module), plugin)
            except PluginError as exc:
                self._failed(plugin, exc)
                raise
            except commands.ExtensionError as exc:
                error = PluginLoadError(name, exc)
                self._failed(plugin, error)
                raise error from exc
            self._loaded(plugin)
        self._changed(notify)
        return plugin

    async def unload(self, name: str) -> Plugin:
        """Tear a loaded plugin down: its cogs, commands and listeners go with it."""
        async with self._lock:
            plugin = self.get(name)
            if plugin.state != "loaded":
                raise PluginStateError(name, f"plugin {name!r} is not loaded")
            await self._need_bot().unload_extension(plugin.module)
            plugin.state = "unloaded"
            log.info("plugins.unloaded", plugin=name)
        self._changed(True)
        return plugin

    async def reload(self, name: str) -> Plugin:
        """Replace a loaded plugin by its code on disk, atomically: ``PluginLoadError`` means the new
        code failed to import or set up, and the old version was set up again and keeps working."""
        async with self._lock:
            plugin = self.get(name)
            if plugin.state != "loaded":
                raise PluginStateError(name, f"plugin {name!r} is not loaded (load it instead)")
            bot = self._need_bot()
            _forget_bytecode(plugin)
            try:
                # Shielded: discord.py restores the old version only when the new one raises an
                # Exception; a cancellation half-way would leave neither loaded.
                await asyncio.shield(bot.reload_extension(plugin.module))
            except commands.ExtensionError as exc:
                plugin.error = str(PluginLoadError(name, exc))
                log.warning("plugins.reload_failed", plugin=name, error=plugin.error, kept="old version")
                raise PluginLoadError(name, exc) from exc
            self._loaded(plugin)
        self._changed(True)
        return plugin

    # -- helpers ------------------------------------------------------------------------------

    async def _bounded(self, loading: Awaitable[None], plugin: Plugin) -> None:
        """Run a load within ``load_timeout``; past it, cancel it and remove what it had added."""
        try:
            async with asyncio.timeout(self.load_timeout):
                await loading
        except TimeoutError as exc:
            bot = self._need_bot()
            if plugin.module in bot.extensions:
                await bot.unload_extension(plugin.module)
            else:
                # discord.py cleans up after an exception, not a cancellation: do what it would.
                sys.modules.pop(plugin.module, None)
                await bot._remove_module_references(plugin.module)
            raise PluginLoadError(
                plugin.name, TimeoutError(f"setup took over {self.load_timeout:g} s")
            ) from exc

    def _need_bot(self) -> commands.Bot:
        if self._bot is None:
            raise PluginError("*", "plugins need the Discord client, which is not attached")
        return self._bot

    def _state(self, name: str) -> str:
        plugin = self._plugins.get(name)
        return plugin.state if plugin is not None else "not found"

    def _loaded(self, plugin: Plugin) -> None:
        plugin.state, plugin.error = "loaded", None
        plugin.loaded_at = self.clock.time() if self.clock is not None else None
        log.info("plugins.loaded", plugin=plugin.name, module=plugin.module)

    def _failed(self, plugin: Plugin, exc: PluginError) -> None:
        plugin.state, plugin.error = "failed", str(exc)
        log.warning("plugins.load_failed", plugin=plugin.name, error=plugin.error)

    def _changed(self, notify: bool) -> None:
        if notify and self._on_change is not None:
            self._on_change()


def _forget_bytecode(plugin: Plugin) -> None:
    """Drop a folder plugin's cached bytecode: a file rewritten within the same second at the same
    size would otherwise be imported from its stale ``.pyc`` (validated by mtime and size only)."""
    importlib.invalidate_caches()
    if plugin.path is None:
        return
    files = [plugin.path] if plugin.path.name != "__init__.py" else list(plugin.path.parent.rglob("*.py"))
    for source in files:
        try:
            Path(importlib.util.cache_from_source(str(source))).unlink(missing_ok=True)
        except (OSError, NotImplementedError, ValueError):
            pass
