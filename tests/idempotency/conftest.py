"""Fixtures of the idempotency tests: private Redis and PostgreSQL servers, and
``make_store``: stores of each kind on the same data, one per "host"."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import nats
import pytest

from fnhost.idempotency import Store
from fnhost.idempotency.kv import KVStore
from fnhost.idempotency.memory import MemoryStore
from fnhost.idempotency.postgres import PostgresStore
from fnhost.idempotency.redis import RedisStore
from fnhost_sdk.server import NatsServer
from support.databases import postgres_dsn, postgres_server, redis_server, redis_url

__all__ = [
    "KV_BUCKET",
    "StoreFactory",
    "make_store",
    "postgres_dsn",
    "postgres_server",
    "redis_server",
    "redis_url",
]

StoreFactory = Callable[[str], Awaitable[Store]]
KINDS = ["memory", "kv", "redis", "postgres"]
KV_BUCKET = "idem_test"


@pytest.fixture(params=KINDS)
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Stores of one kind; each call is another host (its own holder id) on the same data."""
    kind: str = request.param
    stores: list[Store] = []
    closers: list[Callable[[], Awaitable[None]]] = []
    shared: dict[str, object] = {}

    async def make(holder: str) -> Store:
        store: Store
        if kind == "memory":
            # One process, one dict: "another host" shares the same store object.
            if "memory" not in shared:
                shared["memory"] = MemoryStore("h0")
            return shared["memory"]  # type: ignore[return-value]
        if kind == "kv":
            if "js" not in shared:
                server: NatsServer = request.getfixturevalue("nats_server")
                nc = await nats.connect(server.url)
                closers.append(nc.close)
                shared["js"] = nc.jetstream()
            js = shared["js"]
            store = KVStore(lambda: js, KV_BUCKET, holder, ttl=3600)  # type: ignore[arg-type]
        elif kind == "redis":
            store = RedisStore(request.getfixturevalue("redis_url"), "idem", holder)
        else:
            store = PostgresStore(request.getfixturevalue("postgres_dsn"), "idem", holder)
        await store.start()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()
    for close in closers:
        await close()
