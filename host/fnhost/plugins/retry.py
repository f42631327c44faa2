"""Built-in plugin: turn a failed invocation into the outcome its trigger acts on.

It sits just outside ``timeout`` so every middleware further out (idempotency,
metrics, logging, tracing) sees an outcome, not an exception: ``Retry`` -> nak
with its delay, other errors -> nak with the function's ``retry.backoff`` for
this attempt, ``Reject``, undecodable payloads and the last allowed attempt ->
dead letter (see :func:`fnhost.invocation.outcome_for_error`).
"""

from __future__ import annotations

from fnhost.invocation import outcome_for_error
from fnhost.manifest import FunctionSpec
from fnhost.plugins import hookimpl
from fnhost.types import CallNext, Invocation, Middleware, Outcome


@hookimpl
def fnhost_middleware(function: FunctionSpec) -> Middleware:
    async def retry(call: Invocation, call_next: CallNext) -> Outcome:
        try:
            return await call_next(call)
        except Exception as exc:
            return outcome_for_error(function, call, exc)

    return retry
