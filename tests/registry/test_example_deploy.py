"""``fnhost deploy functions/payment.py``, the command docs/deploy.md starts with, on the
repository's example itself.

A host whose project holds only fn.yaml (streams and the registry, no code) gets the
example's payment function from a copy of the example through the real CLI, then
charges an order published to ORDERS into the ledger and publishes its
``payments.completed.v1``. The example module must survive the artifact's pickle
round trip (an earlier payment.py held a module-level ``threading.local``, which
cloudpickle cannot pickle, so this command failed on it).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import nats
import pytest

from chaos.harness import HostProcess
from fnhost_sdk.server import NatsServer
from fnhost_sdk.testing import wait_for

from .conftest import SigningKey, registry_manifest

pytestmark = [pytest.mark.nats, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]

STREAMS = """
streams:
  ORDERS: {subjects: ["orders.created.>"], duplicate_window: 5m}
  PAYMENTS: {subjects: ["payments.>"], duplicate_window: 5m}
  DLQ: {subjects: ["dlq.>"]}
"""


def _charges(ledger: Path) -> list[tuple[str, float]]:
    if not ledger.exists():
        return []
    with sqlite3.connect(ledger) as db:
        return db.execute("SELECT order_id, amount FROM charges").fetchall()


async def test_the_example_payment_is_deployed_to_a_host_and_charges_an_order(
    nats_server: NatsServer, tmp_path: Path, signing_key: SigningKey
) -> None:
    manifest = registry_manifest([signing_key.public], extra=STREAMS)
    dev, hosts_dir = tmp_path / "example", tmp_path / "host"
    hosts_dir.mkdir()
    (hosts_dir / "fn.yaml").write_text(manifest)
    dev.mkdir()
    example = (REPO / "fn.yaml").read_text()
    registry = f"registry: {{enabled: true, trusted_keys: [{signing_key.public}]}}\n"
    (dev / "fn.yaml").write_text(example + registry)
    shutil.copytree(
        REPO / "functions", dev / "functions", ignore=shutil.ignore_patterns("__pycache__")
    )
    ledger = tmp_path / "ledger.db"
    host = HostProcess(hosts_dir / "fn.yaml", nats_server.url)
    nc = await nats.connect(nats_server.url)
    try:
        host.start()
        command = [sys.executable, "-m", "fnhost", "deploy", "functions/payment.py"]
        command += ["--nats", nats_server.url, "--sign-key", str(signing_key.path)]
        deploy = await asyncio.to_thread(
            subprocess.run,
            command,
            cwd=dev,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "FNHOST_LEDGER": str(ledger)},
        )
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        assert "running" in deploy.stdout, deploy.stdout

        js = nc.jetstream()
        order = {"order_id": "o-1", "customer_id": "c-1", "total": 42.5, "items": []}
        await js.publish("orders.created.v1", json.dumps(order).encode())

        await wait_for(lambda: _charges(ledger) == [("o-1", 42.5)], timeout=30, message="charge")
        completed = await js.get_last_msg("PAYMENTS", "payments.completed.v1")
        assert json.loads(completed.data or b"{}")["order_id"] == "o-1"
        assert "payment charged order o-1: 42.50" in host.log()
    except BaseException:
        host.print_tail()
        raise
    finally:
        await nc.close()
        if host.alive:
            assert host.terminate() == 0
        host.close()
