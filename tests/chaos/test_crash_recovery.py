"""F1: 10,000 messages through a stream function while its host is killed and NATS restarts.

The effect is an insert under a unique constraint; an ``attempts`` row is
written (committed on its own) for every execution, with its delivery count
and the pid of the host process that ran it (so every row belongs to one of
the host's lives). The host process is ``kill -9``'d three times at seeded
random moments (a number of effects reached) and restarted; nats-server is
``kill -9``'d once and started again on the same port and data. Each kill must
hit a running host that then dies of the SIGKILL, the last life ends with a
drain (exit 0), and a host that dies by itself fails the test (never restarted
behind its back): exactly KILLS + 1 lives. Just after each kill the consumer
must still wait for acks (the kill cut deliveries short).

Two variants:

- SQLite effects + the ``kv`` store: nothing lost. An effect that ran again
  writes a ``repeats`` row in the effect's own transaction, with its pid; each
  run that was followed by another run of the same effect lost its record, and
  is charged to its life. Only a kill or the NATS restart (which fails the kv
  record) can lose records, at most one per invocation in flight: per life, at
  most CONCURRENCY per such event in it, 0 in a life that only drained.
- PostgreSQL effects + the ``postgres`` store, the key recorded with
  ``ctx.idempotency.record_in(conn)`` in the effect's transaction: nothing
  lost and not one effect committed twice. The effect is an upsert that counts
  its runs in the same transaction, so any second execution that committed
  shows as ``runs`` 2. And the dedup path was taken: deliveries whose
  transaction committed but whose ack was lost were skipped as duplicates
  (the host's ``duplicate`` count, read from /metrics at the end of each life).

Both: the dead-letter stream stays empty, redeliveries really happened, and
``/readyz`` is back to 200. Bounded (every wait has a deadline) and printing
its counts per life and its seed; ``FNHOST_CHAOS_SEED=N`` replays a seed's kill
and restart points (not the exact timing within them).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import sqlite3
import textwrap
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
import os
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
    pid = os.getpid()  # the host's life: the test knows the pid of each
    db.execute(
        "INSERT INTO attempts (key, attempt, pid) VALUES (?, ?, ?)", (key, ctx.attempt, pid)
    )
    # The effect and, when it was already there, the evidence that it ran again:
    # one transaction, so a kill cannot keep the one and lose the other.
    db.execute("BEGIN IMMEDIATE")
    try:
        try:
            db.execute("INSERT INTO effects (key, pid) VALUES (?, ?)", (key, pid))
        except sqlite3.IntegrityError:
            db.execute("INSERT INTO repeats (key, pid) VALUES (?, ?)", (key, pid))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
"""

POSTGRES_EFFECT = """\
import os
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
    pid = os.getpid()
    conn.execute(
        "INSERT INTO attempts (key, attempt, pid) VALUES (%s, %s, %s)", (key, ctx.attempt, pid)
    )
    with conn.transaction():
        # Any second execution that commits shows as runs 2, in the same transaction as
        # the effect and the key: no window where it ran but its evidence is lost.
        conn.execute(
            "INSERT INTO effects (key, pid) VALUES (%s, %s)"
            " ON CONFLICT (key) DO UPDATE SET runs = effects.runs + 1",
            (key, pid),
        )
        ctx.idempotency.record_in(conn)
"""

TABLES = (
    "CREATE TABLE IF NOT EXISTS effects"
    " (key TEXT PRIMARY KEY, pid INTEGER NOT NULL, runs INTEGER NOT NULL DEFAULT 1)",
    "CREATE TABLE IF NOT EXISTS attempts"
    " (key TEXT NOT NULL, attempt INTEGER NOT NULL, pid INTEGER NOT NULL)",
    # SQLite only (rowid gives the order of the repeats of one key).
    "CREATE TABLE IF NOT EXISTS repeats (key TEXT NOT NULL, pid INTEGER NOT NULL)",
)
QUERIES = {
    "effects": "SELECT COUNT(*) FROM effects",
    "executions": "SELECT COUNT(*) FROM attempts",
    "redelivered": "SELECT COUNT(*) FROM attempts WHERE attempt > 1",
    "repeats": "SELECT COUNT(*) FROM repeats",
    "max_runs": "SELECT COALESCE(MAX(runs), 0) FROM effects",
    "runs_above_1": "SELECT COUNT(*) FROM effects WHERE runs > 1",
}


