"""The handlers ``fn.yaml`` runs: the same work as ``raw_nats.py`` and ``faststream_app.py``.

Annotated with bare ``dict``, the plain JSON path of the host's codec, as a
handler author writes it.
"""

from __future__ import annotations

import uuid


async def create_order(order: dict) -> dict:
    return {"order_id": uuid.uuid4().hex, "status": "accepted", "total": order["total"]}


async def forward(event: dict) -> dict:
    """``consume`` plus one JetStream round trip: the host publishes the return value to
    ``output:`` and awaits its PubAck before the ack (``stores.py``'s ``round-trip`` row)."""
    return event


async def consume(event: dict) -> None:
    """Decoding the body into ``event`` is the whole job; the host acks on return."""
