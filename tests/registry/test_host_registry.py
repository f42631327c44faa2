"""A host with the registry enabled, in-process: deploys, refusals, removal, start-up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

import fnhost.registry
from conftest import HostFactory
from fnhost.host import Host
from fnhost_sdk.artifact import Artifact, sign_spec
from fnhost_sdk.deploy import publish
from fnhost_sdk.testing import wait_for

from .conftest import HELPERS, SigningKey, greeter, registry_manifest
from .helpers import build_from_source, function_report, reply_json

pytestmark = pytest.mark.nats

SETTINGS = {"trigger": {"request": "greet"}}


@pytest.fixture
def unpickles(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts every unpickling the host does."""
    calls: list[int] = []
    real = fnhost.registry.load_module

    def counting(data: bytes) -> Any:
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(fnhost.registry, "load_module", counting)
    return calls


def artifact(tmp_path: Path, version: str, **kwargs: Any) -> Artifact:
    files = {"functions/greet.py": greeter(version, **kwargs), "functions/helpers.py": HELPERS}
    return build_from_source(tmp_path / f"src-{version}", files)


async def greet(nc: NatsClient) -> dict[str, Any]:
    return reply_json((await nc.request("greet", b'"ann"', timeout=5)).data)


async def wait_state(nc: NatsClient, revision: int, state: str) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def reported() -> bool:
        nonlocal found
        reports = await function_report(nc, "greet")
        found = next(iter(reports.values()), {})
        return found.get("revision") == revision and found.get("state") == state

    await wait_for(reported, timeout=20, message=f"revision {revision} {state}")
    return found


async def test_deploy_then_update_swaps_the_version(
    host_factory: HostFactory, nc: NatsClient, signing_key: SigningKey, tmp_path: Path
) -> None:
    host = await host_factory(registry_manifest([signing_key.public]))
    v1 = await publish(
        nc,
        name="greet",
        artifact=artifact(tmp_path, "v1"),
        settings=SETTINGS,
        seed=signing_key.seed,
    )
    await wait_state(nc, v1, "running")
    assert (await greet(nc))["version"] == "v1"
    assert host.functions["greet"].runtime is not None
    assert host.functions["greet"].runtime.version == str(v1)
    v2 = await publish(
        nc,
        name="greet",
        artifact=artifact(tmp_path, "v2"),
        settings=SETTINGS,
        seed=signing_key.seed,
    )
    await wait_state(nc, v2, "running")
    assert (await greet(nc))["version"] == "v2"


async def _serving_v1(
    host_factory: HostFactory,
    nc: NatsClient,
    key: SigningKey,
    tmp_path: Path,
    **manifest: str,
) -> Host:
    """A registry host trusting ``key``, serving v1 of ``greet``."""
    host = await host_factory(registry_manifest([key.public], **manifest))
    revision = await publish(
        nc, name="greet", artifact=artifact(tmp_path, "v1"), settings=SETTINGS, seed=key.seed
    )
    await wait_state(nc, revision, "running")
    return host


def _signed(built: Any, key: SigningKey) -> dict[str, Any]:
    """The envelope ``key`` signs for ``built`` as ``greet``, its artifact at ``greet/x``."""
    return sign_spec(
        name="greet", function=SETTINGS, artifact=built, object_name="greet/x", seed=key.seed
    )


async def _put(nc: NatsClient, envelope: dict[str, Any]) -> int:
    kv = await nc.jetstream().key_value("fnhost_functions")
    return await kv.put("greet", json.dumps(envelope).encode())


async def _upload(nc: NatsClient, name: str, data: bytes) -> None:
    store = await nc.jetstream().object_store("fnhost_artifacts")
    await store.put(name, data)


async def _refused(nc: NatsClient, revision: int, code: str) -> None:
    report = await wait_state(nc, revision, "refused")
    assert report["reason"].startswith(f"{code}:"), report
    assert (await greet(nc))["version"] == "v1"  # the previous version keeps serving


async def test_unsigned_is_refused(
    host_factory: HostFactory,
    nc: NatsClient,
    signing_key: SigningKey,
    tmp_path: Path,
    unpickles: list[int],
) -> None:
    await _serving_v1(host_factory, nc, signing_key, tmp_path)
    before = len(unpickles)
    bad = artifact(tmp_path, "v2")
    envelope = _signed(bad, signing_key)
    await _upload(nc, "greet/x", bad.data)
    del envelope["signature"]
    await _refused(nc, await _put(nc, envelope), "unsigned")
    assert len(unpickles) == before


async def test_untrusted_key_is_refused(
    host_factory: HostFactory,
    nc: NatsClient,
    signing_key: SigningKey,
    other_key: SigningKey,
    tmp_path: Path,
    unpickles: list[int],
) -> None:
    await _serving_v1(host_factory, nc, signing_key, tmp_path)
    before = len(unpickles)
    revision = await publish(
        nc, name="greet", artifact=artifact(tmp_path, "v2"), settings=SETTINGS, seed=other_key.seed
    )
    await _refused(nc, revision, "untrusted")
    assert len(unpickles) == before


