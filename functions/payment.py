"""payment: charge each created order once, into a ledger with a unique order id.

The ledger is an SQLite file whose ``charges`` table is keyed by order id, so
a redelivered order (a retry, a redelivery after a crash) is never charged
twice. A charge is committed before the handler returns: the order is acked
only once its charge is on disk.

A commit is an fsync, and a disk takes a few thousand a second: a commit per
order would cap a burst there. So charges are *group committed*: the charges
that arrive while one commit is written all go into the next, one
transaction, run on a thread so the host's event loop never waits on the
disk. A burst costs a commit per group, a lone order one commit. A commit
that fails fails every charge in it: each handler raises, each message is
retried.

The simulated gateway sometimes throttles; ``Retry`` asks JetStream to
redeliver later.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import threading
import time
from pathlib import Path

from fnhost_sdk import Context, Retry
from functions.contracts import OrderCreated, PaymentCompleted

Charge = tuple[str, str, float]
"""(order id, customer id, amount)."""

SETUP_TRIES = 20
"""Tries to switch a ledger file to WAL mode."""

_CHARGE = "INSERT OR IGNORE INTO charges (order_id, customer_id, amount) VALUES (?, ?, ?)"


class LedgerError(Exception):
    """A commit failed: none of its group's charges is stored."""


class Ledger:
    """The charges of one SQLite file, committed in groups, one commit at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        # A connection per thread (sqlite3 wants that), held by the ledger: a module-level
        # threading.local cannot be pickled, and `fnhost deploy` pickles the module.
        self._connections = threading.local()
        self._waiting: list[tuple[Charge, asyncio.Future[bool]]] = []
        self._committing: asyncio.Task[None] | None = None

    async def charge(self, order_id: str, customer_id: str, amount: float) -> bool:
        """Charge an order (``True``), or find it charged already (``False``), once the
        commit holding it is on disk. Raises :class:`LedgerError` if that commit fails."""
        loop = asyncio.get_running_loop()
        committed: asyncio.Future[bool] = loop.create_future()
        self._waiting.append(((order_id, customer_id, amount), committed))
        if self._committing is None:
            self._committing = loop.create_task(self._commit_waiting())
        return await committed

    async def _commit_waiting(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._waiting:
                group, self._waiting = self._waiting, []
                charges = [charge for charge, _ in group]
                try:
                    inserted = await loop.run_in_executor(None, self._commit, charges)
                except Exception as exc:  # the disk, the file, the thread pool at shutdown
                    for _, committed in group:
                        if not committed.done():  # not given up on (a handler timeout)
                            committed.set_exception(
                                LedgerError(f"ledger {self.path}: {type(exc).__name__}: {exc}")
                            )
                else:
                    for (_, committed), was_inserted in zip(group, inserted, strict=True):
                        if not committed.done():
                            committed.set_result(was_inserted)
        finally:
            self._committing = None

    def _commit(self, charges: list[Charge]) -> list[bool]:
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            inserted = [db.execute(_CHARGE, charge).rowcount == 1 for charge in charges]
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return inserted

    def _connect(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._connections, "db", None)
        if db is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            for attempt in range(SETUP_TRIES):
                try:
                    db.execute("PRAGMA journal_mode=WAL")
                    break
                except sqlite3.OperationalError:
                    # Switching a new file to WAL fails at once, without waiting out the
                    # busy timeout, while another process or thread is switching it too.
                    if attempt == SETUP_TRIES - 1:
                        raise
                    time.sleep(0.05)
            db.execute(
                "CREATE TABLE IF NOT EXISTS charges ("
                " order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL, amount REAL NOT NULL,"
                " charged_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
            )
            self._connections.db = db
        return db


_ledgers: dict[str, Ledger] = {}


def ledger_at(path: str) -> Ledger:
    """The ledger of the file ``path`` (one per process, shared by its invocations)."""
    ledger = _ledgers.get(path)
    if ledger is None:
        ledger = _ledgers[path] = Ledger(path)
    return ledger


async def handle(order: OrderCreated, ctx: Context) -> PaymentCompleted:
    if random.random() < float(ctx.config.get("throttle_rate", 0.0)):
        raise Retry(delay=0.5, reason="payment gateway throttled")
    ledger = ledger_at(str(ctx.config.get("ledger", ".fnhost/ledger.db")))
    inserted = await ledger.charge(order.order_id, order.customer_id, order.total)
    verb = "charged" if inserted else "already charged"
    ctx.log.info("payment %s order %s: %.2f", verb, order.order_id, order.total)
    return PaymentCompleted(
        order_id=order.order_id,
        customer_id=order.customer_id,
        amount=order.total,
        items=order.items,
    )
