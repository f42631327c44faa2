"""The example order system under a burst: orders/s at each stage, and every order charged once.

    python bench/orders.py [--orders 20000] [--rounds 3] [--in-flight 256] [--workers N]
                           [--sync always|default] [--loop uvloop|asyncio]

A round runs the repository's example exactly as ``fnhost dev`` does (``fn.yaml``
and ``functions/``, copied to a temp dir) with ``python -m fnhost run`` against
a private nats-server (``sync_interval: always``, as fnhost ships it; ``--sync
default`` for nats-server's own default), minus the status page;
``gateway: simulated`` throttles nothing (``FNHOST_THROTTLE_RATE`` 0, the
manifest's default). ``--workers N`` runs ``fnhost run --workers N``: N host
processes sharing the request queue group and the durable consumers. After a
warm-up order, the driver sends a burst of ``--orders`` ``create-order``
requests, ``--in-flight`` at a time on one connection: each a different
customer with one to three lines drawn from 1,000 SKUs. Then it waits until
``payment`` and ``inventory`` have acked every order.

Per round:

- **intake**: orders/s answered by ``create-order``. An answer means the order
  is stored in the ORDERS stream (the function awaits its PubAck), so this is
  the rate of a burst the system takes in;
- **charged**: orders/s from the first request to ``payment``'s last ack (the
  burst charged into the ledger and its ``payments.completed.v1`` stored);
- **reserved**: the same to ``inventory``'s last ack;
- host (its workers included) and nats-server CPU time per order, from the
  first request to the last ack.

Checks, any failure ends the run with exit code 1: the ledger holds exactly the
answered order ids, one charge each, with the amounts sent; the DLQ stream is
empty; ``num_redelivered`` of both consumers is printed (a redelivered
payment is charged once anyway: the ledger's key is the order id).

Both ends of the charged and reserved windows come from this machine's clock:
the first request's wall time and the consumers' last-ack time stamped by
nats-server on the same machine. Writes
bench/results/orders-sync-<sync>[-workersN].json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from harness import (
    LOG_DIR,
    LOOPS,
    REPO_DIR,
    NatsServer,
    Process,
    ProcessFailed,
    check_loop,
    default_loop,
    exit_with,
    median_of,
    stop_on_sigterm,
    write_results,
)
from run import (
    POLL_INTERVAL,
    STALL_TIMEOUT,
    cpu_seconds,
    figure,
    host_env,
    package_version,
    per_message,
    wait_replying,
)

SKUS = [f"SKU{number:04d}" for number in range(1_000)]
REQUEST_SUBJECT = "orders.create"
CONSUMERS = (("ORDERS", "payment"), ("PAYMENTS", "inventory"))
REQUEST_TIMEOUT = 30.0
WARM_UP_CUSTOMER = "warm-up"
HTTP_LINE = "http: {host: 127.0.0.1, port: 8080}"


class Round(NamedTuple):
    intake: float
    charged: float
    reserved: float
    host_cpu_us: float | None
    server_cpu_us: float | None
    redelivered: dict[str, int]


def order(number: int, rng: random.Random) -> dict[str, Any]:
    lines = [
        {"sku": sku, "qty": rng.randint(1, 3), "price": round(rng.uniform(1, 50), 2)}
        for sku in rng.sample(SKUS, rng.randint(1, 3))
    ]
    total = round(sum(line["qty"] * line["price"] for line in lines), 2)
    return {"customer_id": f"c{number}", "items": lines, "total": total}


def project_copy(workdir: Path) -> Path:
    """fn.yaml and functions/ of this checkout, the status page's port left to the system."""
    project = workdir / "example"
    project.mkdir(parents=True)
    manifest = (REPO_DIR / "fn.yaml").read_text()
    if HTTP_LINE not in manifest:
        raise ProcessFailed(f"fn.yaml no longer has the line {HTTP_LINE!r}: update bench/orders.py")
    (project / "fn.yaml").write_text(
        manifest.replace(HTTP_LINE, "http: {host: 127.0.0.1, port: 0}")
    )
    shutil.copytree(
        REPO_DIR / "functions", project / "functions", ignore=shutil.ignore_patterns("__pycache__")
    )
    return project


