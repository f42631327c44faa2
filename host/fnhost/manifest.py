"""fn.yaml, version 1: the pydantic models and the two ways to load one.

Reading the YAML (line marks, ``${VAR}`` interpolation, ``defaults:``), turning
validation errors into ``file:line:key.path`` issues and the cross-checks live in
``manifest_load``. The reference for users is docs/manifest.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fnhost.durations import format_duration, parse_duration, parse_size
from fnhost.errors import ManifestError, ManifestIssue
from fnhost.subjects import SubjectIndex, subject_problem, subjects_overlap

__all__ = [
    "FunctionSpec",
    "HttpConfig",
    "IdempotencySpec",
    "KVSpec",
    "LoggingConfig",
    "Manifest",
    "NatsConfig",
    "ObjectStoreSpec",
    "RegistrySpec",
    "RetryPolicy",
    "StreamSpec",
    "TLSConfig",
    "TracingConfig",
    "Trigger",
    "load_manifest",
    "parse_manifest",
]

Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
ByteSize = Annotated[int, BeforeValidator(parse_size), Field(ge=1)]
KeyPath = tuple[str | int, ...]

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
_HEADER = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_NKEY_USER = re.compile(r"U[A-Z2-7]{55}")
_KINDS = ("request", "subject", "stream")
_STREAM_ONLY = frozenset(
    {"subjects", "durable", "ack_wait", "max_ack_pending", "deliver", "start_sequence"}
    | {"start_time", "batch"}
)


class KeyedProblems(ValueError):
    """What a model validator raises: problems pinned to sub-keys of its model, so that
    errors name ``functions.x.retry.backoff`` rather than ``functions.x.retry``."""

    def __init__(self, problems: list[tuple[KeyPath, str]]) -> None:
        joined = (".".join(map(str, key)) + ": " + text for key, text in problems)
        super().__init__("; ".join(joined))
        self.problems = problems


def _check(problems: list[tuple[KeyPath, str]]) -> None:
    if problems:
        raise KeyedProblems(problems)


def name_problem(name: object, what: str) -> str | None:
    """Why ``name`` cannot name a stream, bucket or function (it ends up in subjects), or None."""
    if isinstance(name, str) and _NAME.fullmatch(name):
        return None
    return f"{what} name {name!r} may only use letters, digits, '-' and '_'"


def _resolve_path(value: str | None, info: ValidationInfo) -> str | None:
    root = (info.context or {}).get("root")
    return str(Path(root) / Path(value).expanduser()) if value and root else value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Model):
    """Client TLS files; relative paths are resolved against the manifest's folder."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    _paths = field_validator("ca", "cert", "key")(_resolve_path)

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert is None) != (self.key is None):
            _check([(("key" if self.key is None else "cert",), "'cert' and 'key' go together")])
        return self


class NatsConfig(_Model):
    """How to reach NATS: ``embedded`` starts a local nats-server; else URLs and credentials."""

    url: str = "embedded"
    name: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey: str | None = None
    creds: str | None = None
    tls: TLSConfig | None = None
    _paths = field_validator("nkey", "creds")(_resolve_path)

    @field_validator("url")
    @classmethod
    def _urls(cls, url: str) -> str:
        urls = [part.strip() for part in url.split(",")]
        if urls == ["embedded"]:
            return url
        for each in urls:
            scheme, sep, rest = each.partition("://")
            if not sep or scheme not in ("nats", "tls", "ws", "wss") or not rest:
                raise ValueError(f"{each!r} is not 'embedded' or a URL like nats://host:4222")
        return url

    @model_validator(mode="after")
    def _auth(self) -> NatsConfig:
        problems: list[tuple[KeyPath, str]] = []
        if (self.user is None) != (self.password is None):
            key = "password" if self.password is None else "user"
            problems.append(((key,), "'user' and 'password' go together"))
        if self.nkey and self.creds:
            problems.append((("creds",), "use 'nkey' or 'creds', not both"))
        _check(problems)
        return self

    @property
    def urls(self) -> list[str]:
        """The server URLs, split from the comma list."""
        return [part.strip() for part in self.url.split(",")]

    @property
    def is_embedded(self) -> bool:
        """True when the host should start its own nats-server."""
        return self.url.strip() == "embedded"


