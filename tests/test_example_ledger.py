"""The example payment function's ledger: group commits that charge each order once.

``functions/payment.py`` commits the charges that arrive while a commit is being
written as one transaction. These tests run it on a real SQLite file: every
order charged once however its charges are grouped, a failed commit storing none
of its group and failing each charge in it (so each message is retried), and two
ledgers on one file (two host processes) never both charging an order.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def payment(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(REPO))  # the example imports functions.contracts
    import functions.payment

    yield functions.payment


def _rows(path: Path) -> dict[str, float]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT order_id, amount FROM charges").fetchall())


async def test_a_burst_is_charged_once_per_order_in_fewer_commits_than_charges(
    payment: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    groups: list[int] = []
    commit = payment.Ledger._commit

    def counted_commit(ledger: object, charges: list[tuple[str, str, float]]) -> list[bool]:
        groups.append(len(charges))
        return commit(ledger, charges)

    monkeypatch.setattr(payment.Ledger, "_commit", counted_commit)
    path = tmp_path / "ledger.db"
    ledger = payment.Ledger(str(path))
    orders = [f"order-{n}" for n in range(250)]
    burst = orders + orders[:50]  # 50 orders delivered twice within the burst

    charged = await asyncio.gather(
        *(ledger.charge(order, "c1", float(n % 250)) for n, order in enumerate(burst))
    )

    assert sum(charged) == 250
    assert charged[:250] == [True] * 250  # the first charge of each order is the one stored
    assert _rows(path) == {order: float(n) for n, order in enumerate(orders)}
    assert sum(groups) == len(burst)
    assert len(groups) < len(burst), groups
    print(f"{len(burst)} charges in {len(groups)} commits: {groups}")

    again = await asyncio.gather(*(ledger.charge(order, "c1", 1.0) for order in orders))
    assert not any(again)
    assert len(_rows(path)) == 250


async def test_a_failed_commit_stores_none_of_its_group_and_fails_each_charge(
    payment: ModuleType, tmp_path: Path
) -> None:
    path = tmp_path / "ledger.db"
    with sqlite3.connect(path) as db:
        db.execute(
            "CREATE TABLE charges (order_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL,"
            " amount REAL NOT NULL, charged_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)"
        )
        # A database that refuses one charge of the group: the whole commit fails.
        db.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON charges WHEN NEW.amount > 1000"
            " BEGIN SELECT RAISE(ABORT, 'amount refused'); END"
        )
    ledger = payment.Ledger(str(path))
    good = [f"order-{n}" for n in range(10)]

    outcomes = await asyncio.gather(
        *(ledger.charge(order, "c1", 10.0) for order in good),
        ledger.charge("too-much", "c1", 5000.0),
        return_exceptions=True,
    )

    assert all(isinstance(outcome, payment.LedgerError) for outcome in outcomes), outcomes
    assert "amount refused" in str(outcomes[0])
    assert _rows(path) == {}
    # Their redeliveries, without the refused one, are charged.
    assert await asyncio.gather(*(ledger.charge(order, "c1", 10.0) for order in good)) == [
        True
    ] * len(good)
    assert _rows(path) == dict.fromkeys(good, 10.0)


async def test_two_ledgers_on_one_file_charge_each_order_once(
    payment: ModuleType, tmp_path: Path
) -> None:
    path = str(tmp_path / "ledger.db")
    first, second = payment.Ledger(path), payment.Ledger(path)
    orders = [f"order-{n}" for n in range(300)]

    charged = await asyncio.gather(
        *(ledger.charge(order, "c1", 1.0) for order in orders for ledger in (first, second))
    )

    assert sum(charged) == len(orders)
    pairs = [charged[i : i + 2] for i in range(0, len(charged), 2)]
    assert all(sorted(pair) == [False, True] for pair in pairs)
    assert len(_rows(Path(path))) == len(orders)