async def burst(
    nc: Client, orders: list[dict[str, Any]], in_flight: int
) -> tuple[dict[str, float], float]:
    """Send every order, ``in_flight`` at a time: the answered order ids with the totals
    sent, and the seconds taken."""
    answered: dict[str, float] = {}
    queue = iter(orders)

    async def sender() -> None:
        for sent in queue:
            body = json.dumps(sent).encode()
            reply = await nc.request(REQUEST_SUBJECT, body, timeout=REQUEST_TIMEOUT)
            if reply.headers and reply.headers.get("Nats-Service-Error"):
                raise ProcessFailed(f"create-order failed: {reply.headers} {reply.data!r}")
            answer = json.loads(reply.data)
            if answer.get("status") != "accepted" or answer.get("order_id") in answered:
                raise ProcessFailed(f"create-order answered {answer}")
            answered[answer["order_id"]] = sent["total"]

    started = time.perf_counter()
    await asyncio.gather(*(sender() for _ in range(in_flight)))
    return answered, time.perf_counter() - started


async def all_acked(js: JetStreamContext, stream: str, durable: str, host: Process) -> Any:
    """The consumer's info once it has acked everything its stream holds."""
    loop = asyncio.get_running_loop()
    floor, progressed = -1, loop.time()
    while True:
        host.check_alive()
        info = await js.consumer_info(stream, durable)
        stored = (await js.stream_info(stream)).state.last_seq
        assert info.ack_floor is not None
        if info.ack_floor.stream_seq >= stored and not info.num_pending:
            return info
        if info.ack_floor.stream_seq != floor:
            floor, progressed = info.ack_floor.stream_seq, loop.time()
        elif loop.time() - progressed > STALL_TIMEOUT:
            raise ProcessFailed(
                f"{durable} stalled at ack floor {floor}/{stored} for {STALL_TIMEOUT}s"
                + host.tail()
            )
        await asyncio.sleep(POLL_INTERVAL)


def check_ledger(ledger: Path, answered: dict[str, float]) -> None:
    """Every answered order charged once, with its total; nothing else but warm-ups."""
    with sqlite3.connect(ledger) as db:
        charges = db.execute(
            "SELECT order_id, amount FROM charges WHERE customer_id != ?", (WARM_UP_CUSTOMER,)
        ).fetchall()
    charged = dict(charges)
    if len(charged) != len(charges):
        raise ProcessFailed("an order id has two rows in the ledger")
    missing = [order_id for order_id in answered if order_id not in charged]
    if missing:
        raise ProcessFailed(f"{len(missing)} answered orders not charged, e.g. {missing[:3]}")
    if len(charged) != len(answered):
        raise ProcessFailed(f"{len(charged) - len(answered)} charges of orders nobody sent")
    wrong = [order_id for order_id, total in answered.items() if charged[order_id] != total]
    if wrong:
        raise ProcessFailed(f"{len(wrong)} orders charged a wrong amount, e.g. {wrong[:3]}")


async def one_round(round_no: int, server: NatsServer, workdir: Path, args: Any) -> Round:
    project = project_copy(workdir / f"round{round_no}")
    ledger = project / ".fnhost" / "ledger.db"
    env = {**host_env(), "FNHOST_LEDGER": str(ledger), "FNHOST_THROTTLE_RATE": "0"}
    argv = [sys.executable, "-m", "fnhost", "run", str(project / "fn.yaml")]
    workers = ["--workers", str(args.workers)] if args.workers else []
    host = Process(
        "orders-host",
        [*argv, "--nats", server.url, "--loop", args.loop, *workers],
        LOG_DIR / f"orders-host-round{round_no}.log",
        env,
    )
    nc = await nats.connect(server.url, name="bench-orders-driver")
    js = nc.jetstream()
    try:
        for stream in ("ORDERS", "PAYMENTS", "DLQ"):
            # A fresh system every round (the host creates them again), so the
            # consumers' ack floors count this round's orders only.
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(stream)
        await host.start()
        # Asked again after a timeout, it may be charged twice: the ledger check leaves it out.
        warm_up = {**order(0, random.Random(0)), "customer_id": WARM_UP_CUSTOMER}
        await wait_replying(nc, host, REQUEST_SUBJECT, json.dumps(warm_up).encode())
        for stream, durable in CONSUMERS:
            await all_acked(js, stream, durable, host)  # the warm-up order went through
        rng = random.Random(round_no)
        orders = [order(number, rng) for number in range(1, args.orders + 1)]
        host_from, server_from = cpu_seconds([host]), cpu_seconds([server.process])
        first_request = datetime.datetime.now(datetime.UTC)
        answered, intake_seconds = await burst(nc, orders, args.in_flight)
        done = {
            durable: await all_acked(js, stream, durable, host) for stream, durable in CONSUMERS
        }
        host_to, server_to = cpu_seconds([host]), cpu_seconds([server.process])
        dead = (await js.stream_info("DLQ")).state.messages
        if dead:
            raise ProcessFailed(f"{dead} messages in the DLQ stream" + host.tail())
        check_ledger(ledger, answered)
    finally:
        await host.stop()
        await nc.close()

    def rate_until(durable: str) -> float:
        last_ack = done[durable].ack_floor.last_active
        return float(args.orders / (last_ack - first_request).total_seconds())

    return Round(
        intake=args.orders / intake_seconds,
        charged=rate_until("payment"),
        reserved=rate_until("inventory"),
        host_cpu_us=per_message(host_from, host_to, args.orders),
        server_cpu_us=per_message(server_from, server_to, args.orders),
        redelivered={durable: info.num_redelivered or 0 for durable, info in done.items()},
    )


