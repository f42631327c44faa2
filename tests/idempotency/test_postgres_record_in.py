"""``ctx.idempotency.record_in(conn)``: the key commits with the effect, or neither does."""

from __future__ import annotations

import time

import psycopg
import pytest

from fnhost.idempotency.memory import MemoryStore
from fnhost.idempotency.postgres import PostgresStore
from fnhost_sdk.idempotency import Idempotency, LeaseLost
from fnhost_sdk.waiting import wait_for


async def _stores(dsn: str) -> tuple[PostgresStore, PostgresStore]:
    a, b = PostgresStore(dsn, "idem", "a"), PostgresStore(dsn, "idem", "b")
    await a.start()
    await b.start()
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute("CREATE TABLE IF NOT EXISTS effects (k text PRIMARY KEY)")
    return a, b


def _effects(dsn: str) -> int:
    with psycopg.connect(dsn) as db:
        row = db.execute("SELECT count(*) FROM effects").fetchone()
        assert row is not None
        return int(row[0])


async def test_async_record_in_commits_with_the_effect(postgres_dsn: str) -> None:
    a, b = await _stores(postgres_dsn)
    key = a.encoder("fn")("k1")
    begin = await a.begin(key, 30)
    handle = Idempotency("k1", key, begin.token, a.transactional(3600))
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn, conn.transaction():
        await conn.execute("INSERT INTO effects (k) VALUES ('k1')")
        await handle.record_in(conn)
    assert handle.recorded
    assert (await b.begin(key, 30)).state == "done"
    assert _effects(postgres_dsn) == 1
    await a.close()
    await b.close()


async def test_lost_lease_rolls_the_effect_back(postgres_dsn: str) -> None:
    a, b = await _stores(postgres_dsn)
    key = a.encoder("fn")("k2")
    slow = await a.begin(key, 0.2)
    lapsed = time.time() + 0.4
    await wait_for(lambda: time.time() > lapsed, timeout=5, message="a's lease lapsed")
    fast = await b.begin(key, 30)
    assert fast.state == "new"
    # b (the takeover) commits first; a's late transaction must not add a second effect.
    with psycopg.connect(postgres_dsn) as conn, conn.transaction():
        conn.execute("INSERT INTO effects (k) VALUES ('k2')")
        Idempotency("k2", key, fast.token, b.transactional(3600)).record_in(conn)
    late = Idempotency("k2", key, slow.token, a.transactional(3600))
    with pytest.raises(LeaseLost):
        conn = await psycopg.AsyncConnection.connect(postgres_dsn)
        async with conn, conn.transaction():
            await conn.execute("INSERT INTO effects (k) VALUES ('k2-second-run')")
            await late.record_in(conn)
    assert not late.recorded
    assert _effects(postgres_dsn) == 1
    assert (await a.begin(key, 30)).state == "done"
    await a.close()
    await b.close()


async def test_a_key_locked_by_a_handler_s_open_transaction_reads_as_leased(
    postgres_dsn: str,
) -> None:
    """From record_in until its commit, the handler's transaction holds the key's row
    lock, and another delivery's begin waits on it. That is a live lease (its holder is
    committing), not a store outage: begin says "leased" (the middleware waits, using
    up no delivery) instead of failing when the store's statement timeout runs out."""
    a, b = await _stores(postgres_dsn)
    key = a.encoder("fn")("k3")
    begin = await a.begin(key, 30)
    handle = Idempotency("k3", key, begin.token, a.transactional(3600))
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        async with conn.transaction():
            await conn.execute("INSERT INTO effects (k) VALUES ('k3')")
            await handle.record_in(conn)
            assert (await b.begin(key, 30)).state == "leased"
        assert (await b.begin(key, 30)).state == "done"
    assert _effects(postgres_dsn) == 1
    await a.close()
    await b.close()


async def test_record_in_needs_the_postgres_store() -> None:
    store = MemoryStore("h")
    handle = Idempotency("k", "fn/k", "t", store.transactional(60))
    with pytest.raises(RuntimeError, match="postgres"):
        handle.record_in(object())
