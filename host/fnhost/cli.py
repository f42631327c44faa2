"""The ``fnhost`` command.

Client commands (``invoke``, ``publish``, ...) find NATS by ``--nats``, then
``NATS_URL``, then the manifest; a manifest on ``embedded`` means the server a
running ``fnhost dev`` wrote to ``.fnhost/nats.url``. User errors print one
clear line each and exit 1; never a Python traceback. Usage errors exit 2
(:class:`~fnhost.cli_dlq.UsageError` for arguments that do not go together).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import typer
from rich.console import Console
from rich.table import Table

from fnhost.cli_deploy import register as register_deploy_commands
from fnhost.cli_dlq import UsageError, dlq_app
from fnhost.connection import ConnectError, connect_briefly
from fnhost.errors import ConfigError, FnhostError, LoadError, ManifestError
from fnhost.manifest import HttpConfig, Manifest, NatsConfig, load_manifest
from fnhost_sdk import headers as h
from fnhost_sdk.session import PublishError, Session

T = TypeVar("T")

app = typer.Typer(
    name="fnhost",
    help="A serverless-style function host over NATS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)
app.add_typer(dlq_app, name="dlq")

ManifestArg = Annotated[Path, typer.Argument(help="The manifest.", show_default=True)]
NatsOption = Annotated[
    str | None,
    typer.Option("--nats", help="NATS URL(s), comma separated; overrides nats.url and NATS_URL."),
]
EVENT_LOOPS = ("auto", "uvloop", "asyncio")


def _known_loop(name: str) -> str:
    if name not in EVENT_LOOPS:
        raise typer.BadParameter(f"{name!r} is not one of {', '.join(EVENT_LOOPS)}")
    return name


LoopOption = Annotated[
    str,
    typer.Option(
        "--loop",
        help="Event loop: auto (uvloop when installed), uvloop, asyncio.",
        callback=_known_loop,
    ),
]
GraceOption = Annotated[
    float, typer.Option("--grace", help="Seconds in-flight work gets to finish on SIGTERM/SIGINT.")
]
LogLevelOption = Annotated[
    str | None, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ...")
]
ReloadOption = Annotated[
    bool,
    typer.Option(
        "--reload/--no-reload", help="Reload functions when their code or fn.yaml changes."
    ),
]


def main() -> None:
    """Console-script entry point."""
    app()


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(1)


def _load(path: Path) -> Manifest:
    try:
        return load_manifest(path)
    except ManifestError as exc:
        for issue in exc.issues:
            err.print(f"[red]error:[/red] {issue}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def client_nats_config(manifest_path: Path) -> NatsConfig | None:
    """The credentials and TLS a client command connects with: the manifest's, if any."""
    return _load(manifest_path).nats if manifest_path.is_file() else None


YOUNG_GC_THRESHOLD = 10_000
"""Allocations between collections of the cyclic GC's youngest generation in a host
process (Python's default is 700). An invocation that awaits the network holds its
futures, frames and messages across many collections at 700, each of which scans
them again and promotes them: with the kv idempotency store that was 1,536 young
collections per 100,000 messages and 3.6 µs of the host's CPU per message
(bench/README.md). The garbage this leaves for later is small and bounded."""


def _run_async(main_coro: Callable[[], Awaitable[T]], loop: str = "auto") -> T:
    factory = _loop_factory(loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main_coro())  # type: ignore[arg-type]


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if loop == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if loop == "uvloop":
            raise _fail("--loop uvloop: uvloop is not installed") from None
        return None
    return uvloop.new_event_loop


