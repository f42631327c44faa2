"""A recording middleware factory shared by the ordering plugins."""

from __future__ import annotations

from fnhost.manifest import FunctionSpec
from fnhost.types import CallNext, Invocation, Middleware, Outcome
from plugins_for_tests import record


def recording(plugin: str, function: FunctionSpec) -> Middleware:
    """A middleware that logs entering and leaving, and what came back up the chain."""
    record.FACTORY_CALLS.append((plugin, function.name))
    name = function.name

    async def middleware(call: Invocation, call_next: CallNext) -> Outcome:
        record.EVENTS.append((plugin, "enter", name, call.data))
        try:
            outcome = await call_next(call)
        except Exception as exc:
            record.EVENTS.append((plugin, "exit", name, f"raised {type(exc).__name__}"))
            raise
        record.EVENTS.append((plugin, "exit", name, type(outcome).__name__))
        return outcome

    return middleware
