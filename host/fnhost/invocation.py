"""One message in, one outcome out.

:func:`build_endpoint` makes the innermost step of a function's chain (decode,
call the handler, encode, publish ``output:``); :func:`compose` wraps it in the
function's middleware once per load, Starlette-style, so the per-message path
is plain awaits through pre-built callables. :func:`outcome_for_error` is the
single place where an exception becomes an outcome.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from fnhost.errors import HandlerTimeout
from fnhost.loader import LoadedFunction
from fnhost.manifest import FunctionSpec
from fnhost.types import (
    ACK,
    DeadLetter,
    Failed,
    Handler,
    Invocation,
    Middleware,
    Nak,
    Outcome,
    Reply,
)
from fnhost_sdk import headers as h
from fnhost_sdk.codec import encode
from fnhost_sdk.errors import PayloadError, Reject, Retry


def compose(endpoint: Handler, middlewares: Sequence[Middleware]) -> Handler:
    """Wrap ``endpoint`` so that ``middlewares[0]`` is outermost."""
    chain = endpoint
    for middleware in reversed(middlewares):
        chain = _bind(middleware, chain)
    return chain


def _bind(middleware: Middleware, call_next: Handler) -> Handler:
    # A partial, not a closure: one Python frame less per layer per message.
    bound: Handler = functools.partial(middleware, call_next=call_next)  # type: ignore[call-arg]
    return bound


def build_endpoint(loaded: LoadedFunction, executor: ThreadPoolExecutor | None = None) -> Handler:
    """The innermost step: decode, run the handler, turn its result into an outcome.

    Plain ``def`` handlers run on ``executor`` (required for them). The
    variants are chosen here, once, so the per-message path has no branches
    on the function's shape.
    """
    decode = loaded.decode
    handler = loaded.handler
    spec = loaded.spec

    if loaded.is_async:
        if loaded.passes_context:

            async def run(inv: Invocation) -> object:
                return await handler(decode(inv.data), inv)
        else:

            async def run(inv: Invocation) -> object:
                return await handler(decode(inv.data))
    else:
        if executor is None:
            raise ValueError(f"function {spec.name!r} is a plain def and needs a thread executor")
        pool = executor

        async def run(inv: Invocation) -> object:
            payload = decode(inv.data)
            call = (
                functools.partial(handler, payload, inv)
                if loaded.passes_context
                else functools.partial(handler, payload)
            )
            # Copy the context so the thread's log lines carry the invocation's fields.
            return await asyncio.get_running_loop().run_in_executor(
                pool, contextvars.copy_context().run, call
            )

    output = spec.output
    if spec.trigger.kind == "request":

        async def reply_endpoint(inv: Invocation) -> Outcome:
            result = await run(inv)
            if output is not None and result is not None:
                await inv.publish(output, result)
            return Reply(encode(result))

        return reply_endpoint

    if output is not None:

        async def output_endpoint(inv: Invocation) -> Outcome:
            result = await run(inv)
            if result is not None:
                await inv.publish(output, result)
            return ACK

        return output_endpoint

    async def endpoint(inv: Invocation) -> Outcome:
        await run(inv)
        return ACK

    return endpoint


def outcome_for_error(spec: FunctionSpec, inv: Invocation, exc: Exception) -> Outcome:
    """Map an exception from a function's chain to the outcome its trigger acts on.

    Request: 400 for bad input or ``Reject``, 503 for ``Retry``, 500 otherwise.
    Subject: logged and counted as an error. Stream: ``Reject`` and
    undecodable payloads are dead-lettered (termed when the function has no
    ``dead_letter``); a failure on the last allowed attempt (``max_deliver``),
    ``Retry`` included, is dead-lettered too: a nak there would leave the
    message to the max-deliveries advisory. Before that, ``Retry`` naks with
    its delay (the back-off when it has none), other errors with the back-off.
    """
    description = describe(exc)
    kind = inv.kind
    if kind == "request":
        if isinstance(exc, PayloadError | Reject):
            return error_reply(400, description)
        if isinstance(exc, Retry):
            return error_reply(503, description)
        return error_reply(500, description)
    if kind == "subject":
        return Failed(description)
    if isinstance(exc, PayloadError | Reject):
        return DeadLetter(description, type(exc).__name__)
    if inv.attempt >= spec.retry.max_deliver:
        return DeadLetter(
            f"retries exhausted after {inv.attempt} attempts: {description}", type(exc).__name__
        )
    if isinstance(exc, Retry) and exc.delay is not None:
        return Nak(exc.delay, description, type(exc).__name__)
    return Nak(spec.retry.delay_for(inv.attempt), description, type(exc).__name__)


def describe(exc: BaseException) -> str:
    """A one-line description of an error for replies, logs and dead-letter headers.

    One line because NATS header values cannot hold line breaks.
    """
    if isinstance(exc, Reject):
        text = exc.reason
    elif isinstance(exc, PayloadError | HandlerTimeout | Retry):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def error_reply(code: int, description: str) -> Reply:
    """An error reply in the NATS services convention."""
    return Reply(
        b"",
        {h.SERVICE_ERROR: description, h.SERVICE_ERROR_CODE: str(code)},
        error_code=code,
    )
