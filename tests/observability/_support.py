"""Helpers shared by the observability tests: HTTP from a thread, spans in memory."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fnhost.plugins import hookimpl
from fnhost_sdk.waiting import wait_for_sync

if TYPE_CHECKING:
    from fnhost.host import Host

TESTS_DIR = Path(__file__).resolve().parents[1]

HostFactory = Callable[..., Awaitable["Host"]]
"""The ``host_factory`` fixture of tests/conftest.py."""


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def _fetch(url: str, method: str, body: bytes | None, headers: dict[str, str]) -> HttpResult:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return HttpResult(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        with error:
            return HttpResult(error.code, dict(error.headers), error.read())


async def http(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> HttpResult:
    """One HTTP request from a worker thread, so the host in this loop can answer it."""
    return await asyncio.to_thread(_fetch, url, method, body, headers or {})


class SpanMemory:
    """A plugin object: every finished span of the host it is registered with, in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()

    @hookimpl
    def fnhost_startup(self, host: Host) -> None:
        assert host.tracing.provider is not None, "tracing.exporter is none: no spans"
        host.tracing.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans if span.name == name]


class CliHost:
    """``python -m fnhost <command> fn.yaml --nats URL [args]`` as a process, output in a file."""

    def __init__(self, manifest: Path, nats_url: str, command: str = "run", *args: str) -> None:
        self.manifest = manifest
        self.log_path = manifest.parent / f"{command}.log"
        self.argv = [sys.executable, "-m", "fnhost", command, str(manifest), "--nats", nats_url]
        self.argv += ["--grace", "5", *args]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), *_pythonpath()])}
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, *, wait_ready: bool = True) -> None:
        """Start the process; by default wait until it logs that it is ready (an INFO line)."""
        with self.log_path.open("wb") as out:
            self._proc = subprocess.Popen(
                self.argv,
                cwd=self.manifest.parent,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait_ready:
            wait_for_sync(
                lambda: "host ready" in self.log() or not self.alive,
                timeout=30,
                message=f"{self.log_path.name}: host ready",
            )
            assert self.alive, self.log()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM, wait, return the exit code (SIGKILL if it does not exit)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return 0
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()


def _pythonpath() -> list[str]:
    current = os.environ.get("PYTHONPATH")
    return [current] if current else []
