"""F6: a 3-node cluster, R3 streams; the stream leader, the consumer leader and the
host's own server are ``kill -9``'d and restarted, one after another, under load.

One host process (``fnhost run`` with the cluster's three URLs) runs a stream
function on an R3 stream with a durable consumer and the default ``kv``
idempotency store (whose bucket takes the stream's three replicas). Its effect
is F1's (``test_crash_recovery``): an insert under ``UNIQUE(key)`` into SQLite
plus an ``attempts`` row for every execution, here after 50-250 ms of work, so
that about ten deliveries are in flight at any moment. The test publishes
``MESSAGES`` messages at a steady pace, each with a ``Nats-Msg-Id`` and retried
until a 30 s deadline (RELIABILITY.md: a 5 s budget once lost a publish in a
failover). Meanwhile, in turn, it kills (SIGKILL) the node leading the stream,
the node leading the consumer, the node leading the idempotency bucket's stream
(the third R3 stream the function depends on) and the node the host is
connected to. Each kill waits until deliveries are in flight; then the test
waits until the survivors elected a new leader (or the host reconnected
elsewhere) and the function made progress on two nodes, starts the node again
on its store and waits until every node is healthy before the next fault. A
thread polls the host's ``/readyz`` throughout.

Passes when every message was stored once and has its effect (0 lost), done
work really was delivered again (deliveries skipped as duplicates, or effects
run again), every key ran its handler exactly once (0 duplicate effects: the
idempotency store, not ``UNIQUE``, kept redeliveries from running again), the
dead-letter stream is empty, the host never died and drained with exit 0, and
the longest stretch of ``/readyz`` answering anything but 200 stays under
``UNREADY_BOUND``. Bounded (every wait has a deadline) and printing its counts:
lost, duplicates and what caused each, executions, deliveries skipped as
duplicates, publish retries, the unready stretches and which node held which
roles when it was killed.

A ``kv`` record whose write meets the bucket's leader election (no responders,
or no answer within 5 s) is tried again until the new leader stores it; before
that was so, 2 to 35 effects a run ran twice here.
"""

from __future__ import annotations

import asyncio
import json
import re
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from fnhost_sdk.cluster import NatsCluster
from fnhost_sdk.server import NatsServer
from fnhost_sdk.waiting import wait_for

from .harness import HostProcess
from .test_crash_recovery import SQLITE_EFFECT, SqliteOracle, _duplicates, _http_url, _ready

pytestmark = [pytest.mark.nats, pytest.mark.fault, pytest.mark.slow]

