"""Run the ``fnhost`` command as a user would: a subprocess, its output and exit code.

``DevServer`` runs ``fnhost dev`` in the background (its own process group,
output in a log file) until ``stop()``; ``hold_port`` keeps a port busy so the
embedded server has to pick another one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from fnhost_sdk.server import port_is_free
from fnhost_sdk.waiting import wait_for_sync

_ENV = {"NO_COLOR": "1", "PYTHONUNBUFFERED": "1"}


def fnhost(
    *args: str,
    cwd: Path,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """``python -m fnhost ARGS`` in ``cwd``; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-m", "fnhost", *args],
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **_ENV, **(env or {})},
        stdin=None if input is not None else subprocess.DEVNULL,
    )


class DevServer:
    """``fnhost dev`` running in ``project`` until :meth:`stop`."""

    def __init__(
        self, project: Path, args: Sequence[str] = (), env: Mapping[str, str] | None = None
    ) -> None:
        self.project = project
        self.log_path = project / "dev.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fnhost", "dev", "--no-reload", *args],
                cwd=project,
                env={**os.environ, **_ENV, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for_sync(
            lambda: "host ready" in self.log() or self.proc.poll() is not None,
            timeout=timeout,
            message="fnhost dev ready",
        )
        assert self.proc.poll() is None, f"fnhost dev exited:\n{self.log()}"

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, wait; SIGKILL the group if it does not exit. The exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                raise
        return self.proc.returncode


@contextlib.contextmanager
def hold_port(port: int, host: str = "127.0.0.1") -> Iterator[bool]:
    """Listen on ``port`` while inside, if it is free; yields whether we hold it.

    Either way the port is busy inside the block (someone else has it when we don't).
    """
    if not port_is_free(host, port):
        yield False
        return
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
        sock.listen()
        yield True
    finally:
        sock.close()
