"""Hot reload: watch the function modules, the project-local modules they import and
fn.yaml, and swap in what a change touches, between messages.

Three layers, each usable without the next:

- pure: :func:`scan_dependencies` reads the import statements of the function
  modules (no import, no execution), :func:`plan` maps a set of changed files to
  the actions, :func:`diff_manifests` compares two manifests;
- apply: :class:`Reloader` and :func:`apply_manifest` act on a running
  :class:`~fnhost.host.Host` through ``reload_function``, ``add_function`` and
  ``remove_function`` (remote deploy reuses them), and never raise: a failure
  is logged and kept on ``FunctionState.error`` while the old version serves;
- watch: :class:`HotReload`, the host plugin behind ``fnhost dev`` and
  ``fnhost run --reload``, feeds watchfiles' change sets to a ``Reloader``.

The user-facing description is docs/reload.md.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import importlib.util
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from watchfiles import Change, awatch

from fnhost import provision
from fnhost.errors import FnhostError, ManifestError
from fnhost.manifest import FunctionSpec, Manifest, load_manifest
from fnhost.plugins import hookimpl

if TYPE_CHECKING:
    from fnhost.host import Host

log = logging.getLogger("fnhost.reload")

DEBOUNCE_MS = 300
"""Longest wait, from the first change of a batch, before the batch is handled (watchfiles'
default, 1.6 s, would be most of the reload latency)."""
STEP_MS = 50
"""A batch ends once the watched files stay quiet this long: one editor save is one batch."""
TICK_MS = 200
"""How often the watcher reports in when nothing changes: its first report tells the host
start-up that it is live, later ones apply changes held back while the host was starting."""

RESTART_SECTIONS = ("nats", "http", "logging", "tracing", "plugins", "registry")
"""Manifest sections read once at start: a change to them is only applied by a restart."""


# -- pure: dependencies, plans, manifest diffs


@dataclass(frozen=True, slots=True)
class Dependencies:
    """Which files each function's code comes from.

    ``functions`` maps a function to its module file and every project-local
    file it imports, directly or through other local modules; ``modules`` maps
    each local module file to the same closure of its own. Files that do not
    exist (yet) are included: creating ``functions/helpers.py`` that a broken
    module imports is what fixes it.
    """

    functions: Mapping[str, frozenset[Path]] = field(default_factory=dict)
    modules: Mapping[Path, frozenset[Path]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What one batch of changed files asks for."""

    functions: frozenset[str] = frozenset()
    """Functions to load afresh and swap in."""
    modules: frozenset[Path] = frozenset()
    """Local modules to drop from ``sys.modules`` first, so the reloads execute them anew."""
    manifest: bool = False
    """Whether to re-read fn.yaml."""

    @property
    def empty(self) -> bool:
        return not (self.functions or self.modules or self.manifest)


def plan(changed: Iterable[Path], deps: Dependencies, manifest: Path) -> ReloadPlan:
    """Map changed files (absolute, resolved) to the functions and modules to reload.

    A module is re-executed when it or anything it imports changed, so a
    function importing ``contracts`` through ``helpers`` sees both new.
    """
    files = frozenset(changed)
    return ReloadPlan(
        functions=frozenset(name for name, used in deps.functions.items() if used & files),
        modules=frozenset(module for module, used in deps.modules.items() if used & files),
        manifest=manifest in files,
    )


def scan_dependencies(manifest: Manifest) -> Dependencies:
    """Find every function's local dependencies by reading import statements.

    Static on purpose: it works for a version that failed to load, sees imports
    inside functions, and runs nothing. Imports built at run time
    (``importlib.import_module(name)``) are not seen.
    """
    root = manifest.root.resolve()
    direct: dict[Path, frozenset[Path]] = {}

    def closure(start: Iterable[Path]) -> frozenset[Path]:
        seen = set(start)
        todo = list(seen)
        while todo:
            path = todo.pop()
            if path not in direct:
                direct[path] = _imports_of(path, root)
            new = direct[path] - seen
            seen |= new
            todo.extend(new)
        return frozenset(seen)

    functions = {
        name: closure(_module_files(spec, root)) for name, spec in manifest.functions.items()
    }
    modules = {path: closure([path]) for path in list(direct) if path.is_file()}
    return Dependencies(functions, modules)


def _module_files(spec: FunctionSpec, root: Path) -> Iterable[Path]:
    path = spec.module_path
    return [path.resolve()] if path is not None else _files_of(spec.module, root)


