"""``fnhost run --workers N`` as a real process for tests: its HTTP face, its workers."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from fnhost_sdk.waiting import wait_for_sync


class Supervised:
    """``python -m fnhost run fn.yaml --workers N`` in its own session, logging to a file."""

    def __init__(self, root: Path, *extra: str) -> None:
        self.log_path = root / "supervisor.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fnhost", "run", "fn.yaml", "--grace", "5", *extra],
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        found = wait_for_sync(
            lambda: re.search(r'"fnhost.workers", "msg": "HTTP on (http://[0-9.:]+)', self.log()),
            timeout=30,
            message="the supervisor's HTTP address in its log",
        )
        self.url = found.group(1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=10) as answer:
                body = answer.read()
                status = answer.status
        except urllib.error.HTTPError as refused:
            with refused:
                body, status = refused.read(), refused.code
        return status, (json.loads(body) if path != "/metrics" else body.decode())

    def workers(self) -> list[dict[str, Any]]:
        return list(self.get("/healthz")[1]["workers"])

    def pid_of(self, index: int) -> int:
        return int(next(w["pid"] for w in self.workers() if w["worker"] == index))

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def metric(self, name: str, **labels: str) -> float:
        for family in text_string_to_metric_families(self.get("/metrics")[1]):
            for sample in family.samples:
                wanted = all(sample.labels.get(key) == want for key, want in labels.items())
                if sample.name == name and wanted:
                    return float(sample.value)
        raise AssertionError(f"no sample {name} {labels}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def close(self, worker_pids: list[int]) -> None:
        for pid in worker_pids:
            kill(pid)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: its parent just has not reaped it yet.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rpartition(")")[2].split()[0] == "Z")
