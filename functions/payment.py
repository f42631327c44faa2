"""payment: charge each created order once, into a ledger with a unique order id.

A plain ``def``: the host runs it in a worker thread, so blocking SQLite calls
are fine. The simulated gateway sometimes throttles; ``Retry`` asks JetStream
to redeliver later, and the ledger's UNIQUE constraint keeps a redelivered
order from being charged twice.
"""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path

from fnhost_sdk import Context, Retry
from functions.contracts import OrderCreated, PaymentCompleted

_local = threading.local()


def _ledger(path: str) -> sqlite3.Connection:
    db: sqlite3.Connection | None = getattr(_local, "db", None)
    if db is None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS charges ("
            " order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, amount REAL NOT NULL,"
            " charged_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        _local.db = db
    return db


def handle(order: OrderCreated, ctx: Context) -> PaymentCompleted:
    if random.random() < float(ctx.config.get("throttle_rate", 0.0)):
        raise Retry(delay=0.5, reason="payment gateway throttled")
    db = _ledger(str(ctx.config.get("ledger", ".fnhost/ledger.db")))
    inserted = db.execute(
        "INSERT OR IGNORE INTO charges (order_id, customer_id, amount) VALUES (?, ?, ?)",
        (order.order_id, order.customer_id, order.total),
    ).rowcount
    verb = "charged" if inserted else "already charged"
    ctx.log.info("payment %s order %s: %.2f", verb, order.order_id, order.total)
    return PaymentCompleted(
        order_id=order.order_id,
        customer_id=order.customer_id,
        amount=order.total,
        items=order.items,
    )
