"""Hot reload end to end: a real watchfiles watcher, a real nats-server, and a client
that keeps sending while the module is rewritten (RELIABILITY.md, F11)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from conftest import HostFactory
from fnhost.host import Host
from fnhost.http import readiness
from fnhost.reload import HotReload
from fnhost_sdk.waiting import wait_for

pytestmark = [pytest.mark.nats, pytest.mark.slow]

MANIFEST = """\
version: 1
http: false
functions:
  hello:
    module: hello.py
    trigger: {request: hello}
"""


def versioned(version: int) -> str:
    return textwrap.dedent(
        f"""\
        VERSION = {version}

        async def handle(data: dict) -> dict:
            return {{"version": VERSION, "i": data["i"]}}
        """
    )


SYNTAX_ERROR = "VERSION = 99\n\nasync def handle(data: dict) -> dict\n    return {}\n"


def write(path: Path, text: str) -> None:
    path.write_text(text)


@dataclass
class Traffic:
    """Requests sent by ``senders`` sequential clients, and what came back."""

    sent: int = 0
    replies: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    versions: dict[int, list[int]] = field(default_factory=dict)
    """Per sender, the version of each reply in order."""
    latest: int = 0


async def send_steadily(nc: NatsClient, traffic: Traffic, sender: int, stop: asyncio.Event) -> None:
    seen = traffic.versions.setdefault(sender, [])
    while not stop.is_set():
        i = traffic.sent
        traffic.sent += 1
        try:
            msg: Msg = await nc.request("hello", json.dumps({"i": i}).encode(), timeout=5)
        except Exception as exc:  # a timeout or no responders: the test fails on it below
            traffic.errors.append(f"request {i}: {type(exc).__name__}: {exc}")
            continue
        if msg.headers and "Nats-Service-Error" in msg.headers:
            traffic.errors.append(f"request {i}: error reply {msg.headers}")
            continue
        reply: dict[str, Any] = json.loads(msg.data)
        assert reply["i"] == i
        traffic.replies[i] += 1
        seen.append(reply["version"])
        traffic.latest = max(traffic.latest, reply["version"])
        await asyncio.sleep(0.001)  # steady, not a flood: the machine is shared


async def test_requests_never_fail_while_the_module_is_rewritten(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(MANIFEST, {"hello.py": versioned(1)}, plugins=[HotReload()])
    path = host.manifest.root / "hello.py"
    state = host.functions["hello"]
    traffic = Traffic()
    stop = asyncio.Event()
    senders = [asyncio.ensure_future(send_steadily(nc, traffic, n, stop)) for n in range(4)]
    try:
        await wait_for(lambda: traffic.sent >= 200, timeout=30, message="traffic flowing")
        saves = [2, 3, None, 4, 5]  # None: a save with a syntax error
        for version in saves:
            before = traffic.sent
            if version is None:
                write(path, SYNTAX_ERROR)
                await wait_for(lambda: state.error, timeout=30, message="the broken save seen")
                assert "syntax error" in (state.error or "")
                assert any(r.startswith("reload:hello:") for r in readiness(host))
            else:
                write(path, versioned(version))
                await wait_for(
                    lambda v=version: traffic.latest == v,
                    timeout=30,
                    message=f"version {version} answering",
                )
            # Keep the stream going between saves, so each save lands mid-traffic.
            await wait_for(
                lambda b=before: traffic.sent >= b + 300,
                timeout=60,
                message="more traffic after the save",
            )
        await wait_for(lambda: traffic.sent >= 2000, timeout=120, message="2,000 requests sent")
    finally:
        stop.set()
        await asyncio.gather(*senders)

    assert traffic.errors == []
    assert traffic.sent >= 2000
    assert sorted(traffic.replies) == list(range(traffic.sent))  # every request answered...
    assert set(traffic.replies.values()) == {1}  # ...exactly once
    for seen in traffic.versions.values():
        assert seen == sorted(seen)  # never back to an older version after a newer one
        assert 99 not in seen  # the broken save never served
    everything = {v for seen in traffic.versions.values() for v in seen}
    assert everything == {1, 2, 3, 4, 5}
    assert host.functions["hello"].error is None
    assert readiness(host) == []


STREAM_MANIFEST = """\
version: 1
http: false
streams:
  WORK: {subjects: ["work.>"]}
