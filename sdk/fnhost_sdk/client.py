"""``Client``: call fnhost functions from any Python service.

Only nats-py, pydantic and this package are imported: a service that only
calls functions does not pull in the host's HTTP, metrics or reload stack.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import nats
from nats.aio.client import Client as NatsClient
from nats.js.api import PubAck

from fnhost_sdk.session import Requests, Session


class Client(Requests):
    """Request/reply and publishing with fnhost's wire conventions.

    ::

        async with await Client.connect("nats://127.0.0.1:4222") as client:
            order = await client.request("orders.create", {"customer_id": "c1", "total": 9.5})

    An error reply raises :class:`~fnhost_sdk.ServiceError` with its code.
    """

    def __init__(self, nc: NatsClient) -> None:
        self.nc = nc
        self._session = Session(nc)

    @classmethod
    async def connect(
        cls, servers: str | list[str] = "nats://127.0.0.1:4222", **options: Any
    ) -> Client:
        """Connect to NATS; ``options`` go to :func:`nats.connect` (auth, TLS, ...)."""
        options.setdefault("max_reconnect_attempts", -1)
        return cls(await nats.connect(servers, **options))

    async def publish(
        self,
        subject: str,
        data: Any,
        *,
        message_id: str | None = None,
        headers: dict[str, str] | None = None,
        jetstream: bool = False,
    ) -> PubAck | None:
        """Publish ``data``; with ``jetstream=True`` wait until a stream stored it."""
        return await self._session.publish(
            subject, data, message_id=message_id, headers=headers, jetstream=jetstream
        )

    async def close(self) -> None:
        await self.nc.drain()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
