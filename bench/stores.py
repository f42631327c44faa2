"""What each idempotency store costs: messages/s of one stream function, store by store.

    python bench/stores.py [--rounds 3] [--messages 20000] [--loop uvloop|asyncio]
                           [--only none,round-trip,memory,kv,redis,postgres]
                           [--sync always|default] [--hosts 1] [--concurrency N]
                           [--output]

The function is workload B of ``run.py`` (``bench/functions.py:consume``:
decode the JSON, return; the host acks), run by ``python -m fnhost run`` with
manifest defaults (concurrency 64) and ``idempotency: {store: S}``, against
one private nats-server (``sync_interval: always``), a private redis-server
and a private PostgreSQL (fsync on) started by this script. ``none`` is the
same function without ``idempotency:``.

Each round runs every store once, one after the other, so machine noise hits
all alike. A trial: re-create the stream BENCH and pre-publish ``--messages``
events (not timed; no ``Nats-Msg-Id``, so the key is ``BENCH:<seq>:<ns>``), start
the host with a fresh bucket / key prefix / table (so every key is new: the
cost of a first delivery, the common case), and time from the consumer's
creation to its last ack, both server timestamps (``run.measure_consume``).

Prints, per store: the median of the rounds, min, max, the ratio to ``none``,
the per-message cost of the store in wall time, ``1e6/rate - 1e6/rate(none)``
µs, the host process's CPU time per message (from ``/proc``, counted from
the driver's first look at the consumer, per message acked since) with the
store's share of it (the difference to ``none``), and nats-server's CPU time
per message, counted the same way. ``--hosts N`` runs N host processes on the
same manifest, sharing the durable consumer as several fnhost hosts do; their
CPU is added up. ``--concurrency N`` sets the function's ``concurrency``
(and so its ``max_ack_pending`` and pull size, which follow it) in every
trial: how many messages are in flight at once decides how many of them
share each socket write and read. ``--sync default`` runs
nats-server with its default fsync interval instead of ``sync_interval:
always``, which separates the host's own cost per message from the server's
fsync per KV write. ``--output`` gives every trial's function the work of
the example's ``payment`` and ``inventory`` functions beyond decoding: its
return value goes to ``output:`` (handler ``forward``), one JetStream publish
awaited before the ack, so the ratios show what each store costs a function
that publishes its result (``round-trip`` is then ``none``, and is left out).
Writes bench/results/stores-sync-<always|default>[-output].json.

``round-trip`` is not a store but the floor under every store that talks to
a server: no ``idempotency:``, and the handler's return value goes to
``output:`` (a second stream, deleted before each trial so that its duplicate
window does not drop the outputs of the trial before), so the host awaits
exactly one JetStream PubAck per message before the ack, and nothing else. A
store needing one round trip before the handler or before the ack cannot cost
less than this row.

Before the trials it measures the *kv ceiling*: compare-and-set writes per
second into a KV bucket from this process, written as the kv store writes them
(``fnhost_sdk.replies``) with 64 in flight and no host, with the CPU per
write of this process and of nats-server: the bound of a store that makes
one such write per message (the kv store's lease; its records share group
writes). And the *loopback ping-pong*:
200 bytes to an echo process and back, one at a time, no NATS: what waking
another process and being woken costs on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import nats
import nats.errors
import nats.js.errors

from fnhost_sdk.replies import replies_for
from harness import (
    BENCH_DIR,
    LOG_DIR,
    LOOPS,
    REPO_DIR,
    NatsServer,
    Process,
    ProcessFailed,
    check_loop,
    comma_choice,
    default_loop,
    exit_with,
    median_of,
    stop_on_sigterm,
    write_results,
)
from run import (
    Consumed,
    figure,
    host_env,
    measure_consume,
    package_version,
    ratio,
    reset_stream,
)

STORES = ("none", "round-trip", "memory", "kv", "redis", "postgres")
ROUND_TRIP = "round-trip"
OUTPUT_STREAM = "BENCHOUT"
CEILING_WRITES = 8_000
CEILING_INFLIGHT = 64
PING_PONGS = 20_000
ECHO = """\
import socket, sys
peer = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := peer.recv(65536):
    peer.sendall(data)
"""

MANIFEST = """\
version: 1
http: false
streams:
  BENCH: {{subjects: ["bench.events.>"], storage: file}}
  {output_stream}: {{subjects: ["bench.out.>"], storage: file}}
