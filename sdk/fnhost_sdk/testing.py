"""pytest fixtures that run a real nats-server for your function's tests.

Installing fnhost registers this plugin (entry point ``pytest11: fnhost``), so
the fixtures are there in any project's tests without a conftest import::

    import nats
    import pytest

    from fnhost_sdk.testing import wait_for


    @pytest.mark.nats
    async def test_order_is_charged(nats_url: str) -> None:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="ORDERS", subjects=["orders.>"])
            ...  # start your host or call your handler, publish an input
            await wait_for(lambda: ledger.count() == 1, message="payment recorded")
        finally:
            await nc.close()

Every server runs on an ephemeral loopback port with its store in the test's
``tmp_path``, and is stopped when the test ends; the teardown then fails the
test if any nats-server it started is still alive (an orphan on
a known port once made a test pass for the wrong reason). Faults are methods of
the server: ``kill()``, ``restart()`` (same port, same data), ``pause()`` /
``resume()``. Wait for conditions with ``wait_for`` (async) or
``wait_for_sync``, never with a bare sleep.

Fixtures:

- ``nats_server``: one JetStream server (a ``NatsServer``), function-scoped.
- ``nats_url``: its URL.
- ``nats_server_factory``: call it for more servers (``jetstream=``,
  ``config_extra=``, ``start=False`` to start it yourself); all stopped at the end.
- ``nats_cluster``: a 3-node JetStream cluster (a ``NatsCluster``) with a meta
  leader; ``await nats_cluster.stream_leader(nc, "ORDERS")`` finds a leader to kill.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from fnhost_sdk.cluster import NatsCluster
from fnhost_sdk.server import NatsServer, find_nats_servers
from fnhost_sdk.waiting import wait_for, wait_for_sync

__all__ = [
    "NatsCluster",
    "NatsServer",
    "NatsServerFactory",
    "assert_no_stray_servers",
    "wait_for",
    "wait_for_sync",
]


def pytest_configure(config: pytest.Config) -> None:
    """Register the ``nats`` marker, so ``--strict-markers`` projects can use it."""
    config.addinivalue_line("markers", "nats: talks to a real nats-server started by the test")


def assert_no_stray_servers(servers: list[NatsServer], root: Path) -> None:
    """Fail if a server we started, or any nats-server whose files are under ``root``, lives.

    Strays are killed before failing, so one leak does not cascade into the next test.
    """
    problems: list[str] = []
    for server in servers:
        if server.running:
            problems.append(f"{server!r} still running after teardown")
            server.kill()
    for pid in find_nats_servers(root):
        problems.append(f"stray nats-server pid {pid} with files under {root}")
        with contextlib.suppress(ProcessLookupError):  # it may have exited meanwhile
            os.kill(pid, signal.SIGKILL)
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


class NatsServerFactory:
    """Makes ``NatsServer``s in numbered store dirs under one root; ``close()`` stops them all."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.servers: list[NatsServer] = []

    def __call__(
        self,
        *,
        jetstream: bool = True,
        config_extra: str = "",
        port: int = -1,
        server_name: str | None = None,
        start: bool = True,
    ) -> NatsServer:
        """A new server in ``root/nN`` (started unless ``start=False``)."""
        server = NatsServer(
            self.root / f"n{len(self.servers) + 1}",
            port=port,
            jetstream=jetstream,
            config_extra=config_extra,
            server_name=server_name,
            # A test run killed outright (a CI time box, Ctrl-C twice) leaves no server.
            die_with_parent=True,
        )
        self.servers.append(server)
        return server.start() if start else server

    def close(self) -> None:
        """Stop every server this factory made."""
        for server in self.servers:
            server.stop()


@pytest.fixture
def nats_server_factory(tmp_path: Path) -> Iterator[NatsServerFactory]:
    """Make as many servers as the test needs; all stopped and checked at teardown."""
    # Its own subdirectory: the stray check must not see the cluster fixture's servers.
    factory = NatsServerFactory(tmp_path / "nats")
    try:
        yield factory
    finally:
        factory.close()
        assert_no_stray_servers(factory.servers, factory.root)


@pytest.fixture
def nats_server(nats_server_factory: NatsServerFactory) -> NatsServer:
    """A running single-node JetStream server on an ephemeral loopback port."""
    return nats_server_factory()


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """The ``nats://127.0.0.1:PORT`` URL of ``nats_server``."""
    return nats_server.url


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A 3-node JetStream cluster on loopback, started and with a meta leader."""
    # A test run killed outright (a CI time box, Ctrl-C twice) leaves no server.
    cluster = NatsCluster(tmp_path / "cluster", 3, die_with_parent=True)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        assert_no_stray_servers(cluster.servers, cluster.root)
