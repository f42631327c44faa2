"""The postgres store when its server freezes or restarts (a private PostgreSQL per test).

A frozen server (SIGSTOP: sockets open, nothing answers) is an outage like a
server that is down: the message is nak'ed and /readyz reports the store,
never a hang. After a restart, the pooled connections the server cut are
replaced before they are used: no message fails for them.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from nats.aio.client import Client as NatsClient

from conftest import HostFactory
from fnhost.http import readiness
from fnhost.idempotency.postgres import POOL_SIZE, PostgresStore
from fnhost.plugins.idempotency import _stores
from fnhost_sdk.testing import wait_for
from support.databases import PostgresServer

from .conftest import freeze, thaw
from .test_middleware import COUNTING, manifest, publish, runs, settled

pytestmark = pytest.mark.nats


async def test_a_frozen_server_is_an_outage_not_a_hang(
    host_factory: HostFactory, nc: NatsClient, private_postgres: PostgresServer
) -> None:
    dsn = private_postgres.create_database()
    host = await host_factory(manifest(f"{{store: postgres, url: '{dsn}'}}"), {"fn.py": COUNTING})
    await publish(nc, 1)
    await wait_for(lambda: settled(nc), timeout=20, message="the first message acked")
    # Every pooled connection open, so the next message's call goes to a live one
    # (a new connection has a connect timeout already).
    store = next(iter(_stores[host].guards.values())).store
    await asyncio.gather(*(store.begin(f"warm/{n}", 30) for n in range(POOL_SIZE)))
    assert _connections(dsn) == POOL_SIZE
    freeze(private_postgres)
    try:
        await publish(nc, 2)
        await wait_for(
            lambda: "idempotency:postgres" in host.problems,
            timeout=60,
            message="the frozen store reported down",
        )
        await wait_for(
            lambda: host.metrics.counts("work").get("nak", 0) >= 1,
            timeout=60,
            message="the message nak'ed",
        )
        assert runs(host) == [1]
        assert not await settled(nc)  # never acked unprocessed
    finally:
        thaw(private_postgres)
    await wait_for(lambda: settled(nc), timeout=90, message="the message handled after the thaw")
    assert runs(host) == [1, 2]
    await wait_for(lambda: readiness(host) == [], timeout=60, message="ready again")


def _connections(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as db:
        row = db.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchone()
        assert row is not None
        return int(row[0])


async def test_connections_cut_by_a_restart_are_replaced_before_use(
    private_postgres: PostgresServer,
) -> None:
    dsn = private_postgres.create_database()
    store = PostgresStore(dsn, "idem", "a")
    await store.start()
    try:
        encode = store.encoder("fn")
        # As many calls at once as the pool has connections: each opens its own.
        await asyncio.gather(*(store.begin(encode(f"before-{n}"), 30) for n in range(POOL_SIZE)))
        assert _connections(dsn) == POOL_SIZE
        private_postgres.restart()
        # One after another, each on the next pooled connection: every one was cut.
        for n in range(2 * POOL_SIZE):
            begin = await store.begin(encode(f"after-{n}"), 30)
            assert begin.state == "new"
            await store.record(encode(f"after-{n}"), begin.token, 3600)
        again = [encode(f"after-{n}") for n in range(2 * POOL_SIZE)]
        states = await asyncio.gather(*(store.begin(key, 30) for key in again))
        assert {begin.state for begin in states} == {"done"}
    finally:
        await store.close()
