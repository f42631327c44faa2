"""Many JetStream publishes in flight on one connection, at a few microseconds each.

``js.publish`` is a ``nc.request``: a future, an ``asyncio.wait_for`` timer and a
JSON parse into a dataclass per message, which costs a Python host about as much
as running a small handler. :class:`Replies` sends each request as a plain publish
whose reply subject is ``<inbox>.<token>`` under one wildcard subscription; the
answer resolves the request's future, and one sweeper task (alive only while
requests are waiting) fails those left unanswered past their deadline. The caller
still awaits its own answer: nothing is reported stored before the server says so.
:meth:`Replies.request_nowait` queues a request without a coroutine
(:func:`~fnhost_sdk.nowait.publish_nowait`; the kv idempotency store's lease).

Used by :meth:`fnhost_sdk.session.Session.publish_durable` (``ctx.publish`` to a
stream, outputs, dead letters), by :class:`PipelinedJetStream` (``ctx.js``, the
writes of ``ctx.kv()`` buckets, the host's own JetStream context) and by the
host's ``kv`` idempotency store, which share one :class:`Replies` per connection
(:func:`replies_for`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import Header, PubAck

from fnhost_sdk.nowait import EncodedHeaders, publish_nowait

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

SWEEP_EVERY = 0.1
"""Seconds between looks for requests past their deadline (how late a timeout may fire)."""


class Replies:
    """Requests over ``nc`` whose answers come back on one subscription."""

    def __init__(self, nc: NatsClient) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._cut = len(self._prefix)
        self._pending: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._tokens = itertools.count()
        self._sub: Subscription | None = None
        self._subscribing = asyncio.Lock()
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None, timeout: float
    ) -> Msg:
        """Publish and return the answer.

        Raises ``nats.errors.NoRespondersError`` when nothing subscribes to
        ``subject`` (for JetStream: no stream captures it), ``nats.errors.TimeoutError``
        when no answer comes within ``timeout`` seconds.
        """
        if self._sub is None:
            await self._subscribe()
        token = str(next(self._tokens))
        waiter = self._expect(token, timeout)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            msg = await waiter
        finally:
            self._pending.pop(token, None)
        if no_responders(msg):
            raise nats.errors.NoRespondersError
        return msg

    def request_nowait(
        self, subject: str, payload: bytes, headers: EncodedHeaders | None, timeout: float
    ) -> asyncio.Future[Msg] | None:
        """:meth:`request` without a coroutine, for a publish :func:`publish_nowait` can
        queue (its subject one the caller built): the answer's future, or ``None`` when
        nothing was sent (call :meth:`request`). The answer is not checked: see
        :func:`no_responders`. The future fails with ``nats.errors.TimeoutError`` as
        :meth:`request` does."""
        if self._sub is None:
            return None
        token = str(next(self._tokens))
        if not publish_nowait(self._nc, subject, payload, self._prefix + token, headers):
            return None
        return self._expect(token, timeout)

    def _expect(self, token: str, timeout: float) -> asyncio.Future[Msg]:
        """The future of the answer to ``token``'s request (failed past ``timeout``)."""
        loop = self._loop
        waiter: asyncio.Future[Msg] = loop.create_future()
        self._pending[token] = (waiter, loop.time() + timeout)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        return waiter

    async def _subscribe(self) -> None:
        async with self._subscribing:
            if self._sub is None:
                self._loop = asyncio.get_running_loop()  # the connection's
                self._sub = await self._nc.subscribe(
                    self._prefix + "*", future=_EveryAnswer(self._answer)
                )

    def _answer(self, msg: Msg) -> None:
        pending = self._pending.pop(msg.subject[self._cut :], None)
        if pending is not None and not pending[0].done():
            pending[0].set_result(msg)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                await asyncio.sleep(SWEEP_EVERY)
                closed = self._nc.is_closed
                now = loop.time()
                late = [token for token, (_, due) in self._pending.items() if closed or due <= now]
                for token in late:
                    waiter, _ = self._pending.pop(token)
                    if not waiter.done():
                        waiter.set_exception(
                            nats.errors.ConnectionClosedError()
                            if closed
                            else nats.errors.TimeoutError()
                        )
        finally:
            self._sweeper = None