functions:
  bench-consume:
    module: {module}
    handler: {handler}
{concurrency}    trigger: {{stream: BENCH, subjects: ["bench.events.>"], durable: bench-consume}}
{extra}"""


def _databases() -> Any:
    """tests/support/databases.py: the private Redis and PostgreSQL servers of the tests."""
    sys.path.insert(0, str(REPO_DIR / "tests"))
    from support import databases

    return databases


def manifest_for(
    store: str, trial: str, urls: dict[str, str], concurrency: int | None, output: bool
) -> str:
    handler, extra = "consume", ""
    if output or store == ROUND_TRIP:
        handler, extra = "forward", "    output: bench.out.forward\n"
    if store not in ("none", ROUND_TRIP):
        settings = f"store: {store}, bucket: {trial}"
        if store in urls:
            settings += f", url: '{urls[store]}'"
        extra += f"    idempotency: {{{settings}}}\n"
    return MANIFEST.format(
        module=BENCH_DIR / "functions.py",
        handler=handler,
        concurrency="" if concurrency is None else f"    concurrency: {concurrency}\n",
        extra=extra,
        output_stream=OUTPUT_STREAM,
    )


async def trial(
    store: str, round_no: int, server: NatsServer, urls: dict[str, str], workdir: Path, args: Any
) -> Consumed:
    url = server.url
    nc = await nats.connect(url, name="bench-stores-driver")
    try:
        js = nc.jetstream()
        await reset_stream(js, args.messages)
        # The outputs' message ids repeat every trial (they derive from the input's
        # stream and sequence): a stream left from the last trial would drop them
        # all as duplicates in its duplicate window instead of storing them.
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(OUTPUT_STREAM)
        name = f"b_{store}_{round_no}"
        manifest = workdir / f"{name}.yaml"
        manifest.write_text(manifest_for(store, name, urls, args.concurrency, args.output))
        argv = [sys.executable, "-m", "fnhost", "run", str(manifest), "--nats", url]
        hosts = [
            Process(
                f"host-{store}-{number}",
                [*argv, "--loop", args.loop],
                LOG_DIR / f"stores-{store}-round{round_no}-host{number}.log",
                host_env(),
            )
            for number in range(1, args.hosts + 1)
        ]
        try:
            for host in hosts:
                await host.start()
            for _ in range(5):
                # Both ends of the window are server timestamps, so asking again after a
                # slow consumer-info answer (a busy server) measures the same window.
                with contextlib.suppress(nats.errors.TimeoutError):
                    return await measure_consume(js, hosts, args.messages, server.process)
            raise ProcessFailed("consumer info timed out 5 times" + hosts[0].tail())
        finally:
            for host in hosts:
                await host.stop()
    finally:
        await nc.close()


class PingPong(NamedTuple):
    """What :func:`loopback_ping_pong` measured, per round trip."""

    wall_us: float
    cpu_us: float


def loopback_ping_pong() -> PingPong:
    """200 bytes to an echo process and back over loopback TCP, one at a time.

    No NATS at all: what waking another process and being woken by it costs
    on this machine, the floor under every server round trip a host waits for.
    """
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        echo = subprocess.Popen([sys.executable, "-c", ECHO, str(port)])
        try:
            conn, _ = server.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                payload = b"x" * 200
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(PING_PONGS):
                    conn.sendall(payload)
                    received = 0
                    while received < len(payload):
                        received += len(conn.recv(65536))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        finally:
            echo.wait(timeout=10)
    return PingPong(wall * 1e6 / PING_PONGS, cpu * 1e6 / PING_PONGS)


class Ceiling(NamedTuple):
    """What :func:`kv_ceiling` measured."""

    writes_per_s: float
    cpu_us_per_write: float
    """The writing process's CPU time per write."""
    server_cpu_us_per_write: float | None
    """nats-server's CPU time per write (None without /proc)."""


