"""Plugin discovery and the typed face of the hooks.

Each :class:`~fnhost.host.Host` owns one :class:`PluginManager` (no global
state). pluggy cannot type ``pm.hook.x(...)``, so every hook is called through
one small typed method here.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pluggy

from fnhost.errors import ConfigError
from fnhost.plugins import hookspecs

if TYPE_CHECKING:
    from fnhost.host import Host
    from fnhost.manifest import FunctionSpec
    from fnhost.types import Middleware, OutgoingHook

ENTRY_POINT_GROUP = "fnhost"

BUILTIN_PLUGINS = (
    # Registration order is the reverse of the onion: pluggy calls the last
    # registered first, and the first result is the outermost middleware.
    "fnhost.plugins.timeout",
    "fnhost.plugins.retry",
    # After retry, so outside it: a duplicate is acked before retry sees it, and a
    # failure reaches idempotency as an outcome (release the lease, record nothing).
    "fnhost.plugins.idempotency",
    "fnhost.plugins.metrics",
    "fnhost.plugins.logging",
    "fnhost.plugins.tracing",
    "fnhost.plugins.deadletter",
    # Not a middleware: reads the deploy registry at startup, before any trigger starts.
    "fnhost.plugins.registry",
)


class PluginManager:
    """Registers built-in, entry-point and manifest plugins and calls their hooks."""

    def __init__(self, *, builtins: Iterable[str] = BUILTIN_PLUGINS) -> None:
        self._pm = pluggy.PluginManager("fnhost")
        self._pm.add_hookspecs(hookspecs)
        for name in builtins:
            self._pm.register(importlib.import_module(name), name=name)
        if os.environ.get("FNHOST_TRACE_HOOKS") == "1":
            self._pm.trace.root.setwriter(lambda text: print(text, end="", file=sys.stderr))
            self._pm.enable_tracing()

    def load_entry_points(self) -> None:
        """Register every plugin published under the ``fnhost`` entry-point group."""
        self._pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)

    def load_modules(self, names: Iterable[str]) -> None:
        """Register plugin modules named by dotted path (``plugins:`` in fn.yaml)."""
        for name in names:
            if self._pm.get_plugin(name) is not None:
                continue
            try:
                module = importlib.import_module(name)
            except ImportError as exc:
                raise ConfigError(f"plugin {name!r} cannot be imported: {exc}") from exc
            self._pm.register(module, name=name)

    def register(self, plugin: object, name: str | None = None) -> None:
        """Register a plugin object (a module, a class instance)."""
        self._pm.register(plugin, name=name)

    def unregister(self, name: str) -> None:
        self._pm.unregister(name=name)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._pm.list_name_plugin()]

    def middleware_for(self, function: FunctionSpec, host: Host) -> list[Middleware]:
        """The function's middleware, outermost first."""
        return [m for m in self._pm.hook.fnhost_middleware(function=function, host=host) if m]

    def outgoing_for(self, function: FunctionSpec, host: Host) -> list[OutgoingHook]:
        return [o for o in self._pm.hook.fnhost_outgoing(function=function, host=host) if o]

    async def startup(self, host: Host) -> None:
        await _await_all(self._pm.hook.fnhost_startup(host=host))

    async def shutdown(self, host: Host) -> None:
        # Reverse registration order, so a plugin shuts down after the ones started after it.
        await _await_all(reversed(self._pm.hook.fnhost_shutdown(host=host)))

    async def functions_changed(self, host: Host) -> None:
        await _await_all(self._pm.hook.fnhost_functions_changed(host=host))

    def routes(self, host: Host) -> list[Any]:
        return [
            route for routes in self._pm.hook.fnhost_routes(host=host) if routes for route in routes
        ]


async def _await_all(results: Iterable[Any]) -> None:
    for result in results:
        if inspect.isawaitable(result):
            await result
