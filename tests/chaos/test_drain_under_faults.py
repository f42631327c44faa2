"""SIGTERM during a batch, with crash faults on top: nothing unfinished is acked.

One host process runs a stream function with 8 concurrent handlers of random
length (seeded, 50 ms to 1.5 s) and a 1 s drain grace. It is sent SIGTERM
several times while handlers are running (the ones past the grace are cut
short) and, independently, dies at seeded random moments after a handler
finished and before its ack (the ``faults_outer`` fault point). Each time it
is started again, until every message is acked.

Evidence, per message and attempt: the handlers' journal (start / finish) and
every acknowledgement on the wire (a plain subscriber on the consumer's
``$JS.ACK`` subjects sees each ``+ACK`` with its stream sequence and delivery
count). Passes when every ``+ACK`` is for an attempt that finished, every
attempt that did not finish came back as a later attempt, every message
finished, and every SIGTERM ended in exit code 0. Bounded; prints its counts.
"""

from __future__ import annotations

import asyncio
import os
import random
import textwrap
from collections import Counter
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.aio.msg import Msg

from fnhost.triggers.stream import delivery_of
from fnhost_sdk.server import NatsServer
from fnhost_sdk.waiting import wait_for
from support.journal import JOURNAL_HELPER, Journal

from .harness import HostProcess

pytestmark = [pytest.mark.nats, pytest.mark.fault, pytest.mark.slow]

MESSAGES = 120
SIGTERMS = 3
DEADLINE = 120.0
"""Seconds any one phase may take (the whole test takes ~20-40 s here)."""
BUSY = (nats.errors.TimeoutError,)
"""A JetStream API call timing out on a loaded machine means "not yet", not a failure."""

MANIFEST = """\
version: 1
http: false
plugins: [plugins_for_tests.faults_outer]
streams:
  IN: {subjects: ["in.>"]}
functions:
  work:
    module: work.py
    trigger: {stream: IN, durable: work, ack_wait: 3s}
    retry: {max_deliver: 50, backoff: [100ms]}
    concurrency: 8
"""

WORK = JOURNAL_HELPER + textwrap.dedent(
    """\
    import asyncio
    import random


    async def handle(data: bytes, ctx) -> None:
        journal = os.environ["JOURNAL"]
        note(journal, "start", ctx.sequence, ctx.attempt, os.getpid())
        seed = int(os.environ["SEED"]) * 1_000_003 + ctx.sequence * 101 + ctx.attempt
        await asyncio.sleep(random.Random(seed).uniform(0.05, 1.5))
        note(journal, "finish", ctx.sequence, ctx.attempt, os.getpid())
    """
)


class WireAcks:
    """Every acknowledgement of consumer IN/work as the server receives it."""

    def __init__(self) -> None:
        self.acked: list[tuple[int, int]] = []  # (stream seq, delivery count)
        self.others: Counter[str] = Counter()

    async def on_ack(self, msg: Msg) -> None:
        body = msg.data.decode() or "+ACK"
        if body == "+ACK":
            attempt, seq, _ = delivery_of(msg.subject)
            self.acked.append((seq, attempt))
        elif body != "+WPI":
            self.others[body.split()[0]] += 1


async def test_sigterm_mid_batch_under_faults_acks_only_what_finished(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    seed = int(os.environ.get("FNHOST_CHAOS_SEED") or random.randrange(2**31))
    print(f"\ndrain chaos: seed {seed} (replay with FNHOST_CHAOS_SEED={seed})")
    (tmp_path / "fn.yaml").write_text(MANIFEST)
    (tmp_path / "work.py").write_text(WORK)
    journal = Journal(tmp_path / "journal.txt")
    host = HostProcess(
        tmp_path / "fn.yaml",
        nats_server.url,
        grace=1.0,
        env={
            "JOURNAL": str(journal.path),
            "SEED": str(seed),
            "FNHOST_FAULT": f"0.02:{seed}",
            "FNHOST_FAULT_AFTER": "5",
        },
    )
    wire = WireAcks()
    nc = await nats.connect(nats_server.url)
    sigterm_exits: list[int] = []
    fault_deaths = 0
    try:
        await nc.subscribe("$JS.ACK.IN.work.>", cb=wire.on_ack)
        await nc.flush()
        host.start()
        js = nc.jetstream()
        for n in range(MESSAGES):
            await js.publish(f"in.{n}", b"x")

        def restart_if_dead() -> None:
            nonlocal fault_deaths
            if not host.alive:
                assert host.returncode == 137, host.log()[-3000:]
                fault_deaths += 1
                host.start(wait_ready=False)

        for _ in range(SIGTERMS):

            def mid_batch() -> bool:
                restart_if_dead()
                life = [e for e in journal.entries() if e.pid == host.pid]
                running = sum(e.event == "start" for e in life) - sum(
                    e.event == "finish" for e in life
                )
                return len(life) >= 6 and running >= 3

            await wait_for(mid_batch, timeout=DEADLINE, interval=0.05, message="mid-batch")
            code = await asyncio.to_thread(host.terminate, 60.0)
            if code == 137:  # the fault point won the race with the SIGTERM
                fault_deaths += 1
            else:
                sigterm_exits.append(code)
            host.start(wait_ready=False)

        async def all_acked() -> bool:
            restart_if_dead()
            info = await js.consumer_info("IN", "work")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_for(
            all_acked, timeout=DEADLINE, interval=0.2, message="every message acked", ignore=BUSY
        )
        await nc.flush()
        sigterm_exits.append(await asyncio.to_thread(host.terminate, 60.0))
    finally:
        host.close()
        await nc.close()

    entries = journal.entries()
    started = {(int(e.item), e.attempt) for e in entries if e.event == "start"}
    finished = {(int(e.item), e.attempt) for e in entries if e.event == "finish"}
    unfinished = started - finished
    last_attempt: dict[int, int] = {}
    for seq, attempt in started:
        last_attempt[seq] = max(attempt, last_attempt.get(seq, 0))
    acked = set(wire.acked)
    repeats_after_finish = sum(
        1 for seq, attempt in finished if any(a > attempt for s, a in started if s == seq)
    )
    cut_by_drain = host.log().count("still running after the 1s grace period")
    print(
        f"drain chaos: {MESSAGES} messages, {len(started)} attempts, {len(finished)} finished, "
        f"{len(unfinished)} cut short (drains reporting a cut: {cut_by_drain}), "
        f"{len(wire.acked)} acks on the wire, {SIGTERMS} SIGTERMs mid-batch "
        f"(exit codes {sigterm_exits}), {fault_deaths} fault deaths, "
        f"{repeats_after_finish} finished attempts run again (ack lost to a death)"
    )
    assert acked <= finished, f"acked but never finished: {sorted(acked - finished)}"
    assert all(last_attempt[seq] > attempt for seq, attempt in unfinished), (
        "an attempt cut short never came back (was it acked?)"
    )
    assert {seq for seq, _ in finished} == set(range(1, MESSAGES + 1)), "a message was lost"
    assert {seq for seq, _ in acked} == set(range(1, MESSAGES + 1))
    assert sigterm_exits == [0] * len(sigterm_exits)
    assert not wire.others, f"no nak or term expected: {dict(wire.others)}"
    assert unfinished, "no SIGTERM or fault cut a handler short: the test proved nothing"