class GatewayConfig(_Model):
    """``POST /invoke/{function}`` for request functions; off unless enabled, bearer-token only."""

    enabled: bool = False
    token: str | None = None

    @model_validator(mode="after")
    def _token(self) -> GatewayConfig:
        if self.enabled and not self.token:
            _check(
                [(("token",), "the gateway needs a bearer token (e.g. ${FNHOST_GATEWAY_TOKEN})")]
            )
        return self


class HttpConfig(_Model):
    """The HTTP server (health, metrics, status); ``port: 0`` picks a free port."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    gateway: GatewayConfig = GatewayConfig()


class LoggingConfig(_Model):
    """Log level, and format: ``auto`` lets the command decide (JSON in run, text in dev)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: Literal["auto", "json", "text"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, level: object) -> object:
        return level.upper() if isinstance(level, str) else level


class TracingConfig(_Model):
    """OpenTelemetry export; off (``none``) by default."""

    exporter: Literal["none", "console", "otlp"] = "none"
    endpoint: str | None = None
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    service_name: str = "fnhost"


class StreamSpec(_Model):
    """A JetStream stream the host provisions (creates or updates) on start."""

    subjects: list[str] = Field(min_length=1)
    storage: Literal["file", "memory"] = "file"
    replicas: int = Field(default=1, ge=1, le=5)
    max_age: PositiveDuration | None = None
    max_msgs: int | None = Field(default=None, ge=1)
    max_bytes: ByteSize | None = None
    duplicate_window: PositiveDuration = 120.0
    retention: Literal["limits", "workqueue", "interest"] = "limits"
    discard: Literal["old", "new"] = "old"

    @model_validator(mode="after")
    def _subjects(self) -> StreamSpec:
        problems: list[tuple[KeyPath, str]] = []
        for i, subject in enumerate(self.subjects):
            problem = subject_problem(subject)
            if problem is None and subject == ">":
                problem = "'>' would capture every subject, NATS' own included"
            if problem is None:
                clash = next((s for s in self.subjects[:i] if subjects_overlap(s, subject)), None)
                if clash is not None:
                    problem = f"{subject!r} overlaps {clash!r} (JetStream refuses it)"
            if problem:
                problems.append((("subjects", i), problem))
        _check(problems)
        return self


class KVSpec(_Model):
    """A JetStream key-value bucket."""

    ttl: PositiveDuration | None = None
    history: int = Field(default=1, ge=1, le=64)
    replicas: int = Field(default=1, ge=1, le=5)


class ObjectStoreSpec(_Model):
    """A JetStream object store."""

    replicas: int = Field(default=1, ge=1, le=5)


class RegistrySpec(_Model):
    """Remote deploy: signed specs in KV, artifacts in an object store; off unless enabled."""

    enabled: bool = False
    trusted_keys: list[str] = []
    bucket: str = "fnhost_functions"
    store: str = "fnhost_artifacts"
    status_bucket: str = "fnhost_hosts"
    history: int = Field(default=10, ge=1, le=64)
    max_artifact_size: ByteSize = 8 * 1024 * 1024

    @model_validator(mode="after")
    def _keys(self) -> RegistrySpec:
        problems: list[tuple[KeyPath, str]] = []
        if self.enabled and not self.trusted_keys:
            problems.append(
                (("trusted_keys",), "an enabled registry needs trusted_keys (fnhost keygen)")
            )
        for i, key in enumerate(self.trusted_keys):
            if key.startswith("SU"):
                problems.append((("trusted_keys", i), "this is a secret seed: list its public key"))
            elif not _NKEY_USER.fullmatch(key):
                problems.append((("trusted_keys", i), f"{key!r} is not a user public nkey (U...)"))
        for field in ("bucket", "store", "status_bucket"):
            if problem := name_problem(getattr(self, field), "bucket"):
                problems.append(((field,), problem))
        _check(problems)
        return self


