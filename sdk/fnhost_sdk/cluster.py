"""``NatsCluster``: N JetStream servers on loopback forming one cluster, for fault tests.

Helpers find the current stream and consumer leaders so a test can kill them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Self

import nats.errors
from nats.aio.client import Client
from nats.js.api import ConsumerInfo
from nats.js.errors import NotFoundError
from nats.js.manager import JetStreamManager

from fnhost_sdk.server import (
    _PROBE_TIMEOUT,
    ClusterSpec,
    NatsServer,
    NatsServerError,
    _http_get,
    free_port,
)
from fnhost_sdk.waiting import wait_for, wait_for_sync

__all__ = ["NatsCluster"]

log = logging.getLogger(__name__)


class NatsCluster:
    """``size`` JetStream servers on loopback forming one cluster.

    Nodes are named ``{name}-n1``…; their store dirs are ``root/n1``…. Route
    ports are reserved up front (every node must know the others' before any
    starts); client ports are ephemeral and pinned like ``NatsServer``'s.
    ``die_with_parent`` is passed to every node (:class:`NatsServer`).
    """

    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        name: str = "fnhost",
        config_extra: str = "",
        start_timeout: float = 30.0,
        die_with_parent: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.root = Path(root).absolute()
        self.name = name
        self.start_timeout = start_timeout
        route_ports: list[int] = []
        while len(route_ports) < size:
            port = free_port()
            if port not in route_ports:
                route_ports.append(port)
        routes = tuple(f"nats-route://127.0.0.1:{port}" for port in route_ports)
        self.servers: list[NatsServer] = [
            NatsServer(
                self.root / f"n{i + 1}",
                cluster=ClusterSpec(name, route_ports[i], routes),
                server_name=f"{name}-n{i + 1}",
                config_extra=config_extra,
                start_timeout=start_timeout,
                die_with_parent=die_with_parent,
            )
            for i in range(size)
        ]

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node, for ``nats.connect(servers=...)``."""
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """The comma list form of ``urls`` (as ``nats.url`` in fn.yaml takes it)."""
        return ",".join(self.urls)

    def start(self) -> Self:
        """Start every node; return once JetStream has a meta leader every node agrees on."""
        deadline = time.monotonic() + self.start_timeout
        try:
            # All spawned before any is waited on: they boot in parallel and meet at once.
            for server in self.servers:
                server._spawn()
            for server in self.servers:
                server._wait_until_ready(deadline)
            self.wait_for_meta_leader(max(deadline - time.monotonic(), 1.0))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node (SIGTERM, then SIGKILL)."""
        for server in self.servers:
            server.stop()

    def server(self, server_name: str) -> NatsServer:
        """The node called ``server_name``."""
        for server in self.servers:
            if server.server_name == server_name:
                return server
        raise NatsServerError(f"no node named {server_name!r} in cluster {self.name!r}")

    def wait_for_meta_leader(self, timeout: float = 30.0) -> NatsServer:
        """Block until every running node names the same meta leader and is healthy."""

        def leader() -> str | None:
            names = set()
            for server in self.servers:
                if not server.running or server.paused:
                    continue  # a paused node would only time the probe out
                status, body = _http_get(f"{server.monitor_url}/jsz")
                if status != 200:
                    return None
                names.add(json.loads(body).get("meta_cluster", {}).get("leader"))
                # /healthz is 200 once this node's JetStream is current with the leader,
                # which is when an R3 stream can be placed on it.
                if _http_get(f"{server.monitor_url}/healthz")[0] != 200:
                    return None
            name = names.pop() if len(names) == 1 else None
            return name if isinstance(name, str) and name else None

        name = wait_for_sync(
            leader, timeout, interval=0.05, message="JetStream meta leader elected"
        )
        return self.server(name)

    async def stream_leader(
        self,
        client: Client | JetStreamManager,
        stream: str,
        *,
        timeout: float = 10.0,
    ) -> NatsServer:
        """The node leading ``stream``'s raft group (waits through an election)."""
        jsm = client.jsm() if isinstance(client, Client) else client

        async def leader() -> str | None:
            try:
                # A short probe: mid-failover a request may go to a dead connection.
                info = await asyncio.wait_for(jsm.stream_info(stream), _PROBE_TIMEOUT)
            except NotFoundError:
                raise
            except (nats.errors.Error, TimeoutError):
                return None  # no leader mid-election: the API does not answer
            return info.cluster.leader if info.cluster else None

        return self.server(
            await wait_for(leader, timeout, message=f"stream {stream!r} has a leader")
        )

    async def consumer_leader(
        self,
        client: Client | JetStreamManager,
        stream: str,
        consumer: str,
        *,
        timeout: float = 10.0,
    ) -> NatsServer:
        """The node leading the consumer's raft group (waits through an election)."""
        jsm = client.jsm() if isinstance(client, Client) else client

        async def leader() -> str | None:
            try:
                info: ConsumerInfo = await jsm.consumer_info(stream, consumer, _PROBE_TIMEOUT)
            except NotFoundError:
                raise
            except (nats.errors.Error, TimeoutError):
                return None
            return info.cluster.leader if info.cluster else None

        message = f"consumer {stream}/{consumer} has a leader"
        return self.server(await wait_for(leader, timeout, message=message))

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
