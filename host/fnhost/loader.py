"""Import a function module, find its handler, and read its signature.

Every load imports the module afresh (a new module object), so a reload or a
deploy never mutates the version that in-flight invocations still run on.
Modules named by a path under the project root are registered in
``sys.modules`` under their natural dotted name (``functions/payment.py`` ->
``functions.payment``) so sibling imports and pickling see the same module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
import sysconfig
import traceback
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from fnhost.errors import LoadError
from fnhost.manifest import FunctionSpec, Manifest
from fnhost_sdk.codec import Decoder, decoder_for
from fnhost_sdk.context import Context


@dataclass(frozen=True, slots=True)
class LoadedFunction:
    """A function ready to be composed: its handler and how to call it."""

    spec: FunctionSpec
    module: ModuleType
    handler: Callable[..., Any]
    decode: Decoder
    passes_context: bool
    is_async: bool
    version: str


def load_function(spec: FunctionSpec, manifest: Manifest) -> LoadedFunction:
    """Import ``spec.module`` afresh and validate ``spec.handler``; raises :class:`LoadError`."""
    module = import_fresh(spec, manifest)
    return inspect_handler(spec, manifest, module)


def import_fresh(spec: FunctionSpec, manifest: Manifest) -> ModuleType:
    """Import the function's module as a new module object."""
    where = _where(spec, manifest, "module")
    # The module and the project-local modules it imports resolve from the project root.
    root = str(manifest.root)
    if root not in sys.path:
        sys.path.insert(0, root)
    path = spec.module_path
    if path is not None:
        if not path.is_file():
            raise LoadError(f"{where}: function {spec.name!r}: module file {path} does not exist")
        name = _dotted_name(path, manifest.root)
        module_spec = importlib.util.spec_from_file_location(name, path)
    else:
        name = spec.module
        try:
            module_spec = importlib.util.find_spec(name)
        except (ImportError, ValueError) as exc:
            raise LoadError(f"{where}: function {spec.name!r}: {exc}") from None
        if module_spec is None:
            raise LoadError(f"{where}: function {spec.name!r}: no module named {name!r}")
    if module_spec is None or module_spec.loader is None:
        raise LoadError(f"{where}: function {spec.name!r}: cannot import {spec.module!r}")
    module = importlib.util.module_from_spec(module_spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as exc:
        if previous is not None:
            sys.modules[name] = previous
        else:
            sys.modules.pop(name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        if isinstance(exc, SystemExit):
            # A module's sys.exit() must not end the host (or a reload's old version).
            raise LoadError(
                f"{where}: function {spec.name!r}: "
                f"the module exited during import (sys.exit({exc.code!r}))"
            ) from None
        raise LoadError(f"{where}: function {spec.name!r}: {_describe_import_error(exc)}") from None
    return module


def inspect_handler(spec: FunctionSpec, manifest: Manifest, module: ModuleType) -> LoadedFunction:
    """Find the handler in ``module`` and check its signature fits."""
    where = _where(spec, manifest, "handler")
    handler = getattr(module, spec.handler, None)
    if handler is None:
        raise LoadError(
            f"{where}: function {spec.name!r}: module {spec.module!r} has no "
            f"handler {spec.handler!r}{_suggest(module)}"
        )
    if not callable(handler):
        raise LoadError(f"{where}: function {spec.name!r}: {spec.handler!r} is not callable")
    payload_type, passes_context = _read_signature(spec, where, handler)
    try:
        decode = decoder_for(payload_type)
    except Exception as exc:
        raise LoadError(
            f"{where}: function {spec.name!r}: cannot decode payloads into {payload_type!r}: {exc}"
        ) from None
    return LoadedFunction(
        spec=spec,
        module=module,
        handler=handler,
        decode=decode,
        passes_context=passes_context,
        is_async=inspect.iscoroutinefunction(handler),
        version=spec.version or _source_digest(module),
    )


def _read_signature(
    spec: FunctionSpec, where: str, handler: Callable[..., Any]
) -> tuple[Any, bool]:
    try:
        signature = inspect.signature(handler)
        hints = typing.get_type_hints(handler)
    except Exception as exc:
        raise LoadError(
            f"{where}: function {spec.name!r}: cannot read the signature of {spec.handler!r}: {exc}"
        ) from None
    params = [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if not params:
        raise LoadError(
            f"{where}: function {spec.name!r}: handler {spec.handler!r} must take the payload "
            f"as its first parameter, e.g. `async def {spec.handler}(data: dict, ctx: Context)`"
        )
    required = [p for p in params[1:] if p.default is p.empty]
    if len(required) > 1:
        raise LoadError(
            f"{where}: function {spec.name!r}: handler {spec.handler!r} takes "
            f"{len(params)} parameters; it may take (payload) or (payload, ctx)"
        )
    payload_type = hints.get(params[0].name, inspect.Parameter.empty)
    return payload_type, len(params) >= 2 and (
        params[1].default is params[1].empty or hints.get(params[1].name) is Context
    )


def _dotted_name(path: Path, root: Path) -> str:
    try:
        relative = path.resolve().relative_to(root.resolve())
    except ValueError:
        return f"fnhost_fn_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    return ".".join(relative.with_suffix("").parts)


def _where(spec: FunctionSpec, manifest: Manifest, key: str) -> str:
    line = manifest.line_of(f"functions.{spec.name}.{key}") or manifest.line_of(
        f"functions.{spec.name}"
    )
    return f"{manifest.path.name}:{line}:functions.{spec.name}.{key}"


def _describe_import_error(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"syntax error at {exc.filename}:{exc.lineno}: {exc.msg}"
    frames = traceback.extract_tb(exc.__traceback__)
    user_frames = [f for f in frames if "importlib" not in f.filename]
    at = f" at {user_frames[-1].filename}:{user_frames[-1].lineno}" if user_frames else ""
    return f"importing the module failed{at}: {type(exc).__name__}: {exc}"


def user_traceback(exc: LoadError) -> str:
    """The traceback of the user's code behind ``exc``, as Python prints it, or "".

    For an error raised while the module executed (the exception the import
    raised is the :class:`LoadError`'s context): the frames of the user's files,
    without the import system's, then the exception; a syntax error shows its
    line and caret. Handler problems (missing, wrong signature) have none.
    """
    cause = exc.__cause__ or exc.__context__
    if cause is None:
        return ""
    if isinstance(cause, SyntaxError):
        return "".join(traceback.format_exception_only(cause)).rstrip()
    frames = [f for f in traceback.extract_tb(cause.__traceback__) if _is_user_file(f.filename)]
    if not frames:
        return ""
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)]
    lines += traceback.format_exception_only(cause)
    return "".join(lines).rstrip()


def _is_user_file(filename: str) -> bool:
    if filename.startswith("<") or filename == __file__:
        return False
    return not filename.startswith(_STDLIB)


_STDLIB = sysconfig.get_paths()["stdlib"]


def _suggest(module: ModuleType) -> str:
    names = [
        name
        for name, value in vars(module).items()
        if inspect.isfunction(value)
        and value.__module__ == module.__name__
        and not name.startswith("_")
    ]
    return f" (functions in it: {', '.join(sorted(names))})" if names else ""


def _source_digest(module: ModuleType) -> str:
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return "unknown"
    return hashlib.sha256(source.encode()).hexdigest()[:12]