class RetryPolicy(_Model):
    """How often a stream message is delivered, and the delay before each redelivery."""

    max_deliver: int = Field(default=5, ge=1)
    backoff: list[Duration] = [1.0, 5.0, 30.0, 120.0]

    @model_validator(mode="after")
    def _fits(self) -> RetryPolicy:
        if len(self.backoff) > self.max_deliver:
            text = f"{len(self.backoff)} steps but max_deliver is {self.max_deliver}"
            _check([(("backoff",), f"{text}: at most one step per delivery")])
        return self

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait after failed ``attempt`` (1-based); the last step repeats."""
        if not self.backoff:
            return 0.0
        return self.backoff[min(max(attempt, 1), len(self.backoff)) - 1]

    def horizon(self, timeout: float) -> float:
        """Seconds from the first delivery until the last retry starts, plus one ``timeout``."""
        return sum(self.delay_for(attempt) for attempt in range(1, self.max_deliver)) + timeout


class IdempotencySpec(_Model):
    """Skip messages already handled, keyed by ``key``, remembered for ``ttl``.

    ``lease``: how long a delivery holds the key while its handler runs (default:
    the larger of the trigger's ``ack_wait`` and the function's ``timeout``).
    ``bucket`` names the KV bucket (kv), the key prefix (redis) or the table
    (postgres).
    """

    store: Literal["kv", "memory", "redis", "postgres"] = "kv"
    ttl: PositiveDuration = 86400.0
    key: str = "auto"
    lease: PositiveDuration | None = None
    bucket: str = "fnhost_idempotency"
    url: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> IdempotencySpec:
        problems: list[tuple[KeyPath, str]] = []
        header = self.key.removeprefix("header:")
        module, colon, func = self.key.partition(":")
        if not (
            self.key == "auto"
            or (header != self.key and _HEADER.fullmatch(header))
            or (colon and _DOTTED.fullmatch(module) and func.isidentifier())
        ):
            text = "use 'auto', 'header:NAME' or 'package.module:function'"
            problems.append((("key",), f"invalid key {self.key!r}: {text}"))
        if self.store in ("redis", "postgres") and not self.url:
            problems.append((("url",), f"store {self.store} needs a url (its DSN)"))
        if self.store in ("kv", "memory") and self.url:
            problems.append((("url",), f"url is only for redis and postgres, not {self.store}"))
        if problem := name_problem(self.bucket, "bucket"):
            problems.append((("bucket",), problem))
        _check(problems)
        return self


class Trigger(_Model):
    """What invokes a function: exactly one of ``request``, ``subject`` or ``stream``."""

    request: str | None = None
    subject: str | None = None
    stream: str | None = None
    queue: str | None = None
    subjects: list[str] = []
    durable: str | None = None
    ack_wait: PositiveDuration = 30.0
    max_ack_pending: int | None = Field(default=None, ge=1)
    deliver: Literal[
        "all", "new", "last", "last_per_subject", "by_start_sequence", "by_start_time"
    ] = "all"
    start_sequence: int | None = Field(default=None, ge=1)
    start_time: datetime | None = None
    batch: int | None = Field(default=None, ge=1)
    _function: str | None = PrivateAttr(None)

    @field_validator("start_time")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return value.replace(tzinfo=UTC) if value and value.tzinfo is None else value

    @model_validator(mode="after")
    def _shape(self) -> Trigger:
        given = [kind for kind in _KINDS if getattr(self, kind) is not None]
        if len(given) != 1:
            got = " and ".join(repr(k) for k in given) if given else "none"
            _check([((), f"needs exactly one of 'request', 'subject' or 'stream', got {got}")])
        problems: list[tuple[KeyPath, str]] = []
        kind = given[0]
        for field in sorted(self.model_fields_set - set(_KINDS)):
            if (field in _STREAM_ONLY) != (kind == "stream"):
                owner = "stream triggers" if field in _STREAM_ONLY else "request/subject triggers"
                problems.append(((field,), f"'{field}' is for {owner}, not a {kind} trigger"))
        subjects: list[tuple[KeyPath, str]] = [
            (("subjects", i), s) for i, s in enumerate(self.subjects)
        ]
        if kind != "stream":
            subjects.append(((kind,), getattr(self, kind)))
        for key, subject in subjects:
            if problem := subject_problem(subject):
                problems.append((key, problem))
        if self.durable is not None and (problem := name_problem(self.durable, "durable")):
            problems.append((("durable",), problem))
        needs = {"by_start_sequence": "start_sequence", "by_start_time": "start_time"}
        for deliver, field in needs.items():
            given_field = getattr(self, field) is not None
            if self.deliver == deliver and not given_field:
                problems.append((("deliver",), f"deliver: {deliver} needs '{field}'"))
            elif given_field and self.deliver != deliver:
                problems.append(((field,), f"'{field}' only applies with deliver: {deliver}"))
        _check(problems)
        return self

    @property
    def kind(self) -> Literal["request", "subject", "stream"]:
        """Which kind of trigger this is."""
        if self.request is not None:
            return "request"
        return "subject" if self.subject is not None else "stream"

    @property
    def queue_group(self) -> str | None:
        """request/subject: the ``queue`` if given (``queue: null`` = broadcast), else the
        function's name; stream: None."""
        if self.kind == "stream":
            return None
        return self.queue if "queue" in self.model_fields_set else self._bound_name()

    @property
    def durable_name(self) -> str | None:
        """stream: the durable consumer's name, by default the function's; else None."""
        return (self.durable or self._bound_name()) if self.kind == "stream" else None

    def effective_max_ack_pending(self, concurrency: int) -> int:
        """``max_ack_pending``, by default twice the function's concurrency."""
        return self.max_ack_pending or 2 * concurrency

    def effective_batch(self, concurrency: int) -> int:
        """Most messages per fetch: ``batch``, by default the concurrency capped at 256."""
        return self.batch or min(concurrency, 256)

    def _bound_name(self) -> str:
        if self._function is None:
            raise RuntimeError("this Trigger is not part of a FunctionSpec")
        return self._function


