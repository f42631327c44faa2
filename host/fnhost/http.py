"""The host's HTTP face (Starlette, served by uvicorn in the host's own event loop).

``GET /healthz`` alive; ``GET /readyz`` 200 only when connected, started, not
draining, every function running and no component (an idempotency store, say)
reporting a problem, else 503 with the reasons as JSON; ``GET /metrics``
Prometheus text; ``GET /functions`` JSON; ``GET /`` a live status page;
``POST /invoke/{function}`` when ``http.gateway`` is enabled (bearer token).
Plugins add routes through ``fnhost_routes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import logging
import socket
import time
from collections.abc import Iterator
from importlib import resources
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from fnhost.manifest import GatewayConfig, HttpConfig, Manifest
from fnhost_sdk import headers as h

if TYPE_CHECKING:
    from fnhost.host import FunctionState, Host

log = logging.getLogger("fnhost.http")

DEAD_LETTER_CACHE = 2.0
"""Seconds a dead-letter depth is reused, so a status page polling fast costs little."""


def readiness(host: Host) -> list[str]:
    """Why the host is not ready; empty when it is."""
    reasons: list[str] = []
    if host.draining:
        reasons.append("draining")
    elif not host.ready:
        reasons.append("starting")
    if host.ready and not host.connected and not host.draining:
        reasons.append("disconnected from NATS")
    reasons.extend(f"{component}: {reason}" for component, reason in sorted(host.problems.items()))
    for name, state in host.functions.items():
        if state.status == "failed":
            reasons.append(f"function {name} failed: {state.error}")
    return reasons


class _DeadLetterDepth:
    """Messages waiting on each function's dead-letter subject (stream info, cached)."""

    def __init__(self, host: Host) -> None:
        self._host = host
        self._cache: dict[str, tuple[float, int | None]] = {}

    async def depth(self, subject: str) -> int | None:
        cached = self._cache.get(subject)
        now = time.monotonic()
        if cached is not None and now - cached[0] < DEAD_LETTER_CACHE:
            return cached[1]
        stream = self._host.manifest.stream_for_subject(subject)
        depth: int | None = None
        if stream is not None:
            try:
                info = await self._host.js.stream_info(stream, subjects_filter=subject)
                depth = (info.state.subjects or {}).get(subject, 0)
            except (nats.errors.Error, nats.js.errors.Error) as exc:
                log.debug("dead-letter depth of %s: %s", subject, exc)
        self._cache[subject] = (now, depth)
        return depth


def _trigger_json(state: FunctionState, manifest: Manifest) -> dict[str, Any]:
    trigger = state.spec.trigger
    described: dict[str, Any] = {"kind": trigger.kind}
    if trigger.kind == "stream":
        subjects: list[str] | None = trigger.subjects
        if not subjects:
            # No filter: the consumer reads the whole stream, whose subjects fn.yaml may name.
            declared = manifest.streams.get(trigger.stream or "")
            subjects = list(declared.subjects) if declared is not None else None
        described.update(stream=trigger.stream, subjects=subjects, durable=trigger.durable_name)
    else:
        described.update(subject=trigger.request or trigger.subject, queue=trigger.queue_group)
    return described


async def functions_json(host: Host, dead_letters: _DeadLetterDepth) -> list[dict[str, Any]]:
    found = []
    for name, state in host.functions.items():
        spec = state.spec
        pending = None
        if spec.trigger.kind == "stream" and spec.trigger.stream and spec.trigger.durable_name:
            pending = int(
                host.metrics.value(
                    "fnhost_consumer_pending_messages",
                    stream=spec.trigger.stream,
                    consumer=spec.trigger.durable_name,
                )
            )
        found.append(
            {
                "name": name,
                "trigger": _trigger_json(state, host.manifest),
                "version": state.runtime.version if state.runtime else None,
                "status": state.status,
                "error": state.error,
                "inflight": state.trigger.inflight if state.trigger else 0,
                "counts": host.metrics.counts(name),
                "pending": pending,
                "dead_letter": spec.dead_letter,
                "dead_letter_depth": (
                    await dead_letters.depth(spec.dead_letter) if spec.dead_letter else None
                ),
            }
        )
    return found


