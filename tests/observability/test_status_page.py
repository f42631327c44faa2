"""The status page at ``/`` in real headless Chromium (Debian's ``chromium``, driven by Playwright).

The example system (fn.yaml + functions/) runs in-process; the page must list
its functions, show numbers that move after traffic, and fit a phone screen.
Screenshots go to ``test-artifacts/`` (gitignored) for a human to look at.

Skipped on a dev machine without Chromium or Playwright; under ``CI=true``
their absence is a failure (``.ci/run`` installs both).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from nats.aio.client import Client as NatsClient

from fnhost_sdk.testing import wait_for
from support import require

from ._support import HostFactory

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

pytestmark = pytest.mark.nats

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
EXAMPLE_FUNCTIONS = {"create-order", "payment", "inventory"}
ORDER = {"customer_id": "c1", "items": [{"sku": "A1", "qty": 1, "price": 5.0}], "total": 5.0}


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    return None


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    require(
        "playwright (pip install -e '.[test]')", importlib.util.find_spec("playwright") is not None
    )
    require("chromium (apt-get install chromium)", _chromium() is not None)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=_chromium(), headless=True)
        try:
            yield launched
        finally:
            await launched.close()


@pytest.fixture
async def example(
    host_factory: HostFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """The example system on the test's server; returns the status page URL."""
    project = tmp_path / "example"
    shutil.copytree(REPO / "functions", project / "functions")
    monkeypatch.setenv("FNHOST_LEDGER", str(tmp_path / "ledger.db"))
    monkeypatch.setenv("FNHOST_THROTTLE_RATE", "0")
    manifest = (REPO / "fn.yaml").read_text()
    manifest = manifest.replace("http: {host: 127.0.0.1, port: 8080}", "http: {port: 0}")
    assert "port: 0" in manifest, "fn.yaml's http line changed; update this test"
    host = await host_factory(manifest, root=project)
    assert host.http_url is not None
    return host.http_url + "/"


async def card_values(page: Page) -> dict[str, dict[str, str]]:
    """Each function card's stats, by function name and label."""
    values: dict[str, dict[str, str]] = await page.evaluate(
        """() => Object.fromEntries([...document.querySelectorAll("section.fn")].map((card) => [
            card.dataset.name,
            Object.fromEntries([...card.querySelectorAll("dl > div")].map((pair) => [
                pair.querySelector("dt").textContent, pair.querySelector("dd").textContent,
            ])),
        ]))"""
    )
    return values


async def order(nc: NatsClient) -> Any:
    reply = await nc.request("orders.create", json.dumps(ORDER).encode(), timeout=10)
    return json.loads(reply.data)


async def test_status_page_lists_functions_and_numbers_move(
    browser: Browser, example: str, nc: NatsClient
) -> None:
    page = await browser.new_page(viewport={"width": 1280, "height": 800})
    await page.goto(example)
    await page.wait_for_function("document.querySelectorAll('section.fn').length === 3")
    assert await page.title() == "fnhost status"
    names = await page.eval_on_selector_all("section.fn", "cards => cards.map(c => c.dataset.name)")
    assert set(names) == EXAMPLE_FUNCTIONS
    await page.wait_for_function("document.getElementById('ready').textContent === 'ready'")
    before = await card_values(page)
    assert before["create-order"]["handled"] == "0"
    assert before["payment"]["pending"] == "0"
    assert before["create-order"]["pending"] == "\N{EN DASH}"  # not a stream: no pending

    # Traffic until the page shows it: handled counts through the whole chain, and a rate.
    async def traffic() -> None:
        while True:
            await order(nc)
            await asyncio.sleep(0.05)

    sender = asyncio.ensure_future(traffic())
    try:

        async def moved() -> dict[str, dict[str, str]] | None:
            now = await card_values(page)
            busy = all(int(now[name]["handled"]) > 0 for name in EXAMPLE_FUNCTIONS)
            return now if busy and float(now["create-order"]["rate /s"]) > 0 else None

        after = await wait_for(moved, timeout=20, interval=0.2, message="numbers moved")
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
    assert float(after["payment"]["rate /s"]) >= 0
    assert after["payment"]["errors /s"] == "0.0"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)


async def test_status_page_fits_a_phone(browser: Browser, example: str, nc: NatsClient) -> None:
    await order(nc)
    context = await browser.new_context(
        viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True
    )
    try:
        page = await context.new_page()
        await page.goto(example)
        await page.wait_for_function("document.querySelectorAll('section.fn').length === 3")
        overflow = await page.evaluate(
            "() => [document.documentElement.scrollWidth, window.innerWidth]"
        )
        assert overflow[0] <= overflow[1], f"horizontal overflow: {overflow}"
        widest = await page.evaluate(
            "() => Math.max(...[...document.querySelectorAll('section.fn')]"
            ".map((card) => card.getBoundingClientRect().right))"
        )
        assert widest <= 390
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "status-page-phone.png"), full_page=True)
    finally:
        await context.close()
