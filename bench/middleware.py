"""The per-message cost of fnhost's default observability middleware, as a throughput ratio.

    python bench/middleware.py [--rounds 3] [--messages 50000] [--requests 30000]
                               [--variants none,observability] [--loop uvloop|asyncio]

The same host, the same bench/fn.yaml and the same workloads as bench/run.py,
with a different middleware set per *variant*:

- ``none``: no middleware at all, the chain is the bare endpoint (decode, call,
  encode); the built-in timeout and retry plugins are off too.
- ``observability``: the default observability set only: logging (at INFO,
  as ``fnhost run`` logs: no per-message line), metrics, tracing with
  ``exporter: none`` (W3C propagation, no spans).
- ``all``: every built-in, as ``fnhost run`` composes it (timeout, retry and
  the observability set); for reference.

Each round runs every variant once, one after the other, so machine noise
hits them alike; the tables show medians over the rounds and the ratio of
each variant to ``none``. Workload B (stream consume, timed by the server from
the consumer's creation to its last ack) and workload A (request/reply, 64 in
flight, from ``loadgen.py``) are those of bench/run.py; so is the nats-server
(private, loopback, ``sync_interval: always``).

A third table times the composed chain alone, in this process, with no NATS:
microseconds per message through each variant's chain around an endpoint
that returns at once. Its differences are the middleware's own cost.

Target (issue 5): the observability set costs at most 25% of throughput,
i.e. ``observability / none >= 0.75`` on both workloads. Writes
bench/results/middleware.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from harness import (
    BENCH_DIR,
    LOG_DIR,
    LOOPS,
    REPO_DIR,
    NatsServer,
    Process,
    check_loop,
    comma_choice,
    default_loop,
    exit_with,
    stop_on_sigterm,
    write_results,
)
from run import (
    host_env,
    measure_consume,
    measure_requests,
    package_version,
    reset_stream,
    wait_replying,
)

VARIANTS = ("none", "observability", "all")
OBSERVABILITY = ("fnhost.plugins.logging", "fnhost.plugins.metrics", "fnhost.plugins.tracing")
CORE = ("fnhost.plugins.timeout", "fnhost.plugins.retry")
OFF: dict[str, tuple[str, ...]] = {
    "none": OBSERVABILITY + CORE,
    "observability": CORE,
    "all": (),
}
TARGET = 0.75
"""The observability variant's throughput must be at least this share of ``none``'s."""
CHAIN_CALLS = 50_000
SCRIPT = str(Path(__file__).resolve())


# --- the host side: one variant, in a child process -----------------------------------


def make_host(variant: str, nats_url: str | None) -> Any:
    """A Host for bench/fn.yaml with the variant's built-in plugins unregistered."""
    from fnhost.host import Host
    from fnhost.manifest import load_manifest

    host = Host(load_manifest(BENCH_DIR / "fn.yaml"), nats_url=nats_url, load_entry_points=False)
    for name in OFF[variant]:
        host.plugins.unregister(name)
    return host


def serve(variant: str, nats_url: str, loop: str) -> int:
    """``fnhost run bench/fn.yaml`` with the variant's middleware set (JSON logs at INFO)."""
    from fnhost.logs import setup_logging
    from harness import run as run_on_loop

    setup_logging("json", "INFO")

    async def main() -> int:
        code: int = await make_host(variant, nats_url).serve()
        return code

    return run_on_loop(main(), loop)


# --- the chain alone, in this process ---------------------------------------------------


