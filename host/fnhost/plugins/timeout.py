"""Built-in plugin: cancel a handler that runs past the function's ``timeout``.

The timed-out invocation fails with :class:`~fnhost.errors.HandlerTimeout`
and is treated like any other failure (error reply, nak with back-off, dead
letter on the last attempt); it is never acked. A plain ``def`` handler's
thread cannot be interrupted: the invocation fails at the deadline and the
thread finishes in the background.
"""

from __future__ import annotations

import asyncio

from fnhost.errors import HandlerTimeout
from fnhost.manifest import FunctionSpec
from fnhost.plugins import hookimpl
from fnhost.types import CallNext, Invocation, Middleware, Outcome


@hookimpl
def fnhost_middleware(function: FunctionSpec) -> Middleware:
    seconds = function.timeout

    async def timeout(call: Invocation, call_next: CallNext) -> Outcome:
        deadline = asyncio.timeout(seconds)
        try:
            async with deadline:
                return await call_next(call)
        except TimeoutError:
            if deadline.expired():
                raise HandlerTimeout(
                    f"function {call.function!r} ran past its timeout of {seconds:g}s"
                ) from None
            raise

    return timeout
