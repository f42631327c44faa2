"""Hosts as real processes for chaos tests: start, ``kill -9``, restart, read their logs.

Every process runs ``python -m fnhost run fn.yaml --nats URL`` in its own
process group, with the test plugins importable (``plugins_for_tests``), and
logs to a file the test can read after the process is gone. A watchdog stops
it (a drain, then SIGKILL) if the test process dies first: pytest ended by
SIGTERM or SIGKILL runs no teardown, and the host would reconnect forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from fnhost_sdk.server import OwnerWatchdog
from fnhost_sdk.waiting import wait_for_sync

TESTS_DIR = Path(__file__).resolve().parents[1]


class HostProcess:
    """One host process that can be killed and started again with the same settings."""

    def __init__(
        self,
        manifest: Path,
        nats_url: str,
        *,
        env: Mapping[str, str] | None = None,
        grace: float = 5.0,
        name: str = "host",
    ) -> None:
        self.manifest = manifest
        self.nats_url = nats_url
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(TESTS_DIR), self.env.get("PYTHONPATH", "")) if p
        )
        self.grace = grace
        self.log_path = manifest.parent / f"{name}.log"
        self.lives = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: OwnerWatchdog | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int:
        """Pid of the current (or last) life."""
        assert self._proc is not None, "never started"
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Exit code of the last life, None while it runs."""
        return None if self._proc is None else self._proc.poll()

    def start(self, *, wait_ready: bool = True) -> None:
        """Start a new life of the host; by default wait until it logs that it is ready."""
        self._release_watchdog()
        with self.log_path.open("ab") as log:
            log.write(f"--- life {self.lives + 1}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fnhost",
                    "run",
                    str(self.manifest),
                    "--nats",
                    self.nats_url,
                    "--grace",
                    str(self.grace),
                ],
                cwd=self.manifest.parent,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._watchdog = OwnerWatchdog(self._proc.pid, str(self.manifest), self.log_path)
        self.lives += 1
        if wait_ready:
            life = self.lives
            wait_for_sync(
                lambda: (
                    self.log().split(f"--- life {life}\n")[-1].count("host ready") > 0
                    or not self.alive
                ),
                timeout=30,
                message=f"{self.log_path.name} life {life} ready",
            )

    def kill(self) -> None:
        """SIGKILL the host's process group: no drain, no acks, no cleanup."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()
        self._release_watchdog()

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (a graceful drain) and return the exit code."""
        assert self._proc is not None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
        code = self._proc.wait(timeout)
        self._release_watchdog()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def print_tail(self, lines: int = 60) -> None:
        """Print the end of the log: pytest shows it with a failed test's output, after
        the test's temp dir (and so the log) may be gone."""
        tail = "\n".join(self.log().splitlines()[-lines:])
        print(f"--- last {lines} lines of {self.log_path}:\n{tail}")

    def close(self) -> None:
        self.kill()

    def _release_watchdog(self) -> None:
        """The last life has exited: its watchdog has nothing left to stop."""
        if self._watchdog is not None and self._proc is not None and self._proc.poll() is not None:
            self._watchdog.release()
            self._watchdog = None
