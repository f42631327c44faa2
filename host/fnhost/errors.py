"""One typed hierarchy for the host. nats-py errors are mapped at the boundary
where they are caught, never swallowed."""

from __future__ import annotations

from dataclasses import dataclass

from fnhost_sdk.artifact import DeployRefused
from fnhost_sdk.errors import FnhostError, PayloadError, Reject, Retry, ServiceError

__all__ = [
    "ConfigError",
    "DeployRefused",
    "FnhostError",
    "HandlerTimeout",
    "LoadError",
    "ManifestError",
    "ManifestIssue",
    "PayloadError",
    "Reject",
    "Retry",
    "ServiceError",
]


@dataclass(frozen=True, slots=True)
class ManifestIssue:
    """One problem in a manifest: where it is and what is wrong."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}:{self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ManifestError(FnhostError):
    """fn.yaml is invalid; ``issues`` holds every problem found, each with file:line:key."""

    def __init__(self, issues: list[ManifestIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(issue) for issue in issues))


class LoadError(FnhostError):
    """A function module could not be imported, or its handler is missing or unfit."""


class ConfigError(FnhostError):
    """A runtime setting outside fn.yaml (a CLI flag, an environment variable) is wrong."""


class HandlerTimeout(FnhostError):
    """The handler ran past the function's ``timeout`` and was cancelled."""