def _host_command(
    manifest_path: Path,
    *,
    nats: str | None,
    grace: float,
    loop: str,
    log_format: str,
    log_level: str | None,
    force_embedded: bool,
    reload: bool,
) -> None:
    from fnhost import workers
    from fnhost.host import Host

    manifest = _load(manifest_path)
    # Set by a --workers supervisor for the host processes it starts.
    worker_status = os.environ.get(workers.STATUS_ENV)
    worker = int(os.environ.get(workers.INDEX_ENV, "0")) if worker_status else None
    _setup_logging(manifest, log_format, log_level, worker=worker)
    nats_url = nats or ("embedded" if force_embedded else None)
    if worker_status:
        # The supervisor serves the manifest's address; it reads this worker on a private one.
        gateway = (manifest.http or HttpConfig()).gateway
        private = HttpConfig(host="127.0.0.1", port=0, gateway=gateway)
        manifest = manifest.model_copy(update={"http": private})

    async def serve() -> int:
        plugins: list[object] = []
        if reload:
            from fnhost.reload import HotReload  # watchfiles only when asked for

            plugins.append(HotReload())
        host = Host(
            manifest,
            nats_url=nats_url,
            drain_grace=grace,
            plugins=plugins,
            any_http_port_if_taken=force_embedded,  # dev: a second project is not an error
        )
        if not worker_status:
            return await host.serve()
        supervisor_pid = int(os.environ[workers.SUPERVISOR_ENV])
        beside = asyncio.ensure_future(
            workers.serve_as_worker(host, Path(worker_status), supervisor_pid)
        )
        try:
            return await host.serve()
        finally:
            beside.cancel()

    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    try:
        code = _run_async(serve, loop)
    except (ConfigError, FnhostError, OSError) as exc:
        raise _fail(str(exc)) from None
    _exit_past_stuck_threads(code)
    raise typer.Exit(code)


def _setup_logging(
    manifest: Manifest, command_format: str, log_level: str | None, *, worker: int | None = None
) -> None:
    """The manifest's ``logging:``, its ``auto`` format being the command's own."""
    from fnhost.logs import setup_logging

    fmt = manifest.logging.format if manifest.logging.format != "auto" else command_format
    level = log_level or manifest.logging.level
    setup_logging("json" if fmt == "json" else "text", level, worker=worker)


def _exit_past_stuck_threads(code: int) -> None:
    """Exit at once if a plain ``def`` handler still runs after the drain's grace.

    Its worker thread cannot be interrupted and Python waits for it at exit,
    which would ignore ``--grace``. Its message was not acked, so JetStream
    redelivers it.
    """
    import logging
    import threading
    import time

    deadline = time.monotonic() + 1.0  # idle workers exit as soon as they see the shutdown
    stuck = []
    for thread in threading.enumerate():
        if thread.name.startswith("fnhost-"):
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
    if not stuck:
        return
    logging.getLogger("fnhost.host").warning(
        "exiting with %d handler thread(s) still running past the grace period "
        "(their messages are not acked): %s",
        len(stuck),
        ", ".join(stuck),
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _supervise(
    manifest_path: Path,
    *,
    count: int,
    worker_timeout: float,
    nats: str | None,
    grace: float,
    loop: str,
    log_level: str | None,
) -> None:
    from fnhost import workers

    manifest = _load(manifest_path)
    _setup_logging(manifest, "json", log_level)
    worker_argv = [sys.executable, "-m", "fnhost", "run", str(manifest_path.resolve())]
    worker_argv += ["--grace", str(grace), "--loop", loop]
    if log_level:
        worker_argv += ["--log-level", log_level]
    supervisor = workers.Supervisor(
        manifest,
        count=count,
        worker_argv=worker_argv,
        nats_url=nats,
        grace=grace,
        worker_timeout=worker_timeout,
    )
    try:
        code = _run_async(supervisor.serve, loop)
    except (ConfigError, FnhostError, OSError) as exc:
        raise _fail(str(exc)) from None
    raise typer.Exit(code)


@app.command()
def run(
    manifest: ManifestArg = Path("fn.yaml"),
    nats_url: NatsOption = None,
    grace: GraceOption = 30.0,
    loop: LoopOption = "auto",
    log_level: LogLevelOption = None,
    reload: ReloadOption = False,
    worker_count: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            help="Host processes to run, under one supervisor that serves their HTTP "
            "and replaces any that dies or hangs (one per core is a good start).",
        ),
    ] = 1,
    worker_timeout: Annotated[
        float,
        typer.Option(
            "--worker-timeout",
            min=1.0,
            help="With --workers: seconds a worker may leave its health check unanswered "
            "before it is killed and replaced.",
        ),
    ] = 60.0,
) -> None:
    """Run the manifest's functions (production: JSON logs)."""
    if worker_count > 1:
        if reload:
            raise UsageError("--reload swaps code inside one host process; run without --workers")
        _supervise(
            manifest,
            count=worker_count,
            worker_timeout=worker_timeout,
            nats=nats_url,
            grace=grace,
            loop=loop,
            log_level=log_level,
        )
        return
    _host_command(
        manifest,
        nats=nats_url,
        grace=grace,
        loop=loop,
        log_format="json",
        log_level=log_level,
        force_embedded=False,
        reload=reload,
    )


