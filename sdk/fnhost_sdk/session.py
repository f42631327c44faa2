"""The NATS plumbing behind ``ctx.publish``/``ctx.request`` and :class:`~fnhost_sdk.Client`.

A :class:`Session` wraps one nats-py connection. Publishing to a subject that a
JetStream stream captures waits for the stream's PubAck, retrying until a
deadline (a stream leader election can take seconds; a message id makes the
retries safe), so "published" means "stored".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard, TypeVar, overload

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from fnhost_sdk import headers as h
from fnhost_sdk.codec import decoder_for, encode
from fnhost_sdk.errors import FnhostError, ServiceError
from fnhost_sdk.replies import NotPubAckError, PipelinedJetStream, publish_to_stream

T = TypeVar("T")

StreamLookup = Callable[[str], "str | None"]
"""Maps a concrete subject to the stream that captures it, or ``None``."""

OutgoingHook = Callable[[str, dict[str, str]], None]
"""Decorates the headers of an outgoing message in place (``subject, headers``)."""

PUBLISH_DEADLINE = 30.0
"""Seconds a stream publish keeps retrying: 5 s once left a PubAck missing in a failover."""

_RETRYABLE_PUBLISH_ERRORS = (
    nats.errors.TimeoutError,
    # A publish turns "no responders" into this: no stream captures the subject
    # (yet: a stream being created, a server restarting, a leader being elected).
    nats.js.errors.NoStreamResponseError,
    nats.js.errors.ServiceUnavailableError,
)

STREAM_REFUSED = 10077
"""JetStream's error code (with a 503) for a message its stream did not store. Over a
limit with ``discard: new`` (``maximum messages exceeded``, ``maximum bytes exceeded``,
``maximum messages per subject exceeded``) retrying cannot help: it fails at once. The
same code carries passing store failures too (``store is closed`` while a stream is
updated or moved), which are retried like a missing PubAck."""


class PublishError(FnhostError):
    """A stream publish that stored nothing: no PubAck before its deadline, the stream's
    refusal (:data:`STREAM_REFUSED`), or an answer that is not a PubAck."""


class Session:
    """Publish and request over one NATS connection, with fnhost's conventions."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        stream_for_subject: StreamLookup | None = None,
        outgoing: Sequence[OutgoingHook] = (),
        publish_deadline: float = PUBLISH_DEADLINE,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = PipelinedJetStream(nc)
        self._stream_for_subject = stream_for_subject
        self._outgoing = tuple(outgoing)
        self._publish_deadline = publish_deadline
        self._kv: dict[str, KeyValue] = {}
        self._object_stores: dict[str, ObjectStore] = {}

    def with_outgoing(self, outgoing: Sequence[OutgoingHook]) -> Session:
        """A session on the same connection whose publishes pass through ``outgoing`` hooks."""
        session = Session(
            self.nc,
            stream_for_subject=self._stream_for_subject,
            outgoing=outgoing,
            publish_deadline=self._publish_deadline,
        )
        session._kv = self._kv
        session._object_stores = self._object_stores
        return session

    def prepare_headers(
        self, subject: str, message_id: str | None, headers: dict[str, str] | None
    ) -> dict[str, str] | None:
        """Merge the message id and outgoing hooks into a copy of ``headers``.

        A ``Nats-Msg-Id`` in ``headers`` is kept unless ``message_id`` is given,
        which replaces it."""
        if not (message_id or headers or self._outgoing):
            return None
        merged = dict(headers) if headers else {}
        if message_id:
            merged[h.MSG_ID] = message_id
        for hook in self._outgoing:
            hook(subject, merged)
        return merged or None

    def is_stream_subject(self, subject: str) -> bool:
        return (
            self._stream_for_subject is not None and self._stream_for_subject(subject) is not None
        )

    async def publish(
        self,
        subject: str,
        data: Any,
        *,
        message_id: str | None = None,
        headers: dict[str, str] | None = None,
        jetstream: bool | None = None,
    ) -> PubAck | None:
        """Publish ``data`` (encoded by its type); wait for the PubAck when a stream captures it.

        ``jetstream`` forces the choice when the session does not know the streams.
        """
        payload = encode(data)
        merged = self.prepare_headers(subject, message_id, headers)
        if jetstream if jetstream is not None else self.is_stream_subject(subject):
            return await self.publish_durable(subject, payload, merged)
        await self.nc.publish(subject, payload, headers=merged)
        return None

    async def publish_durable(
        self, subject: str, payload: bytes, headers: dict[str, str] | None
    ) -> PubAck:
        """A JetStream publish (pipelined, :mod:`fnhost_sdk.replies`) retried with back-off
        until the deadline; raises :class:`PublishError`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._publish_deadline
        pause = 0.05
        while True:
            remaining = deadline - loop.time()
            try:
                return await publish_to_stream(
                    self.nc, subject, payload, headers, timeout=min(5.0, max(remaining, 0.1))
                )
            except NotPubAckError as exc:  # retrying would only bother the responder again
                raise PublishError(str(exc)) from exc
            except _RETRYABLE_PUBLISH_ERRORS as exc:
                if _over_a_stream_limit(exc):
                    raise PublishError(
                        f"the stream refused {subject!r}: {exc.description} "
                        f"(JetStream error {exc.err_code})"
                    ) from exc
                if loop.time() + pause >= deadline:
                    raise PublishError(
                        f"no PubAck for {subject!r} within {self._publish_deadline:g}s: "
                        f"{type(exc).__name__}"
                    ) from exc
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)

    @overload
    async def request(
        self,
        subject: str,
        data: Any = ...,
        *,
        timeout: float = ...,
        headers: dict[str, str] | None = ...,
        returns: None = ...,
    ) -> bytes: ...

    @overload
    async def request(
        self,
        subject: str,
        data: Any = ...,
        *,
        timeout: float = ...,
        headers: dict[str, str] | None = ...,
        returns: type[T],
    ) -> T: ...

    async def request(
        self,
        subject: str,
        data: Any = b"",
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
        returns: type[Any] | None = None,
    ) -> Any:
        """Send a request; return the reply body (decoded into ``returns`` when given).

        An error reply (``Nats-Service-Error-Code`` header) raises :class:`ServiceError`.
        """
        reply = await self.request_msg(subject, data, timeout=timeout, headers=headers)
        raise_for_error(reply)
        return reply.data if returns is None else decoder_for(returns)(reply.data)

    async def request_msg(
        self,
        subject: str,
        data: Any = b"",
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> Msg:
        """Send a request and return the raw reply message, error or not."""
        merged = self.prepare_headers(subject, None, headers)
        return await self.nc.request(subject, encode(data), timeout=timeout, headers=merged)

    async def kv(self, bucket: str) -> KeyValue:
        """The JetStream key-value bucket ``bucket`` (looked up once, then cached)."""
        store = self._kv.get(bucket)
        if store is None:
            store = self._kv[bucket] = await self.js.key_value(bucket)
        return store

    async def object_store(self, name: str) -> ObjectStore:
        """The JetStream object store ``name`` (looked up once, then cached)."""
        store = self._object_stores.get(name)
        if store is None:
            store = self._object_stores[name] = await self.js.object_store(name)
        return store


def raise_for_error(reply: Msg) -> None:
    """Raise :class:`ServiceError` if ``reply`` is an error reply (NATS services convention)."""
    reply_headers = reply.headers
    if reply_headers and h.SERVICE_ERROR_CODE in reply_headers:
        code = reply_headers[h.SERVICE_ERROR_CODE]
        raise ServiceError(
            int(code) if code.isdigit() else 500, reply_headers.get(h.SERVICE_ERROR, "")
        )


def _over_a_stream_limit(exc: Exception) -> TypeGuard[nats.js.errors.APIError]:
    return (
        isinstance(exc, nats.js.errors.APIError)
        and exc.err_code == STREAM_REFUSED
        and "exceeded" in (exc.description or "")
    )


class Requests:
    """``request()`` for the objects built on a :class:`Session`: :class:`~fnhost_sdk.Client`
    and the handler's :class:`~fnhost_sdk.Context`."""

    __slots__ = ()
    _session: Session

    @overload
    async def request(
        self, subject: str, data: Any = ..., *, timeout: float = ..., returns: None = ...
    ) -> bytes: ...

    @overload
    async def request(
        self, subject: str, data: Any = ..., *, timeout: float = ..., returns: type[T]
    ) -> T: ...

    async def request(
        self,
        subject: str,
        data: Any = b"",
        *,
        timeout: float = 5.0,
        returns: type[Any] | None = None,
    ) -> Any:
        """Call a request/reply function: the reply's body, decoded into ``returns`` if
        given. An error reply raises :class:`~fnhost_sdk.ServiceError`; no reply within
        ``timeout`` seconds, ``nats.errors.TimeoutError``."""
        return await self._session.request(subject, data, timeout=timeout, returns=returns)
