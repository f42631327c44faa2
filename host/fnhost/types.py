"""The invocation protocol, written down first.

One message becomes one :class:`Invocation`; a function's middleware chain
turns it into one :data:`Outcome`; the trigger acts on the outcome (ack, nak
with a delay, term, reply, dead letter). Nothing flows back up.

A :data:`Middleware` has the shape ``async def mw(call, call_next) -> Outcome``
and may call ``call_next`` more than once. Chains are composed once per
function load (see :mod:`fnhost.invocation`), never per message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from nats.aio.msg import Msg

from fnhost_sdk.context import Context
from fnhost_sdk.session import OutgoingHook, Session

__all__ = [
    "ACK",
    "DUPLICATE",
    "Ack",
    "AckAfter",
    "CallNext",
    "DeadLetter",
    "Failed",
    "Handler",
    "Invocation",
    "Middleware",
    "Nak",
    "Outcome",
    "OutgoingHook",
    "Reply",
    "Term",
    "TriggerKind",
    "UserHandler",
]

TriggerKind: TypeAlias = Literal["request", "subject", "stream"]


class Invocation(Context):
    """One message on its way through a function.

    It *is* the handler's ``ctx`` (a :class:`~fnhost_sdk.Context`) plus what
    only the host and middleware need: the trigger ``kind``, the raw ``data``
    and the nats-py ``msg``. One object instead of two because it is
    allocated for every message.
    """

    __slots__ = ("ack_after", "data", "kind", "propagate", "trace_id")

    def __init__(
        self,
        session: Session,
        msg: Msg,
        *,
        kind: TriggerKind,
        function: str,
        subject: str,
        data: bytes,
        headers: dict[str, str] | None,
        message_id: str | None,
        attempt: int = 1,
        stream: str | None = None,
        sequence: int | None = None,
        stored_at_ns: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(
            session,
            msg,
            function=function,
            subject=subject,
            headers=headers,
            message_id=message_id,
            attempt=attempt,
            stream=stream,
            sequence=sequence,
            stored_at_ns=stored_at_ns,
            config=config,
        )
        self.kind: TriggerKind = kind
        self.data = data
        self.trace_id: str | None = None
        self.propagate: dict[str, str] | None = None
        """Headers carried onto everything this invocation publishes (trace context)."""
        self.ack_after: AckAfter | None = None
        """A store write the message's ack must wait for, set by a middleware (the
        idempotency record, :data:`AckAfter`)."""

    @property
    def msg(self) -> Msg:
        """The nats-py message as delivered."""
        return self._msg

    @property
    def session(self) -> Session:
        """The function's session (publishing with its outgoing hooks)."""
        return self._session


@dataclass(slots=True, frozen=True)
class Ack:
    """Success. On a stream: ack. ``duplicate`` marks a redelivery skipped by idempotency."""

    duplicate: bool = False

    @property
    def label(self) -> str:
        return "duplicate" if self.duplicate else "ack"


@dataclass(slots=True, frozen=True)
class Nak:
    """Redeliver later; ``delay`` in seconds (``None``: at once). ``error_type``: the
    failure's exception class name, when an exception caused it."""

    delay: float | None = None
    error: str = ""
    error_type: str = ""

    label = "nak"


@dataclass(slots=True, frozen=True)
class Term:
    """Never redeliver (stream), or drop and count (core subject)."""

    reason: str

    label = "term"


@dataclass(slots=True, frozen=True)
class Reply:
    """The answer to a request; an error reply carries ``error_code`` (NATS services headers)."""

    data: bytes
    headers: dict[str, str] | None = None
    error_code: int | None = None

    @property
    def label(self) -> str:
        return "reply" if self.error_code is None else "error"


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """Copy the message to the function's dead-letter subject, then term it."""

    reason: str
    error_type: str = "Reject"

    label = "dead_letter"


@dataclass(slots=True, frozen=True)
class Failed:
    """A core-subject message whose handler failed: logged and counted, nothing to answer."""

    error: str

    label = "error"


Outcome: TypeAlias = Ack | Nak | Term | Reply | DeadLetter | Failed

AckAfter: TypeAlias = tuple[
    "asyncio.Future[None]", Callable[["Invocation", BaseException], Awaitable[Outcome]]
]
"""``(stored, recover)`` on :attr:`Invocation.ack_after`: the stream trigger acts on an
:class:`Ack` outcome only once ``stored`` is done, without the invocation waiting for
it and holding the message's slot meanwhile (a drain waits for it). If ``stored``
fails, it acts on ``await recover(call, failure)`` instead (the write retried: the ack,
or a nak). Any other outcome is acted on at once. A tuple: one is made per message."""
ACK = Ack()
DUPLICATE = Ack(duplicate=True)

CallNext: TypeAlias = Callable[[Invocation], Awaitable[Outcome]]
"""The rest of the chain: call it (possibly again) to run the handler."""

Handler: TypeAlias = CallNext
"""A composed chain, or its innermost step: one invocation in, one outcome out."""

Middleware: TypeAlias = Callable[[Invocation, CallNext], Awaitable[Outcome]]
"""``async def mw(call, call_next) -> Outcome``: wraps every invocation of a function."""

UserHandler: TypeAlias = Callable[..., Any]