def readiness_response(reasons: list[str]) -> JSONResponse:
    """``/readyz``: 200 when nothing is wrong, else 503 with the reasons."""
    if reasons:
        return JSONResponse({"status": "not ready", "reasons": reasons}, status_code=503)
    return JSONResponse({"status": "ready"})


def status_page_html() -> str:
    """The status page, which reads ``/functions`` and ``/readyz`` from the browser."""
    return resources.files("fnhost").joinpath("static/status.html").read_text()


def build_app(host: Host) -> Starlette:
    """The Starlette app of one host."""
    dead_letters = _DeadLetterDepth(host)
    page = status_page_html()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "alive"})

    async def readyz(request: Request) -> Response:
        return readiness_response(readiness(host))

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(host.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def functions(request: Request) -> Response:
        return JSONResponse(await functions_json(host, dead_letters))

    async def status_page(request: Request) -> Response:
        return HTMLResponse(page)

    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/functions", functions),
        Route("/", status_page),
    ]
    gateway = host.manifest.http.gateway if host.manifest.http else GatewayConfig()
    if gateway.enabled:
        routes.append(Route("/invoke/{function}", _gateway(host, gateway), methods=["POST"]))
    routes.extend(host.plugins.routes(host))
    return Starlette(routes=routes)


def _gateway(host: Host, gateway: GatewayConfig) -> Any:
    expected = f"Bearer {gateway.token}".encode()

    async def invoke(request: Request) -> Response:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return JSONResponse({"error": "missing or wrong bearer token"}, status_code=401)
        state = host.functions.get(request.path_params["function"])
        if state is None or state.spec.trigger.kind != "request" or not state.spec.trigger.request:
            return JSONResponse({"error": "no request function by that name"}, status_code=404)
        # An HTTP caller's W3C trace context continues into the function.
        carried = {
            name: value
            for name in (h.TRACEPARENT, h.TRACESTATE)
            if (value := request.headers.get(name)) is not None
        }
        try:
            reply = await host.nc.request(
                state.spec.trigger.request,
                await request.body(),
                timeout=30,
                headers=carried or None,
            )
        except nats.errors.NoRespondersError:
            return JSONResponse({"error": "no function answers"}, status_code=503)
        except nats.errors.TimeoutError:
            return JSONResponse({"error": "no reply within 30s"}, status_code=504)
        code = reply.headers.get(h.SERVICE_ERROR_CODE) if reply.headers else None
        if code is not None:
            error = reply.headers.get(h.SERVICE_ERROR, "") if reply.headers else ""
            return JSONResponse({"error": error}, status_code=int(code) if code.isdigit() else 500)
        return Response(reply.data, media_type="application/json")

    return invoke


class _InLoopServer(uvicorn.Server):
    """uvicorn in the host's event loop: the host, not uvicorn, owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class HttpServer:
    """Serves ``app`` (a host's :func:`build_app`, or the ``--workers`` supervisor's) until
    stopped."""

    def __init__(self, app: Starlette, config: HttpConfig) -> None:
        self._config = uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            loop="none",
            lifespan="off",
            access_log=False,
            log_level="warning",
        )
        self._server = _InLoopServer(self._config)
        self._task: asyncio.Task[None] | None = None
        self.url: str | None = None

    async def start(self, *, any_port_if_taken: bool = False) -> str:
        """Start serving; returns the URL (with the real port when ``port: 0``).

        The socket is bound here so that a taken port is a clear ``OSError``
        (uvicorn would exit the process from inside its task), or, with
        ``any_port_if_taken`` (``fnhost dev``: two projects side by side), a
        free port and a warning.
        """
        host, port = self._config.host, self._config.port
        try:
            sock = _bind(host, port)
        except OSError as exc:
            if not (any_port_if_taken and exc.errno == errno.EADDRINUSE):
                raise OSError(
                    f"cannot serve HTTP on {host}:{port}: {exc.strerror} "
                    "(set http.port, 0 for any free port, or http: false)"
                ) from None
            sock = _bind(host, 0)
            log.warning("HTTP port %d is taken; serving on %d instead", port, sock.getsockname()[1])
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.01)
        self.url = f"http://{self._config.host}:{sock.getsockname()[1]}"
        return self.url

    async def stop(self) -> None:
        if self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)
