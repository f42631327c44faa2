"""create-order: validate an order, publish ``orders.created.v1``, answer with its id."""

from __future__ import annotations

import uuid

from fnhost_sdk import Context
from functions.contracts import CreateOrder, OrderCreated


async def create_order(order: CreateOrder, ctx: Context) -> dict[str, str]:
    order_id = uuid.uuid4().hex
    created = OrderCreated(order_id=order_id, **order.model_dump())
    # The order id as message id: a retried publish is stored once (duplicate window).
    await ctx.publish("orders.created.v1", created, message_id=f"order:{order_id}")
    ctx.log.info("order %s accepted for %s (%.2f)", order_id, order.customer_id, order.total)
    return {"order_id": order_id, "status": "accepted"}
