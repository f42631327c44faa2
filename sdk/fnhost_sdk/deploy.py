"""Deploy a function from Python, and the registry's shapes on the wire.

From a script or a notebook::

    from fnhost_sdk import deploy, function

    @function(request="greet")
    async def hello(name: str) -> str:
        return f"hello {name}"

    result = await deploy(hello, nats="nats://nats:4222", sign_key="deploy.nk")
    print(result.revision, result.refused)

``fnhost deploy`` runs the same code (:func:`publish`, :func:`wait_for_hosts`).

Registry layout (names from fn.yaml's ``registry:``; defaults below):

- KV ``fnhost_functions``: key = function name, value = a signed spec
  (:mod:`fnhost_sdk.artifact`); the KV revision is the version users see.
- Object store ``fnhost_artifacts``: the artifacts, named ``<function>/<sha256>``.
- KV ``fnhost_hosts``: ``host.<id>`` is one host's status document (rewritten
  on each change and every :data:`HEARTBEAT` seconds, deleted on a clean
  stop); ``accepted.<function>.<revision>`` marks revisions a host ran
  (``fnhost rollback`` picks from them). A host is live when its document was
  written within :data:`LIVE_WINDOW` seconds.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import nats
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from fnhost_sdk.artifact import Artifact, DeployRefused, build_artifact, read_seed, sign_spec

__all__ = [
    "HEARTBEAT",
    "LIVE_WINDOW",
    "DeployResult",
    "HostReport",
    "Registry",
    "bucket_keys",
    "connect",
    "deploy",
    "function",
    "function_settings",
    "host_documents",
    "publish",
    "wait_for_hosts",
]

HEARTBEAT = 5.0
"""Seconds between a host's status rewrites when nothing changes."""
LIVE_WINDOW = 3 * HEARTBEAT
"""A host whose status document is older than this is not waited for."""
SIGN_KEY_ENV = "FNHOST_SIGN_KEY"
_ATTRIBUTE = "__fnhost_function__"

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Registry:
    """The bucket names of one registry (fn.yaml ``registry:``)."""

    bucket: str = "fnhost_functions"
    store: str = "fnhost_artifacts"
    status_bucket: str = "fnhost_hosts"
    history: int = 10


def function(
    *,
    request: str | None = None,
    subject: str | None = None,
    trigger: Mapping[str, Any] | None = None,
    name: str | None = None,
    **settings: Any,
) -> Callable[[F], F]:
    """Declare a handler's deploy settings: ``@function(request="orders.create")``.

    Give one of ``request``, ``subject`` or a full ``trigger`` mapping (as in
    fn.yaml, e.g. ``{"stream": "ORDERS", "subjects": [...], "durable": "pay"}``);
    other keywords are fn.yaml function settings (``concurrency``, ``timeout``,
    ``retry``, ``config``, ...). The function itself is returned unchanged.
    """
    given = [
        each
        for each in (
            {"request": request} if request else None,
            {"subject": subject} if subject else None,
            trigger,
        )
        if each
    ]
    if len(given) > 1:
        raise ValueError("give one of request=, subject= or trigger=")
    declared: dict[str, Any] = dict(settings)
    if given:
        declared["trigger"] = dict(given[0])

    def mark(func: F) -> F:
        setattr(func, _ATTRIBUTE, {"name": name, "handler": func.__name__, "settings": declared})
        return func

    return mark


def function_settings(target: object) -> tuple[str | None, dict[str, Any]] | None:
    """The ``(name, settings)`` a ``@function`` decorator put on ``target``, or None.

    The name is None unless the decorator gave one; the settings include ``handler``.
    """
    found = getattr(target, _ATTRIBUTE, None)
    if not isinstance(found, dict):
        return None
    return found["name"], {"handler": found["handler"], **found["settings"]}


@dataclass(frozen=True, slots=True)
class HostReport:
    """What one host says about one function."""

    host: str
    function: str
    revision: int | None
    state: str
    reason: str | None = None
    running: int | None = None


@dataclass(slots=True)
class DeployResult:
    """The outcome of a deploy: the new revision and what each live host reported."""

    name: str
    revision: int
    sha256: str
    size: int
    reports: list[HostReport] = field(default_factory=list)
    waiting_for: list[str] = field(default_factory=list)
    """Live hosts that had not reported the revision when the wait ended."""

    @property
    def refused(self) -> list[HostReport]:
        return [r for r in self.reports if r.state != "running"]


class _Progress(io.BytesIO):
    """Artifact bytes that report how much the object store has read."""

    def __init__(self, data: bytes, callback: Callable[[int, int], None]) -> None:
        super().__init__(data)
        self._total = len(data)
        self._callback = callback

    def readinto(self, buffer: Any) -> int:
        count = super().readinto(buffer)
        self._callback(self.tell(), self._total)
        return count


async def _kv(js: JetStreamContext, bucket: str, history: int) -> KeyValue:
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        return await js.create_key_value(bucket=bucket, history=history)


