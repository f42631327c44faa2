"""fnhost.provision: what the manifest declares exists on the server after start, every time."""

from __future__ import annotations

import pytest
from nats.aio.client import Client as NatsClient

pytestmark = pytest.mark.nats

MANIFEST = """\
version: 1
http: false
streams:
  ORDERS: {subjects: ["orders.>"]}
kv:
  inventory: {history: 3}
object_stores:
  invoices: {}
functions:
  store:
    module: fn.py
    trigger: {request: invoices.store}
"""

STORE = """\
async def handle(data: bytes, ctx) -> str:
    store = await ctx.object_store("invoices")
    info = await store.put("invoice-1", data)
    return info.name
"""


async def test_declared_streams_buckets_and_object_stores_exist_and_are_usable(
    host_factory, nc: NatsClient
) -> None:
    await host_factory(MANIFEST, {"fn.py": STORE})
    # A second host on the same server provisions again without complaint.
    await host_factory(MANIFEST, {"fn.py": STORE})

    js = nc.jetstream()
    assert (await js.stream_info("ORDERS")).config.subjects == ["orders.>"]
    assert (await (await js.key_value("inventory")).status()).history == 3

    reply = await nc.request("invoices.store", b"PDF bytes", timeout=10)
    assert reply.data == b"invoice-1"
    stored = await (await js.object_store("invoices")).get("invoice-1")
    assert stored.data == b"PDF bytes"