functions:
  worker:
    module: worker.py
    trigger: {stream: WORK, subjects: [work.items], durable: worker}
    output: done.items
"""


def stream_worker(version: int) -> str:
    return textwrap.dedent(
        f"""\
        async def handle(data: dict) -> dict:
            return {{"version": {version}, "i": data["i"]}}
        """
    )


async def test_no_stream_message_is_lost_across_reloads(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(
        STREAM_MANIFEST, {"worker.py": stream_worker(1)}, plugins=[HotReload()]
    )
    path = host.manifest.root / "worker.py"
    done: Counter[int] = Counter()
    versions: dict[int, int] = {}

    async def on_done(msg: Msg) -> None:
        result = json.loads(msg.data)
        done[result["i"]] += 1
        versions[result["i"]] = result["version"]

    sub = await nc.subscribe("done.items", cb=on_done)
    js = nc.jetstream()
    total = 0

    async def publish(count: int) -> None:
        nonlocal total
        for _ in range(count):
            await js.publish("work.items", json.dumps({"i": total}).encode())
            total += 1

    await publish(100)
    for version in (2, 3):
        write(path, stream_worker(version))
        while not any(v == version for v in versions.values()):
            await publish(10)
            await asyncio.sleep(0.01)
        await publish(100)
    await wait_for(lambda: len(done) == total, timeout=60, message=f"{total} results")
    await sub.unsubscribe()
    assert sorted(done) == list(range(total))
    assert set(done.values()) == {1}
    info = await js.consumer_info("WORK", "worker")
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)
    assert host.functions["worker"].error is None


async def test_fn_yaml_and_new_imports_are_watched(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host: Host = await host_factory(MANIFEST, {"hello.py": versioned(1)}, plugins=[HotReload()])
    root = host.manifest.root
    # A function added to fn.yaml starts...
    added = MANIFEST + "  extra:\n    module: extra.py\n    trigger: {request: extra}\n"
    write(
        root / "extra.py",
        "import extra_helper_7c\n\nasync def handle(data: dict) -> dict:\n"
        "    return {'extra': extra_helper_7c.VALUE}\n",
    )
    write(root / "extra_helper_7c.py", "VALUE = 1\n")
    write(root / "fn.yaml", added)

    async def extra() -> Any:
        msg = await nc.request("extra", b"{}", timeout=5)
        return json.loads(msg.data) if not msg.headers else None

    await wait_for(
        lambda: "extra" in host.functions and host.functions["extra"].runtime,
        timeout=30,
        message="extra started",
    )
    assert await extra() == {"extra": 1}
    # ...and the module it imports, unknown before the fn.yaml change, is watched now.
    write(root / "extra_helper_7c.py", "VALUE = 2\n")
    await wait_for(lambda: _equals(extra(), {"extra": 2}), timeout=30, message="helper reloaded")
    # An invalid fn.yaml keeps everything running and says where.
    write(root / "fn.yaml", added.replace("trigger: {request: extra}", "trigger: {requst: extra}"))
    await wait_for(lambda: "reload:fn.yaml" in host.problems, timeout=30, message="bad fn.yaml")
    assert "functions.extra.trigger.requst" in host.problems["reload:fn.yaml"]
    assert "fn.yaml:9" in host.problems["reload:fn.yaml"]
    assert await extra() == {"extra": 2}
    # Removing the function stops it; fixing the file clears the problem.
    write(root / "fn.yaml", MANIFEST)
    await wait_for(
        lambda: "extra" not in host.functions and not host.problems,
        timeout=30,
        message="extra removed, fn.yaml problem cleared",
    )
    assert (await nc.request("hello", b'{"i": 0}', timeout=5)).data


async def _equals(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
