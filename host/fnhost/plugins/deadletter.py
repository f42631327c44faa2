"""Built-in plugin: watch max-deliveries advisories for the host's lifetime.

A message whose last attempt was never settled (the host died, or the dead
letter could not be stored) still reaches its function's ``dead_letter``
subject: :class:`fnhost.dlq.AdvisoryWatcher` copies it from the advisory
JetStream publishes. Startup provisions the advisory stream and consumers
before any trigger starts; a reload or a deploy that adds, changes or stops a
function moves the watcher along (``fnhost_functions_changed``); shutdown stops
the watcher before the connection closes. A host whose functions dead-letter
nothing does nothing here.
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
    watcher = _watchers[host] = AdvisoryWatcher(
        host.nc, on_dead_lettered=host.metrics.count_dead_letter
    )
    await _follow(host, watcher)


@hookimpl
async def fnhost_functions_changed(host: Host) -> None:
    watcher = _watchers.get(host)
    if watcher is not None:
        await _follow(host, watcher)


async def _follow(host: Host, watcher: AdvisoryWatcher) -> None:
    # host.functions, not the manifest: at start-up the registry has already put
    # the deployed versions there.
    await watcher.sync(host.manifest, [state.spec for state in host.functions.values()])


@hookimpl
async def fnhost_shutdown(host: Host) -> None:
    watcher = _watchers.pop(host, None)
    if watcher is not None:
        await watcher.stop()
