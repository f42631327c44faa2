"""Built-in plugin: one DEBUG line per invocation with its outcome and duration.

Returns no middleware unless DEBUG is on for ``fnhost.invocation`` when the
function loads, so it costs nothing in production. The invocation fields on
every log line come from :mod:`fnhost.logs`, not from here.
"""

from __future__ import annotations

import logging
import time

from fnhost.manifest import FunctionSpec
from fnhost.plugins import hookimpl
from fnhost.types import CallNext, Invocation, Middleware, Outcome

log = logging.getLogger("fnhost.invocation")


@hookimpl
def fnhost_middleware(function: FunctionSpec) -> Middleware | None:
    if not log.isEnabledFor(logging.DEBUG):
        return None

    async def log_invocation(call: Invocation, call_next: CallNext) -> Outcome:
        started = time.perf_counter()
        outcome = await call_next(call)
        log.debug("%s in %.1f ms", outcome.label, (time.perf_counter() - started) * 1000)
        return outcome

    return log_invocation