async def test_a_forged_signature_is_refused(
    host_factory: HostFactory,
    nc: NatsClient,
    signing_key: SigningKey,
    tmp_path: Path,
    unpickles: list[int],
) -> None:
    await _serving_v1(host_factory, nc, signing_key, tmp_path)
    before = len(unpickles)
    bad = artifact(tmp_path, "v2")
    envelope = _signed(bad, signing_key)
    await _upload(nc, "greet/x", bad.data)
    envelope["spec"]["function"] = {"trigger": {"request": "greet"}, "concurrency": 1}
    await _refused(nc, await _put(nc, envelope), "bad-signature")
    assert len(unpickles) == before


async def test_tampered_artifact_is_refused(
    host_factory: HostFactory,
    nc: NatsClient,
    signing_key: SigningKey,
    tmp_path: Path,
    unpickles: list[int],
) -> None:
    await _serving_v1(host_factory, nc, signing_key, tmp_path)
    before = len(unpickles)
    good, evil = artifact(tmp_path, "v2"), artifact(tmp_path, "evil")
    envelope = _signed(good, signing_key)
    await _upload(nc, "greet/x", evil.data)  # the object was replaced after signing
    await _refused(nc, await _put(nc, envelope), "digest")
    assert len(unpickles) == before


class _OtherPython:
    def __init__(self, artifact: Artifact, python: str) -> None:
        self.sha256, self.cloudpickle, self.data = (
            artifact.sha256,
            artifact.cloudpickle,
            artifact.data,
        )
        self.python = python


async def test_python_version_mismatch_is_refused(
    host_factory: HostFactory,
    nc: NatsClient,
    signing_key: SigningKey,
    tmp_path: Path,
    unpickles: list[int],
) -> None:
    await _serving_v1(host_factory, nc, signing_key, tmp_path)
    before = len(unpickles)
    other = _OtherPython(artifact(tmp_path, "v2"), "2.7")
    envelope = _signed(other, signing_key)
    await _upload(nc, "greet/x", other.data)
    await _refused(nc, await _put(nc, envelope), "python")
    assert len(unpickles) == before


async def test_oversize_artifact_is_refused(
    host_factory: HostFactory,
    nc: NatsClient,
    signing_key: SigningKey,
    tmp_path: Path,
    unpickles: list[int],
) -> None:
    await _serving_v1(host_factory, nc, signing_key, tmp_path, max_size="6KiB")
    before = len(unpickles)
    padding = "PADDING = " + repr("x" * 8000)
    revision = await publish(
        nc,
        name="greet",
        artifact=artifact(tmp_path, "v2", extra=padding),
        settings=SETTINGS,
        seed=signing_key.seed,
    )
    await _refused(nc, revision, "oversize")
    assert len(unpickles) == before


async def test_validation_failure_on_the_host_is_refused(
    host_factory: HostFactory, nc: NatsClient, signing_key: SigningKey, tmp_path: Path
) -> None:
    await _serving_v1(host_factory, nc, signing_key, tmp_path)
    revision = await publish(
        nc,
        name="greet",
        artifact=artifact(tmp_path, "v2"),
        settings={**SETTINGS, "handler": "missing"},
        seed=signing_key.seed,
    )
    await _refused(nc, revision, "load")
    report = (await function_report(nc, "greet")).popitem()[1]
    assert "no handler 'missing'" in report["reason"]
    assert report["running"] == revision - 1


async def test_invalid_settings_are_refused(
    host_factory: HostFactory, nc: NatsClient, signing_key: SigningKey, tmp_path: Path
) -> None:
    await _serving_v1(host_factory, nc, signing_key, tmp_path)
    revision = await publish(
        nc,
        name="greet",
        artifact=artifact(tmp_path, "v2"),
        settings={"trigger": {"request": "greet"}, "concurrency": 0},
        seed=signing_key.seed,
    )
    await _refused(nc, revision, "invalid-spec")


async def test_a_deleted_key_stops_the_function(
    host_factory: HostFactory, nc: NatsClient, signing_key: SigningKey, tmp_path: Path
) -> None:
    host = await _serving_v1(host_factory, nc, signing_key, tmp_path)
    kv = await nc.jetstream().key_value("fnhost_functions")
    await kv.delete("greet")

    async def stopped() -> bool:
        report = (await function_report(nc, "greet")).popitem()[1]
        return report["state"] == "stopped"

    await wait_for(stopped, timeout=20, message="greet stopped")
    assert "greet" not in host.functions


async def test_a_starting_host_serves_the_current_version_first(
    host_factory: HostFactory, nc: NatsClient, signing_key: SigningKey, tmp_path: Path
) -> None:
    # The manifest declares greet too: the deployed version replaces its module.
    manifest = registry_manifest(
        [signing_key.public],
        extra="""
        functions:
          greet:
            module: functions/greet.py
            trigger: {request: greet}
        """,
    )
    await publish(
        nc,
        name="greet",
        artifact=artifact(tmp_path, "v7"),
        settings=SETTINGS,
        seed=signing_key.seed,
    )
    files = {
        "functions/__init__.py": "",
        "functions/greet.py": greeter("manifest"),
        "functions/helpers.py": HELPERS,
    }
    host = await host_factory(manifest, files)
    runtime = host.functions["greet"].runtime
    assert runtime is not None and runtime.version == "1"
    assert (await greet(nc))["version"] == "v7"
