"""F2: the host dies after its output's PubAck and before the input's ack.

The redelivered input re-publishes its output with the same derived message id
(``relay:<stream>:<seq>:<stored_at_ns>/0``), the stream's duplicate window drops
it, and the next stream holds every output exactly once.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import nats
import pytest

from fnhost_sdk.server import NatsServer
from fnhost_sdk.waiting import wait_for

from .harness import HostProcess

pytestmark = [pytest.mark.nats, pytest.mark.fault, pytest.mark.slow]

INPUTS = 300

MANIFEST = """\
version: 1
http: false
plugins: [plugins_for_tests.faults_inner]
streams:
  IN: {subjects: ["in.>"], duplicate_window: 5m}
  OUT: {subjects: ["out.>"], duplicate_window: 5m}
functions:
  relay:
    module: relay.py
    trigger: {stream: IN, durable: relay, ack_wait: 2s}
    timeout: 1s
    concurrency: 8
"""

RELAY = """\
import os
from fnhost_sdk import Context


async def handle(event: dict, ctx: Context) -> None:
    ack = await ctx.publish(f"out.{event['n']}", event)
    if ack is not None and ack.duplicate:
        with open(os.environ["DUPLICATES_FILE"], "a") as seen:
            seen.write(f"{event['n']}\\n")
"""


async def test_outputs_are_stored_once_across_crashes(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    (tmp_path / "fn.yaml").write_text(MANIFEST)
    (tmp_path / "relay.py").write_text(textwrap.dedent(RELAY))
    duplicates = tmp_path / "duplicates.txt"
    host = HostProcess(
        tmp_path / "fn.yaml",
        nats_server.url,
        env={
            "FNHOST_FAULT": "0.03:20261125",
            "FNHOST_FAULT_AFTER": "5",
            "DUPLICATES_FILE": str(duplicates),
        },
    )
    nc = await nats.connect(nats_server.url)
    try:
        host.start()
        js = nc.jetstream()
        for n in range(INPUTS):
            await js.publish(f"in.{n}", json.dumps({"n": n}).encode())

        async def drained() -> bool:
            if not host.alive:
                host.start(wait_ready=False)
            info = await js.consumer_info("IN", "relay")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_for(drained, timeout=240, interval=0.2, message="every input acked")
        host.terminate()
        out = await js.stream_info("OUT")
        stored = sorted(
            [
                json.loads((await js.get_msg("OUT", seq)).data)["n"]
                for seq in range(out.state.first_seq, out.state.last_seq + 1)
            ]
        )
        deaths = host.log().count("dying after")
        repeated = duplicates.read_text().split() if duplicates.exists() else []
        print(f"F2: {INPUTS} inputs, {deaths} crashes, {len(repeated)} duplicate publishes dropped")
        assert stored == list(range(INPUTS))
        assert deaths >= 1
        assert len(repeated) >= 1
    finally:
        host.close()
        await nc.close()
