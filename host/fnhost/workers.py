"""``fnhost run --workers N``: one supervisor process and N host processes.

A host runs Python on one core at a time. ``--workers N`` starts N hosts of
the same manifest from one command, each a full ``fnhost run`` in its own
process: they share queue groups and durable consumers exactly as hosts
started by hand do, so NATS spreads the work and the supervisor divides
nothing up. What the supervisor does (the model is uvicorn's
``supervisors/multiprocess.py``):

- **NATS**: with ``nats.url: embedded`` and no ``--nats``, it starts the
  embedded nats-server itself and gives every worker its URL (one server, not N).
- **HTTP**: it serves the manifest's ``http:`` address; every worker serves its
  own on a private loopback port, which the supervisor reads:

  - ``/healthz``: the supervisor is alive, and the state of each worker;
  - ``/readyz``: 200 only when every worker is running and ready, else 503
    with every worker's reasons (``worker 2: idempotency:redis: ...``);
  - ``/metrics``: the workers' metrics added up (counters, histograms and
    gauges; the consumer gauges ``fnhost_consumer_pending_messages`` and
    ``fnhost_consumer_ack_pending_messages``, which every host reads from the
    same consumer, take the largest value instead), plus the supervisor's own
    ``fnhost_workers``, ``fnhost_workers_ready`` and
    ``fnhost_worker_restarts_total``. A worker that died keeps its counters in
    the sum (their values at the supervisor's last look, at most
    :data:`CHECK_EVERY` seconds old), so totals never go down;
  - ``/functions`` (and the status page that reads it): each function's
    counts and in-flight added up over the workers;
  - any other path (``POST /invoke/{function}``, plugin routes) is passed to
    one ready worker, in turn.

- **Supervision**: every :data:`CHECK_EVERY` seconds it asks each worker's
  ``/readyz``. A worker that exits, or that answers nothing for
  ``--worker-timeout`` seconds (a blocked event loop), is killed and started
  again, after a pause that starts at :data:`RESTART_FIRST` and doubles up to
  :data:`RESTART_MAX` while the worker keeps dying within
  :data:`DIES_YOUNG` seconds of its start. Its unacked messages are
  redelivered by JetStream as after any crash.
- **Signals**: SIGTERM or SIGINT stops the restarts and SIGTERMs every worker,
  which drains as a single host does (``--grace``); the supervisor exits 0
  when every worker drained cleanly, 1 otherwise. SIGHUP restarts the workers
  one at a time (a *rolling restart*: new code or a new fn.yaml without a
  moment with no worker): fn.yaml is checked first, and a manifest with
  errors leaves every worker as it is; each worker drains, its replacement
  starts, and the next waits until it is ready (at most
  :data:`ROLL_READY_TIMEOUT` seconds, else the roll stops there and says
  why). The supervisor's own HTTP address is not re-read. Workers run in their own
  sessions, so a Ctrl-C reaches them once, through the supervisor; a worker
  whose supervisor dies (``kill -9``) notices within a second and drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import os
import signal
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from fnhost.embedded import EmbeddedNats
from fnhost.errors import ManifestError
from fnhost.http import HttpServer, readiness_response, status_page_html
from fnhost.manifest import Manifest, load_manifest
from fnhost.tasks import cancel_and_wait
from fnhost_sdk.waiting import wait_for

if TYPE_CHECKING:
    from fnhost.host import Host

log = logging.getLogger("fnhost.workers")

CHECK_EVERY = 2.0
"""Seconds between the supervisor's looks at each worker."""
ASK_TIMEOUT = 5.0
"""Seconds one request to a worker's private HTTP may take."""
RESTART_FIRST, RESTART_MAX = 0.5, 30.0
"""Seconds before a dead worker is started again: the first pause, and the most it doubles to."""
DIES_YOUNG = 10.0
"""A worker that dies within this many seconds of its start doubles the next pause."""
DRAIN_MARGIN = 10.0
"""Seconds past ``--grace`` a draining worker gets before it is killed."""
ROLL_READY_TIMEOUT = 60.0
"""Seconds a worker restarted by SIGHUP gets to become ready before the roll stops."""
STATUS_ENV = "FNHOST_WORKER_STATUS"
"""Where a worker writes its private HTTP address (set by the supervisor)."""
INDEX_ENV = "FNHOST_WORKER"
"""The worker's number, 1 to N (set by the supervisor; logs carry it)."""
SUPERVISOR_ENV = "FNHOST_SUPERVISOR_PID"
"""The supervisor's pid: a worker drains when its parent is no longer that process."""
LARGEST_GAUGES = frozenset(
    {"fnhost_consumer_pending_messages", "fnhost_consumer_ack_pending_messages"}
)
"""Gauges every host reads from the same place: merged by their largest value, not a sum."""
STATUS_PRECEDENCE = ("failed", "starting", "draining", "stopped", "running")
"""A function's merged status is the first of these that any worker reports."""