async def kv_ceiling(server: NatsServer) -> Ceiling:
    """CAS writes into a fresh KV bucket from this process, 64 in flight, no host.

    Written the way the kv store writes (:class:`fnhost_sdk.replies.Replies`),
    so it shows what the store's write per message (the lease; the records of
    many messages share a group write) is up against: with ``sync_interval:
    always`` the server's fsync per write, otherwise the CPU of the client (this
    process does nothing else meanwhile) and of the server per write.
    """
    nc = await nats.connect(server.url, name="bench-stores-ceiling")
    try:
        js = nc.jetstream()
        await js.create_key_value(bucket="ceiling", history=1)
        replies = replies_for(nc)
        keys = iter(range(CEILING_WRITES))
        loop = asyncio.get_running_loop()

        async def writer() -> None:
            for key in keys:
                headers = {"Nats-Expected-Last-Subject-Sequence": "0"}
                answer = await replies.request(f"$KV.ceiling.k{key}", b"L1", headers, 5.0)
                if b'"error"' in answer.data:
                    raise ProcessFailed(f"kv ceiling write refused: {answer.data!r}")

        started, cpu_started = loop.time(), time.process_time()
        server_started = server.process.cpu_seconds()
        await asyncio.gather(*(writer() for _ in range(CEILING_INFLIGHT)))
        elapsed, cpu = loop.time() - started, time.process_time() - cpu_started
        server_ended = server.process.cpu_seconds()
        await js.delete_key_value("ceiling")
        server_cpu = None
        if server_started is not None and server_ended is not None:
            server_cpu = (server_ended - server_started) * 1e6 / CEILING_WRITES
        return Ceiling(CEILING_WRITES / elapsed, cpu * 1e6 / CEILING_WRITES, server_cpu)
    finally:
        await nc.close()


