"""The deploy artifact and its signed spec, shared by ``fnhost deploy``, the SDK and the host.

An **artifact** is a small zip (stored, fixed timestamps: the same code gives
the same bytes) holding

- ``module.pickle``: the function module pickled **by value** with cloudpickle.
  Modules it reaches (through its globals) whose files live under the project
  root travel by value too; installed packages go by reference and must exist
  on the host;
- ``source/<path>``: the source text of each module that travels by value;
- ``fnhost-artifact.json``: format, module name, Python and cloudpickle versions.

A **spec** is the registry entry (a JetStream KV value, key = function name)::

    {"spec": {"format": 1, "name", "function": {trigger and settings},
              "artifact": object name, "sha256", "python": "3.11",
              "cloudpickle": "3.1.3", "deployed_by": "U...", "deployed_at": ISO-8601},
     "signature": base64url(Ed25519 over canonical_json(spec)),
     "rollback_of": null | the revision it re-puts}

``rollback_of`` is outside the signature: a rollback re-puts an earlier signed
spec unchanged. The receiving side checks, in this order and before anything
is unpickled: the signature by a trusted key (:func:`verify_envelope`), the
artifact size, its SHA-256 against the signed digest, then the Python
major.minor and the cloudpickle major version (:func:`verify_artifact`).
Only then does :func:`load_module` unpickle.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib.util
import io
import json
import os
import sys
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

import cloudpickle
import nacl.exceptions
import nacl.signing
import nkeys

from fnhost_sdk.errors import FnhostError

__all__ = [
    "FORMAT",
    "Artifact",
    "DeployRefused",
    "SignedSpec",
    "build_artifact",
    "canonical_json",
    "import_module_file",
    "keygen",
    "load_module",
    "python_version",
    "read_seed",
    "sign_spec",
    "verify_artifact",
    "verify_envelope",
]

FORMAT = 1
_META = "fnhost-artifact.json"
_PICKLE = "module.pickle"
_SOURCE = "source/"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


class DeployRefused(FnhostError):
    """A host (or the CLI) refuses a deploy: ``code`` says which check failed.

    Codes: ``unsigned``, ``untrusted``, ``bad-signature``, ``invalid-spec``,
    ``oversize``, ``digest``, ``python``, ``cloudpickle``, ``format``,
    ``missing-package``, ``load``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def python_version() -> str:
    """This interpreter's major.minor, as artifacts record it."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def canonical_json(value: Any) -> bytes:
    """The bytes a signature covers: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# -- keys


def keygen() -> tuple[bytes, str]:
    """A new user nkey: its seed (``SU...``) and public key (``U...``)."""
    seed: bytes = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    return seed, public_key(seed)


def public_key(seed: bytes) -> str:
    """The public key (``U...``) of a user nkey seed."""
    key: bytes = nkeys.from_seed(bytearray(seed)).public_key
    return key.decode()


def read_seed(path: str | os.PathLike[str]) -> bytes:
    """Read a user nkey seed file (``fnhost keygen`` writes one); raises :class:`DeployRefused`."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise DeployRefused("unsigned", f"cannot read signing key {path}: {exc.strerror}") from None
    seeds = [line.strip() for line in text.splitlines() if line.strip().startswith(b"SU")]
    if not seeds:
        raise DeployRefused("unsigned", f"{path} holds no user nkey seed (SU...)")
    try:
        public_key(seeds[0])
    except (nkeys.NkeysError, ValueError, binascii.Error):
        raise DeployRefused("unsigned", f"{path}: the seed is not a valid user nkey") from None
    return seeds[0]


def _verify_key(public: str) -> nacl.signing.VerifyKey:
    try:
        raw = base64.b32decode(public.encode())
    except (binascii.Error, ValueError):
        raise ValueError(f"{public!r} is not an nkey") from None
    if len(raw) != 35 or raw[0] != nkeys.PREFIX_BYTE_USER:
        raise ValueError(f"{public!r} is not a user public nkey")
    if nkeys.crc16(bytearray(raw[:-2])) != int.from_bytes(raw[-2:], "little"):
        raise ValueError(f"{public!r} has a bad checksum")
    return nacl.signing.VerifyKey(raw[1:-2])


# -- the signed spec


@dataclass(frozen=True, slots=True)
class SignedSpec:
    """A verified registry entry (see the module docstring for the fields)."""

    name: str
    function: Mapping[str, Any]
    artifact: str
    sha256: str
    python: str
    cloudpickle: str
    deployed_by: str
    deployed_at: str
    rollback_of: int | None = None

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], rollback_of: int | None) -> SignedSpec:
        return cls(
            name=fields["name"],
            function=fields["function"],
            artifact=fields["artifact"],
            sha256=fields["sha256"],
            python=fields["python"],
            cloudpickle=fields["cloudpickle"],
            deployed_by=fields["deployed_by"],
            deployed_at=fields["deployed_at"],
            rollback_of=rollback_of,
        )


def sign_spec(
    *,
    name: str,
    function: Mapping[str, Any],
    artifact: Artifact,
    object_name: str,
    seed: bytes,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The registry entry (an envelope dict) for ``artifact``, signed with ``seed``."""
    fields = {
        "format": FORMAT,
        "name": name,
        "function": dict(function),
        "artifact": object_name,
        "sha256": artifact.sha256,
        "python": artifact.python,
        "cloudpickle": artifact.cloudpickle,
        "deployed_by": public_key(seed),
        "deployed_at": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
    }
    signature = nkeys.from_seed(bytearray(seed)).sign(canonical_json(fields))
    return {
        "spec": fields,
        "signature": base64.urlsafe_b64encode(signature).decode(),
        "rollback_of": None,
    }


