"""Build artifacts from source text and read host status, for the registry tests."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NatsClient

from fnhost_sdk.artifact import Artifact, build_artifact, import_module_file
from fnhost_sdk.deploy import Registry, host_documents


def build_from_source(
    root: Path, files: Mapping[str, str], module: str = "functions/greet.py"
) -> Artifact:
    """Write ``files`` under ``root``, import ``module`` from there and build its artifact.

    The project's modules are dropped from ``sys.modules`` afterwards, so the next
    build (another version, another root) imports its own.
    """
    for name, text in {"functions/__init__.py": "", **files}.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    _forget("functions")
    try:
        artifact, _ = build_artifact(import_module_file(root / module, root), root=root)
    finally:
        _forget("functions")
        if str(root.resolve()) in sys.path:
            sys.path.remove(str(root.resolve()))
    return artifact


def _forget(package: str) -> None:
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


async def function_report(nc: NatsClient, name: str) -> dict[str, dict[str, Any]]:
    """Each live host's status entry for ``name``, by host id."""
    docs = await host_documents(nc, Registry())
    return {host: doc["functions"][name] for host, doc in docs.items() if name in doc["functions"]}


def reply_json(data: bytes) -> dict[str, Any]:
    return dict(json.loads(data))
