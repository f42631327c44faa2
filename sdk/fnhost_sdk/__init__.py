"""fnhost_sdk: what function authors and calling services import.

Function authors: :class:`Context`, :class:`Retry`, :class:`Reject`.
Callers: :class:`Client` and :class:`ServiceError`. Deploying from Python:
:func:`deploy` and the :func:`function` decorator (:mod:`fnhost_sdk.deploy`).
Tests: the pytest plugin :mod:`fnhost_sdk.testing` (fixtures ``nats_server``, ``nats_cluster``).

This package must stay light: it imports nats-py and pydantic, never the
host's HTTP, metrics or reload dependencies.
"""

from fnhost_sdk.client import Client
from fnhost_sdk.context import Context
from fnhost_sdk.deploy import deploy, function
from fnhost_sdk.errors import FnhostError, PayloadError, Reject, Retry, ServiceError

__all__ = [
    "Client",
    "Context",
    "FnhostError",
    "PayloadError",
    "Reject",
    "Retry",
    "ServiceError",
    "deploy",
    "function",
]
