"""``fnhost_startup`` / ``fnhost_shutdown``: record when they run and what the host was doing."""

from __future__ import annotations

from typing import Any

from fnhost.plugins import hookimpl
from plugins_for_tests import record


@hookimpl
async def fnhost_startup(host: Any) -> None:
    record.LIFECYCLE.append(
        (
            "startup",
            {
                "connected": host.nc.is_connected,
                "triggers": sum(state.trigger is not None for state in host.functions.values()),
            },
        )
    )


@hookimpl
def fnhost_shutdown(host: Any) -> None:
    record.LIFECYCLE.append(
        (
            "shutdown",
            {
                "connected": host.nc.is_connected,
                "statuses": sorted(state.status for state in host.functions.values()),
            },
        )
    )
