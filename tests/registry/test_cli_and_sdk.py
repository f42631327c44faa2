"""``fnhost keygen``, the CLI's local checks before anything is uploaded, and SDK ``deploy``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient

from conftest import HostFactory
from fnhost_sdk import deploy
from fnhost_sdk.artifact import public_key, read_seed

from .conftest import SigningKey, registry_manifest


def fnhost(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NATS_URL": "nats://127.0.0.1:1"}  # never reached by these checks
    command = [sys.executable, "-m", "fnhost", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=60, env=env)


def test_keygen_writes_a_private_seed_and_prints_its_public_key(tmp_path: Path) -> None:
    result = fnhost(tmp_path, "keygen", "deploy.nk")
    assert result.returncode == 0, result.stderr
    path = tmp_path / "deploy.nk"
    assert path.stat().st_mode & 0o777 == 0o600
    assert result.stdout.strip() == public_key(read_seed(path))
    again = fnhost(tmp_path, "keygen", "deploy.nk")
    assert again.returncode == 1 and "exists" in again.stderr


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("async def handle(data: bytes) -> bytes:\n    return data\n", "no trigger for 'fn'"),
        ("def broken(:\n", "syntax error"),
        ("import no_such_module_anywhere\n", "ModuleNotFoundError"),
        (
            "from fnhost_sdk import function\n\n@function(request='x')\n"
            "async def other(data: bytes) -> bytes:\n    return data\n",
            "",
        ),
    ],
)
def test_deploy_checks_the_module_before_uploading(
    tmp_path: Path, signing_key: SigningKey, source: str, expected: str
) -> None:
    (tmp_path / "fn.py").write_text(source)
    args = ("deploy", "fn.py", "--sign-key", str(signing_key.path), "--no-wait")
    if not expected:
        # Decorated `other`, deployed under the file's name: fine locally, then NATS is
        # unreachable (port 1) and that is the only error.
        result = fnhost(tmp_path, *args)
        assert result.returncode == 1
        assert "cannot connect to NATS at nats://127.0.0.1:1" in result.stderr
        return
    result = fnhost(tmp_path, *args)
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_deploy_needs_a_key(tmp_path: Path) -> None:
    (tmp_path / "fn.py").write_text("async def handle(data: bytes) -> bytes:\n    return data\n")
    env_less = fnhost(tmp_path, "deploy", "fn.py", "--request", "x")
    assert env_less.returncode == 1 and "FNHOST_SIGN_KEY" in env_less.stderr


@pytest.mark.nats
async def test_sdk_deploys_a_notebook_function(
    host_factory: HostFactory, nc: NatsClient, signing_key: SigningKey, nats_url: str
) -> None:
    await host_factory(registry_manifest([signing_key.public]))
    notebook = {"__name__": "__main__"}
    exec(
        textwrap.dedent(
            """
            from fnhost_sdk import function

            GREETING = "hi"

            @function(request="nb.hello")
            async def hello(name: str) -> str:
                return f"{GREETING} {name}"
            """
        ),
        notebook,
    )
    result = await deploy(notebook["hello"], nats=nats_url, sign_key=signing_key.path, wait=20)
    assert result.name == "hello" and result.revision >= 1
    assert [r.state for r in result.reports] == ["running"] and not result.refused
    reply = await nc.request("nb.hello", b"ann", timeout=5)
    assert reply.data == b"hi ann"
