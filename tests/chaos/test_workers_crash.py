"""F1 under ``fnhost run --workers 2``: workers ``kill -9``'d mid-stream are replaced
and nothing is lost.

The function and its oracle are F1's (``test_crash_recovery``): an insert under a
unique constraint into SQLite plus an ``attempts`` row per execution, with the
``kv`` idempotency store. The supervisor runs two workers on the one durable
consumer; each is killed once at a seeded random moment (a number of effects
reached) while 4,000 messages flow. The supervisor must start each again; every
message's effect must exist, effects that ran twice stay within what the kills
can cause (one per invocation in flight in the killed worker), and the
supervisor's ``/readyz`` and ``/metrics`` must show both workers back, with
``fnhost_worker_restarts_total`` 2. Bounded and printing its counts and seed.
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


async def test_workers_killed_mid_stream_are_replaced_and_nothing_is_lost(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    oracle = SqliteOracle(tmp_path / "oracle.db")
    (tmp_path / "fn.yaml").write_text(
        MANIFEST.format(
            idempotency="{store: kv, ttl: 1h}", concurrency=CONCURRENCY, db=oracle.location
        )
    )
    (tmp_path / "effect.py").write_text(textwrap.dedent(SQLITE_EFFECT))
    kill_points = sorted(rng.sample(range(MESSAGES // 10, MESSAGES * 9 // 10), 2))
    print(
        f"\nworkers F1 seed {seed}: worker 1 killed after {kill_points[0]} effects, "
        f"worker 2 after {kill_points[1]}"
    )
    supervised = Supervised(tmp_path, "--nats", nats_server.url, "--workers", "2")
    pids: list[int] = []
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
            os.kill(killed, signal.SIGKILL)
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
            f"{dead} dead letters, {restarts:.0f} worker restarts"
        )
        assert effects == MESSAGES  # 0 lost
        assert repeats <= bound
        assert dead == 0
        assert redelivered >= 1  # the kills really cut invocations short
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
