"""fnhost_sdk.server and the pytest plugin: real nats-server processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

import fnhost_sdk.server
from fnhost_sdk.cluster import NatsCluster
from fnhost_sdk.server import (
    NatsServer,
    NatsServerError,
    find_nats_servers,
    free_port,
    nats_server_binary,
    port_is_free,
)
from fnhost_sdk.testing import NatsServerFactory, assert_no_stray_servers
from fnhost_sdk.waiting import wait_for, wait_for_sync

SDK_DIR = Path(fnhost_sdk.server.__file__).resolve().parents[1]


@asynccontextmanager
async def connected(servers: str | list[str], **options: object) -> AsyncIterator[Client]:
    nc = await nats.connect(servers, connect_timeout=2, **options)
    try:
        yield nc
    finally:
        await nc.close()


def pid_alive(pid: int) -> bool:
    """True while the process runs; a zombie (exited, not yet reaped by init) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return not Path("/proc/self").exists()


# --------------------------------------------------------------------------- unit


def test_binary_is_the_one_beside_python() -> None:
    binary = Path(nats_server_binary())
    assert os.access(binary, os.X_OK)
    assert binary.parent == Path(sys.executable).parent


def test_binary_override_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FNHOST_NATS_SERVER", str(tmp_path / "nope"))
    with pytest.raises(NatsServerError, match="FNHOST_NATS_SERVER"):
        nats_server_binary()


def test_free_port_is_free_and_below_the_ephemeral_range() -> None:
    port = free_port()
    assert port_is_free("127.0.0.1", port)
    assert 1024 < port < 32768
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert not port_is_free("127.0.0.1", port)


async def test_wait_for_returns_the_truthy_value_of_a_sync_predicate() -> None:
    calls = []

    def predicate() -> list[int] | None:
        calls.append(1)
        return calls if len(calls) >= 3 else None

    assert await wait_for(predicate, timeout=2, interval=0.001) == [1, 1, 1]


async def test_wait_for_awaits_an_async_predicate() -> None:
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, event.set)

    async def is_set() -> bool:
        return event.is_set()

    assert await wait_for(is_set, timeout=2) is True


async def test_wait_for_times_out_with_the_message() -> None:
    with pytest.raises(AssertionError, match=r"the answer: not true after 0.05s \(last value 0\)"):
        await wait_for(lambda: 0, timeout=0.05, message="the answer")


async def test_wait_for_cancels_a_predicate_running_past_the_deadline() -> None:
    async def hangs() -> bool:
        await asyncio.sleep(60)
        return True

    with pytest.raises(AssertionError, match="slow"):
        await asyncio.wait_for(wait_for(hangs, timeout=0.05, message="slow"), 5)


async def test_wait_for_retries_ignored_errors_and_raises_others() -> None:
    attempts: Iterator[KeyError | int] = iter([KeyError("a"), KeyError("b"), 7])

    def flaky() -> int:
        value = next(attempts)
        if isinstance(value, KeyError):
            raise value
        return value

    assert await wait_for(flaky, timeout=2, interval=0.001, ignore=(KeyError,)) == 7
    with pytest.raises(ZeroDivisionError):
        await wait_for(lambda: 1 / 0, timeout=2)
    with pytest.raises(AssertionError, match="last error KeyError"):
        empty: dict[str, int] = {}
        await wait_for(lambda: empty["x"], timeout=0.02, ignore=(KeyError,))


def test_wait_for_sync() -> None:
    values = iter([0, "", "ok"])
    assert wait_for_sync(lambda: next(values), timeout=2, interval=0.001) == "ok"
    with pytest.raises(AssertionError, match="never"):
        wait_for_sync(lambda: False, timeout=0.02, message="never")


# --------------------------------------------------------------------------- one server


@pytest.mark.nats
async def test_server_serves_and_stops(nats_server: NatsServer, nats_url: str) -> None:
    assert nats_url == f"nats://127.0.0.1:{nats_server.port}" == nats_server.url
    assert nats_server.running and not nats_server.paused
    config = nats_server.config_path.read_text()
    assert "sync_interval: always" in config
    assert nats_server.monitor("varz")["jetstream"]["config"]["sync_always"] is True

    async with connected(nats_url) as nc:
        sub = await nc.subscribe("greet")
        await nc.publish("greet", b"hi")
        assert (await sub.next_msg(timeout=2)).data == b"hi"
        await nc.jetstream().account_info()  # JetStream is on

    pid = nats_server.pid
    assert nats_server.stop() == 0  # SIGTERM is a clean shutdown
    assert not nats_server.running
    assert not pid_alive(pid)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", nats_server.port), timeout=1).close()
    assert "Server Exiting" in nats_server.log_path.read_text()


