"""The local nats-server behind ``nats.url: embedded`` (what ``fnhost dev`` runs).

One JetStream server per project, its data in ``.fnhost/nats`` beside fn.yaml,
on port 4222 when that is free and on a free port otherwise. While it runs its
URL is in ``.fnhost/nats.url``, which is how ``fnhost invoke``/``publish``/``dlq``
run from the same project find it (``discover_url``).

A host killed with SIGKILL cannot stop its server, and nats-server cannot watch
its parent. Three layers keep that from breaking the next ``fnhost dev``:

1. The server is started with ``die_with_parent=True``: a tiny watchdog process
   holds a pipe from the host and SIGTERMs the server when the pipe closes
   without a clean stop, i.e. when the host died.
2. The host holds an ``flock`` on ``.fnhost/nats.lock`` while its server runs.
   The kernel drops it when the host dies, so a held lock means a live owner
   (refuse to start a second server on the same store: nats-server 2.15 does not
   lock its store dir and two servers on one would corrupt it) and a free lock
   means any server still running on this store is an orphan.
3. ``start()`` finds such orphans by command line and stops them before
   starting, and overwrites a stale ``nats.url``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlsplit

from fnhost.errors import FnhostError
from fnhost_sdk.server import (
    NatsServer,
    NatsServerError,
    find_nats_servers,
    port_is_free,
)
from fnhost_sdk.waiting import wait_for_sync

__all__ = ["DEFAULT_PORT", "EmbeddedNats", "EmbeddedNatsError", "discover_url"]

log = logging.getLogger(__name__)

DEFAULT_PORT = 4222
STATE_DIR = ".fnhost"


class EmbeddedNatsError(FnhostError):
    """The embedded nats-server could not be started."""


def _state_dir(project_root: Path) -> Path:
    # Resolved: a project reached through a symlink is still the same project.
    return Path(project_root).resolve() / STATE_DIR


def _server_name(project_root: Path) -> str:
    # Names the project, so discover_url can tell our server from whatever else
    # took the port after a crash; nats-server forbids spaces in names.
    digest = hashlib.sha256(str(Path(project_root).resolve()).encode()).hexdigest()
    return f"fnhost-dev-{digest[:12]}"


def _server_info(host: str, port: int, timeout: float = 0.5) -> dict[str, object] | None:
    """The INFO a nats-server sends on connect, or None if nothing NATS answers there."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            data = b""
            while b"\r\n" not in data and len(data) < 65536:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    line = data.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    return info if isinstance(info, dict) else None


def discover_url(project_root: Path) -> str | None:
    """The URL of this project's running embedded server, else None.

    Reads ``.fnhost/nats.url`` and returns it only when a nats-server answers
    there with this project's server name: after a crash the file may be stale,
    and its port may since have been taken by another server.
    """
    try:
        url = (_state_dir(project_root) / "nats.url").read_text(encoding="utf-8").strip()
    except OSError:
        return None
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or not port:
        return None
    info = _server_info(host, port)
    if info is None or info.get("server_name") != _server_name(project_root):
        return None
    return url


