"""What each idempotency store costs: messages/s of one stream function, store by store.

    python bench/stores.py [--rounds 3] [--messages 20000] [--loop uvloop|asyncio]
                           [--only none,round-trip,memory,kv,redis,postgres]
                           [--sync always|default]

The function is workload B of ``run.py`` (``bench/functions.py:consume``:
decode the JSON, return; the host acks), run by ``python -m fnhost run`` with
manifest defaults (concurrency 64) and ``idempotency: {store: S}``, against
one private nats-server (``sync_interval: always``), a private redis-server
and a private PostgreSQL (fsync on) started by this script. ``none`` is the
same function without ``idempotency:``.

Each round runs every store once, one after the other, so machine noise hits
all alike. A trial: re-create the stream BENCH and pre-publish ``--messages``
events (not timed; no ``Nats-Msg-Id``, so the key is ``BENCH:<seq>``), start
the host with a fresh bucket / key prefix / table (so every key is new: the
cost of a first delivery, the common case), and time from the consumer's
creation to its last ack, both server timestamps (``run.measure_consume``).

Prints, per store: the median of the rounds, min, max, the ratio to ``none``
and the per-message cost of the store, ``1e6/rate - 1e6/rate(none)`` µs: the
extra wall time per message, which on this machine is the host process's
extra CPU per message (the host is the bottleneck, the store servers run on
the other core). ``--sync default`` runs nats-server with its default fsync
interval instead of ``sync_interval: always``, which separates the host's own
cost per message from the server's fsync per KV write. Writes
bench/results/stores-sync-<always|default>.json.

``round-trip`` is not a store but the floor under every store that talks to
a server: no ``idempotency:``, and the handler's return value goes to
``output:`` (a second stream), so the host awaits exactly one JetStream PubAck
per message before the ack, and nothing else. A store needing one round trip
before the handler or before the ack cannot cost less than this row.

Before the trials it measures the *kv ceiling*: compare-and-set writes per
second into a KV bucket from one plain nats-py client with 64 in flight and no
host, the bound of a store that makes two such writes (lease, record) per
message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import nats
import nats.errors

from harness import (
    BENCH_DIR,
    LOOPS,
    REPO_DIR,
    NatsServer,
    Process,
    ProcessFailed,
    check_loop,
    comma_choice,
    default_loop,
)
from run import LOG_DIR, RESULTS_DIR, host_env, measure_consume, package_version, reset_stream

STORES = ("none", "round-trip", "memory", "kv", "redis", "postgres")
ROUND_TRIP = "round-trip"
CEILING_WRITES = 8_000
CEILING_INFLIGHT = 64

MANIFEST = """\
version: 1
http: false
streams:
  BENCH: {{subjects: ["bench.events.>"], storage: file}}
  BENCHOUT: {{subjects: ["bench.out.>"], storage: file}}