@app.command()
def dev(
    manifest: ManifestArg = Path("fn.yaml"),
    nats_url: NatsOption = None,
    grace: GraceOption = 5.0,
    loop: LoopOption = "auto",
    log_level: LogLevelOption = None,
    reload: ReloadOption = True,
) -> None:
    """Run locally: an embedded nats-server (unless --nats) and readable logs."""
    _host_command(
        manifest,
        nats=nats_url,
        grace=grace,
        loop=loop,
        log_format="text",
        log_level=log_level,
        force_embedded=True,
        reload=reload,
    )


@app.command()
def validate(manifest: ManifestArg = Path("fn.yaml")) -> None:
    """Check the manifest and import every function; exit 0 when all is well, 1 otherwise."""
    from fnhost.loader import load_function

    loaded = _load(manifest)
    failures: list[str] = []
    table = Table("function", "trigger", "module", "handler", title=str(manifest))
    for spec in loaded.functions.values():
        try:
            load_function(spec, loaded)
        except LoadError as exc:
            failures.append(str(exc))
            continue
        table.add_row(spec.name, _describe_trigger(spec), spec.module, spec.handler)
    for issue in loaded.warnings:
        err.print(f"[yellow]warning:[/yellow] {issue}", highlight=False, soft_wrap=True)
    for failure in failures:
        err.print(f"[red]error:[/red] {failure}", highlight=False, soft_wrap=True)
    if failures:
        raise typer.Exit(1)
    out.print(table)
    out.print(f"[green]ok[/green]: {len(loaded.functions)} functions")


def _describe_trigger(spec: Any) -> str:
    trigger = spec.trigger
    if trigger.kind == "stream":
        return f"stream {trigger.stream}/{trigger.durable_name}"
    return f"{trigger.kind} {trigger.request or trigger.subject}"


def client_url(nats: str | None, manifest_path: Path) -> str:
    """Where client commands find NATS: --nats, NATS_URL, the manifest, the embedded server."""
    from fnhost.embedded import discover_url

    if nats:
        return nats
    if os.environ.get("NATS_URL"):
        return os.environ["NATS_URL"]
    if manifest_path.is_file():
        manifest = _load(manifest_path)
        if not manifest.nats.is_embedded:
            return manifest.nats.url
        found = discover_url(manifest.root)
        if found:
            return found
        raise _fail(
            f"no embedded nats-server is running for {manifest_path} "
            "(start one with `fnhost dev`, or pass --nats)"
        )
    found = discover_url(Path.cwd())
    if found:
        return found
    return "nats://127.0.0.1:4222"


def _read_data(data: str | None) -> bytes:
    if data is None:
        return b""
    if data == "-":
        return sys.stdin.buffer.read()
    return data.encode()


