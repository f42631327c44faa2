"""Idempotency stores: where a function's processed keys and in-flight leases live.

A store answers three questions for the idempotency middleware
(:mod:`fnhost.plugins.idempotency`), which holds all the policy (waiting for
a lease, when to record, what to do when the store is down):

- :meth:`Store.begin`: take the key's lease for ``lease_ttl`` seconds. The
  answer is :data:`NEW` (the lease is ours: run the handler), :data:`DONE`
  (the key is recorded: a duplicate) or :data:`LEASED` (another holder's
  lease is alive until ``expires_at``). An expired lease, or an expired
  record, is taken over atomically (compare-and-set), so two callers never
  both get NEW for one live key.
- :meth:`Store.record`: the handler succeeded; replace our lease with a record
  kept for ``ttl`` seconds.
- :meth:`Store.release`: the handler failed; drop our lease (only if it is
  still ours) so the redelivery can take it at once.

A store may also offer ``record_soon(key, token, ttl)`` (:class:`RecordsSoon`;
the kv store does): :meth:`Store.record` started, as a future done once the
record is stored. The middleware then hands the stream trigger that future
to ack on, and the invocation does not wait for it.

Every store raises :class:`StoreUnavailable` when it cannot be reached, and
nothing else for a network fault. Stores are shared by all the functions of
one host that name the same store (and bucket or URL); concurrent
invocations await their store calls concurrently. Only the memory store keeps
its keys in Python; the kv store keeps its live leases and open record groups
(what a record needs to find its group write).

One module per store: :mod:`.memory`, :mod:`.kv`, :mod:`.redis`,
:mod:`.postgres` (the last two import their client library only when used).
Every store's :meth:`Store.encoder` puts a long or unstorable key's digest
in its place (:mod:`.keys`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias, runtime_checkable

from fnhost.errors import FnhostError
from fnhost_sdk.idempotency import TransactionalRecorder

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.js import JetStreamContext

    from fnhost.manifest import IdempotencySpec

__all__ = [
    "DONE",
    "Begin",
    "KeyEncoder",
    "RecordsSoon",
    "State",
    "Store",
    "StoreUnavailable",
    "Token",
    "leased",
    "new",
    "open_store",
]

State: TypeAlias = Literal["new", "done", "leased"]

Token: TypeAlias = int | str
"""What proves a lease is ours to :meth:`Store.record` and :meth:`Store.release`:
the kv store's number for the lease it holds, or the holder id (memory, Redis,
PostgreSQL)."""

KeyEncoder: TypeAlias = Callable[[str], str]
"""Turns a message's raw idempotency key into the store's key for one function."""


@dataclass(slots=True, frozen=True)
class Begin:
    """What :meth:`Store.begin` found.

    ``token`` is set for ``new`` (our lease), ``expires_at`` (epoch seconds)
    for ``leased`` (when the other holder's lease ends).
    """

    state: State
    token: Token = 0
    expires_at: float = 0.0


DONE = Begin("done")
"""The key is recorded: the message was handled already."""


def new(token: Token) -> Begin:
    """The lease is ours."""
    return Begin("new", token)


def leased(expires_at: float) -> Begin:
    """Another holder's lease is alive until ``expires_at`` (epoch seconds)."""
    return Begin("leased", 0, expires_at)


class StoreUnavailable(FnhostError):
    """The store cannot be reached (server down, timeout): retry the message later."""


class Store(Protocol):
    """The contract every idempotency store implements (see the module docstring)."""

    name: str
    """``kv``, ``memory``, ``redis`` or ``postgres``: names the host's readiness problem."""

    def encoder(self, function: str) -> KeyEncoder:
        """The key encoder for ``function``: keys of different functions never meet."""
        ...

    async def start(self) -> None:
        """Prepare (bucket, table, connection pool); raises :class:`StoreUnavailable`.

        Called at host start-up, and again before the next use if it failed.
        """
        ...

    async def begin(self, key: str, lease_ttl: float) -> Begin:
        """Take ``key``'s lease for ``lease_ttl`` seconds, or say who has it."""
        ...

    async def record(self, key: str, token: Token, ttl: float) -> None:
        """Replace our lease with a record kept for (at least) ``ttl`` seconds.

        Called again with the same token when it raised :class:`StoreUnavailable`
        (the effect happened: the key is recorded whoever holds it now)."""
        ...

    async def release(self, key: str, token: Token) -> None:
        """Drop our lease if it is still ours; a record or another's lease stays."""
        ...

    def transactional(self, ttl: float) -> TransactionalRecorder | None:
        """What ``ctx.idempotency.record_in(connection)`` calls, or None: the store
        cannot record inside the handler's own transaction."""
        ...

    async def close(self) -> None:
        """Release connections and background tasks."""
        ...


@runtime_checkable
class RecordsSoon(Protocol):
    """A store that can start a record without a coroutine waiting for it."""

    def record_soon(self, key: str, token: Token, ttl: float) -> asyncio.Future[None]:
        """What :meth:`Store.record` does; the future is done once the record is
        stored, or fails with :class:`StoreUnavailable` (call :meth:`Store.record`
        again with the same token, as after a failed record)."""
        ...


def open_store(
    spec: IdempotencySpec,
    *,
    holder: str,
    js: Callable[[], JetStreamContext],
    nc: Callable[[], NatsClient] | None = None,
    declared_buckets: frozenset[str] = frozenset(),
) -> Store:
    """Build the store ``spec`` names (not started: call :meth:`Store.start`).

    ``holder`` is this host's random id, part of every lease it takes; ``js``
    and ``nc`` give the host's JetStream context and connection (kv store);
    ``declared_buckets`` are
    the KV buckets fn.yaml provisions itself (their settings are left alone).
    """
    if spec.store == "memory":
        from fnhost.idempotency.memory import MemoryStore

        return MemoryStore(holder)
    if spec.store == "kv":
        from fnhost.idempotency.kv import KVStore

        return KVStore(
            js,
            spec.bucket,
            holder,
            nc=nc,
            ttl=spec.ttl,
            managed=spec.bucket not in declared_buckets,
        )
    assert spec.url is not None  # the manifest requires a url for redis and postgres
    if spec.store == "redis":
        from fnhost.idempotency.redis import RedisStore

        return RedisStore(spec.url, spec.bucket, holder)
    from fnhost.idempotency.postgres import PostgresStore

    return PostgresStore(spec.url, spec.bucket, holder)
