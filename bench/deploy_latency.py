"""Remote deploy latency: from ``fnhost deploy`` returning to every host serving the new version.

Starts a private nats-server and two host processes (``python -m fnhost run``
with the registry enabled and HTTP on a free port), then runs ``fnhost deploy
--no-wait`` ``--deploys`` times with a changed module. For each deploy it
reports the time from the CLI process exiting (the spec is in KV) until the
``/functions`` endpoint of *every* host shows the new version (the KV
revision); the same from the moment an in-process ``fnhost_sdk.deploy.publish``
returned (the KV put acknowledged, no CLI process exit in between); and the
wall time of a plain waiting ``fnhost deploy`` (upload, sign, wait for every
host's report).

    python bench/deploy_latency.py                 # 10 deploys, median reported
    python bench/deploy_latency.py --deploys 20 --keep
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nats

from fnhost_sdk.artifact import build_artifact, import_module_file, keygen
from fnhost_sdk.deploy import publish
from fnhost_sdk.server import NatsServer

POLL_INTERVAL = 0.002

MANIFEST = """\
version: 1
http: {{port: 0}}
registry:
  enabled: true
  trusted_keys: [{key}]
"""

MODULE = """\
from fnhost_sdk import function


@function(request="bench.deploy")
async def handle(data: bytes) -> int:
    return {version}
"""


def fnhost(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fnhost", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def start_host(project: Path, url: str, index: int) -> tuple[subprocess.Popen[bytes], str]:
    log_path = project / f"host{index}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fnhost", "run", "fn.yaml", "--nats", url, "--grace", "2"],
        cwd=project,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        found = re.search(r"HTTP on (http://[\d.:]+)", text)
        if found and "host ready" in text:
            return proc, found.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"host {index} exited:\n{text}")
        time.sleep(0.05)
    raise SystemExit(f"host {index} not ready:\n{log_path.read_text(errors='replace')}")


def served_version(http: str) -> str | None:
    with urllib.request.urlopen(f"{http}/functions", timeout=5) as response:
        for entry in json.load(response):
            if entry["name"] == "hello":
                return str(entry["version"])
    return None


def wait_serving(https: list[str], revision: str) -> None:
    pending = set(https)
    while pending:
        pending = {h for h in pending if served_version(h) != revision}
        if pending:
            time.sleep(POLL_INTERVAL)


async def publish_in_process(url: str, dev: Path, seed: bytes) -> tuple[str, float]:
    module = import_module_file(dev / "hello.py", dev)
    artifact, _ = build_artifact(module, root=dev)
    nc = await nats.connect(url)
    try:
        settings = {"trigger": {"request": "bench.deploy"}}
        revision = await publish(nc, name="hello", artifact=artifact, settings=settings, seed=seed)
        return str(revision), time.monotonic()
    finally:
        await nc.close()


def revision_of(output: str) -> str:
    found = re.search(r"version (\d+)", output)
    if not found:
        raise SystemExit(f"no version in the deploy output:\n{output}")
    return found.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deploys", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="keep the project dir and logs")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fnhost-deploy-bench-"))
    seed, public = keygen()
    key = work / "deploy.nk"
    key.write_bytes(seed + b"\n")
    key.chmod(0o600)
    hosts_dir, dev = work / "hosts", work / "dev"
    hosts_dir.mkdir()
    dev.mkdir()
    (hosts_dir / "fn.yaml").write_text(MANIFEST.format(key=public))
    (dev / "fn.yaml").write_text(MANIFEST.format(key=public))
    server = NatsServer(work / "nats").start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        https = []
        for index in range(2):
            proc, http = start_host(hosts_dir, server.url, index)
            procs.append(proc)
            https.append(http)
        common = ["--nats", server.url, "--sign-key", str(key)]
        to_serving: list[float] = []
        from_put: list[float] = []
        waiting: list[float] = []
        for version in range(1, args.deploys + 1):
            (dev / "hello.py").write_text(MODULE.format(version=version))
            result = fnhost(dev, "deploy", "hello.py", "--no-wait", *common)
            returned = time.monotonic()
            if result.returncode != 0:
                raise SystemExit(result.stdout + result.stderr)
            wait_serving(https, revision_of(result.stdout))
            to_serving.append(time.monotonic() - returned)
            (dev / "hello.py").write_text(MODULE.format(version=version + 500))
            revision, put_at = asyncio.run(publish_in_process(server.url, dev, seed))
            wait_serving(https, revision)
            from_put.append(time.monotonic() - put_at)
            # The same change again, this time waiting for every host's report.
            (dev / "hello.py").write_text(MODULE.format(version=version * 1000))
            started = time.monotonic()
            result = fnhost(dev, "deploy", "hello.py", *common)
            waiting.append(time.monotonic() - started)
            if result.returncode != 0:
                raise SystemExit(result.stdout + result.stderr)
            print(
                f"deploy {version}: every host serving {to_serving[-1] * 1000:.0f} ms after "
                f"`deploy --no-wait` returned, {from_put[-1] * 1000:.0f} ms after an in-process "
                f"publish; waiting `deploy` took {waiting[-1] * 1000:.0f} ms",
                flush=True,
            )
        ms = [t * 1000 for t in to_serving]
        print(
            f"\n{len(ms)} deploys, 2 hosts: deploy returned -> every host serving: "
            f"median {statistics.median(ms):.0f} ms, min {min(ms):.0f} ms, max {max(ms):.0f} ms"
        )
        put = [t * 1000 for t in from_put]
        print(
            f"in-process publish (KV put acked) -> every host serving: "
            f"median {statistics.median(put):.0f} ms, min {min(put):.0f} ms, max {max(put):.0f} ms"
        )
        print(
            f"waiting `fnhost deploy` (import, pickle, sign, upload, every host's report; "
            f"includes ~0.5 s of CLI start-up): median {statistics.median(waiting) * 1000:.0f} ms"
        )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(30)
        server.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
