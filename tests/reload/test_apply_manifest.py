"""fn.yaml reloads on a running host (``apply_manifest`` and ``Reloader``), real
nats-server, no file watcher: only what changed restarts; streams and consumers
follow their new config; an invalid fn.yaml changes nothing and says where."""

from __future__ import annotations

import json
import logging
import textwrap

import pytest
from nats.aio.client import Client as NatsClient

from conftest import HostFactory
from fnhost.http import readiness
from fnhost.manifest import Manifest, load_manifest
from fnhost.reload import Reloader, apply_manifest

pytestmark = pytest.mark.nats

MANIFEST = """\
version: 1
http: false
streams:
  WORK: {subjects: ["work.>"]}
functions:
  keep:
    module: fns.py
    handler: keep
    trigger: {request: keep}
  change:
    module: fns.py
    handler: change
    trigger: {request: change}
  goes:
    module: fns.py
    handler: goes
    trigger: {request: goes}
  worker:
    module: fns.py
    handler: worker
    trigger: {stream: WORK, subjects: [work.a], durable: worker, ack_wait: 30s}
"""

FNS = """\
async def keep(data: dict) -> dict:
    return {"f": "keep"}

async def change(data: dict, ctx) -> dict:
    return {"f": "change", "config": ctx.config}

async def goes(data: dict) -> dict:
    return {"f": "goes"}

async def comes(data: dict) -> dict:
    return {"f": "comes"}

async def worker(data: dict) -> None:
    return None
"""


def rewrite(manifest: Manifest, text: str) -> Manifest:
    manifest.path.write_text(textwrap.dedent(text))
    return load_manifest(manifest.path)


async def ask(nc: NatsClient, subject: str) -> dict[str, object]:
    msg = await nc.request(subject, b"{}", timeout=5)
    assert not msg.headers, msg.headers
    result: dict[str, object] = json.loads(msg.data)
    return result


async def test_only_added_removed_and_changed_functions_restart(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(MANIFEST, {"fns.py": FNS})
    keep = host.functions["keep"].runtime
    worker = host.functions["worker"].runtime
    new = (
        MANIFEST.replace(
            "    trigger: {request: goes}\n", "    trigger: {request: goes}\n    config: {x: 1}\n"
        )
        .replace("handler: goes", "handler: comes")
        .replace("  goes:", "  comes:")
        .replace("trigger: {request: goes}", "trigger: {request: comes}")
        .replace("handler: change\n", "handler: change\n    config: {answer: 42}\n")
    )
    diff = await apply_manifest(host, rewrite(host.manifest, new))
    assert (diff.added, diff.removed, diff.changed) == (("comes",), ("goes",), ("change",))
    assert host.functions["keep"].runtime is keep  # untouched: same version object
    assert host.functions["worker"].runtime is worker
    assert "goes" not in host.functions
    assert await ask(nc, "comes") == {"f": "comes"}
    assert await ask(nc, "change") == {"f": "change", "config": {"answer": 42}}
    assert await ask(nc, "keep") == {"f": "keep"}
    with pytest.raises(Exception, match="no responders"):
        await nc.request("goes", b"{}", timeout=2)
    assert readiness(host) == []


async def test_streams_and_consumers_follow_their_new_config(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(MANIFEST, {"fns.py": FNS})
    js = nc.jetstream()
    new = MANIFEST.replace(
        'WORK: {subjects: ["work.>"]}', 'WORK: {subjects: ["work.>"], max_msgs: 500}'
    )
    new = new.replace("durable: worker, ack_wait: 30s", "durable: worker, ack_wait: 45s")
    new = new.replace("subjects: [work.a]", "subjects: [work.a, work.b]")
    diff = await apply_manifest(host, rewrite(host.manifest, new))
    assert diff.streams == ("WORK",) and diff.changed == ("worker",)
    stream = await js.stream_info("WORK")
    assert stream.config.max_msgs == 500
    consumer = await js.consumer_info("WORK", "worker")
    assert consumer.config.ack_wait == 45
    assert set(consumer.config.filter_subjects or [consumer.config.filter_subject]) == {
        "work.a",
        "work.b",
    }
    assert host.functions["worker"].status == "running"


async def test_an_invalid_fn_yaml_changes_nothing_and_names_key_and_line(
    host_factory: HostFactory, nc: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    host = await host_factory(MANIFEST, {"fns.py": FNS})
    running = host.manifest
    reloader = Reloader(host)
    path = host.manifest.path
    bad = MANIFEST.replace("handler: keep\n", "handler: keep\n    concurency: 3\n")
    path.write_text(bad)
    with caplog.at_level(logging.ERROR, logger="fnhost"):
        await reloader.apply({path.resolve()})
        await reloader.apply({path.resolve()})  # the same mistake saved again: said once
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 1, logged
    assert "fn.yaml:9:functions.keep.concurency" in logged[0]
    assert host.manifest is running
    assert "fn.yaml:9:functions.keep.concurency" in host.problems["reload:fn.yaml"]
    assert any(r.startswith("reload:fn.yaml: not applied") for r in readiness(host))
    assert await ask(nc, "keep") == {"f": "keep"}

    path.write_text(MANIFEST.replace("handler: keep\n", "handler: keep\n    concurrency: 3\n"))
    await reloader.apply({path.resolve()})
    assert host.functions["keep"].spec.concurrency == 3
    assert readiness(host) == []
    assert await ask(nc, "keep") == {"f": "keep"}


async def test_a_restart_only_section_is_reported_not_applied(
    host_factory: HostFactory, caplog: pytest.LogCaptureFixture
) -> None:
    host = await host_factory(MANIFEST, {"fns.py": FNS})
    new = MANIFEST.replace("http: false", "http: {port: 0}")
    with caplog.at_level(logging.WARNING, logger="fnhost"):
        diff = await apply_manifest(host, rewrite(host.manifest, new))
    assert diff.restart == ("http",) and diff.functions == ()
    assert any("http changed; restart the host" in r.getMessage() for r in caplog.records)


async def test_a_stream_declared_by_a_reload_makes_publishes_to_it_durable(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    """``ctx.publish`` to a subject of a stream the reload added waits for its PubAck
    (and so returns the stored sequence), as it does for streams declared at start."""
    fns = FNS + textwrap.dedent(
        """
        async def relay(data: dict, ctx) -> dict:
            stored = await ctx.publish("audit.entry", data)
            return {"seq": stored.seq if stored is not None else None}
        """
    )
    with_relay = MANIFEST + "  relay:\n    module: fns.py\n    handler: relay\n"
    with_relay += "    trigger: {request: relay}\n"
    host = await host_factory(with_relay, {"fns.py": fns})
    assert await ask(nc, "relay") == {"seq": None}, "no stream yet: a core publish"

    new = with_relay.replace(
        '  WORK: {subjects: ["work.>"]}\n',
        '  WORK: {subjects: ["work.>"]}\n  AUDIT: {subjects: ["audit.>"]}\n',
    )
    diff = await apply_manifest(host, rewrite(host.manifest, new))
    assert diff.streams == ("AUDIT",) and diff.functions == ()
    assert await ask(nc, "relay") == {"seq": 1}
    stored = await nc.jetstream().get_msg("AUDIT", 1)
    assert json.loads(stored.data or b"") == {}
