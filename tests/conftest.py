"""Shared fixtures: ``host_factory`` runs an in-process Host on the test's nats-server.

The nats-server fixtures themselves come from :mod:`fnhost_sdk.testing`, the
pytest plugin fnhost installs for its users too.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from fnhost.host import Host
from fnhost.manifest import parse_manifest
from fnhost_sdk.server import NatsServer

HostFactory = Callable[..., Awaitable[Host]]


def write_project(root: Path, manifest: str, files: Mapping[str, str]) -> Path:
    """Write ``fn.yaml`` and function sources (dedented) under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    manifest_path = root / "fn.yaml"
    manifest_path.write_text(textwrap.dedent(manifest))
    return manifest_path


@pytest.fixture
async def host_factory(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[HostFactory]:
    """Start hosts from manifest text; every host is drained at teardown."""
    hosts: list[Host] = []

    async def start(
        manifest: str,
        files: Mapping[str, str] | None = None,
        *,
        plugins: Sequence[object] = (),
        root: Path | None = None,
        drain_grace: float = 5.0,
        url: str | None = None,
    ) -> Host:
        project = root or tmp_path / f"project{len(hosts)}"
        path = write_project(project, manifest, files or {})
        host = Host(
            parse_manifest(path.read_text(), file=str(path), root=project),
            nats_url=url or nats_server.url,
            drain_grace=drain_grace,
            plugins=plugins,
            load_entry_points=False,
        )
        hosts.append(host)
        await host.start()
        return host

    yield start
    for host in reversed(hosts):
        if not host.draining:
            await host.drain()


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A plain nats-py client on the test's server."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
def js(nc: NatsClient) -> JetStreamContext:
    """The JetStream context of ``nc``."""
    return nc.jetstream()
