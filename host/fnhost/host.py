"""``Host``: connect -> provision -> load -> start triggers -> wait -> drain.

A function that fails to load is reported (its state says why) and every
other function runs: one broken module never takes the host down. The host
ends with exit code 0 after a signal-initiated drain, and 1 when its NATS
connection closes for good, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from fnhost import provision
from fnhost.connection import connect
from fnhost.embedded import EmbeddedNats
from fnhost.errors import FnhostError, LoadError
from fnhost.http import HttpServer, build_app
from fnhost.invocation import build_endpoint, compose
from fnhost.loader import LoadedFunction, load_function, user_traceback
from fnhost.manifest import FunctionSpec, Manifest
from fnhost.metrics import HostMetrics
from fnhost.plugins.manager import PluginManager
from fnhost.tasks import cancel_and_wait
from fnhost.tracing import HostTracing
from fnhost.triggers import FunctionRuntime, Trigger
from fnhost.triggers.request import RequestTrigger
from fnhost.triggers.stream import StreamTrigger
from fnhost.triggers.subject import SubjectTrigger
from fnhost_sdk.session import Session

log = logging.getLogger("fnhost.host")

SLOW_CONSUMER_LOG_EVERY = 10.0
"""Seconds between two log lines about the messages one subscription dropped."""
DEFAULT_GRACE = 30.0
CONNECTION_DRAIN_TIMEOUT = 5.0
"""Seconds the connection's drain gets (after the functions drained) before it is closed."""

FunctionStatus = Literal["starting", "running", "failed", "draining", "stopped"]


@dataclass
class FunctionState:
    """What the host knows about one function: its running version or why it is not running."""

    spec: FunctionSpec
    runtime: FunctionRuntime | None = None
    trigger: Trigger | None = None
    error: str | None = None
    executor: ThreadPoolExecutor | None = field(default=None, repr=False)
    loader: Callable[[FunctionSpec], LoadedFunction] | None = field(default=None, repr=False)
    """Where the code comes from when not the manifest's module (a deployed artifact)."""

    @property
    def status(self) -> FunctionStatus:
        if self.error is not None and self.runtime is None:
            return "failed"
        return "starting" if self.trigger is None else self.trigger.status

    def listens_on(self, sub: Subscription) -> bool:
        return self.trigger is not None and self.trigger.subscription is sub


