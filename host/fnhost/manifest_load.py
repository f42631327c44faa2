"""Loading fn.yaml: YAML with the line of every key, ``${VAR:-default}`` interpolation,
``defaults:`` merged into each function, validation errors turned into
``file:line:key.path`` issues, and the cross-checks no single model can make.

Every problem is collected before raising, so a user fixes them all in one pass.
"""

from __future__ import annotations

import difflib
import os
import re
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from fnhost.durations import format_duration
from fnhost.errors import ManifestError, ManifestIssue
from fnhost.manifest import (
    FunctionSpec,
    KeyedProblems,
    KeyPath,
    Manifest,
    StreamSpec,
    Trigger,
    line_of,
    name_problem,
)
from fnhost.subjects import SubjectIndex, subject_covers, subject_matches, subjects_overlap

__all__ = ["ManifestLoader", "interpolate"]

_M = TypeVar("_M", bound=BaseModel)

_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_VAR = re.compile(r"([A-Za-z_]\w*)(?::-(.*))?", re.DOTALL)
_NOT_IN_DEFAULTS = ("name", "module", "handler", "trigger")
# A stand-in function, so that `defaults:` is validated even where no function uses it.
_PROBE = {"module": "probe", "trigger": {"subject": "probe"}}


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Fill ``${NAME}`` and ``${NAME:-default}`` from ``environ``; ``$${`` is a literal ``${``.

    As in a shell, ``:-`` also uses the default when the variable is set but empty.
    Raises ``ValueError`` for an unset variable without default, or a malformed reference.
    """

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        body = match.group(1)
        if body is None:
            raise ValueError(f"unclosed '${{' in {text!r} (write '$${{' for a literal '${{')")
        var = _VAR.fullmatch(body)
        if var is None:
            raise ValueError(f"'${{{body}}}' is neither ${{NAME}} nor ${{NAME:-default}}")
        name, default = var.groups()
        value = environ.get(name)
        if value or (value == "" and default is None):
            return value
        if default is not None:
            return str(default)
        raise ValueError(f"environment variable {name} is not set (or write ${{{name}:-default}})")

    return _REF.sub(substitute, text)


class ManifestLoader:
    """One load of one fn.yaml: walk, validate each part, cross-check, raise or return."""

    def __init__(self, file: str, path: Path, environ: Mapping[str, str] | None) -> None:
        self.file, self.path = file, path
        self.environ = os.environ if environ is None else environ
        self.context = {"root": path.parent}
        self.lines: dict[str, int] = {}
        self.issues: dict[tuple[str, str], ManifestIssue] = {}
        self.warnings: list[ManifestIssue] = []
        # Keys whose interpolation failed: their value is meaningless, so say nothing more.
        self.blocked: set[str] = set()
        self.walking: set[int] = set()
        self.declared_streams: set[Any] = set()
        self.valid_streams = 0

    def load(self, text: str) -> Manifest:
        """Validate ``text``; raise :class:`ManifestError` with every issue, sorted by line."""
        data = self.read(text)
        if not isinstance(data, dict):
            got = "an empty file" if data is None else _show(data)
            self.report((), f"expected a mapping that starts with 'version: 1', got {got}")
            raise ManifestError(list(self.issues.values()))
        manifest = self.build(data)
        if manifest is None or self.issues:
            raise ManifestError(sorted(self.issues.values(), key=_by_line))
        manifest._path = self.path
        manifest._lines = self.lines
        manifest._warnings = sorted(self.warnings, key=_by_line)
        return manifest

    def report(self, path: KeyPath, message: str, *, warning: bool = False) -> None:
        """Record an issue at ``path``, on the line of that key or of its nearest parent."""
        key = _dotted(path)
        if any(key == b or key.startswith(b + ".") for b in self.blocked):
            return
        issue = ManifestIssue(self.file, line_of(self.lines, key), key, message)
        if warning:
            self.warnings.append(issue)
        else:
            self.issues.setdefault((key, message), issue)

    def read(self, text: str) -> Any:
        """Compose the YAML with marks and turn it into plain data, filling ``self.lines``."""
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            return None if node is None else self.walk(loader, node, ())
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            why = ", ".join(str(part) for part in (exc.problem, exc.context) if part)
            line = mark.line + 1 if mark else None
            issue = ManifestIssue(
                self.file, line, "", f"invalid YAML: {why}{_hint(why, text, line)}"
            )
            raise ManifestError([issue]) from None
        except yaml.YAMLError as exc:
            raise ManifestError(
                [ManifestIssue(self.file, None, "", f"invalid YAML: {exc}")]
            ) from None
        finally:
            loader.dispose()

    def walk(self, loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath) -> Any:
        self.lines.setdefault(_dotted(path), node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(loader, node, path)
        if id(node) in self.walking:
            self.report(path, "an alias refers to a mapping or list that contains it")
            return None
        self.walking.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(loader, node, path)
            return [self.walk(loader, item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.walking.discard(id(node))

    def scalar(self, loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath) -> Any:
        value = loader.construct_object(node)
        if not isinstance(value, str) or "$" not in value:
            return value
        try:
            expanded = interpolate(value, self.environ)
        except ValueError as exc:
            self.report(path, str(exc))
            self.blocked.add(_dotted(path))
            return value
        if isinstance(node, yaml.ScalarNode) and node.style is None and expanded != value:
            # An unquoted `port: ${PORT:-8080}` reads as the number, as if written out.
            tag = loader.resolve(yaml.ScalarNode, expanded, (True, False))  # type: ignore[no-untyped-call]
            return loader.construct_object(yaml.ScalarNode(tag, expanded))
        return expanded

    def mapping(
        self, loader: yaml.SafeLoader, node: yaml.MappingNode, path: KeyPath
    ) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.key(loader, key_node, path)
            if key in first_line:
                self.lines[_dotted((*path, key))] = key_node.start_mark.line + 1
                self.report((*path, key), f"duplicate key (first at line {first_line[key]})")
            first_line.setdefault(key, key_node.start_mark.line + 1)
        loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.key(loader, key_node, path)
            self.lines[_dotted((*path, key))] = key_node.start_mark.line + 1
            mapping[key] = self.walk(loader, value_node, (*path, key))
        return mapping

    def key(self, loader: yaml.SafeLoader, node: yaml.Node, path: KeyPath) -> Any:
        if isinstance(node, yaml.ScalarNode):
            return loader.construct_object(node)
        line = node.start_mark.line + 1
        raise ManifestError([ManifestIssue(self.file, line, _dotted(path), "keys must be scalars")])

    def build(self, data: dict[Any, Any]) -> Manifest | None:
        defaults = self.defaults(data.pop("defaults", None))
        self.declared_streams = set(data.get("streams") or ())
        streams = self.section(
            data,
            "streams",
            "stream",
            lambda name, raw: self.validate(StreamSpec, raw, ("streams", name)),
        )
        functions = self.section(
            data, "functions", "function", lambda name, raw: self.function(name, raw, defaults)
        )
        self.valid_streams = len(streams)
        manifest = self.validate(Manifest, data, ())
        self.cross_check(streams, functions)
        return manifest

    def defaults(self, raw: Any) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.report(("defaults",), f"expected a mapping of function settings, got {_show(raw)}")
            return {}
        for key in _NOT_IN_DEFAULTS:
            if key in raw:
                self.report(("defaults", key), f"'{key}' has no default: set it on each function")
        usable = {k: v for k, v in raw.items() if k not in _NOT_IN_DEFAULTS}
        if usable:
            self.function("defaults", _PROBE, usable, probe=True)
        return usable

    def section(
        self,
        data: dict[Any, Any],
        key: str,
        what: str,
        validate: Callable[[Any, Any], _M | None],
    ) -> dict[Any, _M]:
        """Validate each entry of ``data[key]`` on its own so one bad entry hides no other;
        put the valid ones back for the top-level validation."""
        raw = data.get(key)
        if not isinstance(raw, dict):
            return {}
        valid: dict[Any, _M] = {}
        for name, entry in raw.items():
            if problem := name_problem(name, what):
                self.report((key, name), problem)
            elif (spec := validate(name, entry)) is not None:
                valid[name] = spec
        data[key] = valid
        return valid

    def function(
        self, name: str, raw: Any, defaults: dict[str, Any], *, probe: bool = False
    ) -> FunctionSpec | None:
        """Validate one function with ``defaults`` merged in. An error in a merged key
        is reported once, as ``defaults.key``; ``probe`` reports only those."""
        if isinstance(raw, dict) and "name" in raw and not probe:
            self.report(("functions", name, "name"), "remove it: a function is named by its key")
            return None
        if not isinstance(raw, dict):
            return self.validate(FunctionSpec, raw, ("functions", name))
        if not probe:  # merged keys answer with their line in `defaults:`
            for key, line in list(self.lines.items()):
                if key.startswith("defaults."):
                    self.lines.setdefault(f"functions.{name}.{key.removeprefix('defaults.')}", line)
        try:
            merged = {**_merge(defaults, raw), "name": name}
            return FunctionSpec.model_validate(merged, context=self.context)
        except ValidationError as exc:
            for loc, sub, err in _errors(exc):
                from_defaults = _from_defaults(raw, defaults, loc)
                if from_defaults or not probe:
                    at = ("defaults",) if from_defaults else ("functions", name)
                    text = err if isinstance(err, str) else _message(err, FunctionSpec, loc, at)
                    self.report((*at, *loc, *sub), text)
        return None

    def validate(self, model: type[_M], raw: Any, at: KeyPath) -> _M | None:
        """``model`` from ``raw``, or None with its errors reported under ``at``."""
        try:
            return model.model_validate(raw, context=self.context)
        except ValidationError as exc:
            for loc, sub, err in _errors(exc):
                text = err if isinstance(err, str) else _message(err, model, loc, at)
                self.report((*at, *loc, *sub), text)
        return None

    def cross_check(
        self, streams: dict[str, StreamSpec], functions: dict[str, FunctionSpec]
    ) -> None:
        """The traps that span entries; only valid entries take part."""
        names = list(streams)
        for i, name in enumerate(names):
            for j, subject in enumerate(streams[name].subjects):
                for other in names[:i]:
                    clash = _overlapping(streams[other].subjects, subject)
                    if clash is not None:
                        text = f"overlaps {clash!r} of stream {other}: JetStream refuses two"
                        at = ("streams", name, "subjects", j)
                        self.report(at, f"{text} streams that could store the same subject")
        index = SubjectIndex({name: spec.subjects for name, spec in streams.items()})
        durables: dict[tuple[str, str | None], str] = {}
        horizons: dict[str, tuple[float, str]] = {}
        for name, spec in functions.items():
            consumed = self.check_trigger(name, spec.trigger, streams, durables)
            self.check_kind_settings(name, spec)
            if spec.dead_letter is not None:
                self.check_dead_letter(name, spec, index.stream_for(spec.dead_letter))
            horizon = spec.retry.horizon(spec.timeout)
            output = index.stream_for(spec.output) if spec.output else None
            for stream in {consumed, output} - {None}:
                assert stream is not None
                if horizon > horizons.get(stream, (0.0, ""))[0]:
                    horizons[stream] = (horizon, name)
        for stream, (horizon, name) in horizons.items():
            window = streams[stream].duplicate_window
            if window < horizon:
                text = f"{format_duration(window)} is shorter than the redelivery horizon of"
                text += f" function {name!r} ({format_duration(horizon)}, backoff + timeout):"
                text += " a publish repeated by a late retry would not be de-duplicated"
                self.report(("streams", stream, "duplicate_window"), text, warning=True)

    def check_trigger(
        self,
        name: str,
        trigger: Trigger,
        streams: dict[str, StreamSpec],
        durables: dict[tuple[str, str | None], str],
    ) -> str | None:
        """Check one trigger against the streams; return the stream it consumes, if valid."""
        at = ("functions", name, "trigger")
        if trigger.request is not None:
            for stream, spec in streams.items():
                if (clash := _overlapping(spec.subjects, trigger.request)) is not None:
                    text = f"stream {stream} captures {clash!r}: JetStream would answer requests"
                    self.report(
                        (*at, "request"), f"{text} with a PubAck, not this function's reply"
                    )
                    break
        if trigger.stream is None:
            return None
        consumed = streams.get(trigger.stream)
        if consumed is None:
            if trigger.stream not in self.declared_streams:
                close = difflib.get_close_matches(trigger.stream, map(str, self.declared_streams))
                hint = f"; did you mean {close[0]!r}?" if close else ""
                text = f"stream {trigger.stream!r} is not declared under streams:{hint}"
                self.report((*at, "stream"), text)
            return None
        for i, subject in enumerate(trigger.subjects):
            if not any(subject_covers(pattern, subject) for pattern in consumed.subjects):
                text = f"{subject!r} is outside stream {trigger.stream}'s subjects"
                self.report(
                    (*at, "subjects", i), f"{text} {consumed.subjects}: it would never match"
                )
        durable = (trigger.stream, trigger.durable_name)
        if durable in durables:
            text = f"durable {durable[1]!r} on stream {durable[0]} is function"
            text += f" {durables[durable]!r}'s too: the two would split its messages"
            self.report((*at, "durable"), text)
        durables.setdefault(durable, name)
        return trigger.stream

    def check_kind_settings(self, name: str, spec: FunctionSpec) -> None:
        """Settings that mean nothing for the function's trigger kind."""
        kind = spec.trigger.kind
        if spec.idempotency is not None and kind == "request":
            text = "is for stream and subject triggers: a request's reply is not stored, so a"
            text += " repeated request could not be answered (give requests their own ids)"
            self.report(("functions", name, "idempotency"), text)
        if spec.dead_letter is not None and kind != "stream":
            text = f"only stream triggers dead-letter; a {kind} trigger has no message to keep"
            self.report(("functions", name, "dead_letter"), text)

    def check_dead_letter(self, name: str, spec: FunctionSpec, owner: str | None) -> None:
        """A dead letter must land in a stream, and not in the one the function consumes."""
        at = ("functions", name, "dead_letter")
        trigger = spec.trigger
        if owner is None and len(self.declared_streams) == self.valid_streams:
            text = f"no declared stream captures {spec.dead_letter!r}: a dead letter must persist"
            self.report(at, f"{text} (add a stream, e.g. DLQ: {{subjects: [dlq.>]}})")
        elif owner is not None and owner == trigger.stream and spec.dead_letter is not None:
            filters = trigger.subjects or [">"]
            if any(subject_matches(pattern, spec.dead_letter) for pattern in filters):
                self.report(at, f"this function consumes it from {owner}: dead letters would loop")


def _hint(why: str, text: str, line: int | None) -> str:
    if "'\\t'" in why:
        return " (indent with spaces, not tabs)"
    if "flow" in why and line and "${" in "".join(text.splitlines()[line - 1 : line]):
        return " (inside { } or [ ], quote a value that uses ${VAR})"
    return ""


def _by_line(issue: ManifestIssue) -> tuple[bool, int]:
    return issue.line is None, issue.line or 0


def _overlapping(patterns: list[str], subject: str) -> str | None:
    return next((pattern for pattern in patterns if subjects_overlap(pattern, subject)), None)


def _dotted(path: KeyPath) -> str:
    return ".".join(str(part) for part in path)


def _has(data: Any, path: KeyPath) -> bool:
    for part in path:
        in_dict = isinstance(data, dict) and part in data
        if not in_dict and not (
            isinstance(data, list) and isinstance(part, int) and part < len(data)
        ):
            return False
        data = data[part]
    return True


def _from_defaults(raw: Any, defaults: Any, loc: KeyPath) -> bool:
    """True if the value at ``loc`` of a merged function came from ``defaults:``."""
    for end in range(len(loc), 0, -1):
        if _has(raw, loc[:end]):
            return False
        if _has(defaults, loc[:end]):
            return True
    return False


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        below = merged.get(key)
        if isinstance(below, dict) and isinstance(value, dict):
            value = _merge(below, value)
        merged[key] = value
    return merged


def _errors(exc: ValidationError) -> Iterator[tuple[KeyPath, KeyPath, Any]]:
    """(location, sub-key, error) per problem; a ``KeyedProblems`` becomes one per sub-key."""
    for err in exc.errors(include_url=False):
        loc: KeyPath = tuple(err["loc"])
        error = err.get("ctx", {}).get("error")
        if isinstance(error, KeyedProblems):
            for sub, text in error.problems:
                yield loc, sub, text
        else:
            yield loc, (), err


def _model_at(model: Any, loc: KeyPath) -> type[BaseModel] | None:
    """The model class that validates the mapping at ``loc`` below ``model``."""
    for part in (*loc, None):
        while get_origin(model) in (Union, types.UnionType, Annotated):
            model = next(arg for arg in get_args(model) if arg is not type(None))
        if part is None:
            break
        if isinstance(model, type) and issubclass(model, BaseModel):
            field = model.model_fields.get(str(part))
            model = field.annotation if field else None
        else:
            model = get_args(model)[-1] if get_origin(model) in (dict, list) else None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_PLAIN = {
    "int_parsing": "expected a whole number",
    "int_from_float": "expected a whole number",
    "int_type": "expected a whole number",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected text",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "too_short": "must not be empty",
    "datetime_parsing": "expected a date-time like 2024-05-01T12:00:00Z",
    "datetime_type": "expected a date-time like 2024-05-01T12:00:00Z",
}


def _message(err: Any, model: type[BaseModel], loc: KeyPath, at: KeyPath) -> str:
    """A pydantic error in words a newcomer reads, with the bad value."""
    kind, ctx, got = err["type"], err.get("ctx", {}), _show(err.get("input"))
    top = not at
    if kind == "missing":
        return "required key is missing" + (
            ": begin with 'version: 1'" if top and loc == ("version",) else ""
        )
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        skip = _NOT_IN_DEFAULTS if at == ("defaults",) and owner is FunctionSpec else ("name",)
        known = [f for f in (owner.model_fields if owner else ()) if f not in skip]
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown key '{loc[-1]}'{hint} (expected one of: {', '.join(known)})"
    if kind == "literal_error":
        if top and loc == ("version",):
            return f"unsupported version {got}: this fnhost reads version 1"
        return f"must be {ctx.get('expected')}, got {got}"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"]))
    bounds = {
        "greater_than": "greater than",
        "greater_than_equal": "at least",
        "less_than_equal": "at most",
    }
    if kind in bounds:
        return f"must be {bounds[kind]} {next(iter(ctx.values()))}, got {got}"
    return f"{_PLAIN.get(kind, err['msg'])}, got {got}"
