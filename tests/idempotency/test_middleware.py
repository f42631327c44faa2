"""The idempotency middleware in a real host on a real nats-server.

A duplicate is acked without running the handler; a delivery that meets a
live lease waits for it and uses up no delivery; a missing key header is bad
input (dead letter); a store that is down naks the message, makes /readyz
report it, and the host recovers when the store is back; with the postgres
store the handler commits its effect and its key in one transaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Awaitable
from typing import Any

import nats
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from conftest import HostFactory
from fnhost.host import Host
from fnhost.http import readiness
from fnhost.manifest import parse_manifest
from fnhost.plugins import hookimpl
from fnhost.reload import apply_manifest
from fnhost.types import CallNext, Invocation, Middleware, Nak, Outcome
from fnhost_sdk.cluster import NatsCluster
from fnhost_sdk.testing import wait_for
from support import module_of
from support.databases import RedisServer

pytestmark = pytest.mark.nats

MANIFEST = """\
version: 1
http: false
streams:
  IN: {{subjects: ["in.>"], duplicate_window: 1h}}
  DLQ: {{subjects: ["dlq.>"]}}
functions:
  work:
    module: fn.py
    trigger: {{stream: IN, durable: work, ack_wait: 5s}}
    retry: {{max_deliver: 50, backoff: [200ms]}}
    concurrency: {concurrency}
    dead_letter: dlq.work
    idempotency: {idempotency}
"""

COUNTING = """\
import asyncio

runs = []


async def handle(event: dict, ctx) -> None:
    runs.append(event["n"])
    await asyncio.sleep(event.get("sleep", 0))