async def publish(
    nc: NatsClient,
    *,
    name: str,
    artifact: Artifact,
    settings: Mapping[str, Any],
    seed: bytes,
    registry: Registry = Registry(),
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Upload ``artifact``, put its signed spec under ``name``; return the new revision.

    Creates the buckets when they do not exist yet (hosts create them too).
    """
    js = nc.jetstream()
    kv = await _kv(js, registry.bucket, registry.history)
    await _kv(js, registry.status_bucket, 1)
    try:
        store = await js.object_store(registry.store)
    except nats.js.errors.NotFoundError:
        store = await js.create_object_store(registry.store)
    object_name = f"{name}/{artifact.sha256}"
    data: bytes | io.BytesIO = artifact.data
    if progress is not None:
        data = _Progress(artifact.data, progress)
    await store.put(object_name, data)
    envelope = sign_spec(
        name=name, function=settings, artifact=artifact, object_name=object_name, seed=seed
    )
    return await kv.put(name, json.dumps(envelope).encode())


async def host_documents(
    nc: NatsClient, registry: Registry = Registry(), *, live_only: bool = True
) -> dict[str, dict[str, Any]]:
    """The status documents of the hosts (only the live ones unless ``live_only=False``)."""
    js = nc.jetstream()
    try:
        kv = await js.key_value(registry.status_bucket)
    except nats.js.errors.BucketNotFoundError:
        return {}
    keys = await bucket_keys(js, registry.status_bucket, "host.")
    now = time.time()
    found: dict[str, dict[str, Any]] = {}
    for key in keys:
        if not key.startswith("host."):
            continue
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue
        if not entry.value:
            continue
        doc = json.loads(entry.value)
        if live_only and now - float(doc.get("seen", 0)) > LIVE_WINDOW:
            continue
        found[str(doc.get("host", key.removeprefix("host.")))] = doc
    return found


async def bucket_keys(js: JetStreamContext, bucket: str, prefix: str = "") -> list[str]:
    """The keys of a KV bucket that start with ``prefix`` (deleted ones included).

    Read from the stream's subject counts: nats-py's ``KeyValue.keys()`` can end
    early when entries arrive while it reads.
    """
    base = f"$KV.{bucket}."
    try:
        info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{base}{prefix}>")
    except nats.js.errors.NotFoundError:
        return []
    return sorted(subject[len(base) :] for subject in (info.state.subjects or {}))


def _report(host: str, name: str, doc: Mapping[str, Any]) -> HostReport | None:
    entry = doc.get("functions", {}).get(name)
    if entry is None:
        return None
    return HostReport(
        host=host,
        function=name,
        revision=entry.get("revision"),
        state=entry.get("state", "unknown"),
        reason=entry.get("reason"),
        running=entry.get("running"),
    )


async def wait_for_hosts(
    nc: NatsClient,
    name: str,
    revision: int,
    *,
    registry: Registry = Registry(),
    timeout: float = 30.0,
    interval: float = 0.1,
) -> tuple[list[HostReport], list[str]]:
    """Wait until every live host reports ``revision`` (or later) of ``name``.

    Returns the reports and the live hosts still silent at ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        docs = await host_documents(nc, registry)
        reports: list[HostReport] = []
        silent: list[str] = []
        for host, doc in sorted(docs.items()):
            report = _report(host, name, doc)
            if report is not None and (report.revision or 0) >= revision:
                reports.append(report)
            else:
                silent.append(host)
        if not silent or time.monotonic() >= deadline:
            return reports, silent
        await asyncio.sleep(interval)


def _seed(sign_key: str | os.PathLike[str] | None) -> bytes:
    path = sign_key or os.environ.get(SIGN_KEY_ENV)
    if not path:
        raise DeployRefused("unsigned", f"no signing key: pass sign_key= or set {SIGN_KEY_ENV}")
    return read_seed(path)


async def deploy(
    target: ModuleType | Callable[..., Any],
    *,
    name: str | None = None,
    trigger: Mapping[str, Any] | None = None,
    nats: str | None = None,
    sign_key: str | os.PathLike[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    registry: Registry = Registry(),
    root: Path | None = None,
    wait: float | None = 30.0,
    progress: Callable[[int, int], None] | None = None,
) -> DeployResult:
    """Deploy a function (or a module with a ``handle``) to every host watching the registry.

    ``trigger`` (fn.yaml's shape, e.g. ``{"request": "greet"}``) and ``settings``
    override what a ``@function`` decorator declared. The key is a seed file
    (``fnhost keygen``), from ``sign_key`` or ``FNHOST_SIGN_KEY``. With ``wait``
    (seconds; None: do not wait) the result holds each live host's report.
    """
    seed = _seed(sign_key)
    declared = function_settings(target)
    merged: dict[str, Any] = dict(declared[1]) if declared else {}
    merged.update(settings or {})
    if trigger is not None:
        merged["trigger"] = dict(trigger)
    if "trigger" not in merged:
        raise ValueError("no trigger: pass trigger= or decorate the function with @function(...)")
    artifact, handler = build_artifact(target, root=root)
    if handler is not None:
        merged["handler"] = handler
    fname = name or (declared[0] if declared else None)
    if fname is None and isinstance(target, ModuleType):
        fname = target.__name__.rpartition(".")[2]
    fname = fname or handler
    if not fname:
        raise ValueError("pass name=")
    url = nats or os.environ.get("NATS_URL") or "nats://127.0.0.1:4222"
    nc = await connect(url)
    try:
        revision = await publish(
            nc,
            name=fname,
            artifact=artifact,
            settings=merged,
            seed=seed,
            registry=registry,
            progress=progress,
        )
        result = DeployResult(fname, revision, artifact.sha256, artifact.size)
        if wait is not None:
            result.reports, result.waiting_for = await wait_for_hosts(
                nc, fname, revision, registry=registry, timeout=wait
            )
        return result
    finally:
        await nc.close()


async def connect(url: str) -> NatsClient:
    """A short-lived client connection: gives up after two tries (nats-py's
    ``max_reconnect_attempts=0`` means *forever*), reports errors by raising."""

    async def quiet(exc: Exception) -> None:
        return None

    return await nats.connect(
        url, connect_timeout=3, max_reconnect_attempts=1, reconnect_time_wait=0.5, error_cb=quiet
    )
