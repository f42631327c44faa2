"""``fnhost deploy``, ``ls``, ``rm``, ``rollback`` and ``keygen``: the remote-deploy commands.

They find NATS like ``fnhost invoke`` does (``--nats``, ``NATS_URL``, the
manifest, the embedded server) and the bucket names in the manifest's
``registry:`` section (defaults otherwise). The formats are in
:mod:`fnhost_sdk.artifact` and :mod:`fnhost_sdk.deploy`; the host side is
:mod:`fnhost.registry`; the user guide is docs/deploy.md.
"""

from __future__ import annotations

import json
import os
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, TypeVar

import nats
import nats.errors
import nats.js.errors
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.table import Table

from fnhost.connection import ConnectError, connect_briefly
from fnhost.errors import LoadError
from fnhost.loader import inspect_handler
from fnhost.manifest import Manifest, parse_manifest
from fnhost.registry import describe_load_error, function_spec, settings_of
from fnhost_sdk.artifact import (
    DeployRefused,
    build_artifact,
    import_module_file,
    keygen,
    load_module,
    read_seed,
)
from fnhost_sdk.deploy import (
    SIGN_KEY_ENV,
    HostReport,
    Registry,
    bucket_keys,
    function_settings,
    host_documents,
    publish,
    wait_for_hosts,
)

T = TypeVar("T")

out = Console()
err = Console(stderr=True)

NatsOption = Annotated[
    str | None,
    typer.Option("--nats", help="NATS URL(s), comma separated; overrides nats.url and NATS_URL."),
]
ManifestOption = Annotated[
    Path, typer.Option("--manifest", "-m", help="The manifest (settings and registry names).")
]
WaitOption = Annotated[
    float, typer.Option("--wait", help="Seconds to wait for every live host to report.")
]
NoWaitOption = Annotated[bool, typer.Option("--no-wait", help="Do not wait for the hosts.")]


def _cli() -> Any:
    import fnhost.cli as cli  # fnhost.cli imports this module: import it late

    return cli


def _fail(message: str) -> typer.Exit:
    return _cli()._fail(message)  # type: ignore[no-any-return]


def _manifest(path: Path) -> Manifest | None:
    return _cli()._load(path) if path.is_file() else None


def _registry(manifest: Manifest | None) -> Registry:
    if manifest is None:
        return Registry()
    config = manifest.registry
    return Registry(config.bucket, config.store, config.status_bucket, config.history)