"""


def manifest(idempotency: str, concurrency: int = 4) -> str:
    return MANIFEST.format(idempotency=idempotency, concurrency=concurrency)


def runs(host: Host) -> list[int]:
    return list(module_of(host).runs)


async def settled(nc: NatsClient) -> bool:
    """Every message of IN delivered and acked or termed. The delivered sequence is
    checked too: right after a publish the consumer may not count it pending yet."""
    js = nc.jetstream()
    last = (await js.stream_info("IN")).state.last_seq
    info = await js.consumer_info("IN", "work")
    caught_up = info.delivered.stream_seq >= last
    return caught_up and info.num_pending == 0 and info.num_ack_pending == 0


async def publish(nc: NatsClient, n: int, **headers: str) -> None:
    body: dict[str, Any] = {"n": n}
    await nc.jetstream().publish("in.x", json.dumps(body).encode(), headers=headers or None)


class LoseFirstAck:
    """Outermost: the first delivery of each message is nak'ed after the chain ran,
    as if the host died between recording the key and acking."""

    def __init__(self) -> None:
        self.seen: set[int | None] = set()

    @hookimpl(tryfirst=True)
    def fnhost_middleware(self) -> Middleware:
        async def lose(call: Invocation, call_next: CallNext) -> Outcome:
            outcome = await call_next(call)
            if call.sequence not in self.seen:
                self.seen.add(call.sequence)
                return Nak(0.05, "ack lost (test)")
            return outcome

        return lose


@pytest.mark.parametrize("store", ["memory", "kv"])
async def test_redelivery_of_a_recorded_key_is_acked_without_running(
    host_factory: HostFactory, nc: NatsClient, store: str
) -> None:
    host = await host_factory(
        manifest(f"{{store: {store}}}"), {"fn.py": COUNTING}, plugins=[LoseFirstAck()]
    )
    for n in range(5):
        await publish(nc, n)
    await wait_for(lambda: settled(nc), timeout=20, message="every message acked")
    assert sorted(runs(host)) == [0, 1, 2, 3, 4]
    counts = host.metrics.counts("work")
    # metrics sits inside the test's outermost plugin: it saw the first acks
    assert (counts.get("ack"), counts.get("duplicate")) == (5, 5)


async def test_same_key_header_runs_once(host_factory: HostFactory, nc: NatsClient) -> None:
    host = await host_factory(manifest("{store: kv, key: 'header:Order-Id'}"), {"fn.py": COUNTING})
    for n in range(6):
        await publish(nc, n, **{"Order-Id": f"order-{n % 2}"})
    await wait_for(lambda: settled(nc), timeout=20, message="every message acked")
    assert len(runs(host)) == 2
    assert host.metrics.counts("work").get("duplicate") == 4


async def test_a_re_created_stream_s_messages_are_not_taken_for_old_ones(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    """A stream deleted and created again numbers its messages from 1 again. Keyed by
    stream and sequence alone, they would meet the old messages' records (kept for
    ``ttl``) and be acked as duplicates without running: every key also carries the
    time the stream stored its message."""
    text = manifest("{store: kv}")
    first = await host_factory(text, {"fn.py": COUNTING})
    for n in range(3):
        await publish(nc, n)
    await wait_for(lambda: settled(nc), timeout=20, message="the first three acked")
    await first.drain()
    await nc.jetstream().delete_stream("IN")

    second = await host_factory(text, {"fn.py": COUNTING})
    for n in range(3, 6):
        await publish(nc, n)
    await wait_for(lambda: settled(nc), timeout=20, message="the next three acked")
    assert (await nc.jetstream().stream_info("IN")).state.last_seq == 3
    assert sorted(runs(second)) == [3, 4, 5]
    assert second.metrics.counts("work").get("duplicate") == 0


async def test_a_live_lease_is_waited_on_without_using_a_delivery(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(
        manifest("{store: kv, key: 'header:Order-Id'}", concurrency=4), {"fn.py": COUNTING}
    )
    js = nc.jetstream()
    for n in range(3):
        body = json.dumps({"n": n, "sleep": 0.5}).encode()
        await js.publish("in.x", body, headers={"Order-Id": "same"})
    await wait_for(lambda: settled(nc), timeout=20, message="every message acked")
    assert len(runs(host)) == 1
    info = await js.consumer_info("IN", "work")
    assert info.num_redelivered == 0
    counts = host.metrics.counts("work")
    assert (counts.get("ack"), counts.get("duplicate"), counts.get("nak", 0)) == (1, 2, 0)


async def test_missing_key_header_is_dead_lettered(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(
        manifest("{store: memory, key: 'header:Order-Id'}"), {"fn.py": COUNTING}
    )
    await publish(nc, 1)
    dead = await wait_for(
        lambda: nc.jetstream().get_last_msg("DLQ", "dlq.work"),
        timeout=20,
        message="the message dead-lettered",
        ignore=(nats.js.errors.NotFoundError,),
    )
    await wait_for(lambda: settled(nc), timeout=20, message="the message settled")
    assert runs(host) == []
    assert dead.headers is not None
    # Bad input: dead-lettered at its first delivery, not retried until max_deliver.
    assert dead.headers["Fnhost-Attempts"] == "1"
    assert dead.headers["Fnhost-Error"].startswith(
        "PayloadError: idempotency key header 'Order-Id' is missing"
    )
    assert (await nc.jetstream().consumer_info("IN", "work")).num_redelivered == 0


async def test_key_from_a_module_function(host_factory: HostFactory, nc: NatsClient) -> None:
    files = {
        "fn.py": COUNTING,
        "keys.py": "import json\n\ndef order_id(data, ctx):\n    return json.loads(data)['o']\n",
    }
    host = await host_factory(manifest("{store: memory, key: 'keys:order_id'}"), files)
    js = nc.jetstream()
    for n in range(4):
        await js.publish("in.x", json.dumps({"n": n, "o": n // 2}).encode())
    await wait_for(lambda: settled(nc), timeout=20, message="every message acked")
    assert len(runs(host)) == 2


async def test_store_down_naks_reports_and_recovers(
    host_factory: HostFactory, nc: NatsClient, redis_server: RedisServer
) -> None:
    host = await host_factory(
        manifest(f"{{store: redis, url: '{redis_server.url}'}}"), {"fn.py": COUNTING}
    )
    assert readiness(host) == []
    await publish(nc, 1)
    await wait_for(lambda: settled(nc), timeout=20, message="the first message acked")
    redis_server.kill()
    await publish(nc, 2)
    await wait_for(
        lambda: "idempotency:redis" in host.problems, timeout=20, message="store reported down"
    )
    assert any(reason.startswith("idempotency:redis: ") for reason in readiness(host))
    assert runs(host) == [1]
    assert host.metrics.counts("work").get("nak", 0) >= 1
    assert not await settled(nc)  # never acked unprocessed
    redis_server.start()
    await wait_for(lambda: settled(nc), timeout=30, message="the message handled after recovery")
    assert runs(host) == [1, 2]
    assert readiness(host) == []


GATED = """\
import asyncio

runs = []
GATE = asyncio.Event()


