"""Helpers shared by the integration tests: certificates, NATS JWTs, CLI runs."""

import os

import pytest


def require(what: str, found: bool) -> None:
    """Skip (developer machine) or fail (``CI=true``) when ``what`` is not installed."""
    if found:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is not installed, and CI must run these tests", pytrace=False)
    pytest.skip(f"{what} is not installed")
