"""A plain third-party middleware plugin (no ordering hints)."""

from __future__ import annotations

from fnhost.manifest import FunctionSpec
from fnhost.plugins import hookimpl
from fnhost.types import Middleware
from plugins_for_tests._middleware import recording


@hookimpl
def fnhost_middleware(function: FunctionSpec) -> Middleware:
    return recording("beta", function)
