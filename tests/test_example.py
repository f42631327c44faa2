"""The example order system, the way the README runs it: ``fnhost dev`` in a copy of
the repository's ``fn.yaml`` + ``functions/``, then ``fnhost invoke create-order``.

The order id in the reply must reach the payment function (its log line and
its ledger) through the ORDERS stream. Port 4222 may be taken on this machine:
the embedded server then takes another port, and ``invoke`` finds it.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from fnhost_sdk.testing import assert_no_stray_servers
from fnhost_sdk.waiting import wait_for_sync
from support.cli import DevServer, fnhost

pytestmark = [pytest.mark.nats, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
HTTP_LINE = "http: {host: 127.0.0.1, port: 8080}"


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, DevServer]]:
    """A running ``fnhost dev`` on a copy of the example; stopped (and checked) at the end."""
    for name in ("NATS_URL", "FNHOST_LEDGER", "FNHOST_THROTTLE_RATE"):
        monkeypatch.delenv(name, raising=False)  # the manifest's defaults, as a new user has
    project = tmp_path / "example"
    project.mkdir()
    manifest = (REPO / "fn.yaml").read_text()
    assert HTTP_LINE in manifest, "the example's http line changed; update this test"
    # Port 8080 may be busy here; the status page is not what this test is about.
    (project / "fn.yaml").write_text(
        manifest.replace(HTTP_LINE, "http: {host: 127.0.0.1, port: 0}")
    )
    shutil.copytree(
        REPO / "functions", project / "functions", ignore=shutil.ignore_patterns("__pycache__")
    )
    dev = DevServer(project)
    try:
        dev.wait_ready()
        yield project, dev
    finally:
        code = dev.stop()
    assert code == 0, dev.log()
    assert "Traceback" not in dev.log(), dev.log()
    assert not (project / ".fnhost" / "nats.url").exists()
    assert_no_stray_servers([], project)


def test_create_order_is_answered_and_charged_by_payment(
    example: tuple[Path, DevServer],
) -> None:
    project, dev = example
    assert "host ready: 3 of 3 functions running" in dev.log(), dev.log()

    result = fnhost("invoke", "create-order", '{"customer_id":"c1","total":99.95}', cwd=project)
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    order_id = reply["order_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", order_id), reply
    assert reply["status"] == "accepted"

    wait_for_sync(
        lambda: re.search(rf"\[payment\] payment charged order {order_id}: 99\.95", dev.log()),
        timeout=60,
        message="the payment function's log line for the order",
    )
    with sqlite3.connect(project / ".fnhost" / "ledger.db") as db:
        rows = db.execute("SELECT customer_id, amount FROM charges WHERE order_id = ?", (order_id,))
        assert rows.fetchall() == [("c1", 99.95)]
    wait_for_sync(
        lambda: f"inventory reserved 0 of 0 SKUs for order {order_id}" in dev.log(),
        timeout=60,
        message="inventory saw the completed payment",
    )

    bad = fnhost("invoke", "create-order", '{"customer_id": "c1"}', cwd=project)
    assert bad.returncode == 1, bad.stdout
    assert "400" in bad.stderr and "total" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


async def test_inventory_reserves_each_sku_of_an_order_once_however_often_it_is_paid(
    example: tuple[Path, DevServer],
) -> None:
    project, dev = example
    order = {
        "customer_id": "c3",
        "total": 25.0,
        "items": [
            {"sku": "A1", "qty": 2, "price": 5.0},
            {"sku": "B2", "qty": 1, "price": 10.0},
            {"sku": "A1", "qty": 1, "price": 5.0},
        ],
    }
    result = fnhost("invoke", "create-order", json.dumps(order), cwd=project)
    assert result.returncode == 0, result.stderr
    order_id = json.loads(result.stdout)["order_id"]
    wait_for_sync(
        lambda: f"inventory reserved 2 of 2 SKUs for order {order_id}" in dev.log(),
        timeout=60,
        message="inventory reserved the order's SKUs",
    )

    # The same payment again, as a redelivery after a crash brings it (another
    # message id, so the stream stores it again).
    payment = {**order, "order_id": order_id, "amount": 25.0}
    again = fnhost(
        "publish", "payments.completed.v1", json.dumps(payment), "--id", "again", cwd=project
    )
    assert again.returncode == 0, again.stderr
    wait_for_sync(
        lambda: f"inventory reserved 0 of 2 SKUs for order {order_id}" in dev.log(),
        timeout=60,
        message="inventory saw the payment again",
    )

    nc = await nats.connect((project / ".fnhost" / "nats.url").read_text().strip())
    try:
        kv = await nc.jetstream().key_value("inventory")
        reserved = {key: (await kv.get(key)).value for key in await kv.keys()}
    finally:
        await nc.close()
    assert reserved == {
        f"reservations.{order_id}.A1": b"3",
        f"reservations.{order_id}.B2": b"1",
    }

    bad_sku = {**order, "items": [{"sku": "A 1", "qty": 1, "price": 5.0}]}
    refused = fnhost("invoke", "create-order", json.dumps(bad_sku), cwd=project)
    assert refused.returncode == 1, refused.stdout
    assert "400" in refused.stderr and "sku" in refused.stderr, refused.stderr