class _ProjectLock:
    """An exclusive ``flock`` on a file, released by the kernel if this process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        if self._fd is not None:
            return True
        if sys.platform == "win32":  # no flock: rely on the orphan scan alone
            return True
        import fcntl

        # Not inheritable (PEP 446): a child such as nats-server must not keep it held.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        # The owner's pid, for a human wondering who holds it.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


class EmbeddedNats:
    """The project's local JetStream server: ``url = await EmbeddedNats(root).start()``.

    ``port`` is the preferred port; when it is taken the server takes a free
    one and says so in the log. Blocking process work runs in a thread, so
    ``start()``/``stop()`` do not stall the event loop.
    """

    def __init__(
        self, project_root: Path, *, port: int = DEFAULT_PORT, host: str = "127.0.0.1"
    ) -> None:
        self.project_root = Path(project_root).resolve()
        self.preferred_port = port
        self.host = host
        self._server: NatsServer | None = None
        self._url: str | None = None
        self._lock = _ProjectLock(self.state_dir / "nats.lock")

    @property
    def state_dir(self) -> Path:
        """``.fnhost`` beside fn.yaml."""
        return _state_dir(self.project_root)

    @property
    def data_dir(self) -> Path:
        """The server's config, log and JetStream store: ``.fnhost/nats``."""
        return self.state_dir / "nats"

    @property
    def url_file(self) -> Path:
        """``.fnhost/nats.url``: the URL while the server runs."""
        return self.state_dir / "nats.url"

    @property
    def url(self) -> str | None:
        """The running server's URL, else None."""
        return self._url if self._server is not None and self._server.running else None

    @property
    def server(self) -> NatsServer | None:
        """The underlying ``NatsServer`` (for its log, pid and monitoring URL)."""
        return self._server

    async def start(self) -> str:
        """Start the server (stopping an orphan of a crashed run first); its URL."""
        if self.url is not None:
            return self.url
        return await asyncio.to_thread(self._start)

    async def stop(self) -> None:
        """Stop the server, remove ``nats.url`` if it is still ours, release the lock."""
        server = self._server
        if server is not None:
            await asyncio.to_thread(server.stop)
        self._forget()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- blocking internals, run in a worker thread

    def _start(self) -> str:
        if self._server is not None:  # ours, but it died: reap it, free the lock
            self._server.stop()
            self._forget()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self._lock.acquire():
            running = discover_url(self.project_root)
            raise EmbeddedNatsError(
                f"another fnhost process runs the embedded nats-server of {self.project_root}"
                + (f" at {running}" if running else "")
                + "; stop it, or connect to it with --nats URL"
            )
        try:
            self._stop_orphans()
            server = self._launch()
            try:
                # Write-then-rename: a reader never sees half a URL. Overwrites a stale one.
                tmp = self.url_file.with_name(f"nats.url.{os.getpid()}.tmp")
                tmp.write_text(server.url + "\n", encoding="utf-8")
                os.replace(tmp, self.url_file)
            except BaseException:
                server.stop()
                raise
        except BaseException:
            self._lock.release()
            raise
        self._server, self._url = server, server.url
        log.info("embedded nats-server on %s (data in %s)", server.url, self.data_dir)
        return server.url

    def _stop_orphans(self) -> None:
        """Stop nats-servers still running on our store after their host died.

        Only called with the lock held, so no live fnhost owns them. SIGTERM
        first (JetStream flushes), SIGKILL after 10 s.
        """
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            orphans = find_nats_servers(self.data_dir)
            if not orphans:
                return
            for pid in orphans:
                log.warning(
                    "sending %s to nats-server pid %s orphaned by a crashed fnhost", sig.name, pid
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                    os.kill(pid, signal.SIGCONT)  # in case it was left stopped
            with contextlib.suppress(AssertionError):
                wait_for_sync(lambda: not find_nats_servers(self.data_dir), grace, 0.05)
        if find_nats_servers(self.data_dir):
            raise EmbeddedNatsError(f"cannot stop the orphaned nats-server on {self.data_dir}")

    def _launch(self) -> NatsServer:
        port = self.preferred_port
        if port > 0 and not port_is_free(self.host, port):
            log.info("port %s is in use; the embedded nats-server takes a free port", port)
            port = -1
        try:
            return self._new_server(port).start()
        except NatsServerError as err:
            if port == -1 or "address already in use" not in str(err):
                raise
            # Someone took the port between the check and nats-server's bind.
            log.info(
                "port %s was taken while starting; the embedded nats-server takes a free port", port
            )
            return self._new_server(-1).start()

    def _new_server(self, port: int) -> NatsServer:
        return NatsServer(
            self.data_dir,
            host=self.host,
            port=port,
            server_name=_server_name(self.project_root),
            die_with_parent=True,
        )

    def _forget(self) -> None:
        url, self._url, self._server = self._url, None, None
        try:
            # Only our own URL: a newer run may have written its own meanwhile.
            if url is not None and self.url_file.read_text(encoding="utf-8").strip() == url:
                self.url_file.unlink()
        except FileNotFoundError:
            pass
        self._lock.release()
