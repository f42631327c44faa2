"""Private Redis and PostgreSQL servers for tests: loopback, a free port, a temp dir.

``RedisServer`` and ``PostgresServer`` start, stop, ``kill()`` and
``restart()`` (same port, same data) a real server, like
:class:`fnhost_sdk.server.NatsServer` does for NATS. The fixtures at the end
give a test its own (function-scoped, for tests that kill the server) or a
shared one (session-scoped, each test in its own database or key prefix).

A missing binary skips the test on a developer machine and fails it under
``CI=true``: CI installs ``redis-server`` and ``postgresql`` (see ``.ci/run``).
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fnhost_sdk.server import free_port
from fnhost_sdk.waiting import wait_for_sync
from support import require


def _pg_bin() -> Path:
    """``FNHOST_PG_BIN``, else the newest Debian PostgreSQL, else ``initdb`` on PATH."""
    if configured := os.environ.get("FNHOST_PG_BIN"):
        return Path(configured)
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else Path("/usr/lib/postgresql/15/bin")


PG_BIN = _pg_bin()

__all__ = [
    "PostgresServer",
    "RedisServer",
    "postgres_dsn",
    "postgres_server",
    "redis_server",
    "redis_url",
    "require",
]


def _stop(proc: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout: float) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class RedisServer:
    """A redis-server without persistence on 127.0.0.1 and a free port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        assert binary is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(self.workdir)]
        with (self.workdir / "redis.log").open("ab") as log:
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for_sync(self._answers, timeout=10, message=f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        import socket

        if self._proc is not None and self._proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self._proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        _stop(self._proc, signal.SIGKILL, 5)

    def stop(self) -> None:
        _stop(self._proc, signal.SIGTERM, 10)

    def restart(self) -> RedisServer:
        self.stop()
        return self.start()


class PostgresServer:
    """A PostgreSQL cluster in a temp dir (owned by ``postgres`` when run as root)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="fnhost-pg-"))
        self.data = self.workdir / "data"
        self._as_postgres = os.geteuid() == 0
        self._databases = itertools.count(1)
        if self._as_postgres:
            entry = pwd.getpwnam("postgres")
            os.chown(self.workdir, entry.pw_uid, entry.pw_gid)
        self._run(
            [str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust"],
            "initdb",
        )
        settings = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.workdir}'",
            "fsync = on",
            "max_connections = 200",
            "shared_buffers = 32MB",
        ]
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n".join(settings) + "\n")

    def _run(self, argv: list[str], what: str) -> None:
        if self._as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=self.workdir)
        if done.returncode != 0:
            raise RuntimeError(f"{what} failed: {done.stdout}\n{done.stderr}")

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        log = self.workdir / "postgres.log"
        self._run(
            [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(log), "-w", "start"],
            "pg_ctl start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(
                [str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"],
                "pg_ctl stop",
            )

    def kill(self) -> None:
        """Stop at once (``immediate``: no checkpoint, clients cut off)."""
        self.stop("immediate")

    def restart(self) -> PostgresServer:
        self.stop()
        return self.start()

    def create_database(self) -> str:
        """A new empty database; returns its DSN."""
        import psycopg

        name = f"test_{next(self._databases)}_{int(time.time() * 1000) % 100000}"
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.dsn_for(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def postgres_available() -> bool:
    return (PG_BIN / "initdb").exists()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the session (tests take a database each)."""
    require(f"PostgreSQL ({PG_BIN}/initdb)", postgres_available())
    require("psycopg", _importable("psycopg"))
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's PostgreSQL server."""
    return postgres_server.create_database()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for one test (it may kill and restart it)."""
    require("redis-server", shutil.which("redis-server") is not None)
    require("the redis package", _importable("redis"))
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
