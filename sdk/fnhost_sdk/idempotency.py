"""``ctx.idempotency``: the handler's view of the idempotency key of its message.

Set on every invocation of a function with ``idempotency:`` in fn.yaml (``None``
otherwise). The host records the key after the handler succeeds; with the
PostgreSQL store a handler can instead record it *in its own transaction*,
beside its effect, so that the effect and the record commit together or not
at all — the only exactly-once effect fnhost offers::

    async def handle(order: dict, ctx: Context) -> None:
        async with await psycopg.AsyncConnection.connect(DSN) as conn:
            async with conn.transaction():
                await conn.execute("INSERT INTO ledger ...", ...)
                await ctx.idempotency.record_in(conn)

``record_in`` works with a psycopg ``Connection`` (runs at once, in a plain
``def`` handler; awaiting its result is optional) and an ``AsyncConnection``
(await it). When the message's lease was taken over by another delivery (this
one ran too long, or its host was thought dead) the record cannot be written and
:class:`LeaseLost` is raised: let it propagate, so the transaction rolls back
and the message is retried (and then found done).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Generator
from typing import Any, Protocol

from fnhost_sdk.errors import FnhostError

__all__ = ["Idempotency", "LeaseLost", "TransactionalRecorder"]


class LeaseLost(FnhostError):
    """The key is no longer this delivery's to record: another one holds or recorded it."""


class TransactionalRecorder(Protocol):
    """What a store that can record inside the handler's transaction provides."""

    def record_sync(self, conn: Any, key: str, token: int | str) -> None:
        """Record ``key`` on a blocking connection, inside its current transaction."""
        ...

    async def record_async(self, conn: Any, key: str, token: int | str) -> None:
        """Record ``key`` on an asyncio connection, inside its current transaction."""
        ...


class _Done:
    """An awaitable that is already finished (``record_in`` on a blocking connection)."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return
        yield


_DONE = _Done()


class Idempotency:
    """The message's idempotency key, and the means to record it transactionally.

    Attributes:
        key: the message's key (``Nats-Msg-Id``, ``stream:sequence:stored_at_ns``,
            a header or what the manifest's key function returned).
        recorded: whether ``record_in`` ran (the host then records nothing itself).
        lease_lost: whether ``record_in`` raised :class:`LeaseLost`.
    """

    __slots__ = ("_recorder", "_store_key", "_token", "key", "lease_lost", "recorded")

    def __init__(
        self,
        key: str,
        store_key: str,
        token: int | str,
        recorder: TransactionalRecorder | None,
    ) -> None:
        self.key = key
        self.recorded = False
        self.lease_lost = False
        self._store_key = store_key
        self._token = token
        self._recorder = recorder

    def record_in(self, conn: Any) -> Awaitable[None]:
        """Record the key in ``conn``'s current transaction (psycopg, sync or async).

        Raises :class:`LeaseLost` when another delivery holds or recorded the
        key, and ``RuntimeError`` when the function's store is not ``postgres``.
        """
        recorder = self._recorder
        if recorder is None:
            raise RuntimeError(
                "record_in needs the postgres idempotency store; this function's store "
                "records the key itself after the handler returns"
            )
        if inspect.iscoroutinefunction(getattr(conn, "execute", None)):
            return self._record_async(recorder, conn)
        try:
            recorder.record_sync(conn, self._store_key, self._token)
        except LeaseLost:
            self.lease_lost = True
            raise
        self.recorded = True
        return _DONE

    async def _record_async(self, recorder: TransactionalRecorder, conn: Any) -> None:
        try:
            await recorder.record_async(conn, self._store_key, self._token)
        except LeaseLost:
            self.lease_lost = True
            raise
        self.recorded = True

    def __repr__(self) -> str:
        return f"Idempotency(key={self.key!r}, recorded={self.recorded})"