class FunctionSpec(_Model):
    """One function: where its code is, what triggers it, and how it is run."""

    name: str
    module: str
    handler: str = "handle"
    trigger: Trigger
    retry: RetryPolicy = RetryPolicy()
    timeout: PositiveDuration = 30.0
    concurrency: int = Field(default=64, ge=1)
    ack: Literal["plain", "sync"] = "plain"
    progress_pings: bool = True
    idempotency: IdempotencySpec | None = None
    dead_letter: str | None = None
    output: str | None = None
    config: dict[str, Any] = {}
    version: str | None = None
    _root: Path | None = PrivateAttr(None)

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: object) -> object:
        return (
            str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value
        )

    @field_validator("module")
    @classmethod
    def _module(cls, module: str) -> str:
        if module.endswith(".py") or _DOTTED.fullmatch(module):
            return module
        raise ValueError(f"{module!r} is neither a path ending in .py nor a dotted module name")

    @field_validator("handler")
    @classmethod
    def _handler(cls, handler: str) -> str:
        if handler.isidentifier():
            return handler
        raise ValueError(f"{handler!r} is not a Python function name")

    @field_validator("dead_letter", "output")
    @classmethod
    def _concrete(cls, subject: str | None) -> str | None:
        if subject is not None and (problem := subject_problem(subject, wildcards=False)):
            raise ValueError(problem)
        return subject

    @model_validator(mode="after")
    def _bind_and_check(self, info: ValidationInfo) -> FunctionSpec:
        self.trigger = self.trigger.model_copy()
        self.trigger._function = self.name
        root = (info.context or {}).get("root")
        self._root = Path(root) if root else None
        problems: list[tuple[KeyPath, str]] = []
        pings = self.progress_pings
        if self.trigger.kind == "stream" and not pings and self.timeout >= self.trigger.ack_wait:
            waits = f"{format_duration(self.timeout)} is not below ack_wait"
            waits += f" {format_duration(self.trigger.ack_wait)} and progress_pings is off"
            text = "the server would redeliver the message while the handler still runs"
            problems.append((("timeout",), f"{waits}: {text}"))
        pending = self.trigger.max_ack_pending
        if pending is not None and pending < self.concurrency:
            text = f"{pending} is below concurrency {self.concurrency}: workers would sit idle"
            problems.append((("trigger", "max_ack_pending"), text))
        _check(problems)
        return self

    @property
    def module_path(self) -> Path | None:
        """The module's file when ``module`` is a path (resolved against the manifest's
        folder), None when it is a dotted module name."""
        if not self.module.endswith(".py"):
            return None
        path = Path(self.module).expanduser()
        return path if path.is_absolute() or self._root is None else self._root / path