@app.command()
def invoke(
    target: Annotated[str, typer.Argument(help="A function name from the manifest, or a subject.")],
    data: Annotated[str | None, typer.Argument(help="The request body; '-' reads stdin.")] = None,
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="The manifest.")] = Path(
        "fn.yaml"
    ),
    nats_url: NatsOption = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the reply.")] = 10.0,
) -> None:
    """Call a request/reply function and print its reply; exit 1 on an error reply."""
    subject = target
    if manifest.is_file():
        spec = _load(manifest).functions.get(target)
        if spec is not None:
            if spec.trigger.kind != "request":
                raise _fail(
                    f"function {target!r} has a {spec.trigger.kind} trigger; "
                    "only request functions answer (use `fnhost publish`)"
                )
            subject = spec.trigger.request or target
    url = client_url(nats_url, manifest)
    nats_config = client_nats_config(manifest)
    body = _read_data(data)

    async def call() -> Any:
        nc = await connect_briefly(url, nats_config)
        try:
            return await nc.request(subject, body, timeout=timeout)
        finally:
            await nc.close()

    try:
        reply = _run_async(call)
    except ConnectError as exc:
        raise _fail(str(exc)) from None
    except nats.errors.NoRespondersError:
        raise _fail(f"no function answers on {subject!r} (is the host running?)") from None
    except nats.errors.TimeoutError:
        raise _fail(f"no reply on {subject!r} within {timeout:g}s") from None
    except (OSError, nats.errors.Error) as exc:
        raise _fail(f"cannot reach NATS at {url}: {exc}") from None
    if reply.headers and h.SERVICE_ERROR_CODE in reply.headers:
        raise _fail(
            f"{reply.headers[h.SERVICE_ERROR_CODE]} {reply.headers.get(h.SERVICE_ERROR, '')}"
        )
    sys.stdout.write(reply.data.decode(errors="replace") + "\n")


@app.command()
def publish(
    subject: Annotated[str, typer.Argument(help="The subject.")],
    data: Annotated[str | None, typer.Argument(help="The message body; '-' reads stdin.")] = None,
    message_id: Annotated[
        str | None, typer.Option("--id", help="Nats-Msg-Id (stream dedup).")
    ] = None,
    manifest: Annotated[Path, typer.Option("--manifest", "-m", help="The manifest.")] = Path(
        "fn.yaml"
    ),
    nats_url: NatsOption = None,
) -> None:
    """Publish a message; to a stream subject, wait until it is stored and print where."""
    url = client_url(nats_url, manifest)
    nats_config = client_nats_config(manifest)
    stream = _load(manifest).stream_for_subject(subject) if manifest.is_file() else None
    body = _read_data(data)

    async def send() -> Any:
        nc = await connect_briefly(url, nats_config)
        try:
            session = Session(nc)
            if stream is None:
                stream_name = await _stream_on_server(nc, subject)
                if stream_name is None:
                    await session.publish(subject, body, message_id=message_id, jetstream=False)
                    return None
            return await session.publish(subject, body, message_id=message_id, jetstream=True)
        finally:
            await nc.close()

    try:
        ack = _run_async(send)
    except ConnectError as exc:
        raise _fail(str(exc)) from None
    except PublishError as exc:
        raise _fail(str(exc)) from None
    except (OSError, nats.errors.Error) as exc:
        raise _fail(f"cannot reach NATS at {url}: {exc}") from None
    if ack is None:
        out.print(f"published to {subject} (core NATS, no stream captures it)")
    else:
        note = " [yellow](duplicate: already stored)[/yellow]" if ack.duplicate else ""
        out.print(f"stored in stream {ack.stream} at sequence {ack.seq}{note}")


async def _stream_on_server(nc: Any, subject: str) -> str | None:
    try:
        name: str = await nc.jetstream().find_stream_name_by_subject(subject)
    except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError):
        return None
    return name


register_deploy_commands(app)  # deploy, ls, rm, rollback, keygen