def _with_nats(url: str, manifest: Path, work: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``work(nc)`` on a short-lived connection; NATS trouble is one line and exit 1."""
    config = _cli().client_nats_config(manifest)

    async def main() -> T:
        nc = await connect_briefly(url, config)
        try:
            return await work(nc)
        finally:
            await nc.close()

    try:
        result: T = _cli()._run_async(main)
    except ConnectError as exc:
        raise _fail(str(exc)) from None
    except nats.js.errors.BucketNotFoundError:
        bucket = _registry(_manifest(manifest)).bucket
        raise _fail(
            f"nothing is deployed: the registry bucket {bucket!r} does not exist at {url}"
        ) from None
    except (OSError, nats.errors.Error, nats.js.errors.Error) as exc:
        raise _fail(f"cannot reach NATS at {url}: {exc}") from None
    return result


def _describe_import_error(path: Path, exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"{path}: syntax error at {exc.filename}:{exc.lineno}: {exc.msg}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "importlib" not in f.filename]
    at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{path}: importing it failed{at}: {type(exc).__name__}: {exc}"


def _settings(
    module: ModuleType, name: str | None, manifest: Manifest | None, flags: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """The function's name and settings: decorator, then the manifest's same-named
    function, then flags, each overriding the one before.

    The name is ``--name``, else the decorator's ``name=``, else the file's stem.
    """
    stem = module.__name__.rpartition(".")[2]
    decorated = {
        found[0] or stem: found[1]
        for value in vars(module).values()
        if callable(value)
        and getattr(value, "__module__", None) == module.__name__
        and (found := function_settings(value)) is not None
    }
    if name is None:
        name = next(iter(decorated)) if len(decorated) == 1 else stem
    settings: dict[str, Any] = dict(decorated.get(name, {}))
    if manifest is not None and name in manifest.functions:
        settings = settings_of(manifest.functions[name])
    settings.update({k: v for k, v in flags.items() if v is not None and k != "trigger"})
    if flags.get("trigger"):
        settings["trigger"] = flags["trigger"]
    return name, settings


def _trigger_flags(
    request: str | None, subject: str | None, stream: str | None, subjects: list[str] | None
) -> dict[str, Any] | None:
    given = [t for t in (request, subject, stream) if t]
    if len(given) > 1:
        raise _fail("give one of --request, --subject or --stream")
    if request:
        return {"request": request}
    if subject:
        return {"subject": subject}
    if stream:
        return {"stream": stream, **({"subjects": subjects} if subjects else {})}
    return None


def _seed(sign_key: Path | None) -> bytes:
    path = sign_key or os.environ.get(SIGN_KEY_ENV)
    if not path:
        raise _fail(f"no signing key: pass --sign-key FILE or set {SIGN_KEY_ENV} (fnhost keygen)")
    try:
        return read_seed(path)
    except DeployRefused as exc:
        raise _fail(str(exc)) from None


def _print_reports(reports: list[HostReport], silent: list[str]) -> None:
    table = Table("host", "revision", "state", "reason")
    for report in reports:
        colour = "green" if report.state in ("running", "stopped") else "red"
        revision = "" if report.revision is None else str(report.revision)
        reason = report.reason or ""
        if report.state == "refused" and report.running:
            reason += f" (revision {report.running} keeps serving)"
        table.add_row(report.host, revision, f"[{colour}]{report.state}[/{colour}]", reason)
    for host in silent:
        table.add_row(host, "", "[yellow]no report[/yellow]", "")
    out.print(table)


def _finish(reports: list[HostReport], silent: list[str], wanted: tuple[str, ...]) -> None:
    if not reports and not silent:
        out.print("[yellow]no live host watches the registry[/yellow]: hosts pick it up on start")
        return
    _print_reports(reports, silent)
    bad = [r for r in reports if r.state not in wanted]
    if bad:
        raise _fail(f"{len(bad)} of {len(reports) + len(silent)} hosts refused")
    if silent:
        raise _fail(f"{len(silent)} live hosts did not report in time")


def deploy(
    path: Annotated[Path, typer.Argument(help="The function module (a .py file).")],
    name: Annotated[str | None, typer.Option("--name", help="The function's name.")] = None,
    manifest: ManifestOption = Path("fn.yaml"),
    sign_key: Annotated[
        Path | None, typer.Option("--sign-key", help=f"Seed file; else ${SIGN_KEY_ENV}.")
    ] = None,
    nats_url: NatsOption = None,
    handler: Annotated[str | None, typer.Option("--handler")] = None,
    request: Annotated[str | None, typer.Option("--request", help="Request trigger.")] = None,
    subject: Annotated[str | None, typer.Option("--subject", help="Subject trigger.")] = None,
    stream: Annotated[str | None, typer.Option("--stream", help="Stream trigger.")] = None,
    stream_subject: Annotated[
        list[str] | None, typer.Option("--stream-subject", help="Filter (repeatable).")
    ] = None,
    concurrency: Annotated[int | None, typer.Option("--concurrency")] = None,
    timeout: Annotated[str | None, typer.Option("--timeout", help="e.g. 30s")] = None,
    wait: WaitOption = 30.0,
    no_wait: NoWaitOption = False,
) -> None:
    """Sign and ship a function to every host watching the registry; print its new version."""
    seed = _seed(sign_key)
    loaded = _manifest(manifest)
    if not path.is_file():
        raise _fail(f"{path} does not exist")
    root = loaded.root if loaded and path.resolve().is_relative_to(loaded.root) else path.parent
    local = loaded or parse_manifest("version: 1\n", file="fn.yaml", root=root.resolve())
    try:
        module = import_module_file(path, root)
    except Exception as exc:
        raise _fail(_describe_import_error(path, exc)) from None
    flags = {
        "trigger": _trigger_flags(request, subject, stream, stream_subject),
        "handler": handler,
        "concurrency": concurrency,
        "timeout": timeout,
    }
    fname, settings = _settings(module, name, loaded, flags)
    if "trigger" not in settings:
        raise _fail(
            f"no trigger for {fname!r}: declare it in {manifest}, with @function(...) "
            "in the module, or with --request/--subject/--stream"
        )
    try:
        spec = function_spec(fname, settings, None)
        inspect_handler(spec, local, module)
        artifact, _ = build_artifact(module, root=root)
        inspect_handler(spec, local, load_module(artifact.data))  # the round trip hosts make
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise _fail(f"function {fname!r}: {problems}") from None
    except (LoadError, DeployRefused) as exc:
        raise _fail(describe_load_error(str(exc), str(path))) from None
    except Exception as exc:  # cloudpickle meets something it cannot pickle
        raise _fail(f"cannot pickle {path}: {type(exc).__name__}: {exc}") from None
    registry = _registry(loaded)
    if loaded and artifact.size > loaded.registry.max_artifact_size:
        limit = loaded.registry.max_artifact_size
        raise _fail(f"the artifact is {artifact.size} bytes, over max_artifact_size {limit}")
    url = _cli().client_url(nats_url, manifest)

    async def ship(nc: Any) -> tuple[int, list[HostReport], list[str]]:
        columns = (TextColumn("upload"), BarColumn(), DownloadColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task("upload", total=artifact.size)
            revision = await publish(
                nc,
                name=fname,
                artifact=artifact,
                settings=settings,
                seed=seed,
                registry=registry,
                progress=lambda done, total: bar.update(task, completed=done),
            )
        out.print(
            f"deployed [bold]{fname}[/bold] version [bold]{revision}[/bold] "
            f"({artifact.size} bytes, sha256 {artifact.sha256[:12]})"
        )
        if no_wait:
            return revision, [], []
        reports, silent = await wait_for_hosts(nc, fname, revision, registry=registry, timeout=wait)
        return revision, reports, silent

    _, reports, silent = _with_nats(url, manifest, ship)
    if not no_wait:
        _finish(reports, silent, ("running",))


def list_functions(manifest: ManifestOption = Path("fn.yaml"), nats_url: NatsOption = None) -> None:
    """Deployed functions: version, deployed at/by, what each live host runs, refusals."""
    registry = _registry(_manifest(manifest))
    url = _cli().client_url(nats_url, manifest)

    async def read(nc: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        specs: dict[str, Any] = {}
        try:
            kv = await nc.jetstream().key_value(registry.bucket)
            for key in await bucket_keys(nc.jetstream(), registry.bucket):
                try:
                    entry = await kv.get(key)
                except nats.js.errors.KeyNotFoundError:
                    continue  # removed
                specs[key] = (entry.revision, json.loads(entry.value or b"{}"))
        except nats.js.errors.BucketNotFoundError:
            pass
        return specs, await host_documents(nc, registry)

    specs, hosts = _with_nats(url, manifest, read)
    table = Table("function", "version", "deployed at", "by", "hosts")
    for fname in sorted(specs):
        revision, envelope = specs[fname]
        fields = envelope.get("spec", {})
        note = f" (rollback of {envelope['rollback_of']})" if envelope.get("rollback_of") else ""
        lines = []
        for host, doc in sorted(hosts.items()):
            entry = doc.get("functions", {}).get(fname)
            if entry is None:
                lines.append(f"{host}: [yellow]no report[/yellow]")
                continue
            state = entry["state"]
            text = f"{host}: r{entry.get('running')} {state}" if entry.get("running") else host
            if state != "running":
                text += f" [red]{state} r{entry['revision']}: {entry.get('reason')}[/red]"
            lines.append(text)
        by = str(fields.get("deployed_by", "?"))
        table.add_row(
            fname,
            f"{revision}{note}",
            str(fields.get("deployed_at", "?")),
            by[:8] + "..." if len(by) > 8 else by,
            "\n".join(lines) or "[yellow]no live host[/yellow]",
        )
    out.print(table)
    out.print(f"{len(specs)} deployed functions, {len(hosts)} live hosts")


def remove(
    name: Annotated[str, typer.Argument(help="The function to stop everywhere.")],
    manifest: ManifestOption = Path("fn.yaml"),
    nats_url: NatsOption = None,
    wait: WaitOption = 30.0,
    no_wait: NoWaitOption = False,
) -> None:
    """Remove a deployed function: every host drains and stops it."""
    registry = _registry(_manifest(manifest))
    url = _cli().client_url(nats_url, manifest)

    async def work(nc: Any) -> tuple[list[HostReport], list[str]]:
        kv = await nc.jetstream().key_value(registry.bucket)
        try:
            await kv.get(name)
        except nats.js.errors.KeyNotFoundError:
            raise _fail(f"{name!r} is not deployed") from None
        await kv.delete(name)
        # nats-py returns no revision for a delete: read the marker's from the history.
        revision = (await kv.history(name))[-1].revision or 0
        out.print(f"removed [bold]{name}[/bold] (revision {revision})")
        if no_wait:
            return [], []
        return await wait_for_hosts(nc, name, revision, registry=registry, timeout=wait)

    reports, silent = _with_nats(url, manifest, work)
    if not no_wait:
        _finish(reports, silent, ("stopped",))


def rollback(
    name: Annotated[str, typer.Argument(help="The function.")],
    to: Annotated[int | None, typer.Option("--to", help="The version to go back to.")] = None,
    manifest: ManifestOption = Path("fn.yaml"),
    nats_url: NatsOption = None,
    wait: WaitOption = 30.0,
    no_wait: NoWaitOption = False,
) -> None:
    """Re-deploy an earlier version from the registry history (default: the previous accepted)."""
    registry = _registry(_manifest(manifest))
    url = _cli().client_url(nats_url, manifest)

    async def work(nc: Any) -> tuple[list[HostReport], list[str]]:
        js = nc.jetstream()
        kv = await js.key_value(registry.bucket)
        try:
            history = await kv.history(name)
        except nats.js.errors.NoKeysError:
            raise _fail(f"{name!r} has no history in {registry.bucket}") from None
        puts = {e.revision: e for e in history if e.operation is None and e.value}
        current = history[-1].revision or 0
        target = (
            to if to is not None else await _previous_accepted(js, registry, name, puts, current)
        )
        if target not in puts:
            kept = ", ".join(str(r) for r in sorted(puts)) or "none"
            raise _fail(f"version {target} of {name!r} is not in the history (kept: {kept})")
        envelope = json.loads(puts[target].value)
        envelope["rollback_of"] = target
        revision = await kv.put(name, json.dumps(envelope).encode())
        out.print(f"{name} version [bold]{revision}[/bold] (rollback of {target})")
        if no_wait:
            return [], []
        return await wait_for_hosts(nc, name, revision, registry=registry, timeout=wait)

    reports, silent = _with_nats(url, manifest, work)
    if not no_wait:
        _finish(reports, silent, ("running",))


async def _previous_accepted(
    js: Any, registry: Registry, name: str, puts: dict[int, Any], current: int
) -> int:
    accepted: set[int] = set()
    for key in await bucket_keys(js, registry.status_bucket, f"accepted.{name}."):
        tail = key.rpartition(".")[2]
        if tail.isdigit():
            accepted.add(int(tail))
    current_spec = json.loads(puts[current].value).get("spec") if current in puts else None
    for revision in sorted(puts, reverse=True):
        if revision >= current or revision not in accepted:
            continue
        if json.loads(puts[revision].value).get("spec") != current_spec:
            return revision
    raise _fail(
        f"no earlier accepted version of {name!r} in the history (now at {current}); "
        "pick one with --to"
    )


def keygen_command(
    file: Annotated[Path | None, typer.Argument(help="Write the seed here (mode 0600).")] = None,
) -> None:
    """Make a signing key: a user nkey seed, and its public key for trusted_keys."""
    seed, public = keygen()
    if file is None:
        out.print(seed.decode(), highlight=False)
    else:
        try:
            fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise _fail(f"{file} exists; not overwriting a key") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(seed + b"\n")
        err.print(f"wrote the seed to {file} (keep it secret; deploy with --sign-key {file})")
    out.print(public, highlight=False)
    err.print("add the public key to registry.trusted_keys in fn.yaml")


def register(app: typer.Typer) -> None:
    """Add the commands to the ``fnhost`` app."""
    app.command("deploy")(deploy)
    app.command("ls")(list_functions)
    app.command("rm")(remove)
    app.command("rollback")(rollback)
    app.command("keygen")(keygen_command)
