"""Built-in plugin: remote deploy (:mod:`fnhost.registry`) on hosts with ``registry.enabled``.

``fnhost_startup`` reads the registry before any trigger starts and begins
watching it; ``fnhost_shutdown`` stops watching and withdraws the host's
status document.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from weakref import WeakKeyDictionary

from fnhost.plugins import hookimpl

if TYPE_CHECKING:
    from fnhost.host import Host
    from fnhost.registry import RegistryWatcher

_watchers: WeakKeyDictionary[Host, RegistryWatcher] = WeakKeyDictionary()


def watcher_for(host: Host) -> RegistryWatcher | None:
    """The registry watcher of ``host``, when its registry is enabled and it started."""
    return _watchers.get(host)


@hookimpl
async def fnhost_startup(host: Host) -> None:
    config = host.manifest.registry
    if not config.enabled:
        return
    from fnhost.registry import RegistryWatcher  # cloudpickle and nkeys only when used

    watcher = RegistryWatcher(host, config)
    _watchers[host] = watcher
    await watcher.start()


@hookimpl
async def fnhost_shutdown(host: Host) -> None:
    watcher = _watchers.pop(host, None)
    if watcher is not None:
        await watcher.stop()
