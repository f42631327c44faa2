"""Die after everything but the ack (idempotency recorded, outcome decided)."""

from __future__ import annotations

from fnhost.plugins import hookimpl
from fnhost.types import Middleware

from .faults import fault_middleware


@hookimpl(tryfirst=True)
def fnhost_middleware() -> Middleware | None:
    return fault_middleware("outer")