SampleKey = tuple[str, tuple[tuple[str, str], ...]]
WorkerState = Literal["starting", "ready", "not ready", "restarting", "stopped"]


class Worker:
    """One host process of the supervisor, and what the supervisor last saw of it."""

    def __init__(self, index: int, argv: list[str], status_dir: Path) -> None:
        self.index = index
        self.argv = argv
        self.status_file = status_dir / f"worker-{index}.json"
        self.process: asyncio.subprocess.Process | None = None
        self.url: str | None = None
        self.started_at = 0.0
        self.answered_at = 0.0
        self.reasons: list[str] | None = None
        """What the worker's ``/readyz`` said was wrong ([] = ready); None before it answered."""
        self.restarts = 0
        self.pause = RESTART_FIRST
        self.restart_at: float | None = None
        self.metrics: list[Metric] = []
        """The worker's metric families at the supervisor's last look."""
        self.exited: asyncio.Future[int] | None = None
        """The task waiting for the process's exit, held so it is not garbage-collected."""
        self.rolling = False
        """Being restarted by SIGHUP: its exit is no crash."""

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def state(self) -> WorkerState:
        if not self.running:
            return "restarting" if self.restart_at is not None else "stopped"
        if self.reasons is None:
            return "starting"
        return "ready" if not self.reasons else "not ready"

    async def start(self, on_exit: Callable[[], None]) -> None:
        self.status_file.unlink(missing_ok=True)
        self.url, self.reasons, self.restart_at = None, None, None
        env = {
            **os.environ,
            STATUS_ENV: str(self.status_file),
            INDEX_ENV: str(self.index),
            SUPERVISOR_ENV: str(os.getpid()),
        }
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, env=env, stdin=asyncio.subprocess.DEVNULL, start_new_session=True
        )
        self.started_at = self.answered_at = time.monotonic()
        self.exited = asyncio.ensure_future(self.process.wait())
        self.exited.add_done_callback(lambda _: on_exit())
        log.info("worker %d started (pid %d)", self.index, self.process.pid)

    def find_url(self) -> str | None:
        """The worker's private HTTP address, once it has written it."""
        if self.url is None:
            with contextlib.suppress(OSError, ValueError, KeyError):
                self.url = str(json.loads(self.status_file.read_text())["http"])
        return self.url

    def send(self, sig: signal.Signals) -> None:
        if self.running:
            assert self.process is not None
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)


def _settled(worker: Worker) -> bool:
    """Whether a restarted worker is ready, or has already died again."""
    return worker.state == "ready" or not worker.running


