"""F1: 10,000 messages through a stream function while its host is killed and NATS restarts.

The effect is an insert under a unique constraint; an ``attempts`` row is
written (committed on its own) for every execution, with its delivery count,
and a ``repeats`` row for every execution that found its effect already
there (an effect that ran twice). The host process is ``kill -9``'d three
times at seeded random moments (a number of effects reached) and restarted;
nats-server is ``kill -9``'d once and started again on the same port and data.

Two variants:

- SQLite effects + the ``kv`` store: nothing lost; an effect can run twice
  only when a kill (or the NATS restart, which fails the record) falls between
  an effect and its record, so at most one per in-flight invocation per such
  event: the test fails above that bound. Repeats are counted and printed.
- PostgreSQL effects + the ``postgres`` store, the key recorded with
  ``ctx.idempotency.record_in(conn)`` in the effect's transaction: nothing
  lost and not one effect twice.

Both: the dead-letter stream stays empty, redeliveries really happened
(executions with a delivery count above 1), and ``/readyz`` is back to 200.
Bounded (every wait has a deadline) and printing its counts and seed.
"""

from __future__ import annotations

import json
import random
import re
import sqlite3
import textwrap
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nats
import nats.errors
import nats.js
import pytest

from fnhost_sdk.server import NatsServer
from fnhost_sdk.waiting import wait_for
from support.databases import postgres_dsn, postgres_server

from .harness import HostProcess

__all__ = ["postgres_dsn", "postgres_server"]  # fixtures, imported for pytest

pytestmark = [pytest.mark.nats, pytest.mark.fault, pytest.mark.slow]

MESSAGES = 10_000
KILLS = 3
CONCURRENCY = 16
DEADLINE = 150.0
"""Seconds any one phase may take before the test fails (it takes ~10-40 s here)."""

MANIFEST = """\
version: 1
http: {{port: 0}}
streams:
  IN: {{subjects: ["in.>"], duplicate_window: 10m}}
  DLQ: {{subjects: ["dlq.>"]}}
functions:
  effect:
    module: effect.py
    trigger: {{stream: IN, durable: effect, ack_wait: 3s}}
    timeout: 2s
    concurrency: {concurrency}
    retry: {{max_deliver: 20, backoff: [100ms, 500ms]}}
    idempotency: {idempotency}
    dead_letter: dlq.effect
    config: {{db: "{db}"}}
"""

SQLITE_EFFECT = """\
import sqlite3
import threading

_local = threading.local()


def _db(path):
    db = getattr(_local, "db", None)
    if db is None:
        db = sqlite3.connect(path, timeout=60, isolation_level=None)
        db.execute("PRAGMA synchronous=NORMAL")
        _local.db = db
    return db


def handle(event: dict, ctx) -> None:
    db = _db(ctx.config["db"])
    key = str(event["n"])
    db.execute("INSERT INTO attempts (key, attempt) VALUES (?, ?)", (key, ctx.attempt))
    try:
        db.execute("INSERT INTO effects (key) VALUES (?)", (key,))
    except sqlite3.IntegrityError:
        db.execute("INSERT INTO repeats (key) VALUES (?)", (key,))
"""

POSTGRES_EFFECT = """\
import threading

import psycopg

_local = threading.local()


def _db(dsn):
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = _local.conn = psycopg.connect(dsn, autocommit=True)
    return conn


def handle(event: dict, ctx) -> None:
    conn = _db(ctx.config["db"])
    key = str(event["n"])
    conn.execute("INSERT INTO attempts (key, attempt) VALUES (%s, %s)", (key, ctx.attempt))
    repeated = False
    try:
        with conn.transaction():
            try:
                with conn.transaction():
                    conn.execute("INSERT INTO effects (key) VALUES (%s)", (key,))
            except psycopg.errors.UniqueViolation:
                repeated = True
            ctx.idempotency.record_in(conn)
    finally:
        if repeated:
            conn.execute("INSERT INTO repeats (key) VALUES (%s)", (key,))
"""

TABLES = (
    "CREATE TABLE IF NOT EXISTS effects (key TEXT PRIMARY KEY)",
    "CREATE TABLE IF NOT EXISTS attempts (key TEXT NOT NULL, attempt INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS repeats (key TEXT NOT NULL)",
)
QUERIES = {
    "effects": "SELECT COUNT(*) FROM effects",
    "executions": "SELECT COUNT(*) FROM attempts",
    "redelivered": "SELECT COUNT(*) FROM attempts WHERE attempt > 1",
    "repeats": "SELECT COUNT(*) FROM repeats",
}


@dataclass
class Counts:
    effects: int
    executions: int
    redelivered: int
    repeats: int
    dead_letters: int
    lives: int


class SqliteOracle:
    def __init__(self, path: Path) -> None:
        self.location = str(path)
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        for statement in TABLES:
            self.db.execute(statement)

    def count(self, what: str) -> int:
        return int(self.db.execute(QUERIES[what]).fetchone()[0])

    def sessions(self) -> list[tuple[object, ...]]:
        return []  # SQLite has no server to ask

    def close(self) -> None:
        self.db.close()


class PostgresOracle:
    def __init__(self, dsn: str) -> None:
        import psycopg

        self.location = dsn
        self.db = psycopg.connect(dsn, autocommit=True)
        for statement in TABLES:
            self.db.execute(statement)

    def count(self, what: str) -> int:
        row = self.db.execute(QUERIES[what]).fetchone()
        assert row is not None
        return int(row[0])

    def sessions(self) -> list[tuple[object, ...]]:
        """The database's other sessions that are not idle: state, wait, transaction age, query."""
        return self.db.execute(
            "SELECT pid, state, wait_event_type, wait_event, now() - xact_start,"
            " left(query, 120) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'"
        ).fetchall()

    def close(self) -> None:
        self.db.close()


