"""fnhost.embedded: the project's local nats-server for ``nats.url: embedded``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

import fnhost.embedded
import fnhost_sdk.server
from fnhost.embedded import DEFAULT_PORT, EmbeddedNats, EmbeddedNatsError, discover_url
from fnhost_sdk.server import (
    NatsServer,
    find_nats_servers,
    free_port,
    port_is_free,
)
from fnhost_sdk.testing import assert_no_stray_servers
from fnhost_sdk.waiting import wait_for

pytestmark = pytest.mark.nats

PYTHONPATH = os.pathsep.join(
    str(Path(module.__file__).resolve().parents[1])
    for module in (fnhost.embedded, fnhost_sdk.server)
    if module.__file__
)


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A project root; no nats-server may outlive the test."""
    root = tmp_path / "project"
    root.mkdir()
    yield root
    assert_no_stray_servers([], root)


async def test_starts_on_the_preferred_port_and_publishes_its_url(project: Path) -> None:
    port = free_port()
    embedded = EmbeddedNats(project, port=port)
    url = await embedded.start()
    try:
        assert url == f"nats://127.0.0.1:{port}" == embedded.url
        assert embedded.url_file == project / ".fnhost" / "nats.url"
        assert embedded.url_file.read_text().strip() == url
        assert discover_url(project) == url
        assert embedded.data_dir == project / ".fnhost" / "nats"
        assert embedded.server is not None
        assert "sync_interval: always" in embedded.server.config_path.read_text()
        assert await embedded.start() == url  # idempotent while running

        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="EMB", subjects=["emb"])
            await js.publish("emb", b"x")
        finally:
            await nc.close()
        assert (embedded.data_dir / "jetstream").is_dir()
    finally:
        await embedded.stop()

    assert embedded.url is None
    assert not embedded.url_file.exists()
    assert discover_url(project) is None
    assert find_nats_servers(project) == []
    await embedded.stop()  # idempotent