def chain_cost(variant: str, calls: int, loop: str) -> float:
    """Microseconds per message through ``variant``'s composed chain, endpoint doing nothing."""
    from fnhost.invocation import compose
    from fnhost.types import ACK, Invocation, Outcome
    from harness import ORDER_BYTES
    from harness import run as run_on_loop

    host = make_host(variant, "nats://unused:4222")
    spec = host.manifest.functions["bench-consume"]

    async def endpoint(inv: Invocation) -> Outcome:
        return ACK

    chain = compose(endpoint, host.plugins.middleware_for(spec, host))
    reply = f"$JS.ACK.BENCH.{spec.name}.1.1.1.0.0"

    def invocation(seq: int) -> Invocation:
        return Invocation(
            None,  # type: ignore[arg-type]  # no publish happens: the endpoint returns at once
            None,  # type: ignore[arg-type]
            kind="stream",
            function=spec.name,
            subject=reply,
            data=ORDER_BYTES,
            headers=None,
            message_id=None,
            stream="BENCH",
            sequence=seq,
        )

    async def timed() -> float:
        for seq in range(1_000):  # warm-up
            await chain(invocation(seq))
        started = time.perf_counter()
        for seq in range(calls):
            await chain(invocation(seq))
        return (time.perf_counter() - started) / calls * 1e6

    seconds: float = run_on_loop(timed(), loop)
    return seconds


# --- the driver ------------------------------------------------------------------------


async def trial(
    variant: str, round_no: int, url: str, nc: Any, args: argparse.Namespace
) -> tuple[float, float, int]:
    """One variant, one round: (replies/s, messages acked/s, redeliveries)."""
    await reset_stream(nc.jetstream(), args.messages)
    argv = [sys.executable, SCRIPT, "serve", "--variant", variant, "--nats", url]
    log = LOG_DIR / f"mw-{variant}-round{round_no}.log"
    proc = Process(f"host-{variant}", [*argv, "--loop", args.loop], log, host_env())
    await proc.start()
    try:
        measured = await measure_consume(nc.jetstream(), [proc], args.messages)
        consumed, redelivered = measured.rate, measured.redelivered
        await wait_replying(nc, proc)
        replies = await measure_requests(url, args, proc, round_no)
    finally:
        await proc.stop()
    return replies, consumed, redelivered


