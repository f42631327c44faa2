"""Benchmark fnhost against hand-written nats-py and FastStream, in one run, on one machine.

    python bench/run.py [--rounds 3] [--requests 30000] [--messages 50000]
                        [--only raw,faststream,host,host-workers] [--loop uvloop|asyncio]

Each round runs every implementation once, one after the other, so that
machine noise hits all of them alike. One trial of an implementation:

1. recreate the stream BENCH and pre-publish ``--messages`` events (not timed);
2. start the implementation's process; workload B (stream consume) is timed by
   the server itself, from the creation of the durable consumer to its last ack;
3. once it answers requests, workload A (request/reply): ``loadgen.py`` keeps
   64 requests in flight for ``--requests`` requests after a warm-up;
4. stop the process (SIGTERM, then SIGKILL).

Prints a table per workload (medians of the rounds) and writes
bench/results/latest.json. bench/README.md explains every number.
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
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NamedTuple

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType
from nats.js.errors import NotFoundError, TooManyStalledMsgsError

from harness import (
    BENCH_DIR,
    DURABLE,
    EVENT_SUBJECT,
    LOG_DIR,
    LOOPS,
    ORDER,
    ORDER_BYTES,
    REPO_DIR,
    REQUEST_SUBJECT,
    STREAM,
    STREAM_SUBJECTS,
    NatsServer,
    Process,
    ProcessFailed,
    check_loop,
    comma_choice,
    default_loop,
    exit_with,
    stop_on_sigterm,
    write_results,
)

IMPLEMENTATIONS = ("raw", "faststream", "host", "host-workers")
WORKERS = os.cpu_count() or 2
"""``host-workers`` runs ``fnhost run --workers`` with one host process per CPU."""
WORKLOADS = {
    "request_reply": "A  request/reply: replies/s",
    "stream_consume": "B  stream consume: messages acked/s",
}
INFLIGHT = 64
STARTUP_TIMEOUT = 30.0
# Workload B fails when the ack floor has not moved for this long.
STALL_TIMEOUT = 30.0
# Only how soon the driver notices the end; the timing itself comes from the server.
POLL_INTERVAL = 0.1


def child_env(**extra: str) -> dict[str, str]:
    """The driver's environment plus ``extra``, for a child process."""
    return {**os.environ, **extra}


def host_env() -> dict[str, str]:
    """Put this checkout's ``host/`` and ``sdk/`` first on the path, so the
    benchmark measures the code beside it even when another fnhost is installed."""
    paths = [str(REPO_DIR / "host"), str(REPO_DIR / "sdk")]
    if current := os.environ.get("PYTHONPATH"):
        paths.append(current)
    return child_env(PYTHONPATH=os.pathsep.join(paths))


def command(impl: str, url: str, loop: str) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that start ``impl`` against the server at ``url``."""
    if impl == "raw":
        argv = [sys.executable, str(BENCH_DIR / "raw_nats.py"), "--nats", url, "--loop", loop]
        return argv, child_env()
    if impl == "faststream":
        app = ["faststream_app:app", "--app-dir", str(BENCH_DIR)]
        argv = [sys.executable, "-m", "faststream", "run", *app, "--loop", f"{loop}:new_event_loop"]
        return argv, child_env(NATS_URL=url)
    argv = [sys.executable, "-m", "fnhost", "run", str(BENCH_DIR / "fn.yaml"), "--nats", url]
    if impl == "host-workers":
        argv += ["--workers", str(WORKERS)]
    return [*argv, "--loop", loop], host_env()


def unavailable(impl: str) -> str | None:
    """Why ``impl`` cannot run here, or None when it can."""
    if impl == "faststream" and importlib.util.find_spec("faststream") is None:
        return "faststream is not installed (pip install -e '.[bench]')"
    if impl.startswith("host"):
        # Asked of a child with the host's environment: that is where it must import.
        probe = "import importlib.util as u, sys; sys.exit(u.find_spec('fnhost.__main__') is None)"
        found = subprocess.run(
            [sys.executable, "-c", probe], env=host_env(), capture_output=True, text=True
        )
        if found.returncode != 0:
            last_line = found.stderr.strip().splitlines()[-1:] or ["fnhost has no __main__"]
            return f"python -m fnhost is not importable: {last_line[0]}"
    return None


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


@dataclass
class Results:
    """Per-round rates, and why an implementation has none."""

    impls: list[str]
    rates: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {workload: {} for workload in WORKLOADS}
    )
    redelivered: dict[str, list[int]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    """Workload B: the implementation process's CPU µs per message, per round (Linux)."""
    server_cpu: dict[str, list[float]] = field(default_factory=dict)
    """Workload B: nats-server's CPU µs per message, per round (Linux)."""
    unavailable: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def runnable(self) -> list[str]:
        return [i for i in self.impls if i not in self.unavailable and i not in self.failed]

    def summary(self, workload: str) -> dict[str, dict[str, Any]]:
        """One row per implementation: status, rounds, median/min/max and the ratios."""
        medians = {i: statistics.median(self.rates[workload][i]) for i in self.runnable()}
        rows: dict[str, dict[str, Any]] = {}
        for impl in self.impls:
            if impl in self.unavailable:
                rows[impl] = {"status": "n/a", "reason": self.unavailable[impl]}
            elif impl in self.failed:
                rows[impl] = {"status": "failed", "reason": self.failed[impl]}
            else:
                rounds = self.rates[workload][impl]
                median = medians[impl]
                rows[impl] = {
                    "status": "ok",
                    "rounds": rounds,
                    "median": median,
                    "min": min(rounds),
                    "max": max(rounds),
                    "vs_raw": median / medians["raw"] if "raw" in medians else None,
                    "vs_faststream": (
                        median / medians["faststream"] if "faststream" in medians else None
                    ),
                }
                if workload == "stream_consume":
                    rows[impl]["redelivered"] = self.redelivered[impl]
                    cpu = self.cpu.get(impl, [])
                    rows[impl]["cpu_rounds"] = cpu
                    rows[impl]["cpu_us_per_message"] = statistics.median(cpu) if cpu else None
                    server_cpu = self.server_cpu.get(impl, [])
                    rows[impl]["server_cpu_rounds"] = server_cpu
                    rows[impl]["server_cpu_us_per_message"] = (
                        statistics.median(server_cpu) if server_cpu else None
                    )
        return rows


