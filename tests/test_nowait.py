"""fnhost_sdk.nowait on a real nats-server: a queued publish arrives as nats-py's would,
in order with them; whenever the client is not plainly connected (or the payload is
one nats-py would refuse) nothing is queued and nats-py's own publish takes over."""

from __future__ import annotations

import asyncio

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from fnhost_sdk.nowait import EncodedHeaders, publish_nowait
from fnhost_sdk.server import NatsServer
from fnhost_sdk.testing import wait_for
from support import collect

pytestmark = pytest.mark.nats


async def test_a_queued_publish_arrives_in_order_with_nats_py_publishes(nc: NatsClient) -> None:
    received = await collect(nc, "orders.>")
    headers = EncodedHeaders({"Nats-Msg-Id": "m-1", "Order-Id": "o 7"})
    await nc.publish("orders.a", b"first")
    assert publish_nowait(nc, "orders.b", b"second", "reply.here", headers)
    assert publish_nowait(nc, "orders.c")
    await nc.publish("orders.d", b"fourth")
    await wait_for(lambda: len(received) == 4, message="four messages")
    assert [(m.subject, m.data) for m in received] == [
        ("orders.a", b"first"),
        ("orders.b", b"second"),
        ("orders.c", b""),
        ("orders.d", b"fourth"),
    ]
    assert received[1].reply == "reply.here"
    assert received[1].headers == {"Nats-Msg-Id": "m-1", "Order-Id": "o 7"}
    assert received[2].headers is None
    assert nc.stats["out_msgs"] >= 4


async def test_encoded_headers_are_the_dict_nats_py_publishes_when_handed_back(
    nc: NatsClient,
) -> None:
    received = await collect(nc, "orders.>")
    await nc.publish("orders.a", b"x", headers=EncodedHeaders({"Order-Id": "o-1"}))
    await wait_for(lambda: received, message="the message")
    assert received[0].headers == {"Order-Id": "o-1"}


async def test_a_payload_over_the_server_limit_is_not_queued(nc: NatsClient) -> None:
    too_big = b"x" * (nc.max_payload + 1)
    assert not publish_nowait(nc, "orders.a", too_big)
    with pytest.raises(nats.errors.MaxPayloadError):
        await nc.publish("orders.a", too_big)


async def test_a_full_outgoing_buffer_is_left_to_nats_py(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url, pending_size=64)
    try:
        received = await collect(nc, "orders.>")
        assert not publish_nowait(nc, "orders.a", b"x" * 100)
        await nc.publish("orders.a", b"x" * 100)  # nats-py flushes at once instead
        await wait_for(lambda: received, message="nats-py's publish arrived")
    finally:
        await nc.close()


async def test_nothing_is_queued_on_a_closed_client(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    await nc.close()
    assert not publish_nowait(nc, "orders.a", b"x")
    with pytest.raises(nats.errors.ConnectionClosedError):
        await nc.publish("orders.a", b"x")


async def test_while_reconnecting_nats_py_buffers_and_sends_after_the_reconnect(
    nats_server: NatsServer,
) -> None:
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(
        nats_server.url,
        reconnected_cb=on_reconnect,
        reconnect_time_wait=0.1,
        max_reconnect_attempts=-1,
    )
    try:
        received = await collect(nc, "orders.>")
        nats_server.stop()
        await wait_for(lambda: not nc.is_connected, message="the client noticed the outage")
        assert not publish_nowait(nc, "orders.a", b"during")
        await nc.publish("orders.a", b"during")  # buffered by nats-py
        nats_server.start()
        await asyncio.wait_for(reconnected.wait(), 30)
        assert publish_nowait(nc, "orders.b", b"after")
        await wait_for(lambda: len(received) == 2, timeout=20, message="both messages")
        assert [m.data for m in received] == [b"during", b"after"]
    finally:
        await nc.close()


async def test_nothing_is_queued_once_the_client_drains_its_publishes(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url, allow_reconnect=False)
    nats_server.pause()  # the drain's last flush waits: the client stays draining
    try:
        draining = asyncio.get_running_loop().create_task(nc.drain())
        await wait_for(lambda: nc.is_draining_pubs, message="draining publishes")
        assert not publish_nowait(nc, "orders.a", b"x")
        with pytest.raises(nats.errors.ConnectionDrainingError):
            await nc.publish("orders.a", b"x")
    finally:
        nats_server.resume()
    await draining
