"""Die right after the handler (effect and ``output:`` done, nothing recorded or acked)."""

from __future__ import annotations

from fnhost.plugins import hookimpl
from fnhost.types import Middleware

from .faults import fault_middleware


@hookimpl(trylast=True)
def fnhost_middleware() -> Middleware | None:
    return fault_middleware("inner")
