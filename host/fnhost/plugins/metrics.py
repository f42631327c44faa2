"""Built-in plugin: count every invocation and publish in the host's metrics.

See :mod:`fnhost.metrics` for the metric names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fnhost.manifest import FunctionSpec
from fnhost.plugins import hookimpl
from fnhost.types import Middleware, OutgoingHook

if TYPE_CHECKING:
    from fnhost.host import Host


@hookimpl
def fnhost_middleware(function: FunctionSpec, host: Host) -> Middleware:
    return host.metrics.middleware(function)


@hookimpl
def fnhost_outgoing(host: Host) -> OutgoingHook:
    return host.metrics.count_publish


@hookimpl
def fnhost_startup(host: Host) -> None:
    host.metrics.start_refresher(host)


@hookimpl
async def fnhost_shutdown(host: Host) -> None:
    await host.metrics.stop_refresher()