async def bench(args: Any) -> tuple[list[Round], str]:
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="fnhost-orders-") as tmp:
        workdir = Path(tmp)
        server = NatsServer(
            workdir, LOG_DIR / "orders-nats-server.log", sync_always=args.sync == "always"
        )
        await server.start()
        try:
            for round_no in range(1, args.rounds + 1):
                print(f"round {round_no}/{args.rounds}", end="", flush=True)
                result = await one_round(round_no, server, workdir, args)
                redelivered = ", ".join(f"{d} {n}" for d, n in result.redelivered.items() if n)
                print(
                    f"  intake {result.intake:,.0f}, charged {result.charged:,.0f}, "
                    f"reserved {result.reserved:,.0f} orders/s; host CPU "
                    f"{figure(result.host_cpu_us, '.0f')} µs/order, nats-server "
                    f"{figure(result.server_cpu_us, '.0f')}"
                    + (f"; redelivered: {redelivered}" if redelivered else "")
                )
                rounds.append(result)
        finally:
            await server.stop()
    return rounds, server.version


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--orders", type=int, default=20_000, help="orders in the burst")
    parser.add_argument(
        "--in-flight", type=int, default=256, help="create-order requests awaiting an answer"
    )
    parser.add_argument("--loop", choices=LOOPS, default=default_loop())
    parser.add_argument(
        "--workers",
        type=int,
        help="run the host as `fnhost run --workers N` (a supervisor and N host processes)",
    )
    parser.add_argument(
        "--sync",
        choices=("always", "default"),
        default="always",
        help="nats-server fsync: on every write (as production, default) or its 2-minute default",
    )
    args = parser.parse_args()
    check_loop(parser, args.loop)
    if min(args.rounds, args.orders, args.in_flight, args.workers or 1) < 1:
        parser.error("--rounds, --orders, --in-flight and --workers must be at least 1")
    return args


async def main(args: argparse.Namespace) -> int:
    stop_on_sigterm()
    try:
        rounds, server_version = await bench(args)
    except ProcessFailed as failure:
        print(f"\nfailed: {failure}")
        return 1
    medians = {
        field: median_of([getattr(result, field) for result in rounds])
        for field in ("intake", "charged", "reserved", "host_cpu_us", "server_cpu_us")
    }
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "nats_server": server_version,
        "nats_py": package_version("nats-py"),
        "python": platform.python_version(),
        "loop": args.loop if args.loop == "asyncio" else f"uvloop {package_version('uvloop')}",
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "orders": args.orders,
        "in_flight": args.in_flight,
        "workers": args.workers,
        "nats_sync": args.sync,
    }
    print(
        f"\nnats-server {server_version}, nats-py {meta['nats_py']}, Python {meta['python']}, "
        f"loop {meta['loop']}, {meta['cpus']} CPUs, nats-server sync {args.sync}; "
        f"{args.orders:,} orders per burst, {args.in_flight} in flight, "
        f"{args.workers or 1} host process(es), "
        f"median of {args.rounds} round(s)\n"
    )
    print(
        f"{'intake':>10} {'charged':>10} {'reserved':>10} {'host CPU µs':>12} {'NATS CPU µs':>12}"
    )
    print(
        f"{figure(medians['intake'], ',.0f'):>10} {figure(medians['charged'], ',.0f'):>10} "
        f"{figure(medians['reserved'], ',.0f'):>10} {figure(medians['host_cpu_us'], '.0f'):>12} "
        f"{figure(medians['server_cpu_us'], '.0f'):>12}"
    )
    print("orders/s; every answered order charged once with its total, DLQ empty, every round")
    suffix = f"-workers{args.workers}" if args.workers else ""
    payload = {"meta": meta, "medians": medians, "rounds": [r._asdict() for r in rounds]}
    write_results(f"orders-sync-{args.sync}{suffix}.json", payload)
    return 0


if __name__ == "__main__":
    exit_with(lambda: asyncio.run(main(parse_args())))
