"""An ``fnhost_outgoing`` plugin: stamps every message a function publishes."""

from __future__ import annotations

from fnhost.manifest import FunctionSpec
from fnhost.plugins import hookimpl
from fnhost.types import OutgoingHook


@hookimpl
def fnhost_outgoing(function: FunctionSpec) -> OutgoingHook:
    def stamp(subject: str, headers: dict[str, str]) -> None:
        headers["X-Stamped-By"] = function.name
        headers["X-Stamped-Subject"] = subject

    return stamp