functions:
  bench-consume:
    module: {module}
    handler: {handler}
    trigger: {{stream: BENCH, subjects: ["bench.events.>"], durable: bench-consume}}
{extra}"""


def _databases() -> Any:
    """tests/support/databases.py: the private Redis and PostgreSQL servers of the tests."""
    sys.path.insert(0, str(REPO_DIR / "tests"))
    from support import databases

    return databases


def manifest_for(store: str, trial: str, urls: dict[str, str]) -> str:
    handler, extra = "consume", ""
    if store == ROUND_TRIP:
        handler, extra = "forward", "    output: bench.out.forward\n"
    elif store != "none":
        settings = f"store: {store}, bucket: {trial}"
        if store in urls:
            settings += f", url: '{urls[store]}'"
        extra = f"    idempotency: {{{settings}}}\n"
    return MANIFEST.format(module=BENCH_DIR / "functions.py", handler=handler, extra=extra)


async def trial(
    store: str, round_no: int, url: str, urls: dict[str, str], workdir: Path, args: Any
) -> tuple[float, int]:
    nc = await nats.connect(url, name="bench-stores-driver")
    try:
        await reset_stream(nc.jetstream(), args.messages)
        name = f"b_{store}_{round_no}"
        manifest = workdir / f"{name}.yaml"
        manifest.write_text(manifest_for(store, name, urls))
        argv = [sys.executable, "-m", "fnhost", "run", str(manifest), "--nats", url]
        proc = Process(
            f"host-{store}",
            [*argv, "--loop", args.loop],
            LOG_DIR / f"stores-{store}-round{round_no}.log",
            host_env(),
        )
        await proc.start()
        try:
            for _ in range(5):
                # Both ends of the window are server timestamps, so asking again after a
                # slow consumer-info answer (a busy server) measures the same window.
                with contextlib.suppress(nats.errors.TimeoutError):
                    return await measure_consume(nc.jetstream(), proc, args.messages)
            raise ProcessFailed("consumer info timed out 5 times" + proc.tail())
        finally:
            await proc.stop()
    finally:
        await nc.close()


async def kv_ceiling(url: str) -> float:
    """CAS writes/s into a fresh KV bucket from one nats-py client, 64 in flight, no host.

    What the kv store's two writes per message (lease, record) are up against:
    with ``sync_interval: always`` the server's fsync per write, otherwise the
    client's own Python cost per publish.
    """
    nc = await nats.connect(url, name="bench-stores-ceiling")
    try:
        js = nc.jetstream()
        await js.create_key_value(bucket="ceiling", history=1)
        keys = iter(range(CEILING_WRITES))
        loop = asyncio.get_running_loop()

        async def writer() -> None:
            for key in keys:
                headers = {"Nats-Expected-Last-Subject-Sequence": "0"}
                await js.publish(f"$KV.ceiling.k{key}", b"L1", headers=headers)

        started = loop.time()
        await asyncio.gather(*(writer() for _ in range(CEILING_INFLIGHT)))
        rate = CEILING_WRITES / (loop.time() - started)
        await js.delete_key_value("ceiling")
        return rate
    finally:
        await nc.close()


async def bench(args: Any) -> tuple[dict[str, list[float]], dict[str, str], str, float]:
    rates: dict[str, list[float]] = {}
    skipped: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fnhost-stores-")))
        server = NatsServer(workdir, LOG_DIR / "stores-nats-server.log")
        if args.sync == "default":
            # nats-server's own default: fsync every 2 minutes, not on every write.
            config = workdir / "nats-server.conf"
            config.write_text(config.read_text().replace(", sync_interval: always", ""))
        url = await server.start()
        stack.push_async_callback(server.stop)
        urls: dict[str, str] = {}
        if "redis" in args.stores or "postgres" in args.stores:
            databases = _databases()
        if "redis" in args.stores:
            if shutil.which("redis-server") and importlib.util.find_spec("redis"):
                redis = databases.RedisServer(workdir / "redis").start()
                stack.callback(redis.kill)
                urls["redis"] = redis.url
            else:
                skipped["redis"] = "redis-server or the redis package is not installed"
        if "postgres" in args.stores:
            if databases.postgres_available() and importlib.util.find_spec("psycopg"):
                postgres = databases.PostgresServer().start()
                stack.callback(postgres.close)
                urls["postgres"] = postgres.dsn
            else:
                skipped["postgres"] = "PostgreSQL or psycopg is not installed"
        stores = [store for store in args.stores if store not in skipped]
        ceiling = await kv_ceiling(url)
        print(f"kv ceiling: {ceiling:,.0f} CAS writes/s (one client, no host)")
        for round_no in range(1, args.rounds + 1):
            for store in stores:
                print(f"round {round_no}/{args.rounds}  {store:<10}", end="", flush=True)
                rate, redelivered = await trial(store, round_no, url, urls, workdir, args)
                extra = f"  ({redelivered} redelivered)" if redelivered else ""
                print(f"  {rate:>9,.0f} msgs/s{extra}")
                rates.setdefault(store, []).append(rate)
    return rates, skipped, server.version, ceiling


def summary(rates: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    medians = {store: statistics.median(values) for store, values in rates.items()}
    base = medians.get("none")
    rows: dict[str, dict[str, Any]] = {}
    for store, values in rates.items():
        median = medians[store]
        rows[store] = {
            "rounds": values,
            "median": median,
            "min": min(values),
            "max": max(values),
            "vs_none": median / base if base else None,
            "us_per_message": 1e6 / median,
            "store_us_per_message": (1e6 / median - 1e6 / base) if base else None,
        }
    return rows


def print_report(
    meta: dict[str, Any], rows: dict[str, dict[str, Any]], skipped: dict[str, str]
) -> None:
    print(
        f"\nnats-server {meta['nats_server']}, nats-py {meta['nats_py']}, Python {meta['python']}, "
        f"loop {meta['loop']}, {meta['cpus']} CPUs, nats-server sync {meta['nats_sync']}; "
        f"{meta['messages']:,} messages per trial, "
        f"median of {meta['rounds']} round(s)\n"
    )
    header = f"{'store':<11}{'msgs/s':>10}{'min':>10}{'max':>10}{'vs none':>9}"
    print(header + f"{'µs/msg':>9}{'store µs':>10}")
    for store, row in rows.items():
        ratio = "-" if row["vs_none"] is None else f"{row['vs_none']:.2f}x"
        cost = row["store_us_per_message"]
        cost_text = "-" if cost is None or store == "none" else f"{cost:,.0f}"
        print(
            f"{store:<11}{row['median']:>10,.0f}{row['min']:>10,.0f}{row['max']:>10,.0f}"
            f"{ratio:>9}{row['us_per_message']:>9,.0f}{cost_text:>10}"
        )
    for store, reason in skipped.items():
        print(f"{store:<11}{'n/a':>10}   {reason}")
    ceiling = meta["kv_ceiling_writes_per_s"]
    print(
        f"\nkv ceiling: {ceiling:,.0f} CAS writes/s into a KV bucket (one nats-py client, "
        f"{CEILING_INFLIGHT} in flight, no host) = {ceiling / 2:,.0f} msgs/s at the kv store's "
        "2 writes (lease, record) per message"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--only", default=",".join(STORES), help="comma list of stores")
    parser.add_argument("--loop", choices=LOOPS, default=default_loop())
    parser.add_argument(
        "--sync",
        choices=("always", "default"),
        default="always",
        help="nats-server fsync: on every write (as production, default) or its 2-minute default",
    )
    args = parser.parse_args()
    args.stores = comma_choice(parser, "--only", args.only, STORES)
    check_loop(parser, args.loop)
    if min(args.rounds, args.messages) < 1:
        parser.error("--rounds and --messages must be at least 1")
    return args


async def main(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        rates, skipped, server_version, ceiling = await bench(args)
    except ProcessFailed as failure:
        print(f"\nfailed: {failure}")
        return 1
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nats_server": server_version,
        "nats_py": package_version("nats-py"),
        "redis_py": package_version("redis"),
        "psycopg": package_version("psycopg"),
        "python": platform.python_version(),
        "loop": args.loop if args.loop == "asyncio" else f"uvloop {package_version('uvloop')}",
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "messages": args.messages,
        "nats_sync": args.sync,
        "kv_ceiling_writes_per_s": ceiling,
    }
    rows = summary(rates)
    print_report(meta, rows, skipped)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"stores-sync-{args.sync}.json"
    out.write_text(json.dumps({"meta": meta, "stores": rows, "n/a": skipped}, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO_DIR)}; process logs in {LOG_DIR.relative_to(REPO_DIR)}/")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("\ninterrupted; every process stopped")