async def reset_stream(js: JetStreamContext, messages: int) -> None:
    """A fresh stream (which also drops the durable consumer) holding ``messages`` events."""
    with contextlib.suppress(NotFoundError):
        await js.delete_stream(STREAM)
    await js.add_stream(name=STREAM, subjects=[STREAM_SUBJECTS], storage=StorageType.FILE)
    # Pipelined: with sync_interval always, awaiting each publish would take minutes.
    try:
        for seq in range(messages):
            event = json.dumps({"seq": seq, "order": ORDER}).encode()
            await js.publish_async(EVENT_SUBJECT, event)
    except TooManyStalledMsgsError:
        # nats-py reports a cancellation (Ctrl-C) that arrives while it waits
        # for a free publish slot as this error: let the cancellation be one.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError from None
        raise
    await js.publish_async_completed()
    # publish_async_completed() does not raise a failed publish; the count tells.
    stored = (await js.stream_info(STREAM)).state.messages
    if stored != messages:
        raise RuntimeError(f"stream {STREAM} holds {stored} messages, published {messages}")


class Consumed(NamedTuple):
    """What :func:`measure_consume` saw."""

    rate: float
    """Messages acked per second."""
    redelivered: int
    cpu_us_per_message: float | None
    """CPU time of the host processes together per message acked while measured
    (None without /proc)."""
    server_cpu_us_per_message: float | None = None
    """The same for nats-server, when it was given."""


def cpu_seconds(processes: Sequence[Process]) -> float | None:
    """The CPU time ``processes`` have used together (None for none, or if one cannot be read)."""
    if not processes:
        return None
    total = 0.0
    for process in processes:
        used = process.cpu_seconds()
        if used is None:
            return None
        total += used
    return total


