"""Fixtures for remote-deploy tests: a signing key, function sources, a registry manifest."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from fnhost_sdk.artifact import keygen


@dataclass(frozen=True)
class SigningKey:
    seed: bytes
    public: str
    path: Path


@pytest.fixture
def signing_key(tmp_path: Path) -> SigningKey:
    seed, public = keygen()
    path = tmp_path / "deploy.nk"
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return SigningKey(seed, public, path)


@pytest.fixture
def other_key(tmp_path: Path) -> SigningKey:
    seed, public = keygen()
    path = tmp_path / "other.nk"
    path.write_bytes(seed + b"\n")
    return SigningKey(seed, public, path)


def greeter(version: str, *, subject: str = "greet", extra: str = "") -> str:
    """A request function whose replies say which version and process answered."""
    return textwrap.dedent(
        f'''
        import os

        from fnhost_sdk import function

        from functions.helpers import tag

        {extra}

        @function(request="{subject}")
        async def handle(name: str) -> dict:
            return {{"hello": name, "version": tag("{version}"), "pid": os.getpid()}}
        '''
    )


HELPERS = """
def tag(version: str) -> str:
    return version
"""


def registry_manifest(trusted: list[str], *, max_size: str = "8MiB", extra: str = "") -> str:
    keys = ", ".join(trusted)
    return textwrap.dedent(
        f"""
        version: 1
        http: false
        registry:
          enabled: true
          trusted_keys: [{keys}]
          max_artifact_size: {max_size}
        """
    ) + textwrap.dedent(extra)
