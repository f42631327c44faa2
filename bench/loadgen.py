"""Request/reply load generator: the same raw nats-py code for every implementation.

Keeps ``--inflight`` requests outstanding on one connection (one worker task
per slot), first for ``--warmup`` requests that are not timed, then for
``--requests`` timed ones. Every reply must parse as JSON, carry no
``Nats-Service-Error`` header and say ``"status": "accepted"``; the first one
that does not ends the run with a non-zero exit. Prints one JSON line:
``{"requests": N, "seconds": S}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg

from harness import LOOPS, ORDER_BYTES, REQUEST_SUBJECT, run

ERROR_HEADER = "Nats-Service-Error"
# Far above any healthy round trip; a reply this late means the responder is stuck.
REQUEST_TIMEOUT = 10.0


class BadReply(Exception):
    """A reply that is an error or not the expected JSON."""


def check(msg: Msg) -> None:
    if msg.headers and ERROR_HEADER in msg.headers:
        raise BadReply(f"error reply, headers {msg.headers}")
    reply = json.loads(msg.data)
    if reply.get("status") != "accepted":
        raise BadReply(f"unexpected reply {reply!r}")


async def drive(nc: Client, total: int, inflight: int) -> None:
    """Send ``total`` requests with ``inflight`` of them outstanding at any time."""
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            check(await nc.request(REQUEST_SUBJECT, ORDER_BYTES, timeout=REQUEST_TIMEOUT))

    # A TaskGroup cancels the other workers at the first bad reply.
    async with asyncio.TaskGroup() as group:
        for _ in range(inflight):
            group.create_task(worker())


async def main(url: str, requests: int, warmup: int, inflight: int) -> dict[str, float]:
    nc = await nats.connect(url, name="bench-loadgen")
    try:
        await drive(nc, warmup, inflight)
        start = time.perf_counter()
        await drive(nc, requests, inflight)
        seconds = time.perf_counter() - start
    finally:
        await nc.close()
    return {"requests": requests, "seconds": seconds}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nats", required=True, help="NATS server URL")
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--inflight", type=int, default=64)
    parser.add_argument("--loop", choices=LOOPS, required=True)
    args = parser.parse_args()
    try:
        result = run(main(args.nats, args.requests, args.warmup, args.inflight), args.loop)
    except* (BadReply, ValueError, nats.errors.Error) as failures:
        sys.exit(f"loadgen: {failures.exceptions[0]!r}")
    print(json.dumps(result))