@dataclass
class Life:
    """One host process: how it ended and what ran in it."""

    pid: int
    end: str  # "killed" (by the test, SIGKILL) or "drained" (SIGTERM, exit 0)
    returncode: int
    nats_restart: bool = False  # nats-server was kill -9'd and restarted during this life
    duplicates: int | None = None  # the host's duplicate count, read just before its end
    unacked_at_kill: int | None = None  # the consumer's ack pending just after the kill
    executions: int = 0
    redelivered: int = 0  # executions here of a delivery after the first
    effects: int = 0  # effects first done in this life
    repeats_run: int = 0  # executions here that found their effect already done
    records_lost: int = 0  # effects done here that ran again later (their record was lost)
    cut_short: int = 0  # keys executed here and executed again in a later life

    @property
    def allowance(self) -> int:
        """Effects whose record may be lost in this life: one per invocation in flight
        at each event that can fail a record (its kill, the NATS restart), else none."""
        return CONCURRENCY * ((self.end == "killed") + self.nats_restart)


@dataclass
class Counts:
    effects: int
    executions: int
    redelivered: int
    repeats: int
    max_runs: int
    runs_above_1: int
    dead_letters: int
    lives: list[Life]


class SqliteOracle:
    def __init__(self, path: Path) -> None:
        self.location = str(path)
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        for statement in TABLES:
            self.db.execute(statement)

    def count(self, what: str) -> int:
        return int(self.db.execute(QUERIES[what]).fetchone()[0])

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        return list(self.db.execute(query).fetchall())

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

    def rows(self, query: str) -> list[tuple[Any, ...]]:
        return list(self.db.execute(query).fetchall())

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


def _http_url(host: HostProcess, path: str) -> str:
    life = host.log().split(f"--- life {host.lives}\n")[-1]
    found = re.findall(r"HTTP on (http://[0-9.]+:[0-9]+)", life)
    assert found, f"no HTTP address in {host.log_path}"
    return f"{found[-1]}{path}"


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def _duplicates(host: HostProcess) -> int | None:
    """The running life's count of deliveries acked as duplicates (skipped by the
    idempotency store), from /metrics; None if it cannot be read."""
    try:
        with urllib.request.urlopen(_http_url(host, "/metrics"), timeout=5) as answer:
            text = answer.read().decode()
    except (OSError, AssertionError):
        return None
    found = re.findall(
        r'^fnhost_messages_total\{[^}]*outcome="duplicate"[^}]*\} ([0-9.e+]+)$', text, re.M
    )
    return int(sum(float(value) for value in found))


def _alive(host: HostProcess) -> None:
    """Fail (not restart) when the host died by itself: only the test's kills may end it."""
    if not host.alive:
        raise AssertionError(
            f"host life {host.lives} (pid {host.pid}) exited by itself with {host.returncode}"
        )


def _per_life(oracle: Oracle, lives: list[Life]) -> None:
    """Fill each life's counts from the oracle's rows (which carry the pid of the run)."""
    by_pid = {life.pid: life for life in lives}
    order = {life.pid: n for n, life in enumerate(lives)}
    for pid, n in oracle.rows("SELECT pid, COUNT(*) FROM attempts GROUP BY pid"):
        assert pid in by_pid, f"an execution in pid {pid}, which is none of the host's lives"
        by_pid[pid].executions = int(n)
    for pid, n in oracle.rows("SELECT pid, COUNT(*) FROM attempts WHERE attempt > 1 GROUP BY pid"):
        by_pid[pid].redelivered = int(n)
    for pid, n in oracle.rows("SELECT pid, COUNT(*) FROM effects GROUP BY pid"):
        by_pid[pid].effects = int(n)
    for pid, n in oracle.rows("SELECT pid, COUNT(*) FROM repeats GROUP BY pid"):
        by_pid[pid].repeats_run = int(n)
    # The executions of a key that did (or redid) its effect, in order: the effect's
    # first run, then every repeat. Each run followed by another lost its record.
    # (SQLite only: the PostgreSQL effect counts its runs in the effect's row instead.)
    runs: dict[str, list[int]] = {}
    if isinstance(oracle, SqliteOracle):
        firsts = dict(
            oracle.rows("SELECT key, pid FROM effects WHERE key IN (SELECT key FROM repeats)")
        )
        for key, pid in oracle.rows("SELECT key, pid FROM repeats ORDER BY rowid"):
            runs.setdefault(key, [firsts[key]]).append(pid)
    for chain in runs.values():
        for pid in chain[:-1]:
            by_pid[pid].records_lost += 1
    # Keys whose executions span lives: each life but the last of a key cut it short.
    spans = oracle.rows(
        "SELECT key, pid FROM attempts WHERE key IN"
        " (SELECT key FROM attempts GROUP BY key HAVING COUNT(DISTINCT pid) > 1)"
    )
    seen: dict[str, set[int]] = {}
    for key, pid in spans:
        seen.setdefault(key, set()).add(pid)
    for pids in seen.values():
        last = max(pids, key=order.__getitem__)
        for pid in pids - {last}:
            by_pid[pid].cut_short += 1