class Supervisor:
    """Runs ``count`` workers of one manifest until SIGTERM/SIGINT (see the module docstring)."""

    def __init__(
        self,
        manifest: Manifest,
        *,
        count: int,
        worker_argv: list[str],
        nats_url: str | None,
        grace: float,
        worker_timeout: float,
    ) -> None:
        self.manifest = manifest
        self.count = count
        self.worker_argv = worker_argv
        self.nats_url = nats_url
        self.grace = grace
        self.worker_timeout = worker_timeout
        self.workers: list[Worker] = []
        self.retired: dict[tuple[str, str, str], dict[SampleKey, float]] = {}
        """Counter and histogram samples of workers that died, by family (name, type, help)."""
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        """Set when a worker exits or a signal comes: look again before the next tick."""
        self._turn = itertools.count()
        self._roll: asyncio.Task[None] | None = None

    async def serve(self) -> int:
        """Start everything, supervise until a signal, drain; return the exit code."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)
        async with contextlib.AsyncExitStack() as stack:
            await self._start(stack)
            while not self._stop.is_set():
                self._wake.clear()
                await self._check()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._until_next_look())
            if self._roll is not None:
                await cancel_and_wait([self._roll])
            code = await self._drain()
        return code

    async def _start(self, stack: contextlib.AsyncExitStack) -> None:
        """NATS if embedded, the HTTP face, then the workers; their clean-up on ``stack``."""
        status_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fnhost-")))
        url = self.nats_url
        if url == "embedded" or (not url and self.manifest.nats.is_embedded):
            embedded = EmbeddedNats(self.manifest.root)
            url = await embedded.start()
            stack.push_async_callback(embedded.stop)
        argv = [*self.worker_argv, *(["--nats", url] if url else [])]
        self.workers = [Worker(index, argv, status_dir) for index in range(1, self.count + 1)]
        stack.push_async_callback(self._kill_all)
        if self.manifest.http is not None:
            http = HttpServer(build_app(self), self.manifest.http)
            http_url = await http.start()
            stack.push_async_callback(http.stop)
            log.info("HTTP on %s (status page, /healthz, /readyz, /metrics)", http_url)
        for worker in self.workers:
            await worker.start(self._wake.set)
        log.info("supervising %d workers", self.count)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            log.warning("%s again: still draining the workers", sig.name)
            return
        log.info("%s received: draining %d workers", sig.name, self.count)
        self._stop.set()
        self._wake.set()

    @property
    def stopping(self) -> bool:
        """A SIGTERM/SIGINT came: no more restarts, the workers drain."""
        return self._stop.is_set()

    def _on_hangup(self) -> None:
        if self.stopping:
            return
        if self._roll is not None and not self._roll.done():
            log.warning("SIGHUP again: a rolling restart is still going on")
            return
        log.info("SIGHUP received: restarting the workers one at a time")
        self._roll = asyncio.get_running_loop().create_task(self._restart_one_by_one())

    async def _restart_one_by_one(self) -> None:
        try:
            load_manifest(self.manifest.path)
        except ManifestError as exc:
            log.error(
                "%s has errors; every worker keeps running as it is:\n%s",
                self.manifest.path,
                exc,
            )
            return
        for worker in self.workers:
            if worker.running:
                worker.rolling = True
                try:
                    worker.send(signal.SIGTERM)
                    await self._wait_exit(worker)
                    await worker.start(self._wake.set)
                finally:
                    worker.rolling = False
            with contextlib.suppress(AssertionError):  # wait_for's deadline: judged below
                await wait_for(partial(_settled, worker), timeout=ROLL_READY_TIMEOUT, interval=0.1)
            if worker.state != "ready":
                why = "; ".join(worker.reasons or [worker.state])
                log.error(
                    "rolling restart stopped: worker %d is not ready (%s); "
                    "the workers after it keep running as they were",
                    worker.index,
                    why,
                )
                return
        log.info("rolling restart done: %d workers", len(self.workers))

    async def _wait_exit(self, worker: Worker) -> int:
        """The drained worker's exit code; killed if it outlives ``--grace``."""
        assert worker.process is not None
        try:
            return await asyncio.wait_for(worker.process.wait(), self.grace + DRAIN_MARGIN)
        except TimeoutError:
            log.error("worker %d did not finish its drain: killing it", worker.index)
            worker.send(signal.SIGKILL)
            return await worker.process.wait()

    def _until_next_look(self) -> float:
        """Seconds to the next tick, or to the next restart due before it."""
        now = time.monotonic()
        due = [w.restart_at - now for w in self.workers if w.restart_at is not None]
        return max(0.0, min([CHECK_EVERY, *due]))

    async def _check(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            if worker.running or worker.rolling:
                continue
            if worker.restart_at is None:
                self._died(worker, now)
            elif now >= worker.restart_at:
                worker.restarts += 1
                await worker.start(self._wake.set)
        await asyncio.gather(*(self._look(worker) for worker in self.workers if worker.running))

    def _died(self, worker: Worker, now: float) -> None:
        assert worker.process is not None
        young = now - worker.started_at < DIES_YOUNG
        worker.pause = min(worker.pause * 2, RESTART_MAX) if young else RESTART_FIRST
        worker.restart_at = now + worker.pause
        log.error(
            "worker %d (pid %d) exited with code %s; starting it again in %.1fs",
            worker.index,
            worker.process.pid,
            worker.process.returncode,
            worker.pause,
        )
        self._retire(worker)

    def _retire(self, worker: Worker) -> None:
        """Keep a dead worker's counters in the sums, so they never go down."""
        for family in worker.metrics:
            if family.type not in ("counter", "histogram"):
                continue
            kept = self.retired.setdefault((family.name, family.type, family.documentation), {})
            for sample in family.samples:
                key = _sample_key(sample)
                kept[key] = kept.get(key, 0.0) + sample.value
        worker.metrics = []

    async def _look(self, worker: Worker) -> None:
        """Ask one worker whether it is ready, and keep its metrics."""
        url = worker.find_url()
        if url is not None:
            readiness = await ask(url + "/readyz")
            if readiness is not None:
                worker.answered_at = time.monotonic()
                worker.reasons = list(json.loads(readiness[1]).get("reasons", []))
                await refresh_metrics(worker)
                return
        silent = time.monotonic() - worker.answered_at
        if silent > self.worker_timeout and not self.stopping:
            log.error(
                "worker %d (pid %s) has not answered for %.0fs: killing it",
                worker.index,
                worker.pid,
                silent,
            )
            worker.send(signal.SIGKILL)

    async def _drain(self) -> int:
        running = [worker for worker in self.workers if worker.running]
        for worker in running:
            worker.send(signal.SIGTERM)
        codes = [await self._wait_exit(worker) for worker in running]
        failed = [code for code in codes if code != 0]
        log.info("workers stopped%s", f" ({len(failed)} not cleanly)" if failed else "")
        return 1 if failed else 0

    async def _kill_all(self) -> None:
        for worker in self.workers:
            worker.send(signal.SIGKILL)
            if worker.process is not None:
                await worker.process.wait()

    def reachable(self) -> list[Worker]:
        """The running workers whose private HTTP address is known."""
        return [worker for worker in self.workers if worker.running and worker.url]

    def next_ready(self) -> Worker | None:
        """A ready worker, a different one each call while several are."""
        ready = [worker for worker in self.workers if worker.state == "ready" and worker.url]
        return ready[next(self._turn) % len(ready)] if ready else None

    def readiness(self) -> list[str]:
        """Why the workers are not all ready; empty when they are."""
        reasons = ["draining"] if self.stopping else []
        for worker in self.workers:
            state = worker.state
            if state in ("restarting", "stopped", "starting"):
                reasons.append(f"worker {worker.index}: {state}")
            elif time.monotonic() - worker.answered_at > CHECK_EVERY + ASK_TIMEOUT:
                reasons.append(f"worker {worker.index}: not answering")
            else:
                reasons.extend(
                    f"worker {worker.index}: {reason}" for reason in worker.reasons or ()
                )
        return reasons


async def ask(
    url: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, str] | None:
    """One request to a worker's private HTTP: (status, body, content type), or None if
    it did not answer within :data:`ASK_TIMEOUT`."""

    def call() -> tuple[int, bytes, str] | None:
        request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=ASK_TIMEOUT) as answer:
                return answer.status, answer.read(), answer.headers.get("content-type", "")
        except urllib.error.HTTPError as refused:
            with refused:
                return refused.code, refused.read(), refused.headers.get("content-type", "")
        except OSError:
            return None

    return await asyncio.to_thread(call)


