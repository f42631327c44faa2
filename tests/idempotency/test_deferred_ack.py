"""The kv store's deferred ack, in a real host on a real nats-server.

With plain acks the invocation does not wait for its record: the stream trigger
sends the ack from the record write's callback (``Invocation.ack_after``). These
tests cover what that path must still do: a record the store refuses for a while
is tried again and the message acked once it is stored (never run twice); a record
never stored naks the message; ``ack: sync`` and a connection that nats-py must
publish on itself take the awaited path and keep the same promise.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import ConsumerInfo

import fnhost.idempotency.kv
import fnhost.plugins.idempotency
import fnhost.triggers.stream
import fnhost_sdk.replies
from conftest import HostFactory
from fnhost.http import readiness
from fnhost.idempotency import StoreUnavailable
from fnhost.idempotency.kv import KVStore
from fnhost_sdk.server import NatsServer
from fnhost_sdk.testing import wait_for
from support import module_of

from .test_middleware import COUNTING, GATED, LoseFirstAck, manifest, publish, runs, settled

pytestmark = pytest.mark.nats

BUCKET = "fnhost_idempotency"


async def _recorded(nc: NatsClient, message_id: str) -> bool:
    """Whether the message with ``message_id`` is recorded, asked as another host."""
    store = KVStore(nc.jetstream, BUCKET, "another-host")
    await store.start()
    try:
        key = store.encoder("work")(message_id)
        return (await store.begin(key, 30)).state == "done"
    finally:
        await store.close()


async def test_a_record_the_kv_store_refuses_for_a_while_is_stored_once_it_is_back(
    host_factory: HostFactory, nc: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    """The record's group write fails (the bucket is gone): the trigger hands the
    failure back to the middleware, which tries again until the host's probe has
    made the bucket again; only then is the message acked, never nak'ed to run twice."""
    caplog.set_level(logging.INFO, logger="fnhost.idempotency")
    host = await host_factory(manifest("{store: kv}"), {"fn.py": GATED})
    await publish(nc, 1)
    await wait_for(lambda: runs(host) == [1], message="the handler running")
    await nc.jetstream().delete_key_value(BUCKET)
    module_of(host).GATE.set()
    await wait_for(lambda: settled(nc), timeout=30, message="the message acked")
    assert runs(host) == [1]
    assert (await nc.jetstream().consumer_info("IN", "work")).num_redelivered == 0
    messages = [record.getMessage() for record in caplog.records]
    assert len([m for m in messages if "its record was not stored" in m]) == 1, messages
    assert len([m for m in messages if "recorded at try" in m]) == 1, messages
    await wait_for(lambda: readiness(host) == [], timeout=30, message="ready again")


async def test_a_record_never_stored_naks_the_message(
    host_factory: HostFactory, nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the record's patience (shortened here; the probe, slowed down, does not make
    the bucket again meanwhile) the message is nak'ed, not acked unrecorded: its
    redelivery (which makes the bucket again) runs the handler a second time, the
    at-least-once the docs promise when a record is lost."""
    monkeypatch.setattr(fnhost.plugins.idempotency, "RECORD_PATIENCE", 1.0)
    monkeypatch.setattr(fnhost.plugins.idempotency, "PROBE_FIRST", 600.0)
    host = await host_factory(manifest("{store: kv}"), {"fn.py": GATED})
    await publish(nc, 1, **{"Nats-Msg-Id": "m-1"})
    await wait_for(lambda: runs(host) == [1], message="the handler running")
    await nc.jetstream().delete_key_value(BUCKET)
    module_of(host).GATE.set()
    await wait_for(lambda: runs(host) == [1, 1], timeout=30, message="nak'ed and run again")
    await wait_for(lambda: settled(nc), timeout=30, message="the redelivery acked")
    assert await _recorded(nc, "m-1")


@pytest.mark.parametrize("ack", ["plain", "sync"])
async def test_a_redelivered_recorded_key_is_a_duplicate_with_either_ack(
    host_factory: HostFactory, nc: NatsClient, ack: str
) -> None:
    text = manifest("{store: kv}").replace("    dead_letter:", f"    ack: {ack}\n    dead_letter:")
    host = await host_factory(text, {"fn.py": COUNTING}, plugins=[LoseFirstAck()])
    for n in range(5):
        await publish(nc, n, **{"Nats-Msg-Id": f"m-{n}"})
    await wait_for(lambda: settled(nc), timeout=20, message="every message acked")
    assert sorted(runs(host)) == [0, 1, 2, 3, 4]
    counts = host.metrics.counts("work")
    assert (counts.get("ack"), counts.get("duplicate")) == (5, 5)
    for n in range(5):
        assert await _recorded(nc, f"m-{n}")


async def test_acks_and_leases_go_through_nats_py_when_they_cannot_be_queued(
    host_factory: HostFactory, nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose buffer cannot take them now (reconnecting, full, draining, other
    internals): every lease and ack is sent by nats-py's own publish instead."""
    declined: list[str] = []

    def decline(_nc: object, subject: str, *_args: object) -> bool:
        declined.append(subject)
        return False

    monkeypatch.setattr(fnhost.triggers.stream, "publish_nowait", decline)
    monkeypatch.setattr(fnhost_sdk.replies, "publish_nowait", decline)
    host = await host_factory(manifest("{store: kv}"), {"fn.py": COUNTING})
    for n in range(20):
        await publish(nc, n, **{"Nats-Msg-Id": f"m-{n}"})
    await wait_for(lambda: settled(nc), timeout=20, message="every message acked")
    assert sorted(runs(host)) == list(range(20))
    assert (await nc.jetstream().consumer_info("IN", "work")).num_redelivered == 0
    assert len({s for s in declined if s.startswith("$JS.ACK.")}) == 20  # each ack declined
    # (The first lease goes through Replies.request directly: it subscribes first.)
    assert len([s for s in declined if s.startswith(f"$KV.{BUCKET}.work.")]) >= 19
    for n in (0, 10, 19):
        assert await _recorded(nc, f"m-{n}")