def _imports_of(path: Path, root: Path) -> frozenset[Path]:
    """The local files the import statements of ``path`` may execute."""
    try:
        tree = ast.parse(path.read_bytes(), str(path))
    except (OSError, SyntaxError, ValueError):
        # Missing or broken: no imports until it parses again (the reload reports why).
        return frozenset()
    try:
        package: tuple[str, ...] | None = path.parent.relative_to(root).parts
    except ValueError:
        package = None
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base: list[str] = []
            if node.level:
                if package is None or node.level - 1 > len(package):
                    continue
                base = list(package[: len(package) - node.level + 1])
            base += node.module.split(".") if node.module else []
            if base:
                names.add(".".join(base))
                # `from pkg import name`: name may be a submodule.
                names.update(".".join([*base, a.name]) for a in node.names if a.name != "*")
    return frozenset(file for name in names for file in _files_of(name, root))


def _files_of(dotted: str, root: Path) -> Iterator[Path]:
    """Where importing ``dotted`` from ``root`` could execute code: each package's
    ``__init__.py`` on the way and the module itself."""
    parts = dotted.split(".")
    for end in range(1, len(parts) + 1):
        yield root.joinpath(*parts[:end], "__init__.py")
    yield root.joinpath(*parts[:-1], parts[-1] + ".py")


