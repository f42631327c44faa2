"""Fixtures of the idempotency tests: private Redis and PostgreSQL servers, and
``make_store``: stores of each kind on the same data, one per "host"."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import pytest

from fnhost.idempotency import Store
from fnhost.idempotency.kv import KVStore
from fnhost.idempotency.memory import MemoryStore
from fnhost.idempotency.postgres import PostgresStore
from fnhost.idempotency.redis import RedisStore
from fnhost_sdk.server import NatsServer
from fnhost_sdk.waiting import wait_for_sync
from support import require
from support.databases import (
    PostgresServer,
    postgres_available,
    postgres_dsn,
    postgres_server,
    redis_server,
    redis_url,
)

__all__ = [
    "KV_BUCKET",
    "StoreFactory",
    "freeze",
    "make_store",
    "postgres_dsn",
    "postgres_server",
    "private_postgres",
    "redis_server",
    "redis_url",
    "thaw",
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


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this test's own, which it may restart or freeze."""
    require("PostgreSQL (initdb)", postgres_available())
    server = PostgresServer().start()
    try:
        yield server
    finally:
        thaw(server)
        server.close()


def _postmaster(server: PostgresServer) -> int:
    return int((server.data / "postmaster.pid").read_text().split()[0])


def _processes(postmaster: int) -> dict[int, bytes]:
    """The postmaster and its children (each its own session): pid -> state."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_bytes().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited
        if int(entry.name) == postmaster or int(fields[1]) == postmaster:
            found[int(entry.name)] = fields[0]
    return found


def freeze(server: PostgresServer) -> None:
    """SIGSTOP the postmaster, then its backends and helpers: sockets stay open,
    nothing answers. Returns once every one of them is stopped (or a zombie)."""
    postmaster = _postmaster(server)
    os.kill(postmaster, signal.SIGSTOP)  # first: it forks no new backend meanwhile
    for pid in _processes(postmaster):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    wait_for_sync(
        lambda: all(state in b"TtZX" for state in _processes(postmaster).values()),
        timeout=10,
        message="PostgreSQL stopped",
    )


def thaw(server: PostgresServer) -> None:
    """SIGCONT after :func:`freeze` (harmless when not frozen or not running)."""
    with contextlib.suppress(OSError, ValueError):
        postmaster = _postmaster(server)
        for pid in _processes(postmaster):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
