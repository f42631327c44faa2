"""Built-in plugin: watch max-deliveries advisories for the host's lifetime.

A message whose last attempt was never settled (the host died, or the dead
letter could not be stored) still reaches its function's ``dead_letter``
subject: :class:`fnhost.dlq.AdvisoryWatcher` copies it from the advisory
JetStream publishes. Startup provisions the advisory stream and consumers
before any trigger starts; shutdown stops the watcher before the connection
closes. A host whose manifest dead-letters nothing does nothing here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from fnhost.dlq import AdvisoryWatcher
from fnhost.plugins import hookimpl

if TYPE_CHECKING:
    from fnhost.host import Host

# Keyed by host: one process may run several hosts (the tests do).
_watchers: WeakKeyDictionary[Host, AdvisoryWatcher] = WeakKeyDictionary()


@hookimpl
async def fnhost_startup(host: Host) -> None:
    watcher = AdvisoryWatcher(
        host.nc, host.manifest, on_dead_lettered=host.metrics.count_dead_letter
    )
    if watcher.targets:
        _watchers[host] = watcher
        await watcher.start()


@hookimpl
async def fnhost_shutdown(host: Host) -> None:
    watcher = _watchers.pop(host, None)
    if watcher is not None:
        await watcher.stop()