class Manifest(_Model):
    """A validated fn.yaml. Build it with :func:`load_manifest` or :func:`parse_manifest`."""

    version: Literal[1]
    nats: NatsConfig = NatsConfig()
    http: HttpConfig | None = HttpConfig()
    logging: LoggingConfig = LoggingConfig()
    tracing: TracingConfig = TracingConfig()
    streams: dict[str, StreamSpec] = {}
    kv: dict[str, KVSpec] = {}
    object_stores: dict[str, ObjectStoreSpec] = {}
    plugins: list[str] = []
    registry: RegistrySpec = RegistrySpec()
    functions: dict[str, FunctionSpec] = {}
    _path: Path = PrivateAttr(Path("fn.yaml"))
    _warnings: list[ManifestIssue] = PrivateAttr(default_factory=list)
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)
    _index: SubjectIndex = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        self._index = SubjectIndex({name: spec.subjects for name, spec in self.streams.items()})

    @field_validator("streams", "kv", "object_stores", "functions", "plugins", mode="before")
    @classmethod
    def _none_is_empty(cls, value: object, info: ValidationInfo) -> object:
        # `streams:` with every entry commented out is None in YAML; it means "none".
        if value is None:
            return [] if info.field_name == "plugins" else {}
        return value

    @field_validator("http", mode="before")
    @classmethod
    def _http_switch(cls, value: object) -> object:
        if value is True:
            return {}
        return None if value is False else value

    @field_validator("plugins")
    @classmethod
    def _plugins(cls, plugins: list[str]) -> list[str]:
        text = "is not a dotted module name"
        _check([((i,), f"{p!r} {text}") for i, p in enumerate(plugins) if not _DOTTED.fullmatch(p)])
        return plugins

    @field_validator("streams", "kv", "object_stores", "functions")
    @classmethod
    def _names(cls, section: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        what = {"streams": "stream", "functions": "function"}.get(info.field_name or "", "bucket")
        _check([((name,), p) for name in section if (p := name_problem(name, what))])
        return section

    @property
    def path(self) -> Path:
        """The fn.yaml file."""
        return self._path

    @property
    def root(self) -> Path:
        """The folder of fn.yaml: relative paths in the manifest start here."""
        return self._path.parent

    @property
    def warnings(self) -> list[ManifestIssue]:
        """Problems worth a look that do not stop the host (``fnhost validate`` prints them)."""
        return self._warnings

    @property
    def subject_index(self) -> SubjectIndex:
        """Which declared stream captures a subject."""
        return self._index

    def line_of(self, key_path: str) -> int | None:
        """The fn.yaml line of a dotted key path, else of its nearest written parent.

        Keys merged from ``defaults:`` answer with their line in ``defaults:``.
        """
        return line_of(self._lines, key_path)

    def stream_for_subject(self, subject: str) -> str | None:
        """The declared stream that stores the concrete ``subject``, or None."""
        return self._index.stream_for(subject)


def line_of(lines: Mapping[str, int], key_path: str) -> int | None:
    """The line of ``key_path`` in ``lines``, else of its nearest parent that has one."""
    parts = key_path.split(".") if key_path else []
    for end in range(len(parts), -1, -1):
        if (line := lines.get(".".join(parts[:end]))) is not None:
            return line
    return None


def load_manifest(path: str | Path, *, environ: Mapping[str, str] | None = None) -> Manifest:
    """Read and validate an fn.yaml file.

    ``${VAR}`` references are filled from ``environ`` (default: ``os.environ``).
    Raises :class:`ManifestError` listing every problem as ``file:line:key: message``.
    """
    from fnhost.manifest_load import ManifestLoader  # it imports the models above

    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        issue = ManifestIssue(str(path), None, "", f"cannot read the manifest: {reason}")
        raise ManifestError([issue]) from exc
    return ManifestLoader(str(path), file.resolve(), environ).load(text)


def parse_manifest(
    text: str,
    *,
    file: str = "fn.yaml",
    root: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Manifest:
    """Validate fn.yaml ``text``; ``file`` names it in errors, relative paths in it start
    at ``root`` (default: the current directory). Raises :class:`ManifestError`."""
    from fnhost.manifest_load import ManifestLoader  # it imports the models above

    return ManifestLoader(file, (root or Path.cwd()) / Path(file).name, environ).load(text)
