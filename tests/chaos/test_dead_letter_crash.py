"""F3b under chaos: a host ``kill -9``'d during a message's last attempt loses nothing.

Two host processes share one durable consumer (and so one advisory watcher
consumer). Every *killer* message fails its first attempts with an exception
(nak with back-off) and kills whichever host runs its last attempt, so the
trigger never gets to dead-letter it: only JetStream's max-deliveries
advisory, copied by the surviving (or restarted) host, can bring it to the
dead-letter stream. Good messages flow between the killers.

Then every stored advisory is replayed to both hosts at once (the watcher
consumer is deleted, both hosts re-create it and start from the first
advisory): the copies' message id (``dlq:<stream>:<seq>:<stored_at_us>``) keeps the
dead-letter stream at one copy per killer.

Passes when: each killer was attempted exactly ``max_deliver`` times and is in
the dead-letter stream exactly once, with its body and headers and
``Fnhost-Attempts`` = ``max_deliver``; every good message was handled; each
host death is a killer's last attempt. Bounded; prints its counts.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.js import JetStreamContext

from fnhost import dlq
from fnhost_sdk.server import NatsServer
from fnhost_sdk.waiting import wait_for
from support import dead_letter_id_of

from .harness import HostProcess

pytestmark = [pytest.mark.nats, pytest.mark.fault, pytest.mark.slow]

KILLERS = 4
GOOD = 40
MAX_DELIVER = 3
DEADLINE = 120.0
"""Seconds any one phase may take (an advisory caught by a dying host waits out its
60 s ack wait before the other host gets it)."""
BUSY = (nats.errors.TimeoutError,)
"""A JetStream API call timing out on a loaded machine means "not yet", not a failure."""

MANIFEST = f"""\
version: 1
http: false
streams:
  IN: {{subjects: ["in.>"], duplicate_window: 10m}}
  DLQ: {{subjects: ["dlq.>"], duplicate_window: 10m}}
functions:
  work:
    module: work.py
    trigger: {{stream: IN, durable: work, ack_wait: 1s}}
    retry: {{max_deliver: {MAX_DELIVER}, backoff: [100ms]}}
    timeout: 900ms
    concurrency: 1
    dead_letter: dlq.work
"""

# concurrency 1: a host holds one message at a time, so a death takes only the killer
# with it (a good message fetched beside it would also die max_deliver times).
WORK = f"""\
import os

JOURNAL = os.environ["JOURNAL"]


async def handle(event: dict, ctx) -> None:
    with open(JOURNAL, "a") as journal:
        journal.write(f"{{event['kind']}} {{event['n']}} {{ctx.attempt}} {{os.getpid()}}\\n")
    if event["kind"] == "killer":
        if ctx.attempt >= {MAX_DELIVER}:
            os._exit(137)
        raise ValueError("not yet")