@dataclass(frozen=True, slots=True)
class ManifestDiff:
    """What differs between a running manifest and a new one."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    """Functions whose spec (trigger, settings, module, merged defaults) changed."""
    streams: tuple[str, ...] = ()
    kv: tuple[str, ...] = ()
    object_stores: tuple[str, ...] = ()
    """Streams, buckets and stores that are new or changed: provisioned again."""
    restart: tuple[str, ...] = ()
    """Changed sections that only a restart applies (:data:`RESTART_SECTIONS`)."""

    @property
    def functions(self) -> tuple[str, ...]:
        """Every function the diff stops, starts or restarts."""
        return self.added + self.removed + self.changed


def diff_manifests(old: Manifest, new: Manifest) -> ManifestDiff:
    """Compare two manifests section by section; unchanged functions are not listed."""
    return ManifestDiff(
        added=tuple(sorted(new.functions.keys() - old.functions.keys())),
        removed=tuple(sorted(old.functions.keys() - new.functions.keys())),
        changed=tuple(
            name
            for name in sorted(old.functions.keys() & new.functions.keys())
            if not _same_function(old.functions[name], new.functions[name])
        ),
        streams=_new_or_changed(old.streams, new.streams),
        kv=_new_or_changed(old.kv, new.kv),
        object_stores=_new_or_changed(old.object_stores, new.object_stores),
        restart=tuple(s for s in RESTART_SECTIONS if getattr(old, s) != getattr(new, s)),
    )


def _same_function(old: FunctionSpec, new: FunctionSpec) -> bool:
    # `queue: null` (every host) and no queue (the function's name) compare equal as fields.
    return old == new and old.trigger.queue_group == new.trigger.queue_group


def _new_or_changed(old: Mapping[str, object], new: Mapping[str, object]) -> tuple[str, ...]:
    return tuple(sorted(name for name, spec in new.items() if old.get(name) != spec))


# -- apply: act on a running host


async def apply_manifest(host: Host, new: Manifest) -> ManifestDiff:
    """Make a running host match ``new``: provision what changed, then stop removed,
    restart changed and start added functions. Unchanged functions are not touched."""
    old = host.manifest
    diff = diff_manifests(old, new)
    for section in diff.restart:
        log.warning("fn.yaml: %s changed; restart the host to apply it", section)
    # Loads read module paths and fn.yaml lines from host.manifest: switch it first.
    host.manifest = new
    js = host.js
    steps: list[tuple[str, Callable[[], Awaitable[object]]]] = []
    for name in diff.streams:
        stream = provision.stream_config(name, new.streams[name])
        steps.append((f"stream {name}", partial(provision.ensure_stream, js, stream)))
    for name in diff.kv:
        kv = provision.kv_config(name, new.kv[name])
        steps.append((f"kv bucket {name}", partial(provision.ensure_kv, js, kv)))
    for name in diff.object_stores:
        store = provision.object_store_config(name, new.object_stores[name])
        steps.append((f"object store {name}", partial(provision.ensure_object_store, js, store)))
    steps.extend((f"stopping function {n}", partial(host.remove_function, n)) for n in diff.removed)
    for what, step in steps:
        try:
            await step()
        except FnhostError as exc:  # e.g. a stream setting the server cannot change
            log.error("fn.yaml: %s failed: %s", what, exc)
        except Exception:
            # One failed step must not stop the others, nor the host.
            log.exception("fn.yaml: %s failed", what)
    for name in diff.changed + diff.added:
        await restart_function(host, new.functions[name])
    done = [
        f"{what} {', '.join(names)}"
        for what, names in (
            ("started", diff.added),
            ("stopped", diff.removed),
            ("reloaded", diff.changed),
            ("provisioned", diff.streams + diff.kv + diff.object_stores),
        )
        if names
    ]
    log.info("fn.yaml applied: %s", "; ".join(done) or "no function changed")
    return diff


async def restart_function(host: Host, spec: FunctionSpec) -> bool:
    """Load ``spec`` afresh and swap it in, or start it if it is not running.

    Never raises: a function that does not load keeps its running version and
    its ``state.error`` says why (the host does that for load errors; this adds
    the failures around it, such as provisioning its consumer).
    """
    try:
        if spec.name in host.functions:
            return await host.reload_function(spec.name, spec)
        return await host.add_function(spec)
    except Exception as exc:
        state = host.functions.get(spec.name)
        if state is not None:
            state.error = f"function {spec.name!r} did not reload: {exc}"
        log.exception("function %s did not reload; the running version, if any, stays", spec.name)
        return False


class Reloader:
    """Applies batches of changed files to a running host; no file watching of its own."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.root = host.manifest.root.resolve()
        self.manifest_path = host.manifest.path.resolve()
        self.deps = scan_dependencies(host.manifest)
        self.manifest_error: str | None = None
        """Why the last fn.yaml on disk was not applied, until one is."""

    def module_files(self) -> frozenset[Path]:
        """The existing module files a change to which reloads a function."""
        return frozenset(self.deps.modules)

    async def apply(self, changed: Collection[Path]) -> ReloadPlan:
        """Reload what ``changed`` (absolute paths) touches; returns what was planned.

        Order matters: stale bytecode and modules go first, so that every
        reload in the batch executes the new source of every local module.
        """
        started = time.perf_counter()
        todo = plan(changed, self.deps, self.manifest_path)
        if todo.empty:
            return todo
        sources = [path for path in changed if path.suffix == ".py"]
        _drop_bytecode(sources)
        importlib.invalidate_caches()  # a new file in a folder the import system already listed
        _forget_modules(todo.modules, self.root)
        done: set[str] = set()
        if todo.manifest:
            done.update(await self._reread_manifest())
        reloaded = []
        for name in sorted(todo.functions - done):
            spec = self.host.manifest.functions.get(name)
            if spec is not None and await restart_function(self.host, spec):
                reloaded.append(name)
        self.deps = scan_dependencies(self.host.manifest)
        report_problems(self.host, self.manifest_error)
        if reloaded:
            took = (time.perf_counter() - started) * 1000
            log.info("reloaded %s in %.0f ms", ", ".join(reloaded), took)
        return todo

    async def _reread_manifest(self) -> tuple[str, ...]:
        try:
            new = load_manifest(self.manifest_path)
        except ManifestError as exc:
            if str(exc) != self.manifest_error:
                log.error("%s is invalid; the running manifest stays:\n%s", self.manifest_path, exc)
            self.manifest_error = str(exc)
            return ()
        self.manifest_error = None
        return (await apply_manifest(self.host, new)).functions


PROBLEM_PREFIX = "reload:"
"""The keys of :attr:`Host.problems <fnhost.host.Host.problems>` that hot reload owns."""


def report_problems(host: Host, manifest_error: str | None = None) -> None:
    """Show on ``/readyz`` (and the status page) what a reload left broken.

    A function that fails to load *at all* already makes the host unready; a
    function whose new version fails while the old one keeps serving is only
    visible here (and in ``error`` on ``/functions``), as is an fn.yaml that
    was not applied. The entries clear once the files are fixed.
    """
    problems = host.problems
    for key in [key for key in problems if key.startswith(PROBLEM_PREFIX)]:
        del problems[key]
    if manifest_error is not None:
        problems[f"{PROBLEM_PREFIX}fn.yaml"] = (
            f"not applied, the running manifest stays: {'; '.join(manifest_error.splitlines())}"
        )
    for name, state in host.functions.items():
        if state.error is not None and state.runtime is not None:
            problems[f"{PROBLEM_PREFIX}{name}"] = (
                f"version {state.runtime.version} keeps running; the new one failed: {state.error}"
            )


