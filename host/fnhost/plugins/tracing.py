"""Built-in plugin: trace context on every invocation and every message it publishes.

See :mod:`fnhost.tracing`; ``tracing:`` in fn.yaml configures it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fnhost import tracing
from fnhost.manifest import FunctionSpec
from fnhost.plugins import hookimpl
from fnhost.types import Middleware, OutgoingHook

if TYPE_CHECKING:
    from fnhost.host import Host


@hookimpl
def fnhost_middleware(function: FunctionSpec, host: Host) -> Middleware | None:
    return host.tracing.middleware(function)


@hookimpl
def fnhost_outgoing() -> OutgoingHook:
    return tracing.outgoing


@hookimpl
def fnhost_shutdown(host: Host) -> None:
    host.tracing.shutdown()