MESSAGES = 3_000
PUBLISH_SECONDS = 45.0
"""The publisher's pace: ``MESSAGES`` spread over this long (it catches up after a stall)."""
FAULTS = ("stream leader", "consumer leader", "kv bucket leader", "host's server")
FAULT_AFTER = (MESSAGES // 10, MESSAGES * 3 // 10, MESSAGES // 2, MESSAGES * 7 // 10)
"""Published messages before each fault (each also waits for the previous to heal)."""
IN_FLIGHT = 4
"""Deliveries awaiting their ack that a kill waits for (the node dies mid-work)."""
PROGRESS = 100
"""Effects the function must add while a node is down: it works on the two left."""
PUBLISH_DEADLINE = 30.0
"""Seconds one publish is retried for (RELIABILITY.md: at least 30 s in a failover)."""
DEADLINE = 90.0
"""Seconds any one phase may take (elections and catch-up take ~1-10 s here)."""
UNREADY_BOUND = 20.0
"""The longest ``/readyz`` may answer anything but 200 at a stretch. Not a speed
target: the scenario's own "never unready for long" as a liveness bound. A host on
a killed server reconnects within ~1-2 s, a raft election takes a few seconds, and
a store call that meets one gives up after 5 s (measured: 0 to 12 s unready), so
20 s only fails a host that stays unready until something else (a later fault, the
end of the test) wakes it up, on a loaded 2-core machine too."""
CONCURRENCY = 16
HANDLER_MS = (50, 100, 150, 200, 250)
"""How long a handler works before its effect, by key: ~10 deliveries in flight at the
pace, so each kill lands while effects are done and their records and acks travel."""
STREAM, CONSUMER = "IN", "effect"
KV_STREAM = "KV_fnhost_idempotency"
"""The stream behind the default ``kv`` store's bucket (``idempotency.bucket``)."""

BEFORE_EFFECT = '    db.execute("BEGIN IMMEDIATE")\n'
assert SQLITE_EFFECT.count(BEFORE_EFFECT) == 1
WORKING_EFFECT = SQLITE_EFFECT.replace(
    BEFORE_EFFECT,
    "    import time\n\n"
    f"    time.sleep({HANDLER_MS!r}[event['n'] % {len(HANDLER_MS)}] / 1000)\n" + BEFORE_EFFECT,
)
"""F1's effect, after ``HANDLER_MS`` of work."""

# ack_wait 5s brings redeliveries of cut-short work within the test's time. The lease
# is set above the store's own failover: the kv bucket answers nothing for up to ~9 s
# here when the killed node led it (and everything else), and a record still waiting
# for the store when the lease runs out lets a redelivery take the key and run again
# (7 keys did, in one run, with the 6.25 s default for these settings). The default
# lease, with the default ack_wait (30s), is 32 s.
MANIFEST = """\
version: 1
http: {{port: 0}}
streams:
  IN: {{subjects: ["in.>"], replicas: 3, duplicate_window: 10m}}
  DLQ: {{subjects: ["dlq.>"], replicas: 3}}
functions:
  effect:
    module: effect.py
    trigger: {{stream: IN, durable: effect, ack_wait: 5s}}
    timeout: 5s
    concurrency: {concurrency}
    retry: {{max_deliver: 40, backoff: [100ms, 500ms, 1s, 2s]}}
    idempotency: {{store: kv, ttl: 1h, lease: 20s}}
    dead_letter: dlq.effect
    config: {{db: "{db}"}}
"""


class ReadyWatch(threading.Thread):
    """Polls ``/readyz`` every ``interval`` seconds until stopped; a timeout is unready.

    A thread, so a busy event loop in the test cannot make the host look unready.
    """

    def __init__(self, url: str, interval: float = 0.1) -> None:
        super().__init__(name="f6-readyz", daemon=True)
        self.url = url
        self.interval = interval
        self.samples: list[tuple[float, bool]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            self.samples.append((time.monotonic(), _ready(self.url)))
            self.halt.wait(self.interval)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)

    def stretches(self) -> list[tuple[float, float]]:
        """(start, seconds) of each run of unready answers, from the first unready
        sample to the next ready one (or the last sample)."""
        found: list[tuple[float, float]] = []
        began: float | None = None
        for at, ready in self.samples:
            if not ready and began is None:
                began = at
            elif ready and began is not None:
                found.append((began, at - began))
                began = None
        if began is not None:
            found.append((began, self.samples[-1][0] - began))
        return found


@dataclass
class Publisher:
    """Publishes ``MESSAGES`` at a steady pace, each retried until it has a PubAck."""

    js: JetStreamContext
    published: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    acked_as_duplicate: int = 0  # a retry whose first try had been stored after all

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        for n in range(MESSAGES):
            delay = start + n * PUBLISH_SECONDS / MESSAGES - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._publish(n)
            self.published = n + 1

    async def _publish(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PUBLISH_DEADLINE
        body = json.dumps({"n": n}).encode()
        while True:
            try:
                ack = await self.js.publish(
                    f"in.{n % 10}", body, timeout=2, headers={"Nats-Msg-Id": f"f6-{n}"}
                )
            except nats.errors.Error as exc:  # no leader, no responders, reconnecting...
                self.retries[type(exc).__name__] += 1
                if loop.time() > deadline:
                    raise AssertionError(
                        f"message {n}: no PubAck within {PUBLISH_DEADLINE:g}s: {exc!r}"
                    ) from exc
                await asyncio.sleep(0.1)
                continue
            self.acked_as_duplicate += bool(ack.duplicate)
            return


@dataclass
class Fault:
    """One kill: which role was aimed at, the node hit and every role it held then."""

    aimed_at: str
    victim: str
    roles: list[str]
    published: int
    effects: int
    in_flight: int  # the consumer's deliveries awaiting an ack just before the kill
    successor: str = ""  # the new leader, or the server the host reconnected to


def _host_server(host: HostProcess, cluster: NatsCluster) -> NatsServer:
    """The node the host is connected to, from its last (re)connect log line."""
    found = re.findall(r"connected to NATS at [0-9.]+:([0-9]+)", host.log())
    assert found, f"no NATS connection in {host.log_path}"
    port = int(found[-1])
    for server in cluster.servers:
        if server.running and server.port == port:
            return server
    raise AssertionError(f"the host's last connection, port {port}, is no running node")


async def _roles(nc: Client, cluster: NatsCluster, host: HostProcess) -> dict[str, NatsServer]:
    js = nc.jetstream()
    return {
        "stream leader": await cluster.stream_leader(nc, STREAM, timeout=DEADLINE),
        "consumer leader": await cluster.consumer_leader(js, STREAM, CONSUMER, timeout=DEADLINE),
        "kv bucket leader": await cluster.stream_leader(nc, KV_STREAM, timeout=DEADLINE),
        "host's server": _host_server(host, cluster),
    }


async def _successor(
    aimed_at: str, victim: NatsServer, nc: Client, cluster: NatsCluster, host: HostProcess
) -> NatsServer:
    """The node that took the role over: elected leader, or the host's new server."""
    if aimed_at == "stream leader":
        return await cluster.stream_leader(nc, STREAM, timeout=DEADLINE)
    if aimed_at == "consumer leader":
        return await cluster.consumer_leader(nc, STREAM, CONSUMER, timeout=DEADLINE)
    if aimed_at == "kv bucket leader":
        return await cluster.stream_leader(nc, KV_STREAM, timeout=DEADLINE)

    def moved() -> NatsServer | None:
        server = _host_server(host, cluster)  # fails while it names the dead node
        return None if server is victim else server

    return await wait_for(
        moved,
        timeout=DEADLINE,
        interval=0.1,
        message="the host reconnected to another node",
        ignore=(AssertionError,),
    )


async def _healed(cluster: NatsCluster, victim: NatsServer) -> None:
    """Start ``victim`` again and wait until every node is healthy (off the event loop:
    the publisher keeps its pace)."""

    def heal() -> None:
        victim.start()
        victim.wait_healthy(timeout=DEADLINE)
        cluster.wait_for_meta_leader(timeout=DEADLINE)

    await asyncio.to_thread(heal)


async def _fault(
    aimed_at: str,
    nc: Client,
    cluster: NatsCluster,
    host: HostProcess,
    oracle: SqliteOracle,
    publisher: Publisher,
) -> Fault:
    """Kill the node holding ``aimed_at`` mid-work, wait for the survivors to take over
    and make progress, start it again and wait until the cluster is whole."""
    js = nc.jetstream()

    async def in_flight() -> int | None:
        pending = (await js.consumer_info(STREAM, CONSUMER, timeout=5)).num_ack_pending
        return pending if pending >= IN_FLIGHT else None

    busy = await wait_for(
        in_flight,
        timeout=DEADLINE,
        interval=0.01,
        message=f"{IN_FLIGHT} deliveries in flight",
        ignore=(nats.errors.Error,),
    )
    roles = await _roles(nc, cluster, host)
    victim = roles[aimed_at]
    effects = oracle.count("effects")
    victim.kill()
    fault = Fault(
        aimed_at,
        str(victim.server_name),
        [role for role, server in roles.items() if server is victim],
        publisher.published,
        effects,
        busy,
    )
    successor = await _successor(aimed_at, victim, nc, cluster, host)
    assert successor is not victim and successor.running
    fault.successor = str(successor.server_name)

    def progressed() -> bool:
        assert host.alive, f"the host exited by itself with {host.returncode}"
        return oracle.count("effects") >= min(effects + PROGRESS, MESSAGES)

    await wait_for(
        progressed, timeout=DEADLINE, interval=0.05, message=f"progress without {victim!r}"
    )
    await _healed(cluster, victim)
    return fault


async def _drained(js: JetStreamContext) -> bool:
    try:
        info = await js.consumer_info(STREAM, CONSUMER, timeout=5)
    except nats.errors.Error:
        return False  # mid-election
    return info.num_pending == 0 and info.num_ack_pending == 0


_FAILED = re.compile(r"attempt (\d+) of \S+ failed.*idempotency store \w+ unavailable")
_RECORD_REFUSED = "its record was not stored"


def _store_failures(host: HostProcess) -> set[tuple[str, int]]:
    """(message id, attempt) of every delivery nak'd because the store was unavailable, or
    whose record the store refused (tried again)."""
    failed = set()
    for line in host.log().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        message, message_id = entry.get("msg", ""), entry.get("message_id")
        if not message_id:
            continue
        if found := _FAILED.search(message):
            failed.add((message_id, int(found[1])))
        elif _RECORD_REFUSED in message:
            failed.add((message_id, int(entry["attempt"])))
    return failed


@dataclass
class Counts:
    published: int
    stored: int
    effects: int
    missing: list[int]
    executions: int
    redelivered: int
    repeats: int
    runs: dict[str, list[int]]  # key -> the attempts that ran its handler, if more than one
    record_lost: int  # runs followed by another, nak'd for the store after the effect
    dead_letters: int
    skipped_as_duplicate: int | None
    exit_code: int


async def test_f6_kill_stream_leader_consumer_leader_and_host_server(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    oracle = SqliteOracle(tmp_path / "oracle.db")
    (tmp_path / "fn.yaml").write_text(MANIFEST.format(concurrency=CONCURRENCY, db=oracle.location))
    (tmp_path / "effect.py").write_text(textwrap.dedent(WORKING_EFFECT))
    host = HostProcess(tmp_path / "fn.yaml", nats_cluster.url)
    nc = await nats.connect(
        nats_cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.2, name="f6-test"
    )
    watch: ReadyWatch | None = None
    faults: list[Fault] = []
    publishing: asyncio.Task[None] | None = None
    try:
        host.start()
        assert host.alive, f"the host exited at start with {host.returncode}"
        js = nc.jetstream()
        kv = await js.stream_info(KV_STREAM)
        assert kv.config.num_replicas == 3, "the idempotency bucket has the stream's replicas"
        watch = ReadyWatch(_http_url(host, "/readyz"))
        watch.start()
        publisher = Publisher(js)
        publishing = task = asyncio.create_task(publisher.run(), name="f6-publisher")
        for aimed_at, after in zip(FAULTS, FAULT_AFTER, strict=True):

            def reached(after: int = after) -> bool:
                if task.done():
                    task.result()  # a publish that ran out of time fails here
                return publisher.published >= after

            await wait_for(reached, timeout=DEADLINE, interval=0.05, message=f"{after} published")
            faults.append(await _fault(aimed_at, nc, nats_cluster, host, oracle, publisher))
        await asyncio.wait_for(publishing, DEADLINE)
        await wait_for(
            lambda: _drained(js), timeout=DEADLINE, interval=0.2, message="every message acked"
        )
        url = _http_url(host, "/readyz")
        await wait_for(lambda: _ready(url), timeout=30, interval=0.2, message="/readyz 200")
        watch.stop()
        skipped = _duplicates(host)
        stored = (await js.stream_info(STREAM)).state.messages
        dead = (await js.stream_info("DLQ")).state.messages
        exit_code = host.terminate()
        done = {int(key) for (key,) in oracle.rows("SELECT key FROM effects")}
        runs: dict[str, list[int]] = {}
        for key, attempt in oracle.rows("SELECT key, attempt FROM attempts ORDER BY rowid"):
            runs.setdefault(key, []).append(int(attempt))
        runs = {key: attempts for key, attempts in runs.items() if len(attempts) > 1}
        failures = _store_failures(host)
        counts = Counts(
            published=publisher.published,
            stored=stored,
            effects=oracle.count("effects"),
            missing=sorted(set(range(MESSAGES)) - done),
            executions=oracle.count("executions"),
            redelivered=oracle.count("redelivered"),
            repeats=oracle.count("repeats"),
            runs=runs,
            record_lost=sum(
                (f"f6-{key}", attempt) in failures
                for key, attempts in runs.items()
                for attempt in attempts[:-1]
            ),
            dead_letters=dead,
            skipped_as_duplicate=skipped,
            exit_code=exit_code,
        )
    except BaseException:
        host.print_tail(80)
        for fault in faults:
            print(f"F6 fault: {fault}")
        raise
    finally:
        if publishing is not None and not publishing.done():
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        if watch is not None:
            watch.stop()
        host.close()
        await nc.close()
        oracle.close()

    stretches = watch.stretches()
    longest = max((seconds for _, seconds in stretches), default=0.0)
    start = watch.samples[0][0]
    again = sum(len(attempts) - 1 for attempts in counts.runs.values())
    print(
        f"\nF6: {MESSAGES} messages, {counts.published} published "
        f"({sum(publisher.retries.values())} publish retries {dict(publisher.retries)}, "
        f"{publisher.acked_as_duplicate} PubAcks duplicate), {counts.stored} stored, "
        f"{counts.effects} effects, {len(counts.missing)} lost; {len(counts.runs)} keys run "
        f"more than once ({again} runs again, {counts.record_lost} after their record failed "
        f"to the store, {counts.repeats} repeats); {counts.executions} executions "
        f"({counts.redelivered} on a redelivery), {counts.skipped_as_duplicate} deliveries "
        f"skipped as duplicates, {counts.dead_letters} dead letters, host exit {counts.exit_code}"
    )
    for fault in faults:
        print(
            f"  killed {fault.victim} as the {fault.aimed_at} (it held: {', '.join(fault.roles)})"
            f" after {fault.published} published / {fault.effects} effects, {fault.in_flight}"
            f" in flight; {fault.successor} took over"
        )
    print(
        f"  /readyz: {len(watch.samples)} polls, {len(stretches)} unready stretches "
        f"{[(round(at - start, 1), round(seconds, 2)) for at, seconds in stretches]} "
        f"(start s, length s), longest {longest:.2f}s (bound {UNREADY_BOUND:g}s)"
    )
    if counts.runs:
        some = dict(list(counts.runs.items())[:10])
        print(f"  keys run more than once (the attempts that ran): {some}")

    assert counts.published == MESSAGES
    assert counts.stored == MESSAGES  # a retried publish stored once (Nats-Msg-Id)
    assert counts.missing == [], f"lost: {counts.missing[:20]}"  # 0 lost
    assert counts.effects == MESSAGES
    assert counts.dead_letters == 0
    assert counts.exit_code == 0
    # Every fault hit the role it aimed at, mid-work, and another node took over.
    assert [fault.aimed_at for fault in faults] == list(FAULTS)
    assert all(fault.aimed_at in fault.roles for fault in faults)
    assert all(fault.in_flight >= IN_FLIGHT for fault in faults)
    assert all(fault.successor != fault.victim for fault in faults)
    # Never unready for long (see UNREADY_BOUND).
    assert longest < UNREADY_BOUND, stretches
    # The kills cut done work short: it was delivered again (skipped as a duplicate when
    # its record held, run again when not). Without this the next check proves nothing.
    assert (counts.skipped_as_duplicate or 0) + again >= 1
    # 0 duplicate effects, by the idempotency store alone: each key's handler ran once
    # (the UNIQUE constraint would hide a second run; the attempts table shows it).
    assert not (counts.runs or counts.repeats), (
        f"{len(counts.runs)} keys ran more than once, {counts.record_lost} runs after "
        f"a record write failed to the store: {dict(list(counts.runs.items())[:10])}"
    )
