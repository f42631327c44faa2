"""fnhost_sdk.replies: pipelined JetStream publishes answer like js.publish, on a real server."""

from __future__ import annotations

import asyncio

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client as NatsClient

from fnhost_sdk.replies import PipelinedJetStream, publish_to_stream, replies_for
from fnhost_sdk.server import NatsServer
from fnhost_sdk.session import Session


async def test_concurrent_publishes_each_get_their_own_puback(nc: NatsClient) -> None:
    js = nc.jetstream()
    await js.add_stream(name="EVENTS", subjects=["events.>"])
    acks = await asyncio.gather(
        *(publish_to_stream(nc, f"events.{n}", str(n).encode()) for n in range(300))
    )
    assert {ack.stream for ack in acks} == {"EVENTS"}
    assert sorted(ack.seq for ack in acks) == list(range(1, 301))
    for n in (0, 150, 299):
        stored = await js.get_msg("EVENTS", acks[n].seq)
        assert stored.data == str(n).encode()


async def test_a_duplicate_message_id_is_reported_like_js_publish(nc: NatsClient) -> None:
    await nc.jetstream().add_stream(name="EVENTS", subjects=["events.>"])
    first = await publish_to_stream(nc, "events.a", b"1", {"Nats-Msg-Id": "m-1"})
    again = await publish_to_stream(nc, "events.a", b"1", {"Nats-Msg-Id": "m-1"})
    assert (first.duplicate, again.duplicate, again.seq) == (None, True, first.seq)


async def test_no_stream_for_the_subject_raises_no_stream_response(nc: NatsClient) -> None:
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await publish_to_stream(nc, "nobody.listens", b"x")


async def test_a_refused_publish_raises_the_servers_api_error(nc: NatsClient) -> None:
    await nc.jetstream().add_stream(name="EVENTS", subjects=["events.>"])
    await publish_to_stream(nc, "events.a", b"1")
    with pytest.raises(nats.js.errors.BadRequestError) as refused:
        await publish_to_stream(nc, "events.a", b"2", {"Nats-Expected-Last-Subject-Sequence": "7"})
    assert refused.value.err_code == 10071


async def test_an_unanswered_request_times_out(nc: NatsClient) -> None:
    await nc.subscribe("silent")  # receives, never answers
    with pytest.raises(nats.errors.TimeoutError):
        await replies_for(nc).request("silent", b"x", None, timeout=0.3)


async def test_a_request_pending_when_the_connection_closes_fails(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    await nc.subscribe("silent")  # receives, never answers
    pending = asyncio.ensure_future(replies_for(nc).request("silent", b"x", None, timeout=60))
    await asyncio.sleep(0.2)
    await nc.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await pending


async def test_sessions_on_one_connection_share_one_reply_subscription(
    nc: NatsClient,
) -> None:
    await nc.jetstream().add_stream(name="EVENTS", subjects=["events.>"])
    before = len(nc._subs)
    for _ in range(3):
        await Session(nc).publish_durable("events.a", b"x", None)
    assert replies_for(nc) is replies_for(nc)
    assert len(nc._subs) == before + 1


async def test_the_pipelined_context_publishes_like_js_publish(nc: NatsClient) -> None:
    js = PipelinedJetStream(nc)
    await js.add_stream(name="EVENTS", subjects=["events.>"], allow_msg_ttl=True)
    ack = await js.publish("events.a", b"1", stream="EVENTS", msg_ttl=60)
    assert (ack.stream, ack.seq) == ("EVENTS", 1)
    stored = await js.get_msg("EVENTS", 1)
    assert stored.headers is not None and stored.headers.get("Nats-TTL") == "60"
    with pytest.raises(nats.js.errors.BadRequestError) as wrong_stream:
        await js.publish("events.b", b"2", stream="ORDERS")
    assert wrong_stream.value.err_code == 10060
    with pytest.raises(nats.js.errors.NoStreamResponseError):
        await js.publish("nobody.listens", b"x")


async def test_a_sessions_key_value_bucket_creates_updates_and_refuses_like_nats_py(
    nc: NatsClient,
) -> None:
    session = Session(nc)
    assert isinstance(session.js, PipelinedJetStream)
    await session.js.create_key_value(bucket="inventory", history=5)
    kv = await session.kv("inventory")
    first = await kv.create("reservations.o1.A1", b"2")
    # What the example's inventory relies on: a second create of a key is refused.
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await kv.create("reservations.o1.A1", b"2")
    second = await kv.update("reservations.o1.A1", b"3", last=first)
    with pytest.raises(nats.js.errors.KeyWrongLastSequenceError):
        await kv.update("reservations.o1.A1", b"4", last=first)
    assert (await kv.get("reservations.o1.A1")).revision == second
    await kv.delete("reservations.o1.A1")
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get("reservations.o1.A1")
    acks = await asyncio.gather(*(kv.put(f"many.{n}", b"x") for n in range(200)))
    assert len(set(acks)) == 200