async def refresh_metrics(worker: Worker) -> None:
    """Keep the worker's metric families as its ``/metrics`` says now (if it answers)."""
    answer = await ask(f"{worker.url}/metrics")
    if answer is not None and answer[0] == 200:
        worker.metrics = list(text_string_to_metric_families(answer[1].decode()))


def _sample_key(sample: Sample) -> SampleKey:
    return sample.name, tuple(sorted(sample.labels.items()))


def merge_metrics(
    scrapes: Iterable[Iterable[Metric]], retired: dict[tuple[str, str, str], dict[SampleKey, float]]
) -> list[Metric]:
    """The families of several hosts as one: every sample added up, except the
    :data:`LARGEST_GAUGES`, which take their largest value; ``retired`` (the
    counters of dead workers) is added to the sums."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[SampleKey, float]] = {}
    for (name, kind, documentation), samples in retired.items():
        families[name] = Metric(name, documentation, kind)
        values[name] = dict(samples)
    for scrape in scrapes:
        for family in scrape:
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type)
                values[family.name] = {}
            merged = values[family.name]
            largest = family.type == "gauge" and family.name in LARGEST_GAUGES
            for sample in family.samples:
                key = _sample_key(sample)
                if key in merged:
                    merged[key] = (
                        max(merged[key], sample.value) if largest else merged[key] + sample.value
                    )
                else:
                    merged[key] = sample.value
    for name, family in families.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(families.values())


def merge_functions(reports: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Several hosts' ``/functions`` as one: counts and in-flight added up, pending and
    dead-letter depth the largest, the status the worst (:data:`STATUS_PRECEDENCE`)."""
    merged: dict[str, dict[str, Any]] = {}
    for report in reports:
        for function in report:
            into = merged.get(function["name"])
            if into is None:
                merged[function["name"]] = {
                    **function,
                    "counts": dict(function["counts"]),
                    "versions": {function["version"]} - {None},
                    "workers": 1,
                }
                continue
            into["workers"] += 1
            for outcome, count in function["counts"].items():
                into["counts"][outcome] = into["counts"].get(outcome, 0) + count
            into["inflight"] += function["inflight"]
            for field in ("pending", "dead_letter_depth"):
                if function[field] is not None:
                    into[field] = max(into[field] or 0, function[field])
            if STATUS_PRECEDENCE.index(function["status"]) < STATUS_PRECEDENCE.index(
                into["status"]
            ):
                into["status"] = function["status"]
            into["error"] = into["error"] or function["error"]
            into["versions"] |= {function["version"]} - {None}
    for function in merged.values():
        # Different versions side by side: a deploy rolling out, or a worker left behind.
        versions = sorted(function.pop("versions"))
        function["version"] = ", ".join(versions) if versions else None
    return list(merged.values())