class Host:
    """Runs the functions of one manifest on one NATS connection."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        nats_url: str | None = None,
        drain_grace: float = DEFAULT_GRACE,
        plugins: Sequence[object] = (),
        load_entry_points: bool = True,
        any_http_port_if_taken: bool = False,
    ) -> None:
        self.manifest = manifest
        self._any_http_port_if_taken = any_http_port_if_taken
        self.drain_grace = drain_grace
        self.plugins = PluginManager()
        for plugin in plugins:
            self.plugins.register(plugin)
        if load_entry_points:
            self.plugins.load_entry_points()
        self.plugins.load_modules(manifest.plugins)
        self.functions: dict[str, FunctionState] = {
            name: FunctionState(spec) for name, spec in manifest.functions.items()
        }
        self.embedded: EmbeddedNats | None = None
        self.url: str | None = None
        self.http: HttpServer | None = None
        self.http_url: str | None = None
        self.ready = False
        self.draining = False
        self.metrics = HostMetrics()
        self.tracing = HostTracing(manifest.tracing)
        self.problems: dict[str, str] = {}
        """Why the host is not ready, by component (``"idempotency:redis"`` -> reason);
        plugins set and clear their entries, ``/readyz`` reports them."""
        self._nats_url = nats_url
        self._nc: NatsClient | None = None
        self._session: Session | None = None
        self._lost = asyncio.Event()
        self._stop = asyncio.Event()
        self._slow_consumer_logged: dict[str, float] = {}

    @property
    def connected(self) -> bool:
        """Whether the NATS connection is up right now."""
        return self._nc is not None and self._nc.is_connected

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("the host is not connected; call start() first")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        return self.session.js

    @property
    def session(self) -> Session:
        if self._session is None:
            raise RuntimeError("the host is not connected; call start() first")
        return self._session

    async def start(self) -> None:
        """Serve HTTP, connect, provision, load every function and start its trigger."""
        if self.manifest.http is not None:
            self.http = HttpServer(build_app(self), self.manifest.http)
            self.http_url = await self.http.start(any_port_if_taken=self._any_http_port_if_taken)
            log.info("HTTP on %s (status page, /healthz, /readyz, /metrics)", self.http_url)
        servers = await self._servers()
        self._nc = await connect(
            self.manifest.nats,
            servers,
            name=f"fnhost {self.manifest.path.name}",
            on_reconnect=self._on_reconnect,
            on_closed=self._lost.set,
            on_slow_consumer=self._on_slow_consumer,
        )
        # Looked up at each publish: a reload that declares a stream makes publishes to
        # its subjects durable at once.
        self._session = Session(
            self._nc, stream_for_subject=lambda subject: self.manifest.stream_for_subject(subject)
        )
        await provision.provision(self.js, self.manifest)
        await self.plugins.startup(self)
        for state in self.functions.values():
            await self._start_function(state)
        self.ready = True
        running = sum(state.status == "running" for state in self.functions.values())
        log.info("host ready: %d of %d functions running", running, len(self.functions))

    async def _servers(self) -> list[str]:
        if self._nats_url == "embedded" or (not self._nats_url and self.manifest.nats.is_embedded):
            self.embedded = EmbeddedNats(self.manifest.root)
            self.url = await self.embedded.start()
            return [self.url]
        if self._nats_url:
            return [url.strip() for url in self._nats_url.split(",") if url.strip()]
        return self.manifest.nats.urls

    def build_runtime(self, spec: FunctionSpec, state: FunctionState) -> FunctionRuntime:
        """Load ``spec``'s module afresh and compose its chain (raises :class:`LoadError`)."""
        loaded = state.loader(spec) if state.loader else load_function(spec, self.manifest)
        executor = None
        if not loaded.is_async:
            if state.executor is None:
                state.executor = ThreadPoolExecutor(
                    max_workers=spec.concurrency, thread_name_prefix=f"fnhost-{spec.name}"
                )
            executor = state.executor
        chain = compose(build_endpoint(loaded, executor), self.plugins.middleware_for(spec, self))
        session = self.session.with_outgoing(self.plugins.outgoing_for(spec, self))
        return FunctionRuntime(spec=spec, loaded=loaded, chain=chain, session=session)

    def build_trigger(self, runtime: FunctionRuntime) -> Trigger:
        kind = runtime.spec.trigger.kind
        if kind == "request":
            return RequestTrigger(runtime, self.nc, self.metrics.count_refused)
        if kind == "subject":
            return SubjectTrigger(runtime, self.nc, self.metrics.count_refused)
        spec = runtime.spec
        return StreamTrigger(
            runtime,
            self.nc,
            ensure_consumer=lambda: provision.ensure_consumer(self.js, spec),
            on_dead_lettered=self.metrics.count_dead_letter,
        )

    async def _start_function(self, state: FunctionState) -> None:
        try:
            runtime = self.build_runtime(state.spec, state)
        except LoadError as exc:
            state.error = str(exc)
            log.error("%s", exc)
            return
        await self._start_trigger(state, runtime)

    async def _start_trigger(self, state: FunctionState, runtime: FunctionRuntime) -> None:
        trigger = self.build_trigger(runtime)
        try:
            await trigger.start()
        except FnhostError as exc:
            state.error = f"function {runtime.spec.name!r} did not start: {exc}"
            log.error("%s", state.error)
            return
        state.spec, state.runtime, state.trigger, state.error = runtime.spec, runtime, trigger, None
        log.info(
            "function %s running (%s %s, version %s)",
            runtime.spec.name,
            runtime.spec.trigger.kind,
            trigger.describe(),
            runtime.version,
        )

    async def reload_function(self, name: str, spec: FunctionSpec | None = None) -> bool:
        """Load ``name`` afresh (with ``spec`` if its settings changed) and swap it in.

        In-flight invocations finish on the old version; the next message runs
        the new one. When only code or per-invocation settings changed the
        trigger keeps running and just switches version; a changed trigger,
        concurrency or ack mode restarts the trigger (drain, then start). If
        the new version does not load, the running one keeps serving and
        ``state.error`` says why. Returns whether the new version runs.
        """
        state = self.functions[name]
        new_spec = spec or state.spec
        try:
            runtime = self.build_runtime(new_spec, state)
        except LoadError as exc:
            state.error = str(exc)
            keeps = " (the previous version keeps running)" if state.runtime else ""
            shown = user_traceback(exc)
            log.error("%s%s%s", exc, keeps, f"\n{shown}" if shown else "")
            return False
        settings_changed = new_spec != state.spec
        if new_spec.trigger.kind == "stream" and settings_changed:
            await provision.ensure_consumer(self.js, new_spec)
        trigger = state.trigger
        if trigger is not None and not _needs_new_trigger(state.spec, new_spec):
            trigger.runtime = runtime
            state.spec, state.runtime, state.error = new_spec, runtime, None
            log.info("function %s now runs version %s", name, runtime.version)
        else:
            if trigger is not None:
                await trigger.drain(self.drain_grace)
                state.trigger = None
            await self._start_trigger(state, runtime)
        if settings_changed:
            await self.plugins.functions_changed(self)
        return state.trigger is not None

    async def add_function(self, spec: FunctionSpec) -> bool:
        """Start a function that was not running (a manifest reload, a deploy)."""
        if spec.trigger.kind == "stream":
            await provision.ensure_consumer(self.js, spec)
        state = self.functions.setdefault(spec.name, FunctionState(spec))
        state.spec = spec
        await self.plugins.functions_changed(self)
        await self._start_function(state)
        return state.trigger is not None

    async def remove_function(self, name: str) -> None:
        """Drain and stop a function; its consumer stays on the server."""
        state = self.functions.pop(name, None)
        if state is None:
            return
        if state.trigger is not None:
            await state.trigger.drain(self.drain_grace)
        if state.executor is not None:
            state.executor.shutdown(wait=False)
        log.info("function %s stopped", name)
        await self.plugins.functions_changed(self)

    def _on_slow_consumer(self, exc: nats.errors.SlowConsumerError) -> None:
        # nats-py reports every message it drops: each is counted, and logged as one
        # line per subscription every SLOW_CONSUMER_LOG_EVERY seconds.
        function = next(
            (name for name, state in self.functions.items() if state.listens_on(exc.sub)), ""
        )
        subscription = exc.sub.subject
        dropped = self.metrics.count_slow_consumer(function, subscription)
        now = time.monotonic()
        if now - self._slow_consumer_logged.get(subscription, -math.inf) >= SLOW_CONSUMER_LOG_EVERY:
            self._slow_consumer_logged[subscription] = now
            log.error(
                "slow consumer: %s dropped by the NATS client for %s (%d so far): its "
                "handlers fall behind the messages arriving",
                f"a message of function {function}" if function else "a message",
                subscription,
                dropped,
            )

    def _on_reconnect(self) -> None:
        for state in self.functions.values():
            if state.trigger is not None:
                state.trigger.on_reconnect()

    def request_stop(self) -> None:
        """Begin a graceful drain (what SIGTERM/SIGINT do)."""
        self._stop.set()

    async def wait(self) -> int:
        """Wait for a stop request or a lost connection; drain; return the exit code."""
        stop = asyncio.ensure_future(self._stop.wait())
        lost = asyncio.ensure_future(self._lost.wait())
        await asyncio.wait({stop, lost}, return_when=asyncio.FIRST_COMPLETED)
        for waiter in (stop, lost):
            waiter.cancel()
        if self._lost.is_set() and not self._stop.is_set():
            log.error(
                "the NATS connection closed for good; exiting so a supervisor restarts the host"
            )
            await self.close(drain=False)
            return 1
        await self.drain()
        return 0

    async def drain(self, grace: float | None = None) -> None:
        """Stop intake everywhere, let in-flight work finish within ``grace``, then close."""
        grace = self.drain_grace if grace is None else grace
        self.draining = True
        self.ready = False
        triggers = [state.trigger for state in self.functions.values() if state.trigger]
        log.info("draining %d functions (grace %gs)", len(triggers), grace)
        results = await asyncio.gather(*(trigger.drain(grace) for trigger in triggers))
        if all(results):
            log.info("drained: all in-flight work finished")
        await self.close(drain=True)

    async def close(self, *, drain: bool) -> None:
        """Run shutdown hooks, close the connection and the embedded server."""
        await self.plugins.shutdown(self)
        nc = self._nc
        if nc is not None and not nc.is_closed:
            if drain:
                await _drain_connection(nc)
            if not nc.is_closed:
                await nc.close()
        for state in self.functions.values():
            if state.executor is not None:
                state.executor.shutdown(wait=False, cancel_futures=True)
        if self.embedded is not None:
            await self.embedded.stop()
        if self.http is not None:
            await self.http.stop()

    async def serve(self) -> int:
        """Start, run until SIGTERM/SIGINT (or a lost connection), drain; return the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            if not await self._start_unless_stopped():
                log.info("stopped before the host was ready")
                await self.close(drain=False)
                return 0
        except BaseException:
            await self.close(drain=False)
            raise
        return await self.wait()

    async def _start_unless_stopped(self) -> bool:
        """``start()``, abandoned if a stop comes first; whether it finished.

        The first connect retries forever while NATS is unreachable (a host may
        start before its server), so a SIGTERM must be able to end that wait.
        """
        starting = asyncio.ensure_future(self.start())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            starting.cancel()
            raise
        finally:
            stopping.cancel()
        if starting.done():
            starting.result()
            return True
        await cancel_and_wait([starting])
        return False

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("%s again: still draining", sig.name)
            return
        log.info("%s received: draining", sig.name)
        self._stop.set()


async def _drain_connection(nc: NatsClient) -> None:
    """Drain ``nc`` for at most :data:`CONNECTION_DRAIN_TIMEOUT` seconds, then close it.

    Not through ``wait_for``: nats-py's ``drain`` swallows the cancellation of a
    timeout and goes on to a flush of up to 10 s, which ``wait_for`` waits out.
    """
    draining = asyncio.ensure_future(nc.drain())
    await asyncio.wait({draining}, timeout=CONNECTION_DRAIN_TIMEOUT)
    if not draining.done():
        log.warning("connection drain did not finish in %gs; closing", CONNECTION_DRAIN_TIMEOUT)
        await nc.close()
        await cancel_and_wait([draining])
    elif (failure := draining.exception()) is not None:
        # While disconnected nats-py refuses to drain (ConnectionReconnectingError).
        log.warning("connection drain did not finish: %s", failure)


def _needs_new_trigger(old: FunctionSpec, new: FunctionSpec) -> bool:
    """Whether a settings change needs a new trigger rather than a version swap."""
    return (
        old.trigger != new.trigger
        or old.concurrency != new.concurrency
        or old.ack != new.ack
        or old.progress_pings != new.progress_pings
    )