async def test_a_drain_waits_for_an_ack_that_waits_for_its_record(
    host_factory: HostFactory,
    nc: NatsClient,
    nats_server: NatsServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The handler returned, its record's group write is held up (the server is frozen):
    its slot is free again, but the drain waits for the ack all the same, and the ack
    is sent before the connection closes; the message is not redelivered."""
    host = await host_factory(manifest("{store: kv}"), {"fn.py": GATED})
    await publish(nc, 1)
    await wait_for(lambda: runs(host) == [1], message="the handler running")
    trigger = host.functions["work"].trigger
    assert trigger is not None
    nats_server.pause()
    try:
        module_of(host).GATE.set()
        await wait_for(
            lambda: host.metrics.counts("work").get("ack") == 1, message="the handler returned"
        )
        assert (trigger.slots.in_use, trigger.inflight) == (0, 1)  # the ack waits
        draining = asyncio.get_running_loop().create_task(host.drain(grace=30))
    finally:
        nats_server.resume()
    await draining
    assert trigger.inflight == 0
    assert "still running after" not in caplog.text
    await wait_for(lambda: settled(nc), timeout=20, message="the message acked")
    assert runs(host) == [1]


async def test_an_ack_waiting_for_its_record_frees_its_slot_up_to_twice_the_concurrency(
    host_factory: HostFactory, nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Concurrency 2, the records' group writes held back, 10 messages: each handler's
    slot goes to the next message once it returns, so 4 run (2 + 2 whose acks wait):
    the host holds twice its concurrency and asks for no more; none is acked before
    its record is stored. Once the writes go through, all 10 run once and are acked."""
    writes_go = asyncio.Event()
    write_group = KVStore._write_group

    async def held_back(store: KVStore, group: Any) -> None:
        await writes_go.wait()
        await write_group(store, group)

    monkeypatch.setattr(KVStore, "_write_group", held_back)
    host = await host_factory(manifest("{store: kv}", concurrency=2), {"fn.py": COUNTING})
    trigger = host.functions["work"].trigger
    assert isinstance(trigger, fnhost.triggers.stream.StreamTrigger)
    for n in range(10):
        await publish(nc, n)
    await wait_for(lambda: len(runs(host)) == 4, message="four handlers ran")

    async def holding_four() -> ConsumerInfo | None:
        info = await nc.jetstream().consumer_info("IN", "work")
        # num_waiting == 0: no pull request outstanding, nothing more is coming.
        ok = info.num_ack_pending == 4 and info.num_pending == 6 and info.num_waiting == 0
        return info if ok else None

    info = await wait_for(holding_four, message="4 delivered and unacked, 6 left, no pull")
    assert info.ack_floor.stream_seq == 0, "an ack left before its record was stored"
    assert (trigger.slots.in_use, trigger.inflight, trigger.held) == (0, 4, 4)
    assert len(runs(host)) == 4

    writes_go.set()
    await wait_for(lambda: settled(nc), timeout=20, message="every message acked")
    assert sorted(runs(host)) == list(range(10))
    assert (await nc.jetstream().consumer_info("IN", "work")).num_redelivered == 0


async def test_an_ack_whose_record_write_fails_takes_a_slot_back_while_it_is_retried(
    host_factory: HostFactory, nc: NatsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record's write fails (the store refuses every write for now): the message,
    whose slot went to the next one when its handler returned, takes a slot back while
    the middleware retries the record, so a failing store holds back the intake. Once
    writes go through, it is acked, and its slot is free again."""
    refusing = True
    put = fnhost.idempotency.kv._put

    async def refused(*args: Any) -> int:
        if refusing:
            raise StoreUnavailable("refused by the test")
        return await put(*args)

    monkeypatch.setattr(fnhost.idempotency.kv, "_put", refused)
    host = await host_factory(manifest("{store: kv}", concurrency=2), {"fn.py": COUNTING})
    trigger = host.functions["work"].trigger
    assert isinstance(trigger, fnhost.triggers.stream.StreamTrigger)
    await publish(nc, 1)
    await wait_for(lambda: runs(host) == [1], message="the handler ran")
    await wait_for(
        lambda: (trigger.slots.in_use, trigger.inflight) == (1, 1),
        message="the message holds a slot while its record is retried",
    )
    refusing = False
    await wait_for(lambda: settled(nc), timeout=20, message="the message acked")
    assert (trigger.slots.in_use, trigger.inflight) == (0, 0)
    assert runs(host) == [1]
    assert (await nc.jetstream().consumer_info("IN", "work")).num_redelivered == 0
