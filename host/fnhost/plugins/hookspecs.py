"""The plugin contract: every hook fnhost calls, with its arguments.

A plugin is a module or object with functions named after these specs and
marked ``@fnhost.plugins.hookimpl``; an implementation may accept any subset
of a spec's arguments. Plugins load from the ``fnhost`` entry-point group and
from ``plugins:`` in fn.yaml (dotted module names).

Hooks are called when a function is loaded, when the host starts and when it
stops, and when a reload or a deploy changes the running functions: never per
message. What runs per message is what the hooks *return*
(a middleware, an outgoing hook), composed once per function load.

Middleware order: the results of ``fnhost_middleware`` wrap the handler
outermost-first, in pluggy's call order. Built-ins are registered first, so a
third-party middleware is outside them by default; ``tryfirst=True`` puts it
outermost of all, ``trylast=True`` innermost (closest to the handler).

Set ``FNHOST_TRACE_HOOKS=1`` to print every hook call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from fnhost.host import Host
    from fnhost.manifest import FunctionSpec
    from fnhost.types import Middleware, OutgoingHook

hookspec = pluggy.HookspecMarker("fnhost")


@hookspec
def fnhost_middleware(function: FunctionSpec, host: Host) -> Middleware | None:
    """Return a middleware for ``function``, or ``None`` to stay out of its chain.

    Called once each time the function is loaded. The middleware has the shape
    ``async def mw(call: Invocation, call_next: CallNext) -> Outcome``; it may
    call ``call_next`` again (a retry) and may raise (the host maps exceptions
    to outcomes with :func:`fnhost.invocation.outcome_for_error`).
    """


@hookspec
def fnhost_outgoing(function: FunctionSpec, host: Host) -> OutgoingHook | None:
    """Return a hook that decorates every message ``function`` publishes, or ``None``.

    The hook is called as ``hook(subject, headers)`` for each publish and
    request the function makes (``ctx.publish``, ``ctx.request``, ``output:``)
    and edits ``headers`` in place (trace context, message ids). Called once
    per function load.
    """


@hookspec
def fnhost_startup(host: Host) -> Any:
    """Called once the host is connected and before any trigger starts.

    May return an awaitable, which the host awaits.
    """


@hookspec
def fnhost_shutdown(host: Host) -> Any:
    """Called after the host drained its triggers, before the connection closes.

    May return an awaitable, which the host awaits.
    """


@hookspec
def fnhost_functions_changed(host: Host) -> Any:
    """Called when a running host's functions change: a reload or a deploy added one
    (before its trigger starts), gave one new settings, or stopped one.

    ``host.functions`` holds the functions as they are now. Not called at
    start-up (``fnhost_startup`` sees the first set) nor for a change of code
    alone. May return an awaitable, which the host awaits.
    """


@hookspec
def fnhost_routes(host: Host) -> list[Any] | None:
    """Return Starlette routes to add to the host's HTTP app."""
