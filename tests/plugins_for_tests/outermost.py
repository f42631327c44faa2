"""A middleware plugin that asks to be outermost (``tryfirst``)."""

from __future__ import annotations

from fnhost.manifest import FunctionSpec
from fnhost.plugins import hookimpl
from fnhost.types import Middleware
from plugins_for_tests._middleware import recording


@hookimpl(tryfirst=True)
def fnhost_middleware(function: FunctionSpec) -> Middleware:
    return recording("outermost", function)