async def test_takes_a_free_port_when_4222_is_taken(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fnhost.embedded")
    holder: socket.socket | None = None
    if port_is_free("127.0.0.1", DEFAULT_PORT):
        # Free here: occupy it the way another nats-server would.
        holder = socket.socket()
        holder.bind(("127.0.0.1", DEFAULT_PORT))
        holder.listen()
    try:
        async with EmbeddedNats(project) as embedded:
            assert embedded.url is not None
            assert embedded.url != f"nats://127.0.0.1:{DEFAULT_PORT}"
            assert discover_url(project) == embedded.url
    finally:
        if holder is not None:
            holder.close()
    assert "port 4222 is in use" in caplog.text
    assert discover_url(project) is None


async def test_default_port_is_4222_when_free(
    project: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fnhost.embedded")
    async with EmbeddedNats(project) as embedded:
        assert embedded.server is not None
        # 4222 may be taken on this machine: then the log must say so.
        if "port 4222" in caplog.text:
            assert embedded.server.port != DEFAULT_PORT
        else:
            assert embedded.server.port == DEFAULT_PORT


async def test_stop_leaves_a_url_file_that_is_not_its_own(project: Path) -> None:
    embedded = EmbeddedNats(project, port=free_port())
    await embedded.start()
    embedded.url_file.write_text("nats://127.0.0.1:1\n")  # as if another run wrote it
    await embedded.stop()
    assert embedded.url_file.read_text() == "nats://127.0.0.1:1\n"


async def test_a_second_instance_is_refused_while_the_first_runs(project: Path) -> None:
    first = EmbeddedNats(project, port=free_port())
    url = await first.start()
    try:
        with pytest.raises(EmbeddedNatsError, match=f"another fnhost process.*at {url}"):
            await EmbeddedNats(project, port=free_port()).start()
        assert discover_url(project) == url  # the refused one touched nothing
    finally:
        await first.stop()
    second = EmbeddedNats(project, port=free_port())
    await second.start()
    await second.stop()


async def test_stale_url_file_is_ignored_then_overwritten(project: Path) -> None:
    state = project / ".fnhost"
    state.mkdir()
    stale = f"nats://127.0.0.1:{free_port()}"
    (state / "nats.url").write_text(stale + "\n")
    assert discover_url(project) is None  # nothing listens there

    async with EmbeddedNats(project, port=free_port()) as embedded:
        assert embedded.url != stale
        assert discover_url(project) == embedded.url


async def test_discover_url_ignores_a_server_that_is_not_ours(
    project: Path, nats_server: NatsServer
) -> None:
    state = project / ".fnhost"
    state.mkdir()
    (state / "nats.url").write_text(nats_server.url)
    assert discover_url(project) is None  # it answers, but it is not this project's
    (state / "nats.url").write_text("not a url at all")
    assert discover_url(project) is None


async def test_an_orphaned_server_on_the_store_is_stopped_first(project: Path) -> None:
    # A server left on .fnhost/nats by a host and watchdog that both died.
    orphan = NatsServer(project / ".fnhost" / "nats", port=free_port()).start()
    try:
        async with EmbeddedNats(project, port=free_port()) as embedded:
            assert not orphan.running
            assert embedded.server is not None
            assert find_nats_servers(project) == [embedded.server.pid]
    finally:
        orphan.stop()  # reaps it


async def test_restart_after_the_host_was_killed(project: Path, tmp_path: Path) -> None:
    """kill -9 of a host running the embedded server; the next start just works."""
    port = free_port()
    ready = tmp_path / "ready"
    script = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "import nats\n"
        "from fnhost.embedded import EmbeddedNats\n"
        "async def main():\n"
        "    url = await EmbeddedNats(Path(sys.argv[1]), port=int(sys.argv[2])).start()\n"
        "    nc = await nats.connect(url)\n"
        "    js = nc.jetstream()\n"
        "    await js.add_stream(name='KEEP', subjects=['keep'])\n"
        "    await js.publish('keep', b'before the crash')\n"
        "    await nc.close()\n"
        "    Path(sys.argv[3]).write_text(url)\n"
        "    await asyncio.sleep(600)\n"
        "asyncio.run(main())\n"
    )
    argv = [sys.executable, "-c", script, str(project), str(port), str(ready)]
    host = await asyncio.to_thread(
        subprocess.Popen, argv, env={**os.environ, "PYTHONPATH": PYTHONPATH}
    )
    try:
        await wait_for(ready.exists, timeout=30, message="host started the embedded server")
        crashed_url = ready.read_text()
        assert discover_url(project) == crashed_url
    finally:
        host.kill()  # SIGKILL: the host's stop() never runs
        await asyncio.to_thread(host.wait)

    # The watchdog stops the server; the url file and the lock file stay behind.
    await wait_for(lambda: not find_nats_servers(project), timeout=15, message="server stopped")
    assert (project / ".fnhost" / "nats.url").read_text().strip() == crashed_url
    assert (project / ".fnhost" / "nats.lock").exists()
    assert discover_url(project) is None

    async with EmbeddedNats(project, port=port) as embedded:
        assert embedded.url == crashed_url  # the port was free again
        assert discover_url(project) == embedded.url
        nc = await nats.connect(embedded.url)
        try:
            msg = await nc.jetstream().get_msg("KEEP", 1)
            assert msg.data == b"before the crash"
        finally:
            await nc.close()
    assert discover_url(project) is None


async def test_start_runs_off_the_event_loop(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_start = NatsServer.start

    def start(self: NatsServer) -> NatsServer:
        time.sleep(0.3)  # a slow disk: the event loop must keep running meanwhile
        return slow_start(self)

    monkeypatch.setattr(NatsServer, "start", start)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    try:
        async with EmbeddedNats(project, port=free_port()):
            pass
    finally:
        task.cancel()
    assert ticks >= 20


async def test_start_again_after_its_server_died(project: Path) -> None:
    embedded = EmbeddedNats(project, port=free_port())
    await embedded.start()
    assert embedded.server is not None
    embedded.server.kill()
    assert embedded.url is None
    url = await embedded.start()  # not refused by its own lock
    assert discover_url(project) == url
    await embedded.stop()
