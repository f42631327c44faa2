"""Remote deploy on the host: watch the registry, verify, roll out, report.

With ``registry: {enabled: true, trusted_keys: [...]}`` a host watches the KV
bucket of signed specs (:mod:`fnhost_sdk.artifact` has the format,
:mod:`fnhost_sdk.deploy` the layout). For each new revision of a function it
checks, in this order and before anything is unpickled: the signature by a
trusted key, the artifact size, its SHA-256 against the signed digest, the
Python major.minor and the cloudpickle major version. Then it unpickles the
module into a fresh namespace, validates the handler and the settings, and
swaps the version in through :meth:`Host.reload_function` /
:meth:`Host.add_function` (new messages run the new version, in-flight ones
finish on the old). Any failure is a *refusal*: logged, written to the host's
status document, and the running version keeps serving. A deleted key drains
and stops the function.

A starting host reads the registry in ``fnhost_startup``, before any trigger
starts, so it serves the current versions from its first message; a refused
current version leaves the manifest's module of that name in place (if any).
The user-facing description is docs/deploy.md.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue
from nats.js.object_store import ObjectStore
from pydantic import ValidationError

from fnhost import provision
from fnhost.errors import FnhostError, LoadError
from fnhost.loader import LoadedFunction, inspect_handler
from fnhost.manifest import FunctionSpec, KVSpec, ObjectStoreSpec, RegistrySpec
from fnhost.tasks import cancel_and_wait
from fnhost_sdk.artifact import (
    DeployRefused,
    SignedSpec,
    load_module,
    now_iso,
    verify_artifact,
    verify_envelope,
)
from fnhost_sdk.deploy import HEARTBEAT

if TYPE_CHECKING:
    from fnhost.host import FunctionState, Host

log = logging.getLogger("fnhost.registry")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
INITIAL_QUIET = 0.5
"""Seconds without a value, after nats-py's end-of-values marker, that end the initial read."""


def registry_module_name(name: str) -> str:
    """The dotted ``module:`` a deployed function's spec carries (its code is the artifact)."""
    return "fnhost_registry." + _UNSAFE.sub("_", name)


def function_spec(name: str, settings: dict[str, Any], version: str | None) -> FunctionSpec:
    """Validate a deployed function's signed settings into a :class:`FunctionSpec`."""
    fields = {**settings, "name": name, "module": registry_module_name(name), "version": version}
    return FunctionSpec.model_validate(fields)


def settings_of(spec: FunctionSpec) -> dict[str, Any]:
    """What a deploy signs for a manifest function: its settings as written (defaults merged)."""
    return spec.model_dump(mode="json", exclude_unset=True, exclude={"name", "module", "version"})


@dataclass(slots=True)
class Record:
    """This host's word on one registry function."""

    revision: int
    state: str  # running | refused | stopped | failed
    reason: str | None = None
    running: int | None = None
    at: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "state": self.state,
            "reason": self.reason,
            "running": self.running,
            "at": self.at,
        }


@dataclass(slots=True)
class Accepted:
    """A verified revision, ready to swap in."""

    spec: FunctionSpec
    data: bytes
    signed: SignedSpec