class _Collected:
    """A prometheus-client collector of families gathered elsewhere."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


def _own_metrics(supervisor: Supervisor) -> list[Metric]:
    workers = GaugeMetricFamily("fnhost_workers", "Host processes the supervisor runs.")
    workers.add_metric([], supervisor.count)
    ready = GaugeMetricFamily("fnhost_workers_ready", "Host processes running and ready.")
    ready.add_metric([], sum(worker.state == "ready" for worker in supervisor.workers))
    restarts = CounterMetricFamily(
        "fnhost_worker_restarts", "Host processes started again after they died or hung."
    )
    restarts.add_metric([], sum(worker.restarts for worker in supervisor.workers))
    return [workers, ready, restarts]


PROXIED_HEADERS = ("content-type", "authorization", "traceparent", "tracestate")


def build_app(supervisor: Supervisor) -> Starlette:
    """The supervisor's HTTP face (see the module docstring)."""
    page = status_page_html()

    async def healthz(request: Request) -> Response:
        workers = [
            {"worker": worker.index, "pid": worker.pid, "state": worker.state}
            for worker in supervisor.workers
        ]
        return JSONResponse({"status": "alive", "workers": workers})

    async def readyz(request: Request) -> Response:
        return readiness_response(supervisor.readiness())

    async def metrics(request: Request) -> Response:
        running = supervisor.reachable()
        await asyncio.gather(*(refresh_metrics(worker) for worker in running))
        families = merge_metrics((worker.metrics for worker in running), supervisor.retired)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collected(families + _own_metrics(supervisor)))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def functions(request: Request) -> Response:
        running = supervisor.reachable()
        answers = await asyncio.gather(*(ask(f"{worker.url}/functions") for worker in running))
        reports = [json.loads(answer[1]) for answer in answers if answer and answer[0] == 200]
        return JSONResponse(merge_functions(reports))

    async def status_page(request: Request) -> Response:
        return HTMLResponse(page)

    async def to_a_worker(request: Request) -> Response:
        worker = supervisor.next_ready()
        if worker is None:
            return JSONResponse({"error": "no worker is ready"}, status_code=503)
        headers = {name: value for name in PROXIED_HEADERS if (value := request.headers.get(name))}
        target = f"{worker.url}{request.url.path}"
        if request.url.query:
            target += f"?{request.url.query}"
        answer = await ask(
            target, method=request.method, body=await request.body() or None, headers=headers
        )
        if answer is None:
            return JSONResponse({"error": f"worker {worker.index} did not answer"}, 504)
        status, body, content_type = answer
        return Response(body, status_code=status, media_type=content_type or None)

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
            Route("/functions", functions),
            Route("/", status_page),
            Route("/{path:path}", to_a_worker, methods=["GET", "POST", "PUT", "DELETE"]),
        ]
    )


async def serve_as_worker(host: Host, status_file: Path, supervisor_pid: int) -> None:
    """In a worker, beside ``host.serve()``: tell the supervisor where the host's private
    HTTP is, then drain (SIGTERM to this process) once the supervisor is gone."""
    # Polled: the host's start-up offers nothing to wait on, and a parent's death
    # reaches a child only as a change of getppid().
    await wait_for(lambda: host.http_url, timeout=math.inf, interval=0.05)
    written = status_file.with_suffix(".tmp")
    written.write_text(json.dumps({"http": host.http_url, "pid": os.getpid()}))
    written.replace(status_file)  # the supervisor never reads half a file
    await wait_for(lambda: os.getppid() != supervisor_pid, timeout=math.inf, interval=1.0)
    log.error("the supervisor (pid %d) is gone: draining", supervisor_pid)
    os.kill(os.getpid(), signal.SIGTERM)