async def measure_consume(
    js: JetStreamContext,
    hosts: Sequence[Process],
    messages: int,
    server: Process | None = None,
) -> Consumed:
    """Messages acked per second, redeliveries and CPU per message of the durable consumer
    that ``hosts`` (one process, or several sharing it) create.

    Both ends of the window are server timestamps: the consumer's creation and
    its last ack. So the driver's polling adds no error, and the window is the
    same for all: from the moment an implementation has its consumer to the
    moment its last message is acked.

    CPU (of ``hosts`` together, and of ``server`` on its own) is counted from
    the first look at the consumer, per message acked since then, so start-up
    is left out.
    """
    servers = [server] if server is not None else []
    first = hosts[0]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT
    floor, progressed = -1, loop.time()
    cpu_from: tuple[float | None, float | None, int] | None = None
    while True:
        for host in hosts:
            host.check_alive()
        try:
            info = await js.consumer_info(STREAM, DURABLE)
        except NotFoundError:
            if loop.time() > deadline:
                raise ProcessFailed(
                    f"{first.name} created no consumer {DURABLE} within {STARTUP_TIMEOUT}s"
                    + first.tail()
                ) from None
            await asyncio.sleep(POLL_INTERVAL)
            continue
        # Anything but every message, each acked on its own, would time less work.
        if (info.config.ack_policy, info.config.deliver_policy) != ("explicit", "all"):
            raise ProcessFailed(
                f"{first.name} created {DURABLE} with ack_policy {info.config.ack_policy} and "
                f"deliver_policy {info.config.deliver_policy}; the workload needs explicit, all"
            )
        assert info.ack_floor is not None
        if cpu_from is None:
            cpu_from = (cpu_seconds(hosts), cpu_seconds(servers), info.ack_floor.stream_seq)
        # A fresh stream numbers its messages 1..messages: a floor at the last
        # one means every message is acked.
        if info.ack_floor.stream_seq >= messages:
            assert info.ack_floor.last_active is not None
            seconds = (info.ack_floor.last_active - info.created).total_seconds()
            hosts_from, servers_from, counted_from = cpu_from
            counted = messages - counted_from
            return Consumed(
                messages / seconds,
                info.num_redelivered or 0,
                per_message(hosts_from, cpu_seconds(hosts), counted),
                per_message(servers_from, cpu_seconds(servers), counted),
            )
        if info.ack_floor.stream_seq != floor:
            floor, progressed = info.ack_floor.stream_seq, loop.time()
        elif loop.time() - progressed > STALL_TIMEOUT:
            raise ProcessFailed(
                f"{first.name} stalled at ack floor {floor}/{messages} for {STALL_TIMEOUT}s"
                + first.tail()
            )
        await asyncio.sleep(POLL_INTERVAL)


def per_message(start: float | None, end: float | None, messages: int) -> float | None:
    if start is None or end is None or messages <= 0:
        return None
    return (end - start) * 1e6 / messages


async def wait_replying(
    nc: Client, proc: Process, subject: str = REQUEST_SUBJECT, payload: bytes = ORDER_BYTES
) -> None:
    """Return once a request to ``subject`` gets a reply."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT
    while True:
        proc.check_alive()
        try:
            await nc.request(subject, payload, timeout=0.5)
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if loop.time() > deadline:
                raise ProcessFailed(
                    f"{proc.name} did not reply within {STARTUP_TIMEOUT}s" + proc.tail()
                ) from None
            await asyncio.sleep(0.05)


async def measure_requests(
    url: str, args: argparse.Namespace, proc: Process, round_no: int
) -> float:
    """Replies per second that ``loadgen.py`` gets from ``proc``."""
    argv = [sys.executable, str(BENCH_DIR / "loadgen.py"), "--nats", url, "--loop", args.loop]
    # A warm-up fills caches, lazy imports and socket buffers before the clock starts.
    argv += ["--requests", str(args.requests), "--warmup", str(min(2_000, args.requests // 10))]
    log = LOG_DIR / f"loadgen-{proc.name}-round{round_no}.log"
    loadgen = Process("loadgen", [*argv, "--inflight", str(INFLIGHT)], log)
    await loadgen.start()
    try:
        code = await loadgen.wait()
    finally:
        await loadgen.stop()
    if code != 0:
        proc.check_alive()  # a dead responder is the better explanation
        raise ProcessFailed(f"loadgen against {proc.name} exited with {code}" + loadgen.tail())
    result = json.loads(loadgen.last_lines(1)[0])
    return float(result["requests"] / result["seconds"])


async def trial(
    impl: str, round_no: int, server: NatsServer, nc: Client, args: argparse.Namespace
) -> tuple[float, Consumed]:
    """One implementation, one round: replies/s, and what workload B measured."""
    url = server.url
    await reset_stream(nc.jetstream(), args.messages)
    argv, env = command(impl, url, args.loop)
    proc = Process(impl, argv, LOG_DIR / f"{impl}-round{round_no}.log", env)
    await proc.start()
    try:
        consumed = await measure_consume(nc.jetstream(), [proc], args.messages, server.process)
        await wait_replying(nc, proc)
        replies = await measure_requests(url, args, proc, round_no)
    finally:
        await proc.stop()
    return replies, consumed


async def bench(args: argparse.Namespace, results: Results) -> str:
    """Run every round; return the nats-server version."""
    for impl in results.impls:
        if reason := unavailable(impl):
            results.unavailable[impl] = reason
    async with contextlib.AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fnhost-bench-")))
        server = NatsServer(workdir, LOG_DIR / "nats-server.log")
        url = await server.start()
        stack.push_async_callback(server.stop)
        nc = await nats.connect(url, name="bench-driver")
        stack.push_async_callback(nc.close)
        for round_no in range(1, args.rounds + 1):
            for impl in results.runnable():
                print(f"round {round_no}/{args.rounds}  {impl:<13}", end="", flush=True)
                try:
                    replies, consumed = await trial(impl, round_no, server, nc, args)
                except ProcessFailed as failure:
                    print("  failed")
                    results.failed[impl] = str(failure)
                    continue
                print(f"  A {replies:>9,.0f} replies/s   B {consumed.rate:>9,.0f} msgs/s")
                results.rates["request_reply"].setdefault(impl, []).append(replies)
                results.rates["stream_consume"].setdefault(impl, []).append(consumed.rate)
                results.redelivered.setdefault(impl, []).append(consumed.redelivered)
                if consumed.cpu_us_per_message is not None:
                    results.cpu.setdefault(impl, []).append(consumed.cpu_us_per_message)
                if consumed.server_cpu_us_per_message is not None:
                    results.server_cpu.setdefault(impl, []).append(
                        consumed.server_cpu_us_per_message
                    )
    return server.version


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def figure(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or ``-`` when there is none."""
    return "-" if value is None else format(value, spec)


