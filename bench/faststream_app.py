"""The same two workloads as ``raw_nats.py``, written as a FastStream 0.7 app.

Run the way FastStream apps run in production, with its CLI (the NATS URL in
``NATS_URL``):

    NATS_URL=nats://127.0.0.1:4222 faststream run faststream_app:app --app-dir bench \\
        --loop uvloop:new_event_loop
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from faststream import AckPolicy, FastStream
from faststream.nats import ConsumerConfig, JStream, NatsBroker, PullSub

from harness import DURABLE, REQUEST_QUEUE, REQUEST_SUBJECT, STREAM, STREAM_SUBJECTS

FETCH_BATCH = 256

# Reconnect forever, as raw_nats.py does.
broker = NatsBroker(
    os.environ["NATS_URL"],
    name="bench-faststream",
    max_reconnect_attempts=-1,
    reconnect_time_wait=1,
)
app = FastStream(broker)


@broker.subscriber(REQUEST_SUBJECT, queue=REQUEST_QUEUE)
async def create_order(order: dict[str, Any]) -> dict[str, Any]:
    return {"order_id": uuid.uuid4().hex, "status": "accepted", "total": order["total"]}


@broker.subscriber(
    STREAM_SUBJECTS,
    stream=JStream(STREAM, subjects=[STREAM_SUBJECTS]),
    durable=DURABLE,
    pull_sub=PullSub(batch_size=FETCH_BATCH, timeout=5),
    # The consumer settings of raw_nats.py.
    config=ConsumerConfig(ack_wait=30, max_ack_pending=4 * FETCH_BATCH),
    # Ack after the handler returns, nak when it raises: what the fnhost host does too.
    ack_policy=AckPolicy.NACK_ON_ERROR,
)
async def consume(event: dict[str, Any]) -> None:
    """Decoding the body into ``event`` is the whole job; FastStream acks on return."""
