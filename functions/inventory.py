"""inventory: reserve stock for each paid order in the ``inventory`` KV bucket.

Each SKU's reserved count is updated with optimistic concurrency (the KV
revision), so hosts running this function side by side never lose an update.
"""

from __future__ import annotations

import nats.js.errors

from fnhost_sdk import Context, Retry
from functions.contracts import PaymentCompleted


async def handle(payment: PaymentCompleted, ctx: Context) -> None:
    kv = await ctx.kv("inventory")
    for item in payment.items:
        key = f"reserved.{item.sku}"
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            await kv.create(key, str(item.qty).encode())
            continue
        try:
            await kv.update(key, str(int(entry.value or b"0") + item.qty).encode(), entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            raise Retry(delay=0.05, reason=f"concurrent reservation of {item.sku}") from None
    ctx.log.info("inventory reserved %d lines for order %s", len(payment.items), payment.order_id)