def print_report(meta: dict[str, Any], summaries: dict[str, dict[str, dict[str, Any]]]) -> None:
    print()
    print(
        f"nats-server {meta['nats_server']}, nats-py {meta['nats_py']}, "
        f"faststream {meta['faststream']}, Python {meta['python']}, loop {meta['loop']}, "
        f"{meta['cpus']} CPUs; median of {meta['rounds']} round(s)"
    )
    sizes = {
        "request_reply": f"{meta['requests']:,} requests, {INFLIGHT} in flight",
        "stream_consume": f"{meta['messages']:,} messages, pull + explicit ack",
    }
    header = f"{'implementation':<15}{'median':>10}{'min':>10}{'max':>10}{'vs raw':>9}"
    for workload, title in WORKLOADS.items():
        print(f"\n{title} ({sizes[workload]})")
        cpu_column = workload == "stream_consume"
        cpu_header = f"{'CPU µs/msg':>12}{'NATS CPU':>10}" if cpu_column else ""
        print(header + f"{'vs faststream':>15}" + cpu_header)
        for impl, row in summaries[workload].items():
            if row["status"] == "n/a":
                print(f"{impl:<15}{'n/a':>10}   {row['reason']}")
            elif row["status"] == "failed":
                print(f"{impl:<15}{'failed':>10}   (reason below)")
            else:
                cpu = figure(row.get("cpu_us_per_message"), ".1f")
                server_cpu = figure(row.get("server_cpu_us_per_message"), ".1f")
                cpu_text = f"{cpu:>12}{server_cpu:>10}" if cpu_column else ""
                print(
                    f"{impl:<15}{row['median']:>10,.0f}{row['min']:>10,.0f}{row['max']:>10,.0f}"
                    f"{ratio(row['vs_raw']):>9}{ratio(row['vs_faststream']):>15}{cpu_text}"
                )
                if sum(row.get("redelivered", ())):
                    print(f"{'':<15}redelivered per round: {row['redelivered']}")
    for impl, row in summaries["request_reply"].items():
        if row["status"] == "failed":
            print(f"\n{impl} failed: {row['reason']}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the table shows medians")
    parser.add_argument("--requests", type=int, default=30_000, help="timed requests (A)")
    parser.add_argument("--messages", type=int, default=50_000, help="messages to consume (B)")
    parser.add_argument(
        "--only",
        default=",".join(IMPLEMENTATIONS),
        help=f"comma list of implementations (default: {','.join(IMPLEMENTATIONS)})",
    )
    parser.add_argument(
        "--loop",
        choices=LOOPS,
        default=default_loop(),
        help="event loop of every process (default: uvloop when importable)",
    )
    args = parser.parse_args()
    args.impls = comma_choice(parser, "--only", args.only, IMPLEMENTATIONS)
    check_loop(parser, args.loop)
    if min(args.rounds, args.requests, args.messages) < 1:
        parser.error("--rounds, --requests and --messages must be at least 1")
    return args


async def main(args: argparse.Namespace) -> int:
    stop_on_sigterm()

    results = Results(args.impls)
    server_version = await bench(args, results)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nats_server": server_version,
        "nats_py": package_version("nats-py"),
        "faststream": package_version("faststream"),
        "python": platform.python_version(),
        "loop": args.loop if args.loop == "asyncio" else f"uvloop {package_version('uvloop')}",
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "requests": args.requests,
        "messages": args.messages,
        "inflight": INFLIGHT,
    }
    summaries = {workload: results.summary(workload) for workload in WORKLOADS}
    print_report(meta, summaries)
    write_results("latest.json", {"meta": meta, "workloads": summaries})
    return 1 if results.failed else 0


if __name__ == "__main__":
    exit_with(lambda: asyncio.run(main(parse_args())))
