"""The log the test plugins write to: one shared list per kind of event."""

from __future__ import annotations

from typing import Any

EVENTS: list[tuple[Any, ...]] = []
"""Middleware enter/exit events: (plugin, "enter" | "exit", function, detail)."""

FACTORY_CALLS: list[tuple[str, str]] = []
"""(plugin, function) each time a plugin's fnhost_middleware hook is called."""

LIFECYCLE: list[tuple[str, Any]] = []
"""(hook, what the host looked like at that moment)."""


def reset() -> None:
    EVENTS.clear()
    FACTORY_CALLS.clear()
    LIFECYCLE.clear()
