"""The order system's message contracts, versioned by subject (``*.v1``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class LineItem(BaseModel):
    # Letters, digits, - and _: a SKU is part of a KV key (functions/inventory.py).
    sku: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    qty: int = Field(gt=0)
    price: float = Field(ge=0)


class CreateOrder(BaseModel):
    """The request body of ``create-order`` (subject ``orders.create``)."""

    customer_id: str = Field(min_length=1)
    total: float = Field(gt=0)
    items: list[LineItem] = []


class OrderCreated(BaseModel):
    """Published on ``orders.created.v1`` once an order is accepted."""

    order_id: str
    customer_id: str
    total: float
    items: list[LineItem] = []


class PaymentCompleted(BaseModel):
    """Published on ``payments.completed.v1`` once an order is charged."""

    order_id: str
    customer_id: str
    amount: float
    items: list[LineItem] = []