class _EveryAnswer(asyncio.Future["Msg"]):
    """Gives ``answer`` each message of the reply subscription the moment nats-py reads it.

    nats-py hands every message of a subscription made with ``future=`` to that
    future's ``set_result``, inline in its read loop; with ``cb=`` it queues each
    message for a task of its own instead, a task step and a loop turn more per
    answer (about 3 µs of a kv host's CPU per message, bench/README.md). This
    future is never done: each ``set_result`` is one answer.
    """

    def __init__(self, answer: Callable[[Msg], None]) -> None:
        super().__init__()
        self._answer = answer

    def set_result(self, result: Msg, /) -> None:
        self._answer(result)


def no_responders(answer: Msg) -> bool:
    """The answer is the server's "no responders" status (for JetStream: no stream
    captures the subject)."""
    headers = answer.headers
    return not answer.data and headers is not None and headers.get("Status") == "503"


_replies: WeakKeyDictionary[NatsClient, Replies] = WeakKeyDictionary()


def replies_for(nc: NatsClient) -> Replies:
    """The :class:`Replies` of connection ``nc`` (one per connection, made on first use)."""
    replies = _replies.get(nc)
    if replies is None:
        replies = _replies[nc] = Replies(nc)
    return replies


async def publish_to_stream(
    nc: NatsClient,
    subject: str,
    payload: bytes,
    headers: dict[str, str] | None = None,
    *,
    timeout: float = 5.0,
) -> PubAck:
    """What ``js.publish`` does, raising the same errors, pipelined through :func:`replies_for`.

    An answer that is neither a PubAck nor a JetStream error (a core subscriber
    replied on a subject no stream captures) raises :class:`NotPubAckError`.
    """
    try:
        msg = await replies_for(nc).request(subject, payload, headers, timeout)
    except nats.errors.NoRespondersError:
        raise nats.js.errors.NoStreamResponseError from None
    try:
        answer = json.loads(msg.data)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), dict):
        nats.js.errors.APIError.from_error(answer["error"])  # raises the specific error
    if not (isinstance(answer, dict) and "stream" in answer and "seq" in answer):
        raise NotPubAckError(subject, msg.data)
    return PubAck.from_response(answer)


class PipelinedJetStream(JetStreamContext):
    """A JetStream context whose ``publish`` goes through :func:`publish_to_stream`.

    Everything built on it publishes that way: a key-value bucket from its
    ``key_value()`` writes with it (``put``, ``create``, ``update``, ``delete``),
    about a third less of the host's CPU per write than nats-py's request path
    (``bench/kv_writes.py``). Same arguments, answer and errors as
    :meth:`nats.js.JetStreamContext.publish`. ``ctx.js`` and ``ctx.kv()`` are
    built on one.
    """

    async def publish(
        self,
        subject: str,
        payload: bytes = b"",
        timeout: float | None = None,
        stream: str | None = None,
        headers: dict[str, Any] | None = None,
        msg_ttl: float | None = None,
    ) -> PubAck:
        if stream is not None:
            headers = {**(headers or {}), Header.EXPECTED_STREAM: stream}
        if msg_ttl is not None:
            headers = {**(headers or {}), Header.MSG_TTL: str(int(msg_ttl))}
        if timeout is None:
            timeout = self._timeout
        return await publish_to_stream(self._nc, subject, payload, headers, timeout=timeout)


class NotPubAckError(nats.js.errors.Error):
    """The answer to a stream publish is no PubAck: a core responder, not a stream, answered."""

    def __init__(self, subject: str, answer: bytes) -> None:
        super().__init__(
            f"the answer on {subject!r} is not a JetStream PubAck (a core subscriber "
            f"replied, not a stream?): {answer[:100]!r}"
        )
        self.subject = subject
        self.answer = answer

    def __str__(self) -> str:
        return self.description or ""