async def bench(args: Any) -> tuple[dict[str, list[Consumed]], dict[str, str], str, Ceiling]:
    trials: dict[str, list[Consumed]] = {}
    skipped: dict[str, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fnhost-stores-")))
        server = NatsServer(
            workdir, LOG_DIR / "stores-nats-server.log", sync_always=args.sync == "always"
        )
        await server.start()
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
        ceiling = await kv_ceiling(server)
        print(
            f"kv ceiling: {ceiling.writes_per_s:,.0f} CAS writes/s, "
            f"{ceiling.cpu_us_per_write:.1f} µs client CPU and "
            f"{figure(ceiling.server_cpu_us_per_write, '.1f')} µs nats-server CPU per write "
            "(one client, no host)"
        )
        for round_no in range(1, args.rounds + 1):
            for store in stores:
                print(f"round {round_no}/{args.rounds}  {store:<10}", end="", flush=True)
                consumed = await trial(store, round_no, server, urls, workdir, args)
                extra = f"  ({consumed.redelivered} redelivered)" if consumed.redelivered else ""
                cpu, server_cpu = consumed.cpu_us_per_message, consumed.server_cpu_us_per_message
                cpu_text = "" if cpu is None else f", host CPU {cpu:.1f} µs/msg"
                if server_cpu is not None:
                    cpu_text += f", nats-server CPU {server_cpu:.1f} µs/msg"
                print(f"  {consumed.rate:>9,.0f} msgs/s{cpu_text}{extra}")
                trials.setdefault(store, []).append(consumed)
    return trials, skipped, server.version, ceiling


def summary(trials: dict[str, list[Consumed]]) -> dict[str, dict[str, Any]]:
    medians = {
        store: statistics.median(consumed.rate for consumed in values)
        for store, values in trials.items()
    }
    cpu_medians = {
        store: median_of([consumed.cpu_us_per_message for consumed in values])
        for store, values in trials.items()
    }
    base, cpu_base = medians.get("none"), cpu_medians.get("none")
    rows: dict[str, dict[str, Any]] = {}
    for store, values in trials.items():
        median, cpu = medians[store], cpu_medians[store]
        rates = [consumed.rate for consumed in values]
        rows[store] = {
            "rounds": rates,
            "cpu_rounds": [consumed.cpu_us_per_message for consumed in values],
            "median": median,
            "min": min(rates),
            "max": max(rates),
            "vs_none": median / base if base else None,
            "us_per_message": 1e6 / median,
            "store_us_per_message": (1e6 / median - 1e6 / base) if base else None,
            "cpu_us_per_message": cpu,
            "store_cpu_us_per_message": (
                cpu - cpu_base if cpu is not None and cpu_base is not None else None
            ),
            "server_cpu_rounds": [consumed.server_cpu_us_per_message for consumed in values],
            "server_cpu_us_per_message": median_of(
                [consumed.server_cpu_us_per_message for consumed in values]
            ),
        }
    return rows


def print_report(
    meta: dict[str, Any], rows: dict[str, dict[str, Any]], skipped: dict[str, str]
) -> None:
    print(
        f"\nnats-server {meta['nats_server']}, nats-py {meta['nats_py']}, Python {meta['python']}, "
        f"loop {meta['loop']}, {meta['cpus']} CPUs, nats-server sync {meta['nats_sync']}; "
        f"{meta['messages']:,} messages per trial, {meta['hosts']} host process(es), "
        f"concurrency {meta['concurrency'] or 'default (64)'}, "
        f"handler {'forward (one output publish)' if meta['output'] else 'consume'}, "
        f"median of {meta['rounds']} round(s)\n"
    )
    header = f"{'store':<11}{'msgs/s':>10}{'min':>10}{'max':>10}{'vs none':>9}"
    print(header + f"{'µs/msg':>9}{'store µs':>10}{'CPU µs':>9}{'store CPU':>11}{'NATS CPU':>10}")
    for store, row in rows.items():
        extra = "-" if store == "none" else figure(row["store_us_per_message"], ",.0f")
        cpu = figure(row["cpu_us_per_message"], ".1f")
        cpu_extra = "-" if store == "none" else figure(row["store_cpu_us_per_message"], ".1f")
        print(
            f"{store:<11}{row['median']:>10,.0f}{row['min']:>10,.0f}{row['max']:>10,.0f}"
            f"{ratio(row['vs_none']):>9}{row['us_per_message']:>9,.0f}{extra:>10}{cpu:>9}"
            f"{cpu_extra:>11}{figure(row['server_cpu_us_per_message'], '.1f'):>10}"
        )
    for store, reason in skipped.items():
        print(f"{store:<11}{'n/a':>10}   {reason}")
    ceiling = meta["kv_ceiling_writes_per_s"]
    write_cpu = meta["kv_ceiling_cpu_us_per_write"]
    server_write_cpu = figure(meta["kv_ceiling_server_cpu_us_per_write"], ".1f")
    print(
        f"\nkv ceiling: {ceiling:,.0f} CAS writes/s into a KV bucket (one client writing as the "
        f"kv store does, {CEILING_INFLIGHT} in flight, no host): at most {ceiling:,.0f} "
        f"msgs/s at the kv store's one lease write per message (records share group "
        f"writes); {write_cpu:.1f} µs of the client's CPU and {server_write_cpu} µs of "
        f"nats-server's per write"
    )
    print(
        f"loopback ping-pong (no NATS): {meta['ping_pong_us']:.1f} µs per round trip between two "
        f"processes, {meta['ping_pong_cpu_us']:.1f} µs of the waiting side's CPU"
    )
    none_cpu = rows.get("none", {}).get("cpu_us_per_message")
    if none_cpu is not None:
        floor = none_cpu + write_cpu
        print(
            f"a host adding only the lease write's client CPU would spend {floor:.1f} µs per "
            f"message (none {none_cpu:.1f} + {write_cpu:.1f})"
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
    parser.add_argument(
        "--hosts",
        type=int,
        default=1,
        help="host processes sharing the function's durable consumer (default 1)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        help="the function's concurrency (default: the manifest default, 64)",
    )
    parser.add_argument(
        "--output",
        action="store_true",
        help="every function also publishes its return value to a stream (handler forward)",
    )
    args = parser.parse_args()
    args.stores = comma_choice(parser, "--only", args.only, STORES)
    if args.output and ROUND_TRIP in args.stores:
        if args.only != ",".join(STORES):
            parser.error("--output makes round-trip the same as none: leave it out of --only")
        args.stores.remove(ROUND_TRIP)
    check_loop(parser, args.loop)
    too_small = args.concurrency is not None and args.concurrency < 1
    if too_small or min(args.rounds, args.messages, args.hosts) < 1:
        parser.error("--rounds, --messages, --hosts and --concurrency must be at least 1")
    return args


async def main(args: argparse.Namespace) -> int:
    stop_on_sigterm()
    ping_pong = loopback_ping_pong()
    print(
        f"loopback ping-pong: {ping_pong.wall_us:.1f} µs per round trip, "
        f"{ping_pong.cpu_us:.1f} µs CPU on this side"
    )
    try:
        trials, skipped, server_version, ceiling = await bench(args)
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
        "kv_ceiling_writes_per_s": ceiling.writes_per_s,
        "kv_ceiling_cpu_us_per_write": ceiling.cpu_us_per_write,
        "kv_ceiling_server_cpu_us_per_write": ceiling.server_cpu_us_per_write,
        "hosts": args.hosts,
        "concurrency": args.concurrency,
        "output": args.output,
        "ping_pong_us": ping_pong.wall_us,
        "ping_pong_cpu_us": ping_pong.cpu_us,
    }
    rows = summary(trials)
    print_report(meta, rows, skipped)
    name = f"stores-sync-{args.sync}{'-output' if args.output else ''}.json"
    write_results(name, {"meta": meta, "stores": rows, "n/a": skipped})
    return 0


if __name__ == "__main__":
    exit_with(lambda: asyncio.run(main(parse_args())))