Oracle = SqliteOracle | PostgresOracle


def _ready_url(host: HostProcess) -> str:
    life = host.log().split(f"--- life {host.lives}\n")[-1]
    found = re.findall(r"HTTP on (http://[0-9.]+:[0-9]+)", life)
    assert found, f"no HTTP address in {host.log_path}"
    return f"{found[-1]}/readyz"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


async def run_f1(
    nats_server: NatsServer, tmp_path: Path, oracle: Oracle, idempotency: str, effect: str
) -> Counts:
    """Publish, kill and restart on schedule, wait until every message is acked; count."""
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    (tmp_path / "fn.yaml").write_text(
        MANIFEST.format(idempotency=idempotency, concurrency=CONCURRENCY, db=oracle.location)
    )
    (tmp_path / "effect.py").write_text(textwrap.dedent(effect))
    host = HostProcess(tmp_path / "fn.yaml", nats_server.url)
    kill_points = sorted(rng.sample(range(MESSAGES // 10, MESSAGES * 9 // 10), KILLS))
    restart_point = rng.randrange(MESSAGES // 5, MESSAGES * 4 // 5)
    print(f"\nF1 seed {seed}: kills after {kill_points} effects, nats-server kill -9 and")
    print(f"F1 restart after {restart_point} effects")
    host.start()
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        for n in range(MESSAGES):
            await js.publish_async(f"in.{n % 10}", json.dumps({"n": n}).encode())
        await js.publish_async_completed()
        events = sorted([(point, "kill") for point in kill_points] + [(restart_point, "nats")])
        for point, event in events:
            await wait_for(
                lambda point=point: oracle.count("effects") >= point,
                timeout=DEADLINE,
                interval=0.01,
                message=f"{point} effects before the {event} event",
            )
            if event == "kill":
                host.kill()
                host.start()
            else:
                nats_server.kill()
                nats_server.start()

        async def drained() -> bool:
            if not host.alive:
                host.start(wait_ready=False)
            try:
                info = await js.consumer_info("IN", "effect")
            except nats.errors.Error:
                return False  # still reconnecting after the server restart
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_for(drained, timeout=DEADLINE, interval=0.2, message="every message acked")
        url = _ready_url(host)
        await wait_for(lambda: _ready(url), timeout=30, interval=0.2, message="/readyz 200")
        dead = (await js.stream_info("DLQ")).state.messages
        assert host.terminate() == 0
        return Counts(
            oracle.count("effects"),
            oracle.count("executions"),
            oracle.count("redelivered"),
            oracle.count("repeats"),
            dead,
            host.lives,
        )
    except BaseException:
        host.print_tail()
        await _print_state(nc.jetstream(), oracle)
        raise
    finally:
        host.close()
        await nc.close()


async def _print_state(js: nats.js.JetStreamContext, oracle: Oracle) -> None:
    """What a stalled run was waiting on: the consumer, the oracle, the database's sessions."""
    try:
        info = await js.consumer_info("IN", "effect", timeout=5)
        print(
            f"consumer: {info.num_pending} pending, {info.num_ack_pending} ack pending, "
            f"{info.num_redelivered} redelivered, {info.num_waiting} pulls waiting"
        )
    except Exception as exc:
        print(f"consumer info unavailable: {exc!r}")
    try:
        print({what: oracle.count(what) for what in QUERIES})
        for row in oracle.sessions():
            print("database session:", row)
    except Exception as exc:
        print(f"oracle unavailable: {exc!r}")


def _report(label: str, counts: Counts, bound: int | None = None) -> None:
    limit = f" (bound {bound})" if bound is not None else ""
    print(
        f"F1 {label}: {MESSAGES} messages, {counts.effects} effects, {counts.executions} "
        f"executions ({counts.redelivered} on a redelivery), {counts.repeats} effects run "
        f"twice{limit}, {counts.dead_letters} dead letters, {counts.lives} host lives"
    )


def _common(counts: Counts) -> None:
    assert counts.effects == MESSAGES  # 0 lost
    assert counts.dead_letters == 0
    assert counts.executions >= counts.effects + counts.repeats
    assert counts.redelivered >= 1  # the kills really cut invocations short
    assert counts.lives >= KILLS + 1


async def test_f1_sqlite_and_kv_store(nats_server: NatsServer, tmp_path: Path) -> None:
    oracle = SqliteOracle(tmp_path / "oracle.db")
    try:
        counts = await run_f1(nats_server, tmp_path, oracle, "{store: kv, ttl: 1h}", SQLITE_EFFECT)
    finally:
        oracle.close()
    # One repeat at most per invocation in flight at each kill or at the NATS restart.
    bound = (KILLS + 1) * CONCURRENCY
    _report("SQLite + kv store", counts, bound)
    _common(counts)
    assert counts.repeats <= bound


async def test_f1_postgres_and_postgres_store_exactly_once(
    nats_server: NatsServer, tmp_path: Path, postgres_dsn: str
) -> None:
    oracle = PostgresOracle(postgres_dsn)
    store = f"{{store: postgres, url: '{postgres_dsn}', ttl: 1h}}"
    try:
        counts = await run_f1(nats_server, tmp_path, oracle, store, POSTGRES_EFFECT)
    finally:
        oracle.close()
    _report("PostgreSQL + postgres store, key and effect in one transaction", counts)
    _common(counts)
    assert counts.repeats == 0  # not one effect ran twice
