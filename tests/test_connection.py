"""fnhost.connection: every way fn.yaml's ``nats:`` section reaches a real nats-server.

Each server here requires the credentials under test (an anonymous client is
refused, checked first), so a host that ignored them could not pass. The host
takes everything from the manifest: no ``--nats`` override, relative key and
certificate paths resolved against fn.yaml's folder.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nkeys
import pytest
from nats.aio.client import Client as NatsClient

from conftest import write_project
from fnhost.errors import FnhostError
from fnhost.host import Host
from fnhost.manifest import parse_manifest
from fnhost_sdk.server import NatsServer, free_port
from fnhost_sdk.testing import NatsServerFactory
from support.certs import TlsFiles, make_tls_files
from support.nats_auth import make_operator_setup, new_keypair

pytestmark = pytest.mark.nats

ECHO = """\
async def handle(data: str) -> str:
    return "echo " + data
"""

MANIFEST = """\
version: 1
http: false
nats:
{nats}
{streams}
functions:
  echo:
    module: echo.py
    trigger: {{request: conn.echo}}
"""

StartHost = Callable[..., Awaitable[Host]]


@pytest.fixture
async def start_host(
    tmp_path: Path, nats_server_factory: NatsServerFactory
) -> AsyncIterator[StartHost]:
    """Start a host whose NATS settings all come from the manifest; drained at teardown
    (before the servers stop: the factory is set up first, so torn down last)."""
    hosts: list[Host] = []

    async def start(
        nats_section: str, *, streams: str = "", files: dict[str, str] | None = None
    ) -> Host:
        project = tmp_path / f"project{len(hosts)}"
        path = write_project(
            project,
            MANIFEST.format(nats=nats_section, streams=streams),
            {"echo.py": ECHO, **(files or {})},
        )
        host = Host(
            parse_manifest(path.read_text(), file=str(path), root=project),
            drain_grace=5,
            load_entry_points=False,
        )
        hosts.append(host)
        # A host that cannot connect retries forever; the test must end anyway.
        async with asyncio.timeout(60):
            await host.start()
        return host

    yield start
    for host in reversed(hosts):
        if host.ready and not host.draining:
            await host.drain()
        elif not host.draining:
            await host.close(drain=False)


async def _echo(url: str, **options: Any) -> bytes:
    nc = await nats.connect(url, max_reconnect_attempts=0, connect_timeout=5, **options)
    try:
        reply = await nc.request("conn.echo", b"hi", timeout=10)
        return reply.data
    finally:
        await nc.close()


async def _assert_refused(url: str, **options: Any) -> None:
    """The server refuses a client without the right credentials."""
    nc = NatsClient()
    try:
        with pytest.raises((nats.errors.Error, OSError)):
            await nc.connect(
                url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5, **options
            )
    finally:
        # A refused connect leaves its socket open; close() releases it, but after a
        # failed TLS handshake nats-py's close() never returns: release it directly.
        try:
            async with asyncio.timeout(2):
                await nc.close()
        except TimeoutError:
            transport = getattr(nc, "_transport", None)
            if transport is not None:
                transport.close()


def _nats_section(**values: str) -> str:
    return "\n".join(f"  {key}: {value}" for key, value in values.items())


async def test_a_url_list_skips_a_dead_server(
    start_host: StartHost, nats_server: NatsServer
) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    host = await start_host(_nats_section(url=f'"{dead}, {nats_server.url}"'))
    assert host.nc.connected_url is not None
    assert host.nc.connected_url.port == nats_server.port
    assert await _echo(nats_server.url) == b"echo hi"


async def test_user_and_password(
    start_host: StartHost, nats_server_factory: NatsServerFactory
) -> None:
    server = nats_server_factory(
        config_extra='authorization { user: fnhost, password: "s3cret-pw" }'
    )
    await _assert_refused(server.url)
    await start_host(_nats_section(url=f'"{server.url}"', user="fnhost", password='"s3cret-pw"'))
    assert await _echo(server.url, user="fnhost", password="s3cret-pw") == b"echo hi"


async def test_wrong_password_fails_the_start_with_a_clear_error(
    start_host: StartHost, nats_server_factory: NatsServerFactory
) -> None:
    server = nats_server_factory(
        config_extra='authorization { user: fnhost, password: "s3cret-pw" }'
    )
    with pytest.raises(FnhostError) as caught:
        await start_host(_nats_section(url=f'"{server.url}"', user="fnhost", password="wrong"))
    message = str(caught.value)
    assert "authorization" in message.lower(), message
    assert str(server.port) in message, message


async def test_token(start_host: StartHost, nats_server_factory: NatsServerFactory) -> None:
    server = nats_server_factory(config_extra='authorization { token: "t0ken-xyz" }')
    await _assert_refused(server.url)
    await start_host(_nats_section(url=f'"{server.url}"', token='"t0ken-xyz"'))
    assert await _echo(server.url, token="t0ken-xyz") == b"echo hi"


async def test_nkey_seed_file(
    start_host: StartHost, nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    user = new_keypair(nkeys.PREFIX_BYTE_USER)
    server = nats_server_factory(
        config_extra=f"authorization {{ users: [ {{ nkey: {user.public_key.decode()} }} ] }}"
    )
    await _assert_refused(server.url)
    # A relative path: resolved against fn.yaml's folder, not the working directory.
    await start_host(
        _nats_section(url=f'"{server.url}"', nkey="keys/user.nk"),
        files={"keys/user.nk": user.seed.decode() + "\n"},
    )
    seed_file = tmp_path / "client.nk"
    seed_file.write_bytes(user.seed)
    assert await _echo(server.url, nkeys_seed=str(seed_file)) == b"echo hi"


async def test_creds_file_with_an_operator_account_user_jwt_chain(
    start_host: StartHost, nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    setup = make_operator_setup()
    server = nats_server_factory(config_extra=setup.server_config)
    await _assert_refused(server.url)
    streams = 'streams:\n  JOBS: {subjects: ["jobs.>"]}'
    host = await start_host(
        _nats_section(url=f'"{server.url}"', creds="user.creds"),
        streams=streams,
        files={"user.creds": setup.creds},
    )
    creds = tmp_path / "client.creds"
    creds.write_text(setup.creds)
    assert await _echo(server.url, user_credentials=str(creds)) == b"echo hi"
    # JetStream in the account works through the same connection: provisioning did.
    info = await host.js.stream_info("JOBS")
    assert info.config.subjects == ["jobs.>"]


def _tls_server(factory: NatsServerFactory, files: TlsFiles) -> NatsServer:
    return factory(
        config_extra=(
            f'tls {{ cert_file: "{files.server_cert}", key_file: "{files.server_key}", '
            f'ca_file: "{files.ca}", verify: true, timeout: 5 }}'
        )
    )


async def test_tls_with_a_client_certificate(
    start_host: StartHost, nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    files = make_tls_files(tmp_path / "tls")
    server = _tls_server(nats_server_factory, files)
    # Neither plain TCP nor TLS without a client certificate gets in.
    await _assert_refused(server.url)
    await _assert_refused(server.url, tls=ssl.create_default_context(cafile=str(files.ca)))
    await start_host(
        _nats_section(
            url=f'"{server.url}"',
            tls=f'{{ca: "{files.ca}", cert: "{files.client_cert}", key: "{files.client_key}"}}',
        )
    )
    context = ssl.create_default_context(cafile=str(files.ca))
    context.load_cert_chain(str(files.client_cert), str(files.client_key))
    assert await _echo(server.url, tls=context) == b"echo hi"


async def test_tls_url_scheme_with_a_ca_only(
    start_host: StartHost, nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    files = make_tls_files(tmp_path / "tls")
    server = nats_server_factory(
        config_extra=f'tls {{ cert_file: "{files.server_cert}", key_file: "{files.server_key}" }}'
    )
    tls_url = server.url.replace("nats://", "tls://")
    await start_host(_nats_section(url=f'"{tls_url}"', tls=f'{{ca: "{files.ca}"}}'))
    context = ssl.create_default_context(cafile=str(files.ca))
    assert await _echo(tls_url, tls=context) == b"echo hi"


async def test_an_untrusted_server_certificate_fails_the_start_with_a_clear_error(
    start_host: StartHost, nats_server_factory: NatsServerFactory, tmp_path: Path
) -> None:
    files = make_tls_files(tmp_path / "tls")
    other_ca = make_tls_files(tmp_path / "other").ca
    server = _tls_server(nats_server_factory, files)
    with pytest.raises(FnhostError) as caught:
        await start_host(
            _nats_section(
                url=f'"{server.url}"',
                tls=f'{{ca: "{other_ca}", cert: "{files.client_cert}", key: "{files.client_key}"}}',
            )
        )
    message = str(caught.value)
    assert "certificate verification failed" in message, message
    assert str(server.port) in message, message
