"""The chaos harness itself: a host process never outlives the test that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fnhost_sdk.server import NatsServer
from fnhost_sdk.waiting import wait_for_sync

from .harness import TESTS_DIR

pytestmark = [pytest.mark.nats, pytest.mark.fault]

MANIFEST = """\
version: 1
http: false
functions:
  echo:
    module: echo.py
    trigger: {subject: harness.echo}
"""

OWNER = """\
import sys, time
from pathlib import Path
from chaos.harness import HostProcess

host = HostProcess(Path(sys.argv[1]), sys.argv[2])
host.start()
Path(sys.argv[3]).write_text(str(host.pid))
time.sleep(600)
"""


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie, exited but not reaped, is not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_a_host_is_drained_when_the_test_process_dies_without_teardown(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """pytest stopped by SIGTERM or SIGKILL runs no teardown: the host it started, in a
    session of its own, would reconnect to nothing forever. Its watchdog drains it."""
    (tmp_path / "fn.yaml").write_text(MANIFEST)
    (tmp_path / "echo.py").write_text("async def handle(data: bytes) -> None:\n    pass\n")
    pid_file = tmp_path / "host.pid"
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path / "fn.yaml"), nats_server.url, str(pid_file)],
        env={**os.environ, "PYTHONPATH": str(TESTS_DIR)},
    )
    try:
        wait_for_sync(pid_file.exists, timeout=60, message="the owner started its host")
        host_pid = int(pid_file.read_text())
        assert running(host_pid)
    finally:
        owner.send_signal(signal.SIGKILL)  # no atexit, no finally, no teardown
        owner.wait()
    wait_for_sync(lambda: not running(host_pid), timeout=30, message="the host stopped")
    log = (tmp_path / "host.log").read_text()
    assert "SIGTERM received: draining" in log, log[-2000:]