async def handle(event: dict, ctx) -> None:
    runs.append(event["n"])
    await GATE.wait()
"""


async def test_a_record_the_store_refuses_for_a_while_is_stored_once_it_is_back(
    host_factory: HostFactory,
    nc: NatsClient,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The handler succeeded, then the store went away before its key was recorded (a
    restart, a KV bucket's leader election): the effect has happened, so the record is
    tried again until the store is back and the message acked, never nak'ed to run
    again. Nak'ed at the first failure, the redelivery found no record and ran the
    handler a second time. One warning for the delivery, not one for each try."""
    caplog.set_level(logging.INFO, logger="fnhost.idempotency")
    host = await host_factory(
        manifest(f"{{store: redis, url: '{redis_server.url}'}}"), {"fn.py": GATED}
    )
    await publish(nc, 1)
    module = module_of(host)
    await wait_for(lambda: runs(host) == [1], message="the handler running")
    redis_server.kill()
    module.GATE.set()
    await wait_for(
        lambda: "idempotency:redis" in host.problems, message="the record failed, store down"
    )
    redis_server.start()
    await wait_for(lambda: settled(nc), timeout=30, message="the message acked")
    assert runs(host) == [1]
    assert host.metrics.counts("work")["nak"] == 0
    assert (await nc.jetstream().consumer_info("IN", "work")).num_redelivered == 0
    await wait_for(lambda: readiness(host) == [], timeout=30, message="ready again")
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if "its record was not stored" in m]) == 1, messages
    assert len([m for m in messages if "recorded at try" in m]) == 1, messages


async def test_store_back_with_no_message_left_to_use_it_clears_readiness(
    host_factory: HostFactory, nc: NatsClient, redis_server: RedisServer
) -> None:
    """The failed message is gone (handled by another host, here purged): no store call
    of a message would clear the problem, so the guard's own probe does."""
    host = await host_factory(
        manifest(f"{{store: redis, url: '{redis_server.url}'}}"), {"fn.py": COUNTING}
    )
    redis_server.kill()
    await publish(nc, 1)
    await wait_for(
        lambda: "idempotency:redis" in host.problems, timeout=20, message="store reported down"
    )
    await nc.jetstream().purge_stream("IN")
    redis_server.start()
    await wait_for(
        lambda: readiness(host) == [], timeout=30, message="ready again without a message"
    )
    assert runs(host) == []


LONG_KEY = "".join(hashlib.sha256(b"%d" % n).hexdigest() for n in range(160))


@pytest.mark.parametrize("store", ["kv", "postgres"])
async def test_long_and_nul_keys_run_once_each(
    host_factory: HostFactory, nc: NatsClient, store: str, request: pytest.FixtureRequest
) -> None:
    """A 10 KB key made the kv store's KV subject overflow the server's control line
    (the server closed the host's connection: a crash loop) and PostgreSQL's index
    row (an outage: nak until max_deliver); a NUL byte failed PostgreSQL too."""
    spec = "{store: kv, key: 'raw_keys:key'}"
    if store == "postgres":
        dsn = request.getfixturevalue("postgres_dsn")
        spec = f"{{store: postgres, url: '{dsn}', key: 'raw_keys:key'}}"
    files = {
        "fn.py": COUNTING,
        "raw_keys.py": "import json\n\ndef key(data, ctx):\n    return json.loads(data)['k']\n",
    }
    host = await host_factory(manifest(spec), files)
    keys = [LONG_KEY, LONG_KEY, LONG_KEY[:-1] + "!", "a\x00b", "a\x00b", "a\x00c"]
    for n, key in enumerate(keys):
        await nc.jetstream().publish("in.x", json.dumps({"n": n, "k": key}).encode())
    await wait_for(lambda: settled(nc), timeout=30, message="every message acked")
    # Each distinct key ran once (which of two same-key messages runs depends on which
    # takes the lease first: they are delivered together).
    assert sorted(keys[n] for n in runs(host)) == sorted(set(keys))
    counts = host.metrics.counts("work")
    assert (counts.get("ack"), counts.get("duplicate"), counts.get("nak", 0)) == (4, 2, 0)
    assert readiness(host) == []
    assert not host.nc.is_closed