async def run_f1(
    nats_server: NatsServer, tmp_path: Path, oracle: Oracle, idempotency: str, effect: str
) -> Counts:
    """Publish, kill and restart on schedule, wait until every message is acked; count."""
    seed = int(os.environ.get("FNHOST_CHAOS_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    (tmp_path / "fn.yaml").write_text(
        MANIFEST.format(idempotency=idempotency, concurrency=CONCURRENCY, db=oracle.location)
    )
    (tmp_path / "effect.py").write_text(textwrap.dedent(effect))
    host = HostProcess(tmp_path / "fn.yaml", nats_server.url)
    kill_points = sorted(rng.sample(range(MESSAGES // 10, MESSAGES * 9 // 10), KILLS))
    restart_point = rng.randrange(MESSAGES // 5, MESSAGES * 4 // 5)
    print(f"\nF1 seed {seed} (replay with FNHOST_CHAOS_SEED={seed}): kills after {kill_points}")
    print(f"F1 effects, nats-server kill -9 and restart after {restart_point} effects")
    lives: list[Life] = []
    nats_in_life: set[int] = set()  # host.lives numbers (1-based) that saw the NATS restart
    host.start()
    _alive(host)
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        for n in range(MESSAGES):
            await js.publish_async(f"in.{n % 10}", json.dumps({"n": n}).encode())
        await js.publish_async_completed()
        events = sorted([(point, "kill") for point in kill_points] + [(restart_point, "nats")])
        for point, event in events:

            def reached(point: int = point) -> bool:
                _alive(host)
                return oracle.count("effects") >= point

            await wait_for(
                reached, timeout=DEADLINE, interval=0.01, message=f"{point} effects before {event}"
            )
            _alive(host)
            if event == "kill":
                duplicates = _duplicates(host)
                host.kill()
                assert host.returncode == -signal.SIGKILL, host.returncode
                killed = Life(host.pid, "killed", -signal.SIGKILL, host.lives in nats_in_life)
                killed.duplicates = duplicates
                info = await wait_for(
                    lambda: js.consumer_info("IN", "effect"),
                    timeout=DEADLINE,
                    interval=0.2,
                    message="consumer info after a kill",
                    ignore=(nats.errors.Error,),  # reconnecting after the server restart
                )
                killed.unacked_at_kill = info.num_ack_pending
                lives.append(killed)
                host.start()
                _alive(host)
            else:
                nats_in_life.add(host.lives)
                nats_server.kill()
                nats_server.start()

        async def drained() -> bool:
            _alive(host)
            try:
                info = await js.consumer_info("IN", "effect")
            except nats.errors.Error:
                return False  # still reconnecting after the server restart
            return bool(info.num_pending == 0 and info.num_ack_pending == 0)

        await wait_for(drained, timeout=DEADLINE, interval=0.2, message="every message acked")
        url = _http_url(host, "/readyz")
        await wait_for(lambda: _ready(url), timeout=30, interval=0.2, message="/readyz 200")
        dead = (await js.stream_info("DLQ")).state.messages
        duplicates = _duplicates(host)
        assert host.terminate() == 0
        lives.append(Life(host.pid, "drained", 0, host.lives in nats_in_life, duplicates))
        assert host.lives == len(lives)
        assert len({life.pid for life in lives}) == len(lives)  # pids tell the lives apart
        _per_life(oracle, lives)
        return Counts(
            oracle.count("effects"),
            oracle.count("executions"),
            oracle.count("redelivered"),
            oracle.count("repeats"),
            oracle.count("max_runs"),
            oracle.count("runs_above_1"),
            dead,
            lives,
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


def _report(label: str, counts: Counts) -> None:
    print(
        f"F1 {label}: {MESSAGES} messages, {counts.effects} effects, {counts.executions} "
        f"executions ({counts.redelivered} on a redelivery), {counts.repeats} repeats, "
        f"max runs of one effect {counts.max_runs}, {counts.dead_letters} dead letters, "
        f"{len(counts.lives)} host lives"
    )
    for n, life in enumerate(counts.lives, 1):
        nats_note = " + NATS restart" if life.nats_restart else ""
        print(
            f"  life {n} pid {life.pid} {life.end} ({life.returncode}){nats_note}: "
            f"{life.unacked_at_kill} unacked at the kill, {life.executions} executions "
            f"({life.redelivered} on a redelivery), {life.effects} first effects, "
            f"{life.repeats_run} repeats run here, {life.records_lost} records lost "
            f"(allowed {life.allowance}), {life.cut_short} keys cut short, "
            f"{life.duplicates} duplicates skipped"
        )


def _common(counts: Counts) -> None:
    assert counts.effects == MESSAGES  # 0 lost
    assert counts.dead_letters == 0
    assert counts.executions >= counts.effects + counts.repeats
    # Exactly the lives the test made: each kill hit a running host that died of the
    # SIGKILL (one that died by itself failed the run in _alive), the last one drained.
    assert len(counts.lives) == KILLS + 1
    assert [life.end for life in counts.lives] == ["killed"] * KILLS + ["drained"]
    assert all(life.returncode == -signal.SIGKILL for life in counts.lives[:-1])
    assert sum(life.nats_restart for life in counts.lives) == 1
    # Each kill cut deliveries short: the consumer still waited for acks just after it
    # (all redelivered since: every message acked, none lost). Usually the dead life's own
    # deliveries; for a life killed within ack_wait of its start, maybe its predecessor's.
    # How many executions the kills cut mid-handler ("keys cut short": run again in a
    # later life) is printed, not asserted: the handler is a small part of a delivery, and
    # a kill often lands in none of the 16 (measured: 0 in some lives, 1 to 6 in others).
    for n, life in enumerate(counts.lives[:-1], 1):
        assert life.unacked_at_kill is not None and life.unacked_at_kill >= 1, f"life {n}"
    assert counts.redelivered >= 1
    assert counts.lives[-1].cut_short == 0  # nothing runs after the last life


async def test_f1_sqlite_and_kv_store(nats_server: NatsServer, tmp_path: Path) -> None:
    oracle = SqliteOracle(tmp_path / "oracle.db")
    try:
        counts = await run_f1(nats_server, tmp_path, oracle, "{store: kv, ttl: 1h}", SQLITE_EFFECT)
    finally:
        oracle.close()
    _report("SQLite + kv store", counts)
    _common(counts)
    # An effect runs again only when the run before it lost its record: to its host's
    # kill or to the NATS restart (the kv record fails), at most once per invocation in
    # flight at each; never in a life that only drained.
    for n, life in enumerate(counts.lives, 1):
        assert life.records_lost <= life.allowance, f"life {n}: {life}"
    assert sum(life.records_lost for life in counts.lives) == counts.repeats


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
    # Not one effect committed twice: a second run's upsert (runs + 1) is in the same
    # transaction as the key's record, so only a run that really committed counts.
    assert counts.max_runs == 1
    assert counts.runs_above_1 == 0
    assert counts.repeats == 0  # the PostgreSQL effect never writes one
    # The risky moment was hit: a delivery whose effect and key committed lost its ack
    # and was skipped when it came again. Mostly the NATS restart (a transaction that
    # commits while nats-server is down loses its ack: 42 to 114 in six runs here),
    # sometimes a kill between the commit and the ack (0 to 12 a run, in the lives after
    # a kill): not guaranteed per kill, so only the sum is asserted. Each life's count
    # is read just before its end and printed.
    assert sum(life.duplicates or 0 for life in counts.lives) >= 1
