"""``Context``: what a handler receives as ``ctx``.

A handler declares it by naming a second parameter (or any parameter annotated
``Context``); it is optional. One ``Context`` exists per delivered message.
"""

from __future__ import annotations

import logging
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from fnhost_sdk import headers as h
from fnhost_sdk.idempotency import Idempotency
from fnhost_sdk.session import Requests, Session


class Context(Requests):
    """The message being handled and the means to act on the world.

    Attributes:
        function: the function's name in fn.yaml.
        subject: the subject the message arrived on.
        headers: its NATS headers (``None`` when it had none).
        message_id: its ``Nats-Msg-Id`` header, if any.
        attempt: the delivery count (1 on first delivery; always 1 outside streams).
        stream, sequence: the stream and stream sequence (stream triggers only).
        stored_at_ns: when the stream stored the message, in nanoseconds since
            the epoch (stream triggers only; the same on every redelivery).
        config: the function's ``config:`` mapping from fn.yaml.
        idempotency: the message's idempotency key and ``record_in(conn)``
            (see :mod:`fnhost_sdk.idempotency`); ``None`` unless the function
            has ``idempotency:`` and the message a key.
    """

    __slots__ = (
        "_log",
        "_msg",
        "_outputs",
        "_session",
        "attempt",
        "config",
        "function",
        "headers",
        "idempotency",
        "message_id",
        "sequence",
        "stored_at_ns",
        "stream",
        "subject",
    )

    def __init__(
        self,
        session: Session,
        msg: Msg,
        *,
        function: str,
        subject: str,
        headers: dict[str, str] | None,
        message_id: str | None,
        attempt: int = 1,
        stream: str | None = None,
        sequence: int | None = None,
        stored_at_ns: int | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self._session = session
        self._msg = msg
        self._outputs = 0
        self._log: logging.LoggerAdapter[logging.Logger] | None = None
        self.function = function
        self.subject = subject
        self.headers = headers
        self.message_id = message_id
        self.attempt = attempt
        self.stream = stream
        self.sequence = sequence
        self.stored_at_ns = stored_at_ns
        self.config: dict[str, Any] = config if config is not None else {}
        self.idempotency: Idempotency | None = None

    @property
    def idempotency_key(self) -> str | None:
        """The message's identity: its message id, else ``stream:sequence:stored_at_ns``,
        else ``None``.

        The storage time is part of it because a stream deleted and created again
        numbers its messages from 1 again: ``stream:sequence`` alone would name a new
        message like an old one, whose idempotency record (kept for ``ttl``) would
        have it acked as a duplicate without running, and whose outputs' message ids
        the output stream's duplicate window would drop.
        """
        if self.message_id:
            return self.message_id
        if self.stream is not None and self.sequence is not None:
            if self.stored_at_ns is None:
                return f"{self.stream}:{self.sequence}"
            return f"{self.stream}:{self.sequence}:{self.stored_at_ns}"
        return None

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger whose lines carry the function, subject, message id and attempt."""
        if self._log is None:
            self._log = logging.LoggerAdapter(
                logging.getLogger(f"fnhost.fn.{self.function}"),
                {
                    "function": self.function,
                    "subject": self.subject,
                    "message_id": self.idempotency_key,
                    "attempt": self.attempt,
                },
            )
        return self._log

    async def publish(
        self,
        subject: str,
        data: Any,
        *,
        message_id: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> PubAck | None:
        """Publish ``data``; when a stream captures ``subject``, wait until it is stored.

        The message id is explicit when given as ``message_id`` or as a
        ``Nats-Msg-Id`` in ``headers`` (``message_id`` wins when both are). Without
        one, a publish from a message with an identity gets
        ``<function>:<idempotency key>/<index of this publish>``, so the stream's
        duplicate window drops the re-publish of a redelivered message, and not
        another function's output of the same input.
        """
        index = self._outputs
        self._outputs = index + 1
        if message_id is None and not (headers and headers.get(h.MSG_ID)):
            message_id = self._derived_id(index)
        return await self._session.publish(subject, data, message_id=message_id, headers=headers)

    def _derived_id(self, index: int) -> str | None:
        """The derived message id of this invocation's publish number ``index`` (from 0):
        ``<function>:<idempotency key>/<index>``, or ``None`` without an identity.

        The same on every redelivery of the message, to every host of the function.
        The function's name (letters, digits, ``-``, ``_``: the first ``:`` ends it)
        tells apart the outputs of functions that consume the same message.
        """
        key = self.idempotency_key
        if key is None:
            return None
        return f"{self.function}:{key}/{index}"

    async def kv(self, bucket: str) -> KeyValue:
        """A JetStream key-value bucket (declare it under ``kv:`` in fn.yaml).

        nats-py's ``KeyValue``; its writes are pipelined (:attr:`js`)."""
        return await self._session.kv(bucket)

    async def object_store(self, name: str) -> ObjectStore:
        """A JetStream object store (declare it under ``object_stores:`` in fn.yaml)."""
        return await self._session.object_store(name)

    async def in_progress(self) -> None:
        """Tell JetStream the message is still being worked on (resets its ack wait).

        The host already does this every ``ack_wait/3`` while a stream handler
        runs; call it yourself only to be explicit. A no-op outside streams.
        """
        if self.stream is not None:
            await self._msg.in_progress()

    @property
    def nc(self) -> NatsClient:
        """The host's nats-py connection (escape hatch)."""
        return self._session.nc

    @property
    def js(self) -> JetStreamContext:
        """The host's JetStream context (escape hatch): a
        :class:`fnhost_sdk.replies.PipelinedJetStream`, whose ``publish`` answers and
        fails like nats-py's at a third less CPU per write."""
        return self._session.js