def verify_envelope(data: bytes, key: str, trusted_keys: Iterable[str]) -> SignedSpec:
    """Parse a registry entry stored under ``key`` and check its signature by a trusted key."""
    try:
        envelope = json.loads(data)
        fields = envelope["spec"]
        if not isinstance(fields, dict):
            raise TypeError("spec is not an object")
    except (ValueError, TypeError, KeyError) as exc:
        raise DeployRefused("invalid-spec", f"the registry entry is not a spec: {exc}") from None
    signature = envelope.get("signature")
    if not signature:
        raise DeployRefused("unsigned", "the spec is unsigned")
    signer = fields.get("deployed_by")
    if not isinstance(signer, str) or signer not in set(trusted_keys):
        raise DeployRefused("untrusted", f"signed by {signer!r}, which is not in trusted_keys")
    try:
        _verify_key(signer).verify(canonical_json(fields), base64.urlsafe_b64decode(signature))
    except (ValueError, TypeError, binascii.Error, nacl.exceptions.BadSignatureError):
        raise DeployRefused("bad-signature", f"the signature by {signer} does not verify") from None
    if fields.get("format") != FORMAT:
        raise DeployRefused("format", f"spec format {fields.get('format')!r}, expected {FORMAT}")
    if fields.get("name") != key:
        raise DeployRefused("invalid-spec", f"the spec names {fields.get('name')!r}, not {key!r}")
    rollback_of = envelope.get("rollback_of")
    try:
        return SignedSpec.from_fields(fields, rollback_of if isinstance(rollback_of, int) else None)
    except KeyError as exc:
        raise DeployRefused("invalid-spec", f"the spec lacks {exc.args[0]!r}") from None


