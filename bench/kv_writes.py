"""What a function's KV write costs: nats-py's JetStream context against fnhost's pipelined one.

    python bench/kv_writes.py [--rounds 3] [--writes 40000] [--in-flight 64]
                              [--loop uvloop|asyncio]

``ctx.kv()`` hands a function nats-py's ``KeyValue``, built on the host's
JetStream context: a :class:`fnhost_sdk.replies.PipelinedJetStream`, whose
``publish`` goes through :func:`fnhost_sdk.replies.publish_to_stream` instead
of nats-py's ``nc.request``. This script creates ``--writes`` new keys in a
fresh bucket with ``--in-flight`` tasks, once through ``nc.jetstream()`` and once
through ``PipelinedJetStream(nc)``, each round, against a private nats-server
with its default sync, and prints the median creates/s and this process's CPU
per create of each, with the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from fnhost_sdk.replies import PipelinedJetStream
from harness import LOG_DIR, LOOPS, NatsServer, check_loop, default_loop, exit_with, median_of, run

CONTEXTS: dict[str, Callable[[NatsClient], JetStreamContext]] = {
    "nats-py": lambda nc: nc.jetstream(),
    "pipelined": PipelinedJetStream,
}


async def creates(
    server: NatsServer, context: str, bucket: str, args: argparse.Namespace
) -> tuple[float, float]:
    """(creates/s, µs of this process's CPU per create) of one trial."""
    nc = await nats.connect(server.url)
    try:
        js = CONTEXTS[context](nc)
        kv = await js.create_key_value(bucket=bucket, history=1)
        keys = iter(range(args.writes))

        async def writer() -> None:
            for key in keys:
                await kv.create(f"k{key}", b"1")

        started, cpu_started = time.perf_counter(), time.process_time()
        await asyncio.gather(*(writer() for _ in range(args.in_flight)))
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        await js.delete_key_value(bucket)
        return args.writes / elapsed, cpu * 1e6 / args.writes
    finally:
        await nc.close()


async def main(args: argparse.Namespace) -> int:
    found: dict[str, list[tuple[float, float]]] = {name: [] for name in CONTEXTS}
    with tempfile.TemporaryDirectory(prefix="fnhost-kv-writes-") as workdir:
        server = NatsServer(Path(workdir), LOG_DIR / "kv-writes-nats-server.log", sync_always=False)
        await server.start()
        try:
            for round_no in range(1, args.rounds + 1):
                for name in CONTEXTS:
                    rate, cpu = await creates(server, name, f"w{round_no}{name[0]}", args)
                    found[name].append((rate, cpu))
                    round_label = f"round {round_no}/{args.rounds}"
                    print(f"{round_label}  {name:10} {rate:9,.0f} creates/s, {cpu:5.1f} µs CPU")
        finally:
            await server.stop()
    trial = f"{args.writes:,} KV creates per trial, {args.in_flight} in flight"
    print(f"\n{trial}, median of {args.rounds}")
    medians = {
        name: (median_of([r for r, _ in rows]), median_of([c for _, c in rows]))
        for name, rows in found.items()
    }
    base_rate, base_cpu = medians["nats-py"]
    for name, (rate, cpu) in medians.items():
        assert rate is not None and cpu is not None and base_rate and base_cpu
        throughput = f"{rate:9,.0f} creates/s ({rate / base_rate:.2f}x)"
        print(f"{name:10} {throughput}  {cpu:5.1f} µs CPU per create ({cpu / base_cpu:.2f}x)")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writes", type=int, default=40_000)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--loop", choices=LOOPS, default=default_loop())
    args = parser.parse_args()
    check_loop(parser, args.loop)
    if min(args.rounds, args.writes, args.in_flight) < 1:
        parser.error("--rounds, --writes and --in-flight must be at least 1")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    exit_with(lambda: run(main(arguments), arguments.loop))