"""


def journal_entries(path: Path) -> list[tuple[str, int, int, int]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        kind, n, attempt, pid = line.split()
        entries.append((kind, int(n), int(attempt), int(pid)))
    return entries


async def dead_letters(js: JetStreamContext) -> list[tuple[bytes, dict[str, str]]]:
    try:
        state = (await js.stream_info("DLQ")).state
    except nats.js.errors.NotFoundError:
        return []
    found = []
    if not state.messages:
        return found
    for seq in range(state.first_seq, state.last_seq + 1):
        msg = await js.get_msg("DLQ", seq)
        found.append((msg.data or b"", dict(msg.headers or {})))
    return found


async def test_a_host_killed_on_the_last_attempt_dead_letters_via_the_advisory_once(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    (tmp_path / "fn.yaml").write_text(MANIFEST)
    (tmp_path / "work.py").write_text(textwrap.dedent(WORK))
    journal = tmp_path / "journal.txt"
    hosts = [
        HostProcess(tmp_path / "fn.yaml", nats_server.url, env={"JOURNAL": str(journal)}, name=n)
        for n in ("a", "b")
    ]
    nc = await nats.connect(nats_server.url)
    try:
        for host in hosts:
            host.start()
        js = nc.jetstream()
        sent: dict[int, bytes] = {}
        n = 0
        exits: list[int] = []
        for k in range(KILLERS):
            ack = await js.publish(
                "in.killer",
                json.dumps({"kind": "killer", "n": k}).encode(),
                headers={"X-Order": f"k{k}", "Nats-Msg-Id": f"killer-{k}"},
            )
            sent[ack.seq] = json.dumps({"kind": "killer", "n": k}).encode()
            for _ in range(GOOD // KILLERS):
                await js.publish("in.good", json.dumps({"kind": "good", "n": n}).encode())
                n += 1

        async def all_settled() -> bool:
            for host in hosts:
                if not host.alive:
                    exits.append(host.returncode or 0)
                    host.start(wait_ready=False)
            info = await js.consumer_info("IN", "work")
            copies = await dead_letters(js)
            return info.num_pending == 0 and info.num_ack_pending == 0 and len(copies) >= KILLERS

        await wait_for(
            all_settled, timeout=DEADLINE, interval=0.2, message="all settled", ignore=BUSY
        )
        watcher = dlq.watcher_consumer_name("IN", "work")

        async def advisories_handled() -> bool:
            info = await js.consumer_info(dlq.ADVISORY_STREAM, watcher)
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_for(
            advisories_handled, timeout=DEADLINE, message="advisories acked", ignore=BUSY
        )
        first_pass = await dead_letters(js)

        # Every stored advisory again, to both hosts at once.
        advisories = (await js.stream_info(dlq.ADVISORY_STREAM)).state.messages
        await js.delete_consumer(dlq.ADVISORY_STREAM, watcher)

        async def replayed() -> bool:
            try:
                info = await js.consumer_info(dlq.ADVISORY_STREAM, watcher)
            except nats.js.errors.NotFoundError:
                return False
            return (
                info.ack_floor.consumer_seq >= advisories
                and info.num_pending == 0
                and info.num_ack_pending == 0
            )

        await wait_for(
            replayed, timeout=DEADLINE, interval=0.2, message="advisories replayed", ignore=BUSY
        )
        copies = await dead_letters(js)
        expected_ids = {seq: await dead_letter_id_of(nc, "IN", seq) for seq in sent}
        for host in hosts:
            exits.append(host.terminate())
    finally:
        for host in hosts:
            host.close()
        await nc.close()

    entries = journal_entries(journal)
    killer_attempts = Counter(n for kind, n, _, _ in entries if kind == "killer")
    good_seen = {n for kind, n, _, _ in entries if kind == "good"}
    deaths = exits.count(137)
    last_attempts = [(n, pid) for kind, n, attempt, pid in entries if attempt == MAX_DELIVER]
    killed_by = Counter(pid for _, pid in last_attempts)
    dropped = sum(host.log().count("was already dead-lettered") for host in hosts)
    by_advisory = sum(h["Fnhost-Error"].startswith("MaxDeliveries:") for _, h in copies)
    print(
        f"F3b chaos: {KILLERS} killers, {len(good_seen)}/{GOOD} good handled, "
        f"{deaths} host deaths, {sum(killer_attempts.values())} killer attempts, "
        f"{advisories} advisories (replayed to 2 hosts), {len(first_pass)} copies before "
        f"and {len(copies)} after the replay ({dropped} duplicate copies dropped), "
        f"{by_advisory} via the advisory path"
    )
    assert killer_attempts == dict.fromkeys(range(KILLERS), MAX_DELIVER)
    assert good_seen == set(range(GOOD))
    assert deaths == KILLERS, "one death per killer, on its last attempt"
    assert sorted(set(exits)) == [0, 137], "every other life ended in a clean drain"
    assert len(killed_by) == KILLERS and set(killed_by.values()) == {1}
    assert advisories == KILLERS
    assert len(first_pass) == len(copies) == KILLERS, "one copy per killer, replay or not"
    assert by_advisory == KILLERS
    assert dropped >= KILLERS, "the replayed advisories were handled, and their copies dropped"
    by_seq = {int(h["Fnhost-Stream-Seq"]): (data, h) for data, h in copies}
    assert sorted(by_seq) == sorted(sent)
    for seq, (data, headers) in by_seq.items():
        assert data == sent[seq]
        k = json.loads(data)["n"]
        assert headers["X-Order"] == f"k{k}"
        assert headers["Fnhost-Original-Msg-Id"] == f"killer-{k}"
        assert headers["Nats-Msg-Id"] == expected_ids[seq]
        assert headers["Fnhost-Original-Subject"] == "in.killer"
        assert headers["Fnhost-Function"] == "work"
        assert headers["Fnhost-Stream"] == "IN"
        assert headers["Fnhost-Attempts"] == str(MAX_DELIVER)
