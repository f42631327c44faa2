"""The baseline: the hand-written nats-py program an expert would write.

Serves both workloads: request/reply on ``bench.orders.create`` (queue group,
``msg.respond``) and a durable pull consumer on the ``BENCH`` stream
(``fetch(256)``, ``json.loads``, ``ack`` each). Runs until SIGTERM or SIGINT,
then drains the connection.

    python bench/raw_nats.py --nats nats://127.0.0.1:4222 --loop uvloop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import uuid

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from harness import DURABLE, LOOPS, REQUEST_QUEUE, REQUEST_SUBJECT, STREAM, STREAM_SUBJECTS, run

FETCH_BATCH = 256


async def create_order(msg: Msg) -> None:
    order = json.loads(msg.data)
    reply = {"order_id": uuid.uuid4().hex, "status": "accepted", "total": order["total"]}
    await msg.respond(json.dumps(reply).encode())


async def consume(sub: JetStreamContext.PullSubscription) -> None:
    while True:
        try:
            msgs = await sub.fetch(FETCH_BATCH, timeout=5)
        except nats.errors.TimeoutError:
            # An empty stream: fetch again.
            continue
        for msg in msgs:
            json.loads(msg.data)
            await msg.ack()


async def main(url: str) -> None:
    # Reconnect forever: the nats-py default gives up after about two minutes.
    nc = await nats.connect(url, name="bench-raw", max_reconnect_attempts=-1, reconnect_time_wait=1)
    js = nc.jetstream()
    await nc.subscribe(REQUEST_SUBJECT, queue=REQUEST_QUEUE, cb=create_order)
    sub = await js.pull_subscribe(
        STREAM_SUBJECTS,
        durable=DURABLE,
        stream=STREAM,
        # max_ack_pending above the fetch batch, so a full batch is never throttled.
        config=ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, ack_wait=30, max_ack_pending=4 * FETCH_BATCH
        ),
    )
    consumer = asyncio.create_task(consume(sub))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    consumer.cancel()
    await nc.drain()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nats", required=True, help="NATS server URL")
    parser.add_argument("--loop", choices=LOOPS, required=True)
    args = parser.parse_args()
    run(main(args.nats), args.loop)
