"""inventory: reserve stock for each paid order in the ``inventory`` KV bucket.

Each SKU of an order is one entry, ``reservations.<order_id>.<sku>``, holding
the quantity reserved, written with ``create`` (only if it does not exist). So
a payment delivered again (a retry, a redelivery after a crash) reserves
nothing twice, and orders never contend for one SKU's entry: the stock a SKU
has reserved is the sum over ``reservations.*.<sku>``.
"""

from __future__ import annotations

from collections import Counter

import nats.js.errors

from fnhost_sdk import Context
from functions.contracts import PaymentCompleted


async def handle(payment: PaymentCompleted, ctx: Context) -> None:
    kv = await ctx.kv("inventory")
    quantities: Counter[str] = Counter()
    for item in payment.items:
        quantities[item.sku] += item.qty
    reserved = 0
    for sku, qty in quantities.items():
        try:
            await kv.create(f"reservations.{payment.order_id}.{sku}", str(qty).encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            continue  # an earlier delivery of this payment reserved it
        reserved += 1
    ctx.log.info(
        "inventory reserved %d of %d SKUs for order %s",
        reserved,
        len(quantities),
        payment.order_id,
    )
