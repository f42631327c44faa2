"""Helpers shared by the integration tests: certificates, NATS JWTs, CLI runs."""

import os
from typing import Any

import pytest

from fnhost.host import Host


def module_of(host: Host, function: str = "work") -> Any:
    """The module object the host loaded for ``function`` (its globals are the handler's)."""
    runtime = host.functions[function].runtime
    assert runtime is not None, host.functions[function].error
    return runtime.loaded.module


def require(what: str, found: bool) -> None:
    """Skip (developer machine) or fail (``CI=true``) when ``what`` is not installed."""
    if found:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is not installed, and CI must run these tests", pytrace=False)
    pytest.skip(f"{what} is not installed")
