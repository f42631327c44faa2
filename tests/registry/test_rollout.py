"""Two host processes, deploys through the real ``fnhost`` CLI, traffic during the switch.

The hosts' project holds only fn.yaml: every line of function code they run
arrived as an artifact. Traffic (requests, and stream messages through a slow
handler) keeps flowing while version 2 rolls out; nothing may fail or get lost.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from chaos.harness import HostProcess
from fnhost_sdk.server import NatsServer
from fnhost_sdk.testing import wait_for

from .conftest import HELPERS, SigningKey, greeter, registry_manifest

pytestmark = [pytest.mark.nats, pytest.mark.slow]

TALLY = """
import asyncio

from fnhost_sdk import Context, function

from functions.helpers import tag


@function(trigger={{"stream": "EVENTS", "subjects": ["events.>"]}}, concurrency=4)
async def tally(event: dict, ctx: Context) -> None:
    await asyncio.sleep(0.02)
    await ctx.publish("tally.done", {{"n": event["n"], "version": tag("{version}")}})
"""

STREAMS = """
streams:
  EVENTS: {subjects: ["events.>"]}
"""


def fnhost(cwd: Path, *args: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the ``fnhost`` CLI the way a user does."""
    command = [sys.executable, "-m", "fnhost", *args]
    if key is not None:
        command += ["--sign-key", str(key)]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


class Traffic:
    """Requests with a few in flight, until stopped; every reply and failure is kept."""

    def __init__(self, nc: NatsClient, in_flight: int = 4) -> None:
        self.nc = nc
        self.replies: list[dict[str, Any]] = []
        self.sent = 0
        """Requests sent so far; each reply records which one it answers."""
        self.failures: list[str] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run()) for _ in range(in_flight)]

    async def _run(self) -> None:
        while not self._stop.is_set():
            self.sent += 1
            sent = self.sent
            try:
                msg = await self.nc.request("greet", b'"ann"', timeout=10)
            except Exception as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
                if self.nc.is_closed or len(self.failures) > 100:
                    return
                await asyncio.sleep(0.1)
                continue
            if msg.headers and "Nats-Service-Error-Code" in msg.headers:
                self.failures.append(f"error reply {msg.headers}")
                await asyncio.sleep(0.1)
                continue
            self.replies.append({**json.loads(msg.data), "sent": sent})
            await asyncio.sleep(0.005)  # steady traffic, not a benchmark

    def after(self, sent: int) -> list[dict[str, Any]]:
        """Replies to the requests sent after the ``sent``-th one."""
        return [r for r in self.replies if r["sent"] > sent]

    def pids_with(self, version: str, since: int) -> set[int]:
        return {r["pid"] for r in self.after(since) if r["version"] == version}

    def versions(self, since: int) -> set[str]:
        return {r["version"] for r in self.after(since)}

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_two_hosts_roll_out_rollback_refuse_and_a_new_host_catches_up(
    nats_server: NatsServer, tmp_path: Path, signing_key: SigningKey, other_key: SigningKey
) -> None:
    manifest = registry_manifest([signing_key.public], extra=STREAMS)
    hosts_dir, dev = tmp_path / "hosts", tmp_path / "dev"
    (dev / "functions").mkdir(parents=True)
    hosts_dir.mkdir()
    (hosts_dir / "fn.yaml").write_text(manifest)
    (dev / "fn.yaml").write_text(manifest)
    (dev / "functions" / "__init__.py").write_text("")
    (dev / "functions" / "helpers.py").write_text(textwrap.dedent(HELPERS))

    def write(version: str) -> None:
        (dev / "functions" / "greet.py").write_text(greeter(version))
        (dev / "functions" / "tally.py").write_text(textwrap.dedent(TALLY.format(version=version)))

    def deploy(path: str, key: SigningKey = signing_key) -> subprocess.CompletedProcess[str]:
        return fnhost(dev, "deploy", path, "--nats", nats_server.url, key=key.path)

    hosts = [HostProcess(hosts_dir / "fn.yaml", nats_server.url, name=f"host{i}") for i in range(3)]
    nc = await nats.connect(nats_server.url)
    done: dict[int, str] = {}

    async def on_done(msg: Msg) -> None:
        event = json.loads(msg.data)
        done.setdefault(event["n"], event["version"])

    await nc.subscribe("tally.done", cb=on_done)
    traffic: Traffic | None = None
    try:
        for host in hosts[:2]:
            host.start()
        write("v1")
        for path, version in (("functions/greet.py", 1), ("functions/tally.py", 2)):
            result = deploy(path)
            assert result.returncode == 0, result.stdout + result.stderr
            assert f"version {version} " in result.stdout
            assert result.stdout.count("running") == 2, result.stdout

        traffic = Traffic(nc)
        assert traffic.failures == []
        js = nc.jetstream()
        await wait_for(lambda: len(traffic.replies) >= 20, timeout=30, message="v1 traffic")
        for n in range(100):
            await js.publish(f"events.{n}", json.dumps({"n": n}).encode())

        write("v2")
        result, tally = await asyncio.gather(
            asyncio.to_thread(deploy, "functions/greet.py"),
            asyncio.to_thread(deploy, "functions/tally.py"),
        )
        for each in (result, tally):
            assert each.returncode == 0, each.stdout + each.stderr
            assert each.stdout.count("running") == 2, each.stdout
        mark = traffic.sent
        for n in range(100, 200):
            await js.publish(f"events.{n}", json.dumps({"n": n}).encode())
        await wait_for(
            lambda: len(traffic.pids_with("v2", mark)) == 2, timeout=30, message="both hosts v2"
        )
        assert traffic.versions(mark) == {"v2"}
        await wait_for(lambda: len(done) == 200, timeout=60, message="every event handled")
        assert {done[n] for n in range(100, 200)} == {"v2"}

        back = fnhost(dev, "rollback", "greet", "--nats", nats_server.url)
        assert back.returncode == 0, back.stdout + back.stderr
        assert "rollback of" in back.stdout
        mark = traffic.sent
        await wait_for(
            lambda: len(traffic.pids_with("v1", mark)) == 2, timeout=30, message="both back on v1"
        )
        assert traffic.versions(mark) == {"v1"}

        hosts[2].start()  # after the deploys: it reads the current versions before serving
        assert "registry: 2 deployed functions" in hosts[2].log()
        await wait_for(
            lambda: len(traffic.pids_with("v1", mark)) == 3, timeout=60, message="newcomer on v1"
        )

        write("v3")
        refused = deploy("functions/greet.py", other_key)
        assert refused.returncode != 0
        assert refused.stdout.count("refused") == 3 and "untrusted" in refused.stdout
        mark = traffic.sent
        await wait_for(lambda: len(traffic.after(mark)) >= 30, timeout=30, message="traffic")
        assert traffic.versions(mark) == {"v1"}
        listing = fnhost(dev, "ls", "--nats", nats_server.url)
        assert listing.returncode == 0, listing.stderr
        assert "greet" in listing.stdout and "3 live hosts" in listing.stdout
        assert "untrusted" in listing.stdout  # the refusal shows where ls shows it

        await traffic.stop()
        assert traffic.failures == []
    finally:
        if traffic is not None:
            await traffic.stop()
        await nc.close()
        for host in hosts:
            if host.alive:
                assert host.terminate() == 0
            host.close()