def verify_artifact(spec: SignedSpec, data: bytes, max_size: int) -> None:
    """Check fetched artifact bytes against the verified ``spec``; raises :class:`DeployRefused`.

    Size, then SHA-256, then Python major.minor, then cloudpickle major version.
    """
    if len(data) > max_size:
        raise DeployRefused("oversize", f"artifact is {len(data)} bytes, over {max_size}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != spec.sha256:
        text = f"artifact SHA-256 {digest[:12]}... is not the signed {spec.sha256[:12]}..."
        raise DeployRefused("digest", f"{text} (tampered?)")
    if spec.python != python_version():
        raise DeployRefused(
            "python", f"built for Python {spec.python}, this host runs {python_version()}"
        )
    ours = cloudpickle.__version__.split(".")[0]
    if spec.cloudpickle.split(".")[0] != ours:
        raise DeployRefused(
            "cloudpickle",
            f"built with cloudpickle {spec.cloudpickle}, this host has {cloudpickle.__version__}",
        )


# -- the artifact


@dataclass(frozen=True, slots=True)
class Artifact:
    """Artifact bytes and what they hold."""

    data: bytes
    module: str
    sources: Mapping[str, str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def python(self) -> str:
        return python_version()

    @property
    def cloudpickle(self) -> str:
        return str(cloudpickle.__version__)


def import_module_file(path: Path, root: Path) -> ModuleType:
    """Import ``path`` under its dotted name below ``root`` (``functions/pay.py`` ->
    ``functions.pay``), with ``root`` on ``sys.path`` so its sibling imports resolve."""
    path = path.resolve()
    root = root.resolve()
    try:
        name = ".".join(path.relative_to(root).with_suffix("").parts)
    except ValueError:
        name = path.stem
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def build_artifact(
    target: ModuleType | Callable[..., Any], *, root: Path | None = None
) -> tuple[Artifact, str | None]:
    """Pickle ``target`` (a module, or a function) by value into an artifact.

    A function defined in ``__main__`` (a script, a notebook) travels alone in a
    module of its own; a function from an imported module brings its module.
    Returns the artifact and the handler name (None when ``target`` is a module).
    """
    handler: str | None = None
    if isinstance(target, ModuleType):
        module = target
    else:
        handler = target.__name__
        home = sys.modules.get(target.__module__)
        if target.__module__ == "__main__" or home is None or not _file_of(home):
            module = ModuleType(f"fnhost_deployed_{handler}")
            setattr(module, handler, target)
        else:
            module = home
    file = _file_of(module)
    base = (root or (file.parent if file else Path.cwd())).resolve()
    local = _local_modules(module, base)
    registered = set(cloudpickle.list_registry_pickle_by_value())
    added = [m for m in local if m.__name__ in sys.modules and m.__name__ not in registered]
    for each in added:
        cloudpickle.register_pickle_by_value(each)
    try:
        pickled = cloudpickle.dumps(module, protocol=5)
    finally:
        for each in added:
            cloudpickle.unregister_pickle_by_value(each)
    sources: dict[str, str] = {}
    for each in local:
        path = _file_of(each)
        if path is not None:
            sources[path.relative_to(base).as_posix()] = path.read_text(errors="replace")
    meta = {
        "format": FORMAT,
        "module": module.__name__,
        "python": python_version(),
        "cloudpickle": cloudpickle.__version__,
        "sources": sorted(sources),
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        _write(archive, _META, canonical_json(meta))
        _write(archive, _PICKLE, pickled)
        for name in sorted(sources):
            _write(archive, _SOURCE + name, sources[name].encode())
    artifact = Artifact(data=buffer.getvalue(), module=module.__name__, sources=sources)
    return artifact, handler


def read_sources(data: bytes) -> dict[str, str]:
    """The source texts in (verified) artifact bytes, by path; nothing is unpickled."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {
            name.removeprefix(_SOURCE): archive.read(name).decode(errors="replace")
            for name in archive.namelist()
            if name.startswith(_SOURCE)
        }


def load_module(data: bytes) -> ModuleType:
    """Unpickle the module in **verified** artifact bytes, in a fresh namespace.

    Call only after :func:`verify_envelope` and :func:`verify_artifact`. Raises
    :class:`DeployRefused` (``format`` or ``missing-package``, naming it).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            meta = json.loads(archive.read(_META))
            pickled = archive.read(_PICKLE)
    except (zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise DeployRefused("format", f"not an fnhost artifact: {exc}") from None
    if meta.get("format") != FORMAT:
        raise DeployRefused("format", f"artifact format {meta.get('format')!r}, want {FORMAT}")
    try:
        module = cloudpickle.loads(pickled)
    except ModuleNotFoundError as exc:
        raise DeployRefused(
            "missing-package", f"needs {exc.name!r}, which is not installed on this host"
        ) from None
    except Exception as exc:
        raise DeployRefused("load", f"unpickling failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, ModuleType):
        raise DeployRefused("format", f"the artifact holds a {type(module).__name__}, not a module")
    _complete_globals(module)
    return module


def _complete_globals(module: ModuleType) -> None:
    """Give every by-value function the module's names it did not capture.

    cloudpickle keeps only the globals a function's code reads; names used only
    in (string) annotations would be missing and ``get_type_hints`` would fail.
    """
    names = vars(module)
    for value in list(names.values()):
        if isinstance(value, FunctionType) and value.__module__ == module.__name__:
            scope = value.__globals__
            if scope is not names:
                for key, item in names.items():
                    scope.setdefault(key, item)


def _write(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
    info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def _file_of(module: ModuleType) -> Path | None:
    file = getattr(module, "__file__", None)
    return Path(file).resolve() if isinstance(file, str) and file.endswith(".py") else None


def _import_root(module: ModuleType) -> Path | None:
    """The ``sys.path`` folder ``module`` was imported from (its file, up one level per
    dotted part; packages one more)."""
    file = _file_of(module)
    if file is None:
        return None
    levels = module.__name__.count(".") + (2 if file.name == "__init__.py" else 1)
    return file.parents[levels - 1] if levels <= len(file.parents) else None


def _local_modules(module: ModuleType, root: Path) -> list[ModuleType]:
    """``module`` and every module reachable through its globals that was imported
    from ``root`` itself (project files; installed and editable packages live elsewhere)."""

    def is_local(candidate: ModuleType) -> bool:
        return candidate is module or _import_root(candidate) == root

    found: dict[str, ModuleType] = {}
    todo = [module]
    while todo:
        current = todo.pop()
        if current.__name__ in found:
            continue
        found[current.__name__] = current
        for value in list(vars(current).values()):
            owner: ModuleType | None = None
            if isinstance(value, ModuleType):
                owner = value
            elif isinstance(value, FunctionType | type):
                owner = sys.modules.get(getattr(value, "__module__", "") or "")
            if owner is not None and owner.__name__ not in found and is_local(owner):
                todo.append(owner)
    return list(found.values())


def now_iso() -> str:
    """The current UTC time as ISO-8601 seconds (status documents use it)."""
    return datetime.now(UTC).isoformat(timespec="seconds")
