"""A middleware plugin that asks to be innermost, closest to the handler (``trylast``)."""

from __future__ import annotations

from fnhost.manifest import FunctionSpec
from fnhost.plugins import hookimpl
from fnhost.types import Middleware
from plugins_for_tests._middleware import recording


@hookimpl(trylast=True)
def fnhost_middleware(function: FunctionSpec) -> Middleware:
    return recording("innermost", function)