async def test_kv_bucket_keeps_entries_for_the_ttl_after_the_lease(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    """The bucket's max_age was the ttl: a lease longer than the ttl aged out while its
    handler ran, and a bucket made for a shorter ttl was never widened."""
    js = nc.jetstream()
    first = await host_factory(manifest("{store: kv, ttl: 10s}"), {"fn.py": COUNTING})
    lease = 32.0  # the larger of ack_wait (5s) and timeout (30s) + its slack (1s) + 1s
    info = await js.stream_info("KV_fnhost_idempotency")
    assert info.config.max_age == 10 + lease
    await first.drain()
    second = await host_factory(manifest("{store: kv, ttl: 1h}"), {"fn.py": COUNTING})
    info = await js.stream_info("KV_fnhost_idempotency")
    assert info.config.max_age == 3600 + lease

    # A reload that lengthens the ttl widens the bucket too, without a restart.
    root = second.manifest.root
    longer = manifest("{store: kv, ttl: 2h}")
    await apply_manifest(second, parse_manifest(longer, file=str(root / "fn.yaml"), root=root))

    async def max_age() -> float | None:
        return (await js.stream_info("KV_fnhost_idempotency")).config.max_age

    await wait_for(lambda: _equals(max_age(), 7200 + lease), message="bucket widened on reload")


@pytest.mark.slow  # a 3-node cluster and R3 placements take a few seconds
async def test_kv_bucket_has_the_replicas_of_the_streams_it_guards(
    nats_cluster: NatsCluster,  # first: stopped after host_factory drained its hosts
    host_factory: HostFactory,
) -> None:
    """The bucket fnhost made had one replica whatever the streams: in a cluster, the
    records guarding an R3 stream's messages lived on one server, and while it was down
    no message could run (chaos F6: the host's server killed, 90 s without progress)."""
    r1 = manifest("{store: kv, ttl: 1h, bucket: raised}")
    r3 = r1.replace("duplicate_window: 1h}", "duplicate_window: 1h, replicas: 3}")
    assert r3 != r1

    async def replicas(js: JetStreamContext, bucket: str) -> int | None:
        return (await js.stream_info(f"KV_{bucket}")).config.num_replicas

    nc = await nats.connect(nats_cluster.urls)
    try:
        js = nc.jetstream()
        first = await host_factory(r1, {"fn.py": COUNTING}, url=nats_cluster.url)
        assert await replicas(js, "raised") == 1
        await first.drain()
        # Made with the stream's replicas...
        fresh = r3.replace(", bucket: raised}", "}")
        made = await host_factory(fresh, {"fn.py": COUNTING}, url=nats_cluster.url)
        assert await replicas(js, "fnhost_idempotency") == 3
        await made.drain()
        # ...and an existing bucket raised to them (never lowered).
        await host_factory(r3, {"fn.py": COUNTING}, url=nats_cluster.url)
        assert await replicas(js, "raised") == 3
        await host_factory(r1, {"fn.py": COUNTING}, url=nats_cluster.url)
        assert await replicas(js, "raised") == 3
    finally:
        await nc.close()


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return await value == expected


POSTGRES_EFFECT = """\
import psycopg

DSN = {dsn!r}
runs = []


async def handle(event: dict, ctx) -> None:
    runs.append(event["n"])
    async with await psycopg.AsyncConnection.connect(DSN) as conn:
        async with conn.transaction():
            await conn.execute("INSERT INTO effects (n) VALUES (%s)", (event["n"],))
            await ctx.idempotency.record_in(conn)
"""


async def test_postgres_record_in_commits_effect_and_key_together(
    host_factory: HostFactory, nc: NatsClient, postgres_dsn: str
) -> None:
    import psycopg

    with psycopg.connect(postgres_dsn, autocommit=True) as db:
        db.execute("CREATE TABLE effects (n int PRIMARY KEY)")
    host = await host_factory(
        manifest(f"{{store: postgres, url: '{postgres_dsn}'}}"),
        {"fn.py": POSTGRES_EFFECT.format(dsn=postgres_dsn)},
        plugins=[LoseFirstAck()],
    )
    for n in range(5):
        await publish(nc, n)
    await wait_for(lambda: settled(nc), timeout=20, message="every message acked")
    assert sorted(runs(host)) == [0, 1, 2, 3, 4]
    assert host.metrics.counts("work").get("duplicate") == 5
    with psycopg.connect(postgres_dsn) as db:
        assert db.execute("SELECT count(*) FROM effects").fetchone() == (5,)
        done = db.execute("SELECT count(*) FROM fnhost_idempotency WHERE state = 'D'").fetchone()
        assert done == (5,)


OVERTAKEN = """\
import asyncio

import psycopg

DSN = {dsn!r}
STARTED = []
SECOND_COMMITTED = asyncio.Event()


async def handle(event: dict, ctx) -> None:
    STARTED.append(event["n"])
    async with await psycopg.AsyncConnection.connect(DSN) as conn:
        async with conn.transaction():
            await conn.execute("INSERT INTO effects (n) VALUES (%s)", (event["n"],))
            if event["n"] == 1:
                # Past its 1 s lease: the second delivery of the key takes it over.
                await SECOND_COMMITTED.wait()
            await ctx.idempotency.record_in(conn)
    if event["n"] == 2:
        SECOND_COMMITTED.set()
"""


async def test_a_lease_lost_on_the_last_attempt_to_a_delivery_that_recorded_is_a_duplicate(
    host_factory: HostFactory, nc: NatsClient, postgres_dsn: str
) -> None:
    """record_in raises LeaseLost: the effect rolls back, and the delivery that took the
    key over recorded it. On the last allowed attempt that is not a failure to
    dead-letter (the effect happened once; a replay would run it again): a duplicate."""
    import psycopg

    with psycopg.connect(postgres_dsn, autocommit=True) as db:
        db.execute("CREATE TABLE effects (n int PRIMARY KEY)")
    text = manifest(
        f"{{store: postgres, url: '{postgres_dsn}', key: 'header:Order-Id', lease: 1s}}"
    )
    host = await host_factory(
        text.replace("max_deliver: 50", "max_deliver: 1"),
        {"fn.py": OVERTAKEN.format(dsn=postgres_dsn)},
    )
    await publish(nc, 1, **{"Order-Id": "A"})
    await wait_for(lambda: module_of(host).STARTED == [1], message="the first delivery runs")
    await publish(nc, 2, **{"Order-Id": "A"})
    await wait_for(lambda: settled(nc), timeout=30, message="both messages settled")
    with psycopg.connect(postgres_dsn) as db:
        assert db.execute("SELECT n FROM effects").fetchall() == [(2,)]
    assert (await nc.jetstream().stream_info("DLQ")).state.messages == 0
    counts = host.metrics.counts("work")
    assert (counts.get("ack"), counts.get("duplicate"), counts.get("dead_letter", 0)) == (1, 1, 0)


BLOCKING = """\
import threading
import time

SPANS = []
FIRST_MAY_END = threading.Event()


def handle(event: dict, ctx) -> None:
    started = time.monotonic()
    if ctx.attempt == 1:
        FIRST_MAY_END.wait(30)  # past the 300ms timeout: a thread is not interrupted
    SPANS.append((ctx.attempt, started, time.monotonic()))
"""


async def test_a_timed_out_plain_def_keeps_its_lease_while_its_thread_runs_on(
    host_factory: HostFactory, nc: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The attempt fails at the deadline, but a plain def's thread runs on: the retry
    must not take the key while it does (two runs of one message side by side)."""
    caplog.set_level(logging.INFO, logger="fnhost")
    text = manifest("{store: kv, lease: 3s}").replace(
        "    concurrency: 4\n", "    concurrency: 4\n    timeout: 300ms\n"
    )
    host = await host_factory(text, {"fn.py": BLOCKING})
    module = module_of(host)
    await publish(nc, 1)

    def retry_ran_or_waits() -> bool:
        return bool(module.SPANS) or "is leased by another delivery" in caplog.text

    await wait_for(retry_ran_or_waits, message="the retry ran, or waits on the lease")
    module.FIRST_MAY_END.set()
    await wait_for(lambda: settled(nc), timeout=30, message="the retry acked")
    spans = {attempt: (start, end) for attempt, start, end in module.SPANS}
    assert sorted(spans) == [1, 2]
    assert spans[2][0] >= spans[1][1], f"attempt 2 started while attempt 1 ran: {spans}"


async def test_a_key_function_that_cannot_be_imported_fails_the_function(
    host_factory: HostFactory,
) -> None:
    text = manifest("{store: memory, key: 'no_such_module:key'}")
    host = await host_factory(text, {"fn.py": COUNTING})
    state = host.functions["work"]
    assert state.status == "failed"
    assert "idempotency.key 'no_such_module:key' cannot be loaded" in (state.error or "")