def _drop_bytecode(sources: Iterable[Path]) -> None:
    # A .pyc is trusted when the source's mtime (whole seconds) and size match:
    # two saves within a second of the same length would load the old code.
    for source in sources:
        try:
            Path(importlib.util.cache_from_source(str(source))).unlink(missing_ok=True)
        except (OSError, NotImplementedError) as exc:
            log.warning("cannot remove the cached bytecode of %s: %s", source, exc)


def _forget_modules(modules: Iterable[Path], root: Path) -> None:
    """Drop local modules from ``sys.modules`` so the next import executes them anew.

    The old module objects live on in the globals of the running versions, so
    in-flight invocations keep the code they started with.
    """
    for path in modules:
        try:
            parts = path.relative_to(root).with_suffix("").parts
        except ValueError:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        module = sys.modules.get(name)
        file = getattr(module, "__file__", None)
        if module is None or file is None or Path(file).resolve() != path:
            continue  # not imported, or the name belongs to another file (an installed module)
        del sys.modules[name]
        parent, _, child = name.rpartition(".")
        if parent and getattr(sys.modules.get(parent), child, None) is module:
            # `from pkg import mod` reads the package attribute before sys.modules.
            delattr(sys.modules[parent], child)


# -- watch: the plugin


class ChangeFilter:
    """Which changes matter: ``*.py`` files under the project root and the manifest;
    never dot-folders (``.git``, ``.venv``, ``.fnhost``), ``__pycache__`` or editor
    swap files (``.x.py.swp``, ``x.py~``, ``.#x.py``)."""

    def __init__(self, root: Path, manifest: Path) -> None:
        self.root = root
        self.manifest = manifest

    def __call__(self, change: Change, path: str) -> bool:
        file = Path(path)
        if file == self.manifest:
            return True
        if file.suffix != ".py":
            return False
        try:
            parts = file.relative_to(self.root).parts
        except ValueError:
            return False
        return not any(part.startswith(".") or part == "__pycache__" for part in parts)


class HotReload:
    """The host plugin that watches files and reloads: ``Host(..., plugins=[HotReload()])``.

    It starts watching in ``fnhost_startup`` (before functions load, so no save
    between a load and the watch is missed) and holds changes back until the
    host has started every function, so a reload never races the start-up.
    """

    def __init__(
        self, *, debounce_ms: int = DEBOUNCE_MS, step_ms: int = STEP_MS, tick_ms: int = TICK_MS
    ) -> None:
        self.debounce_ms = debounce_ms
        self.step_ms = step_ms
        self.tick_ms = tick_ms
        self.reloader: Reloader | None = None
        self._stop = asyncio.Event()
        self._live = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @hookimpl
    async def fnhost_startup(self, host: Host) -> None:
        watchfiles_log = logging.getLogger("watchfiles.main")
        if watchfiles_log.level == logging.NOTSET:
            # Its "1 change detected" says less than our "reloaded hello in 3 ms".
            watchfiles_log.setLevel(logging.WARNING)
        self.reloader = Reloader(host)
        self._task = asyncio.get_running_loop().create_task(
            self._watch(self.reloader), name="fnhost-reload"
        )
        live = asyncio.ensure_future(self._live.wait())
        await asyncio.wait({live, self._task}, return_when=asyncio.FIRST_COMPLETED)
        live.cancel()
        if self._live.is_set():
            count = len(self.reloader.module_files())
            log.info(
                "hot reload: watching fn.yaml and %d modules under %s", count, self.reloader.root
            )

    @hookimpl
    async def fnhost_shutdown(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _watch(self, reloader: Reloader) -> None:
        host = reloader.host
        pending: set[Path] = set()
        try:
            async for changes in awatch(
                reloader.root,
                watch_filter=ChangeFilter(reloader.root, reloader.manifest_path),
                debounce=self.debounce_ms,
                step=self.step_ms,
                rust_timeout=self.tick_ms,
                yield_on_timeout=True,
                stop_event=self._stop,
            ):
                self._live.set()
                pending.update(Path(path) for _, path in changes)
                if pending and host.ready and not host.draining:
                    batch, pending = pending, set()
                    try:
                        await reloader.apply(batch)
                    except Exception:
                        # A bug here must not end the watch, nor reach the host.
                        log.exception("reloading %s failed", ", ".join(map(str, sorted(batch))))
        except Exception:
            log.exception("hot reload stopped; restart the host to pick up changes")
