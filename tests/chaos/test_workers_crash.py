"""F1 under ``fnhost run --workers 2``: workers ``kill -9``'d mid-stream are replaced
and nothing is lost.

The oracle is F1's (``test_crash_recovery``): an insert under a unique
constraint into SQLite plus an ``attempts`` row per execution, with the ``kv``
idempotency store. The effect also notes which worker pid started each
execution, and every ``SLOW_EVERY``-th key sleeps before its insert. The
supervisor runs two workers on the one durable consumer; each is killed once,
after a seeded random number of effects, at the moment it is inside a slow
execution, so every kill is sure to cut one short (a kill timed by counts alone
can land when all of a worker's invocations are past their effect, and then
nothing is redelivered). The supervisor must start each again; every message's
effect must exist, each cut key must run again on a redelivery, effects that ran
twice stay within what the kills can cause (one per invocation in flight in the
killed worker), and the supervisor's ``/readyz`` and ``/metrics`` must show both
workers back, with ``fnhost_worker_restarts_total`` 2. Bounded and printing its
counts and seed.
"""

from __future__ import annotations

import os
import random
import signal
import textwrap
from pathlib import Path

import nats
import nats.errors
import pytest

from fnhost_sdk.server import NatsServer
from fnhost_sdk.waiting import wait_for, wait_for_sync
from support.supervised import Supervised, alive

from .test_crash_recovery import DEADLINE, MANIFEST, SQLITE_EFFECT, SqliteOracle

pytestmark = [pytest.mark.nats, pytest.mark.fault, pytest.mark.slow]

MESSAGES = 4_000
CONCURRENCY = 16
SLOW_EVERY = 50
SLOW_SECONDS = 1.5
"""How long a slow execution sleeps: well inside the 2 s timeout, ages for the test to kill."""

SLOW_EXECUTION = f"""\
    if event["n"] % {SLOW_EVERY} == 0:
        import time

        db.execute("INSERT INTO slow (key, pid) VALUES (?, ?)", (key, pid))
        time.sleep({SLOW_SECONDS})
"""
BEFORE_EFFECT = '    db.execute("BEGIN IMMEDIATE")\n'
assert SQLITE_EFFECT.count(BEFORE_EFFECT) == 1
WORKER_EFFECT = SQLITE_EFFECT.replace(BEFORE_EFFECT, SLOW_EXECUTION + BEFORE_EFFECT)
"""F1's effect, with every ``SLOW_EVERY``-th key noting its worker pid and sleeping first."""


def _slow_key_in_progress(oracle: SqliteOracle, pid: int) -> str | None:
    row = oracle.db.execute(
        "SELECT key FROM slow WHERE pid = ? AND key NOT IN (SELECT key FROM effects)", (pid,)
    ).fetchone()
    return None if row is None else str(row[0])


def _highest_attempt(oracle: SqliteOracle, key: str) -> int:
    return int(
        oracle.db.execute("SELECT MAX(attempt) FROM attempts WHERE key = ?", (key,)).fetchone()[0]
    )


async def test_workers_killed_mid_stream_are_replaced_and_nothing_is_lost(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    oracle = SqliteOracle(tmp_path / "oracle.db")
    oracle.db.execute("CREATE TABLE slow (key TEXT NOT NULL, pid INTEGER NOT NULL)")
    (tmp_path / "fn.yaml").write_text(
        MANIFEST.format(
            idempotency="{store: kv, ttl: 1h}", concurrency=CONCURRENCY, db=oracle.location
        )
    )
    (tmp_path / "effect.py").write_text(textwrap.dedent(WORKER_EFFECT))
    kill_points = sorted(rng.sample(range(MESSAGES // 10, MESSAGES * 7 // 10), 2))
    print(
        f"\nworkers F1 seed {seed}: worker 1 killed after {kill_points[0]} effects, "
        f"worker 2 after {kill_points[1]}"
    )
    supervised = Supervised(tmp_path, "--nats", nats_server.url, "--workers", "2")
    pids: list[int] = []
    cut_keys: list[str] = []
    nc = await nats.connect(nats_server.url)
    try:
        wait_for_sync(supervised.ready, timeout=30, message="both workers ready")
        pids = [worker["pid"] for worker in supervised.workers()]
        js = nc.jetstream()
        for n in range(MESSAGES):
            await js.publish_async(f"in.{n % 10}", f'{{"n": {n}}}'.encode())
        await js.publish_async_completed()
        for index, point in enumerate(kill_points, start=1):
            await wait_for(
                lambda point=point: oracle.count("effects") >= point,
                timeout=DEADLINE,
                interval=0.01,
                message=f"{point} effects before killing worker {index}",
            )
            killed = supervised.pid_of(index)
            cut = await wait_for(
                lambda killed=killed: _slow_key_in_progress(oracle, killed),
                timeout=DEADLINE,
                interval=0.01,
                message=f"worker {index} inside a slow execution",
            )
            os.kill(killed, signal.SIGKILL)
            cut_keys.append(cut)
            wait_for_sync(
                lambda index=index, killed=killed: supervised.pid_of(index) != killed,
                timeout=30,
                message=f"worker {index} started again",
            )
            pids.append(supervised.pid_of(index))

        async def drained() -> bool:
            try:
                info = await js.consumer_info("IN", "effect")
            except nats.errors.Error:
                return False
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_for(drained, timeout=DEADLINE, interval=0.2, message="every message acked")
        wait_for_sync(supervised.ready, timeout=30, message="/readyz 200 again")
        effects, repeats = oracle.count("effects"), oracle.count("repeats")
        executions, redelivered = oracle.count("executions"), oracle.count("redelivered")
        dead = (await js.stream_info("DLQ")).state.messages
        restarts = supervised.metric("fnhost_worker_restarts_total")
        bound = 2 * CONCURRENCY
        print(
            f"workers F1: {MESSAGES} messages, {effects} effects, {executions} executions "
            f"({redelivered} on a redelivery), {repeats} effects run twice (bound {bound}), "
            f"{dead} dead letters, {restarts:.0f} worker restarts; keys cut short {cut_keys}"
        )
        assert effects == MESSAGES  # 0 lost
        assert repeats <= bound
        assert dead == 0
        assert all(_highest_attempt(oracle, key) > 1 for key in cut_keys)
        assert redelivered >= len(cut_keys)
        assert restarts == 2
        assert supervised.stop() == 0
        assert not any(alive(pid) for pid in pids)
    except BaseException:
        print(supervised.log()[-6000:])
        raise
    finally:
        supervised.close(pids)
        oracle.close()
        await nc.close()