def summary(rounds: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    medians = {variant: statistics.median(values) for variant, values in rounds.items()}
    base = medians.get("none")
    return {
        variant: {
            "rounds": values,
            "median": medians[variant],
            "vs_none": medians[variant] / base if base else None,
        }
        for variant, values in rounds.items()
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    rates: dict[str, dict[str, list[float]]] = {"request_reply": {}, "stream_consume": {}}
    redeliveries: dict[str, list[int]] = {}
    async with contextlib.AsyncExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fnhost-mw-")))
        server = NatsServer(workdir, LOG_DIR / "mw-nats-server.log")
        url = await server.start()
        stack.push_async_callback(server.stop)
        nc = await nats.connect(url, name="bench-middleware")
        stack.push_async_callback(nc.close)
        for round_no in range(1, args.rounds + 1):
            for variant in args.variants:
                print(f"round {round_no}/{args.rounds}  {variant:<14}", end="", flush=True)
                replies, consumed, redelivered = await trial(variant, round_no, url, nc, args)
                print(f"  A {replies:>9,.0f} replies/s   B {consumed:>9,.0f} msgs/s")
                rates["request_reply"].setdefault(variant, []).append(replies)
                rates["stream_consume"].setdefault(variant, []).append(consumed)
                redeliveries.setdefault(variant, []).append(redelivered)
    chain: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for variant in args.variants:
            cost = await asyncio.to_thread(chain_cost, variant, CHAIN_CALLS, args.loop)
            chain.setdefault(variant, []).append(cost)
    return {
        "server": server.version,
        "request_reply": summary(rates["request_reply"]),
        "stream_consume": summary(rates["stream_consume"]),
        "redelivered": redeliveries,
        "chain_us": {
            variant: {"rounds": values, "median": statistics.median(values)}
            for variant, values in chain.items()
        },
    }


def report(meta: dict[str, Any], found: dict[str, Any]) -> bool:
    """Print the tables; return whether the observability set meets the target."""
    print(
        f"\nnats-server {found['server']}, nats-py {meta['nats_py']}, Python {meta['python']}, "
        f"loop {meta['loop']}, {meta['cpus']} CPUs, load average {meta['load_average']}; "
        f"median of {meta['rounds']} round(s)"
    )
    titles = {
        "request_reply": f"A  request/reply: replies/s ({meta['requests']:,} requests)",
        "stream_consume": f"B  stream consume: messages acked/s ({meta['messages']:,} messages)",
    }
    met = True
    for workload, title in titles.items():
        print(f"\n{title}")
        print(f"{'variant':<15}{'median':>10}{'min':>10}{'max':>10}{'vs none':>9}{'cost':>8}")
        for variant, row in found[workload].items():
            ratio = row["vs_none"]
            cost = "-" if ratio is None else f"{(1 - ratio) * 100:.0f}%"
            print(
                f"{variant:<15}{row['median']:>10,.0f}{min(row['rounds']):>10,.0f}"
                f"{max(row['rounds']):>10,.0f}{'-' if ratio is None else f'{ratio:.2f}x':>9}"
                f"{cost:>8}"
            )
            if variant == "observability" and ratio is not None and ratio < TARGET:
                met = False
    chain = found["chain_us"]
    print(f"\nC  the chain alone, no NATS: microseconds per message ({CHAIN_CALLS:,} calls)")
    base = chain.get("none", {}).get("median")
    for variant, row in chain.items():
        extra = f"   +{row['median'] - base:.2f} us over none" if base is not None else ""
        print(f"{variant:<15}{row['median']:>10.2f}{extra}")
    if base is not None and "observability" in chain:
        # Less noisy than the end-to-end ratio on a busy machine: the chain's extra time
        # as a share of one message's end-to-end time without middleware.
        extra = chain["observability"]["median"] - base
        for workload, label in (("stream_consume", "B"), ("request_reply", "A")):
            rate = found[workload].get("none", {}).get("median")
            if rate:
                per_message = 1e6 / rate
                print(
                    f"{label}: +{extra:.2f} us on {per_message:.1f} us a message "
                    f"= {extra / per_message * 100:.1f}% estimated cost of the observability set"
                )
    if "observability" in found["stream_consume"] and "none" in found["stream_consume"]:
        verdict = "met" if met else "NOT met"
        print(f"\ntarget: observability >= {TARGET:.2f}x of none on A and B: {verdict}")
    return met


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("serve", help="(internal) run one variant's host")
    child.add_argument("--variant", choices=VARIANTS, required=True)
    child.add_argument("--nats", required=True)
    child.add_argument("--loop", choices=LOOPS, default=default_loop())
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the tables show medians")
    parser.add_argument("--requests", type=int, default=30_000, help="timed requests (A)")
    parser.add_argument("--messages", type=int, default=50_000, help="messages to consume (B)")
    parser.add_argument("--variants", default="none,observability", help=f"from {VARIANTS}")
    parser.add_argument("--loop", choices=LOOPS, default=default_loop(), dest="driver_loop")
    args = parser.parse_args()
    if args.command == "serve":
        return args
    args.loop = args.driver_loop
    args.variants = comma_choice(parser, "--variants", args.variants, VARIANTS)
    check_loop(parser, args.loop)
    if min(args.rounds, args.requests, args.messages) < 1:
        parser.error("--rounds, --requests and --messages must be at least 1")
    return args


async def main(args: argparse.Namespace) -> int:
    stop_on_sigterm()
    found = await bench(args)
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nats_py": package_version("nats-py"),
        "python": platform.python_version(),
        "loop": args.loop if args.loop == "asyncio" else f"uvloop {package_version('uvloop')}",
        "cpus": os.cpu_count(),
        "load_average": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "rounds": args.rounds,
        "requests": args.requests,
        "messages": args.messages,
        "variants": args.variants,
        "target": TARGET,
    }
    met = report(meta, found)
    write_results("middleware.json", {"meta": meta, **found, "target_met": met})
    return 0


def _entry() -> Callable[[], int]:
    args = parse_args()
    if args.command == "serve":
        return lambda: serve(args.variant, args.nats, args.loop)
    return lambda: asyncio.run(main(args))


if __name__ == "__main__":
    # The host's code from this checkout, as bench/run.py measures it.
    for path in (REPO_DIR / "sdk", REPO_DIR / "host"):
        if str(path) not in sys.path:
            sys.path.insert(1, str(path))
    exit_with(_entry())
