"""Helpers shared by the integration tests: certificates, NATS JWTs, CLI runs."""

import datetime
import json
import os
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from fnhost.host import Host


def module_of(host: Host, function: str = "work") -> Any:
    """The module object the host loaded for ``function`` (its globals are the handler's)."""
    runtime = host.functions[function].runtime
    assert runtime is not None, host.functions[function].error
    return runtime.loaded.module


def require(what: str, found: bool) -> None:
    """Skip (developer machine) or fail (``CI=true``) when ``what`` is not installed."""
    if found:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is not installed, and CI must run these tests", pytrace=False)
    pytest.skip(f"{what} is not installed")


async def stored_at_ns_of(nc: NatsClient, stream: str, sequence: int) -> int:
    """When ``stream`` stored message ``sequence``, in ns (nats-py's ``get_msg`` keeps µs)."""
    answer = await nc.request(
        f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps({"seq": sequence}).encode()
    )
    stamp = json.loads(answer.data)["message"]["time"]  # RFC 3339, UTC, up to ns
    seconds, _, fraction = stamp.removesuffix("Z").partition(".")
    whole = datetime.datetime.fromisoformat(seconds).replace(tzinfo=datetime.UTC)
    return int(whole.timestamp()) * 10**9 + int(fraction.ljust(9, "0"))


async def dead_letter_id_of(nc: NatsClient, stream: str, sequence: int) -> str:
    """The ``Nats-Msg-Id`` a dead letter of ``stream``'s message ``sequence`` must carry."""
    stored_at_us = await stored_at_ns_of(nc, stream, sequence) // 1000
    return f"dlq:{stream}:{sequence}:{stored_at_us}"


async def collect(nc: NatsClient, subject: str) -> list[Msg]:
    """Subscribe to ``subject``; the list fills with its messages as they arrive."""
    got: list[Msg] = []

    async def keep(msg: Msg) -> None:
        got.append(msg)

    await nc.subscribe(subject, cb=keep)
    await nc.flush()
    return got
