"""Hot reload latency: from a file save to the new version answering.

Starts a private nats-server and ``python -m fnhost run fn.yaml --reload`` (a
real host process with the real watcher), keeps asking the function for its
version, rewrites the module ``--saves`` times and reports, per save, the time
from the moment the write returned to the first reply from the new version.

    python bench/reload_latency.py            # 20 saves
    python bench/reload_latency.py --saves 50 --keep   # keep the project dir and logs

Target (issue 6): median under 300 ms, worst under 1 s. The watcher's settings
(``fnhost.reload.DEBOUNCE_MS`` / ``STEP_MS``) bound the wait: a save is seen
once the files stay quiet for ``STEP_MS``, at most ``DEBOUNCE_MS`` after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import nats.errors
from nats.aio.client import Client as NatsClient

from fnhost.reload import DEBOUNCE_MS, STEP_MS
from fnhost_sdk.server import NatsServer

MANIFEST = """\
version: 1
nats: {url: embedded}
http: false
functions:
  hello:
    module: hello.py
    trigger: {request: bench.reload}
"""

POLL_INTERVAL = 0.002
"""Pause between two probes: fine enough for the figure, light on a shared machine."""


def module(version: int) -> str:
    return f"VERSION = {version}\n\n\nasync def handle(data: bytes) -> int:\n    return VERSION\n"


def save(path: Path, version: int) -> float:
    """Write the module as an editor would (in place); returns when the write returned."""
    path.write_text(module(version))
    return time.monotonic()


async def version_of(nc: NatsClient) -> int | None:
    try:
        msg = await nc.request("bench.reload", b"", timeout=1)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError):
        return None
    return None if msg.headers else int(json.loads(msg.data))


async def wait_for_version(nc: NatsClient, version: int, timeout: float) -> float:
    """Probe until ``version`` answers; returns the monotonic time of that reply."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await version_of(nc) == version:
            return time.monotonic()
        await asyncio.sleep(POLL_INTERVAL)
    raise TimeoutError(f"version {version} did not answer within {timeout:g}s")


async def measure(url: str, path: Path, saves: int, pause: float) -> list[float]:
    nc = await nats.connect(url)
    try:
        await wait_for_version(nc, 0, timeout=60)
        latencies = []
        for version in range(1, saves + 1):
            await asyncio.sleep(pause)  # the previous save's events are long over
            saved = save(path, version)
            answered = await wait_for_version(nc, version, timeout=10)
            latencies.append(answered - saved)
            print(f"save {version:3d}: {1000 * (answered - saved):7.1f} ms", flush=True)
        return latencies
    finally:
        await nc.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--saves", type=int, default=20)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between saves")
    parser.add_argument("--keep", action="store_true", help="keep the project dir and logs")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="fnhost-reload-bench-"))
    project = work / "project"
    project.mkdir()
    (project / "fn.yaml").write_text(MANIFEST)
    (project / "hello.py").write_text(module(0))
    server = NatsServer(work / "nats").start()
    log = (work / "host.log").open("w")
    host = subprocess.Popen(
        [sys.executable, "-m", "fnhost", "run", "fn.yaml", "--reload", "--nats", server.url],
        cwd=project,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        print(f"debounce {DEBOUNCE_MS} ms, step {STEP_MS} ms, load {os.getloadavg()[0]:.2f}")
        latencies = asyncio.run(measure(server.url, project / "hello.py", args.saves, args.pause))
    finally:
        host.send_signal(signal.SIGTERM)
        try:
            host.wait(timeout=15)
        except subprocess.TimeoutExpired:
            host.kill()
            host.wait()
        log.close()
        server.stop()
        if args.keep:
            print(f"project and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    ms = sorted(1000 * t for t in latencies)
    print(
        f"{len(ms)} saves: median {statistics.median(ms):.0f} ms, "
        f"p90 {ms[int(0.9 * (len(ms) - 1))]:.0f} ms, worst {ms[-1]:.0f} ms, best {ms[0]:.0f} ms "
        f"(load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
