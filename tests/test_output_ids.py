"""The ``Nats-Msg-Id`` of what a handler publishes (``ctx.publish``, ``output:``), on a
real nats-server: derived ids name the publishing function, and an id given in
``headers=`` is explicit."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from fnhost_sdk.testing import wait_for
from support import stored_at_ns_of

pytestmark = pytest.mark.nats

STREAMS = """\
version: 1
http: false
streams:
  IN: {subjects: ["in.>"], duplicate_window: 1h}
  OUT: {subjects: ["out.>"], duplicate_window: 1h}
functions:
"""

FAN_OUT = (
    STREAMS
    + """\
  billing:
    module: billing.py
    trigger: {stream: IN, durable: billing}
  shipping:
    module: shipping.py
    trigger: {stream: IN, durable: shipping}
    output: out.done
"""
)

BILLING = """\
    from fnhost_sdk import Retry


    async def handle(data: dict, ctx) -> None:
        body = {"by": ctx.function, "n": data["n"], "attempt": ctx.attempt}
        await ctx.publish("out.billed", body)
        if ctx.attempt == 1:
            raise Retry(delay=0.05)
"""

# The return value (``output:``) is the second publish: index 1.
SHIPPING = """\
    from fnhost_sdk import Retry


    async def handle(data: dict, ctx) -> dict:
        body = {"by": ctx.function, "n": data["n"], "attempt": ctx.attempt}
        await ctx.publish("out.shipped", body)
        if ctx.attempt == 1:
            raise Retry(delay=0.05)
        return {**body, "output": True}
"""


async def drained(js: JetStreamContext, durable: str, total: int) -> bool:
    info = await js.consumer_info("IN", durable)
    return (
        info.num_pending == 0 and info.num_ack_pending == 0 and info.ack_floor.stream_seq == total
    )


async def stored(js: JetStreamContext, stream: str) -> list[tuple[str, dict[str, object]]]:
    """Every message of ``stream`` as (its Nats-Msg-Id, its decoded body), in order."""
    state = (await js.stream_info(stream)).state
    messages = []
    for seq in range(state.first_seq, state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        messages.append(((msg.headers or {}).get("Nats-Msg-Id", ""), json.loads(msg.data)))
    return messages


async def test_functions_consuming_one_stream_each_get_their_outputs_stored_once(
    host_factory, js: JetStreamContext, nc: NatsClient
) -> None:
    """Two functions with their own durables on IN both publish into OUT for every
    input. Before the id named the function, both derived ``<input>/0`` and OUT's
    duplicate window dropped the second function's output (its input acked: lost).
    Each handler publishes, then asks for a retry on attempt 1: the redelivered
    attempt's re-publish carries the same id and is dropped, so OUT holds one copy
    of each output per function."""
    await host_factory(FAN_OUT, {"billing.py": BILLING, "shipping.py": SHIPPING})
    await js.publish("in.a", b'{"n": 1}', headers={"Nats-Msg-Id": "order-1"})
    await js.publish("in.a", b'{"n": 2}', headers={"Nats-Msg-Id": "order-2"})
    await js.publish("in.a", b'{"n": 3}')

    for durable in ("billing", "shipping"):
        await wait_for(lambda d=durable: drained(js, d, 3), message=f"{durable} drained")
    messages = await stored(js, "OUT")

    third = f"IN:3:{await stored_at_ns_of(nc, 'IN', 3)}"
    ids = Counter(message_id for message_id, _ in messages)
    assert ids == Counter(
        {
            f"{function}:{key}/{index}": 1
            for key in ("order-1", "order-2", third)
            for function, index in (("billing", 0), ("shipping", 0), ("shipping", 1))
        }
    ), "each function's outputs stored once per input"
    bodies = sorted(
        (str(body["by"]), int(str(body["n"])), "output" in body) for _, body in messages
    )
    assert bodies == sorted(
        [("billing", n, False) for n in (1, 2, 3)]
        + [("shipping", n, False) for n in (1, 2, 3)]
        + [("shipping", n, True) for n in (1, 2, 3)]
    )
    # The first attempts' publishes were stored; the second attempts' ctx.publish was
    # dropped as a duplicate (the output: publish only happens on attempt 2).
    assert {body["attempt"] for _, body in messages if "output" not in body} == {1}


HEADER_ID = (
    STREAMS
    + """\
  work:
    module: fn.py
    trigger: {stream: IN, durable: work}
"""
)

SHIP = """\
    DUPLICATE = []


    async def handle(data: dict, ctx) -> None:
        ack = await ctx.publish(
            "out.shipped", data, headers={"Nats-Msg-Id": "shipped-9", "X-Order": "9"}
        )
        DUPLICATE.append(ack.duplicate)
"""


async def test_a_message_id_given_in_headers_is_explicit(
    host_factory, js: JetStreamContext
) -> None:
    """A ``Nats-Msg-Id`` in ``headers=`` (the usual NATS way) is used as is: it was
    overwritten with the derived id, so both publishes were stored."""
    await host_factory(HEADER_ID, {"fn.py": SHIP})
    await js.publish("in.a", b'{"n": 1}', headers={"Nats-Msg-Id": "order-1"})
    await js.publish("in.a", b'{"n": 2}')
    await wait_for(lambda: drained(js, "work", 2), message="work drained")

    messages = await stored(js, "OUT")
    assert messages == [("shipped-9", {"n": 1})]
    msg = await js.get_msg("OUT", 1)
    assert (msg.headers or {}).get("X-Order") == "9"