@pytest.mark.nats
async def test_restart_keeps_the_port_and_jetstream_data(nats_server: NatsServer) -> None:
    url, port, monitor = nats_server.url, nats_server.port, nats_server.monitor_url
    async with connected(url) as nc:
        js = nc.jetstream()
        await js.add_stream(name="KEEP", subjects=["keep.>"])
        ack = await js.publish("keep.one", b"payload")

    first_pid = nats_server.pid
    nats_server.restart()
    assert nats_server.pid != first_pid
    assert (nats_server.url, nats_server.port, nats_server.monitor_url) == (url, port, monitor)

    async with connected(url) as nc:
        msg = await nc.jetstream().get_msg("KEEP", ack.seq)
        assert (msg.subject, msg.data) == ("keep.one", b"payload")


@pytest.mark.nats
async def test_connected_client_reconnects_across_a_restart(nats_server: NatsServer) -> None:
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    async with connected(
        nats_server.url, reconnected_cb=on_reconnect, reconnect_time_wait=0.05
    ) as nc:
        await asyncio.to_thread(nats_server.restart)
        await wait_for(reconnected.is_set, timeout=10, message="client reconnected")
        await nc.flush(timeout=2)


@pytest.mark.nats
async def test_kill_is_a_crash_and_acked_data_survives(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as nc:
        js = nc.jetstream()
        await js.add_stream(name="CRASH", subjects=["crash"])
        ack = await js.publish("crash", b"acked")

    pid = nats_server.pid
    nats_server.kill()
    assert not nats_server.running and not pid_alive(pid)
    # No clean shutdown happened: the log ends without the exit line.
    assert "Server Exiting" not in nats_server.log_tail()

    nats_server.start()
    async with connected(nats_server.url) as nc:
        assert (await nc.jetstream().get_msg("CRASH", ack.seq)).data == b"acked"


@pytest.mark.nats
async def test_pause_stops_answering_until_resume(nats_server: NatsServer) -> None:
    async with connected(nats_server.url) as nc:

        async def echo(msg: Msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe("echo", cb=echo)
        assert (await nc.request("echo", b"1", timeout=2)).data == b"1"
        nats_server.pause()
        assert nats_server.paused and nats_server.running
        # A request, not flush(): a flush timeout leaves nats-py's PONG bookkeeping broken.
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request("echo", b"2", timeout=0.3)
        nats_server.resume()
        assert not nats_server.paused
        assert (await nc.request("echo", b"3", timeout=2)).data == b"3"


@pytest.mark.nats
def test_stop_works_on_a_paused_server(nats_server: NatsServer) -> None:
    nats_server.pause()
    assert nats_server.stop(timeout=5) == 0  # SIGTERM acted on, not a SIGKILL fallback


@pytest.mark.nats
def test_bad_config_fails_with_the_server_output(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "bad", config_extra="this is { not valid")
    with pytest.raises(NatsServerError, match=r"exited with code \d+ while starting") as info:
        server.start()
    assert "nats-server.conf" in str(info.value)  # the server's own complaint is in the message
    assert not server.running
    assert find_nats_servers(tmp_path) == []


@pytest.mark.nats
def test_taken_port_fails_with_the_server_output(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        server = NatsServer(tmp_path / "taken", port=sock.getsockname()[1])
        with pytest.raises(NatsServerError, match="address already in use"):
            server.start()
    assert find_nats_servers(tmp_path) == []


@pytest.mark.nats
def test_context_manager_stops(tmp_path: Path) -> None:
    with NatsServer(tmp_path / "cm") as server:
        assert server.running
        pid = server.pid
    assert not server.running and not pid_alive(pid)


@pytest.mark.nats
def test_factory_makes_independent_servers(nats_server_factory: NatsServerFactory) -> None:
    plain = nats_server_factory(jetstream=False)
    second = nats_server_factory(server_name="second")
    assert plain.port != second.port
    assert plain.store_dir != second.store_dir
    assert "jetstream" not in plain.config_path.read_text()
    assert second.monitor("varz")["server_name"] == "second"
    unstarted = nats_server_factory(start=False)
    assert not unstarted.running


@pytest.mark.nats
def test_stray_check_catches_and_kills_a_leaked_server(tmp_path: Path) -> None:
    leaked = NatsServer(tmp_path / "leak").start()
    pid = leaked.pid
    assert find_nats_servers(tmp_path) == [pid]
    with pytest.raises(pytest.fail.Exception, match=f"stray nats-server pid {pid}"):
        assert_no_stray_servers([], tmp_path)
    wait_for_sync(lambda: not leaked.running, timeout=5, message="stray killed")
    leaked.stop()  # reaps it


@pytest.mark.nats
def test_die_with_parent_stops_the_server_when_its_owner_is_killed(tmp_path: Path) -> None:
    store = tmp_path / "owned"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from fnhost_sdk.server import NatsServer\n"
        "NatsServer(Path(sys.argv[1]), die_with_parent=True).start()\n"
        "Path(sys.argv[2]).write_text('ready')\n"
        "time.sleep(600)\n"
    )
    ready = tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(SDK_DIR)}
    owner = subprocess.Popen([sys.executable, "-c", script, str(store), str(ready)], env=env)
    try:
        wait_for_sync(ready.exists, timeout=20, message="owner started its server")
        [server_pid] = find_nats_servers(store)
    finally:
        owner.kill()  # SIGKILL: no atexit, no finally in the owner
        owner.wait()
    wait_for_sync(lambda: not find_nats_servers(store), timeout=15, message="server stopped")
    assert not pid_alive(server_pid)
    # The watchdog sent SIGTERM: a clean shutdown, not a kill.
    assert "Server Exiting" in (store / "nats-server.log").read_text()


# --------------------------------------------------------------------------- cluster


async def publish_to_new_stream(js: JetStreamContext, subject: str, data: bytes) -> PubAck:
    """Publish to a stream just created with replicas, once.

    A new R3 stream may not answer on every node until its leader's interest has
    spread over the routes; the message id makes a retried publish store once.
    """
    ack: PubAck = await wait_for(
        lambda: js.publish(subject, data, headers={"Nats-Msg-Id": f"{subject}:first"}),
        timeout=30,
        message=f"the new stream takes a publish on {subject}",
        ignore=(nats.js.errors.NoStreamResponseError,),
    )
    return ack


@pytest.mark.nats
async def test_cluster_forms_and_places_an_r3_stream(nats_cluster: NatsCluster) -> None:
    assert len(nats_cluster.servers) == 3
    names = {server.server_name for server in nats_cluster.servers}
    assert len(names) == 3
    assert len(set(nats_cluster.urls)) == 3
    meta_leader = nats_cluster.wait_for_meta_leader(timeout=10)
    assert meta_leader in nats_cluster.servers
    for server in nats_cluster.servers:
        meta = server.monitor("jsz")["meta_cluster"]
        assert meta["leader"] == meta_leader.server_name
        assert meta["cluster_size"] == 3

    async with connected(nats_cluster.urls) as nc:
        js = nc.jetstream()
        info = await js.add_stream(name="R3", subjects=["r3.>"], num_replicas=3)
        assert info.config.num_replicas == 3
        await publish_to_new_stream(js, "r3.a", b"x")
        await js.add_consumer("R3", durable_name="worker")

        leader = await nats_cluster.stream_leader(nc, "R3")
        assert leader in nats_cluster.servers
        stream = await js.stream_info("R3")
        assert stream.cluster is not None and stream.cluster.replicas is not None
        assert {peer.name for peer in stream.cluster.replicas} == names - {leader.server_name}
        consumer_leader = await nats_cluster.consumer_leader(js, "R3", "worker")
        assert consumer_leader in nats_cluster.servers


@pytest.mark.nats
@pytest.mark.slow  # a raft election after a lost leader takes ~5 s
async def test_killing_the_stream_leader_elects_another(nats_cluster: NatsCluster) -> None:
    async with connected(nats_cluster.urls, reconnect_time_wait=0.1) as nc:
        js = nc.jetstream()
        await js.add_stream(name="FAIL", subjects=["fail"], num_replicas=3)
        ack = await publish_to_new_stream(js, "fail", b"kept")
        old = await nats_cluster.stream_leader(nc, "FAIL")
        old.kill()
        new = await nats_cluster.stream_leader(nc, "FAIL", timeout=30)
        assert new is not old and new.running
        assert (await js.get_msg("FAIL", ack.seq)).data == b"kept"

        old.start()  # rejoins on the same ports and store
        nats_cluster.wait_for_meta_leader(timeout=30)
        old.wait_healthy(timeout=30)


@pytest.mark.nats
def test_cluster_lookup_of_an_unknown_node_fails(nats_cluster: NatsCluster) -> None:
    with pytest.raises(NatsServerError, match="no node named"):
        nats_cluster.server("elsewhere")