class RegistryWatcher:
    """One host's registry client: startup read, watch loop, heartbeat, status document."""

    def __init__(self, host: Host, config: RegistrySpec) -> None:
        self.host = host
        self.config = config
        hostname = socket.gethostname().split(".")[0]
        self.host_id = _UNSAFE.sub("_", f"{hostname}-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        self.records: dict[str, Record] = {}
        self._started = now_iso()
        self._kv: KeyValue | None = None
        self._status: KeyValue | None = None
        self._store: ObjectStore | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._write_lock = asyncio.Lock()

    # -- lifecycle

    async def start(self) -> None:
        """Create the buckets if needed, apply the current versions, then watch."""
        js = self.host.js
        config = self.config
        await provision.ensure_kv(
            js, provision.kv_config(config.bucket, KVSpec(history=config.history))
        )
        await provision.ensure_kv(js, provision.kv_config(config.status_bucket, KVSpec()))
        self._kv = await js.key_value(config.bucket)
        self._status = await js.key_value(config.status_bucket)
        await provision.ensure_object_store(
            js, provision.object_store_config(config.store, ObjectStoreSpec())
        )
        self._store = await js.object_store(config.store)
        # The initial values end with the bucket's last revision as of now. nats-py's
        # end-of-values marker (None) can come before the last values, when the
        # server's pending count reads 0 early; after it, values that keep coming
        # are still initial, and quiet means the last revision's entry is gone.
        last = (await js.stream_info(f"KV_{config.bucket}")).state.last_seq
        self._watcher = await self._kv.watchall()
        current = 0
        marker_seen = False
        while last:
            try:
                entry = await self._watcher.updates(  # type: ignore[no-untyped-call]
                    timeout=INITIAL_QUIET if marker_seen else 30
                )
            except nats.errors.TimeoutError:
                if marker_seen:
                    break
                raise
            if entry is None:
                marker_seen = True
                continue
            current += 1
            await self._initial(entry)
            if (entry.revision or 0) >= last:
                break
        log.info(
            "registry: %d deployed functions in %s (host id %s)",
            current,
            config.bucket,
            self.host_id,
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch(), name="fnhost-registry-watch"),
            loop.create_task(self._heartbeat(), name="fnhost-registry-heartbeat"),
        ]

    async def stop(self) -> None:
        """Stop watching and withdraw this host's status document."""
        await cancel_and_wait(self._tasks)
        if self._watcher is not None:
            try:
                await self._watcher.stop()  # type: ignore[no-untyped-call]
            except (nats.errors.Error, FnhostError) as exc:
                log.debug("registry watcher stop: %s", exc)
        if self._status is not None and self.host.connected:
            try:
                await self._status.delete(f"host.{self.host_id}")
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                log.warning("could not withdraw the status of host %s: %s", self.host_id, exc)

    async def _watch(self) -> None:
        assert self._watcher is not None
        while not self.host.ready:
            if self.host.draining:
                return
            await asyncio.sleep(0.05)  # the host is starting its triggers: do not race it
        await self.write_status()
        async for entry in self._watcher:
            if self.host.draining:
                return
            if entry is None:
                continue
            try:
                await self._apply(entry)
            except Exception:
                log.exception("registry: applying %s revision %s failed", entry.key, entry.revision)
            await self.write_status()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            if self.host.ready:
                try:
                    await self.write_status()
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    log.warning("registry: status heartbeat failed: %s", exc)

    # -- what to run

    async def _initial(self, entry: KeyValue.Entry) -> None:
        """A current version at start-up: install it in place of the manifest's module."""
        if entry.operation in (KV_DEL, KV_PURGE) or entry.value is None:
            return
        name, revision = entry.key, entry.revision or 0
        try:
            accepted = await self.verify(name, revision, entry.value)
            if accepted.spec.trigger.kind == "stream":
                await _ensure_consumer(self.host, accepted.spec)
        except DeployRefused as exc:
            self._refuse(name, revision, exc)
            if name in self.host.functions:
                log.warning("registry: %s keeps the manifest's module", name)
            return
        from fnhost.host import FunctionState

        self.host.functions[name] = FunctionState(accepted.spec, loader=self._loader(accepted.data))
        self.records[name] = Record(revision, "running", running=revision, at=now_iso())
        await self._mark_accepted(name, revision)

    async def _apply(self, entry: KeyValue.Entry) -> None:
        name, revision = entry.key, entry.revision or 0
        if entry.operation in (KV_DEL, KV_PURGE) or entry.value is None:
            if name in self.host.functions:
                log.info("registry: %s was removed (revision %d): draining it", name, revision)
                await self.host.remove_function(name)
            removed = "removed from the registry"
            self.records[name] = Record(revision, "stopped", removed, None, now_iso())
            return
        previous = self.records.get(name)
        if previous is not None and previous.revision >= revision:
            return  # seen already (the watcher re-delivers after a reconnect)
        running = previous.running if previous else None
        try:
            accepted = await self.verify(name, revision, entry.value)
            await self._swap(name, accepted)
        except DeployRefused as exc:
            self._refuse(name, revision, exc, running)
            return
        self.records[name] = Record(revision, "running", running=revision, at=now_iso())
        await self._mark_accepted(name, revision)
        log.info("registry: %s now runs revision %d", name, revision)

    async def _swap(self, name: str, accepted: Accepted) -> None:
        host = self.host
        loader = self._loader(accepted.data)
        state = host.functions.get(name)
        try:
            if state is None or (state.runtime is None and state.trigger is None):
                if state is not None:
                    state.loader = loader
                else:
                    host.functions[name] = _new_state(accepted.spec, loader)
                started = await host.add_function(accepted.spec)
                state = host.functions[name]
            else:
                previous_loader = state.loader
                state.loader = loader
                started = await host.reload_function(name, accepted.spec)
                if not started:
                    state.loader = previous_loader
        except (FnhostError, nats.errors.Error, nats.js.errors.Error) as exc:
            raise DeployRefused("load", f"could not start: {exc}") from None
        if not started:
            raise DeployRefused("load", _strip_where(state.error or "did not start", host))

    def _loader(self, data: bytes) -> Any:
        manifest = self.host.manifest

        def load(spec: FunctionSpec) -> LoadedFunction:
            try:
                module = load_module(data)
            except DeployRefused as exc:
                raise LoadError(f"function {spec.name!r}: {exc}") from None
            return inspect_handler(spec, manifest, module)

        return load

    async def verify(self, name: str, revision: int, value: bytes) -> Accepted:
        """Every check, in the documented order; raises :class:`DeployRefused`."""
        config = self.config
        signed = verify_envelope(value, name, config.trusted_keys)
        assert self._store is not None
        try:
            info = await self._store.get_info(signed.artifact)
        except nats.js.errors.NotFoundError:
            text = f"artifact {signed.artifact} is not in the store"
            raise DeployRefused("missing", text) from None
        if (info.size or 0) > config.max_artifact_size:
            raise DeployRefused(
                "oversize", f"artifact is {info.size} bytes, over {config.max_artifact_size}"
            )
        try:
            result = await self._store.get(signed.artifact)
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            raise DeployRefused("missing", f"cannot fetch {signed.artifact}: {exc}") from None
        data = bytes(result.data or b"")
        verify_artifact(signed, data, config.max_artifact_size)
        try:
            spec = function_spec(name, dict(signed.function), str(revision))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise DeployRefused("invalid-spec", f"invalid settings: {problems}") from None
        if spec.trigger.kind == "request" and spec.trigger.request:
            stream = self.host.manifest.stream_for_subject(spec.trigger.request)
            if stream is not None:
                text = f"request subject {spec.trigger.request!r} is captured by stream {stream}"
                raise DeployRefused("invalid-spec", f"{text}: JetStream would answer it")
        module = load_module(data)  # only now: every check above has passed
        try:
            inspect_handler(spec, self.host.manifest, module)
        except LoadError as exc:
            raise DeployRefused("load", _strip_where(str(exc), self.host)) from None
        return Accepted(spec, data, signed)

    # -- reporting

    def _refuse(
        self, name: str, revision: int, exc: DeployRefused, running: int | None = None
    ) -> None:
        keeps = f"; revision {running} keeps serving" if running else ""
        text = "registry: refused %s revision %d (%s): %s%s"
        log.error(text, name, revision, exc.code, exc, keeps)
        self.records[name] = Record(revision, "refused", f"{exc.code}: {exc}", running, now_iso())

    def document(self) -> dict[str, Any]:
        """This host's status document (``host.<id>`` in the status bucket)."""
        functions: dict[str, Any] = {}
        for name, record in self.records.items():
            entry = record.as_json()
            state = self.host.functions.get(name)
            if record.running is not None and (state is None or state.runtime is None):
                entry["running"] = None
            functions[name] = entry
        return {
            "host": self.host_id,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "started": self._started,
            "seen": time.time(),
            "http": self.host.http_url,
            "functions": functions,
        }

    async def write_status(self) -> None:
        if self._status is None:
            return
        async with self._write_lock:
            await self._status.put(f"host.{self.host_id}", json.dumps(self.document()).encode())

    async def _mark_accepted(self, name: str, revision: int) -> None:
        if self._status is None:
            return
        mark = {"host": self.host_id, "at": now_iso()}
        try:
            await self._status.put(f"accepted.{name}.{revision}", json.dumps(mark).encode())
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            text = "registry: could not record %s revision %d as accepted: %s"
            log.warning(text, name, revision, exc)


async def _ensure_consumer(host: Host, spec: FunctionSpec) -> None:
    try:
        await provision.ensure_consumer(host.js, spec)
    except (FnhostError, nats.errors.Error, nats.js.errors.Error) as exc:
        raise DeployRefused("load", f"cannot create its consumer: {exc}") from None


def _new_state(spec: FunctionSpec, loader: Any) -> FunctionState:
    from fnhost.host import FunctionState

    return FunctionState(spec, loader=loader)


def _strip_where(message: str, host: Host) -> str:
    """Drop the ``fn.yaml:LINE:functions.x.key: `` prefix and the placeholder module name
    the loader puts in its errors: a deployed function has no place in fn.yaml."""
    return describe_load_error(message)


def describe_load_error(message: str, module: str = "the deployed module") -> str:
    """A loader error about a deployed function, without fn.yaml positions."""
    start = message.find("function '")
    text = message[start:] if start >= 0 else message
    return re.sub(r"module 'fnhost_registry\.[\w]+'", module, text)
