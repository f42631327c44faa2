"""fnhost.reload.Reloader on a running host and a real nats-server, without a file
watcher: the test writes a file and hands the change to ``Reloader.apply`` itself."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient

from conftest import HostFactory
from fnhost.host import Host
from fnhost.http import functions_json, readiness
from fnhost.reload import Reloader

pytestmark = pytest.mark.nats

MANIFEST = """\
version: 1
http: false
functions:
  hello:
    module: hello.py
    trigger: {request: hello}
"""


def versioned(version: str, extra: str = "") -> str:
    return textwrap.dedent(
        f"""\
        {extra}
        VERSION = {version!r}

        async def handle(data: dict) -> dict:
            return {{"version": VERSION}}
        """
    )


async def ask(nc: NatsClient, subject: str = "hello", data: Any = None) -> dict[str, Any]:
    msg = await nc.request(subject, json.dumps(data or {}).encode(), timeout=5)
    assert not msg.headers, msg.headers  # no Nats-Service-Error
    result: dict[str, Any] = json.loads(msg.data)
    return result


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path.resolve()


async def save(reloader: Reloader, path: Path, text: str) -> None:
    await reloader.apply({write(path, text)})


async def dump_functions(host: Host) -> dict[str, dict[str, Any]]:
    class NoDeadLetters:
        async def depth(self, subject: str) -> int | None:
            return None

    return {fn["name"]: fn for fn in await functions_json(host, NoDeadLetters())}  # type: ignore[arg-type]


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_saved_module_answers_the_next_request(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(MANIFEST, {"hello.py": versioned("v1")})
    reloader = Reloader(host)
    first = host.functions["hello"].runtime
    assert await ask(nc) == {"version": "v1"}
    # Same length, same second: stale bytecode would answer v1 again.
    await save(reloader, host.manifest.root / "hello.py", versioned("v2"))
    assert await ask(nc) == {"version": "v2"}
    runtime = host.functions["hello"].runtime
    assert runtime is not None and first is not None
    assert runtime.version != first.version
    assert first.loaded.module.VERSION == "v1"  # the old version's module is untouched
    assert host.functions["hello"].trigger is not None
    assert host.functions["hello"].trigger.runtime is runtime


async def test_a_changed_local_import_reloads_the_functions_using_it(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    manifest = MANIFEST + "  other:\n    module: other.py\n    trigger: {request: other}\n"
    files = {
        "greeting_4a.py": "from money_4a import CURRENCY\nTEXT = 'hi ' + CURRENCY\n",
        "money_4a.py": "CURRENCY = 'EUR'\n",
        "hello.py": """\
            import greeting_4a

            async def handle(data: dict) -> dict:
                return {"text": greeting_4a.TEXT}
        """,
        "other.py": "async def handle(data: dict) -> dict:\n    return {'other': 1}\n",
    }
    host = await host_factory(manifest, files)
    reloader = Reloader(host)
    other = host.functions["other"].runtime
    assert await ask(nc) == {"text": "hi EUR"}
    # A module two imports away: both local modules run anew, the unrelated function stays.
    todo = await reloader.apply(set())
    assert todo.empty
    await save(reloader, host.manifest.root / "money_4a.py", "CURRENCY = 'CHF'\n")
    assert await ask(nc) == {"text": "hi CHF"}
    assert host.functions["other"].runtime is other


@pytest.fixture
def gate() -> Iterator[types.SimpleNamespace]:
    """Events a handler (of any version) can reach: a module outside the project."""
    name = "fnhost_test_reload_gate"
    module = types.ModuleType(name)
    module.started = asyncio.Event()  # type: ignore[attr-defined]
    module.release = asyncio.Event()  # type: ignore[attr-defined]
    sys.modules[name] = module
    yield types.SimpleNamespace(started=module.started, release=module.release)  # type: ignore[attr-defined]
    del sys.modules[name]


async def test_in_flight_work_finishes_on_the_old_version(
    host_factory: HostFactory, nc: NatsClient, gate: types.SimpleNamespace
) -> None:
    slow = """\
        import sys
        VERSION = {version!r}

        async def handle(data: dict) -> dict:
            if data.get("wait"):
                gate = sys.modules["fnhost_test_reload_gate"]
                gate.started.set()
                await gate.release.wait()
            return {{"version": VERSION}}
    """
    host = await host_factory(MANIFEST, {"hello.py": slow.format(version="v1")})
    reloader = Reloader(host)
    waiting = asyncio.ensure_future(ask(nc, data={"wait": True}))
    await asyncio.wait_for(gate.started.wait(), 10)
    await save(
        reloader, host.manifest.root / "hello.py", textwrap.dedent(slow.format(version="v2"))
    )
    assert await ask(nc) == {"version": "v2"}  # the next message runs the new code
    assert not waiting.done()
    gate.release.set()
    assert await waiting == {"version": "v1"}  # the one in flight finished on the old


BROKEN = {
    "syntax": ("VERSION = 'v2'\ndef handle(data: dict) -> dict\n    return {}\n", "syntax error"),
    "import": (
        "import definitely_not_installed_4a\nasync def handle(data: dict) -> dict: ...\n",
        "ModuleNotFoundError",
    ),
    "raises": ("def helper():\n    return 1 / 0\nhelper()\n", "ZeroDivisionError"),
    "no handler": ("async def other(data: dict) -> dict: ...\n", "has no handler 'handle'"),
    "bad signature": ("async def handle() -> dict: ...\n", "must take the payload"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
async def test_a_broken_save_keeps_the_old_version_and_says_why_once(
    host_factory: HostFactory, nc: NatsClient, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    source, why = BROKEN[kind]
    host = await host_factory(MANIFEST, {"hello.py": versioned("v1")})
    reloader = Reloader(host)
    path = host.manifest.root / "hello.py"
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fnhost"):
        await save(reloader, path, source)
    assert await ask(nc) == {"version": "v1"}

    logged = errors_logged(caplog)
    assert len(logged) == 1, logged  # once, not once per component
    assert why in logged[0] and "previous version keeps running" in logged[0]
    assert re.match(r"fn.yaml:\d+:functions\.hello\.(module|handler): ", logged[0])
    if kind in ("raises", "import"):
        assert "Traceback (most recent call last)" in logged[0]
        assert str(path) in logged[0].split("Traceback", 1)[1]
    if kind == "syntax":
        assert "^" in logged[0]  # Python's caret under the mistake

    state = host.functions["hello"]
    assert state.status == "running" and state.error is not None and why in state.error
    listed = (await dump_functions(host))["hello"]
    assert listed["status"] == "running" and why in listed["error"]
    reasons = readiness(host)
    assert any(r.startswith("reload:hello:") and why in r for r in reasons), reasons

    await save(reloader, path, versioned("v3"))
    assert await ask(nc) == {"version": "v3"}
    assert state.error is None
    assert (await dump_functions(host))["hello"]["error"] is None
    assert readiness(host) == []


async def test_a_function_that_never_loaded_starts_once_fixed(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(MANIFEST, {"hello.py": "oops(\n"})
    assert host.functions["hello"].status == "failed"
    assert any(r.startswith("function hello failed") for r in readiness(host))
    reloader = Reloader(host)
    await save(reloader, host.manifest.root / "hello.py", versioned("v1"))
    assert await ask(nc) == {"version": "v1"}
    assert readiness(host) == []


async def test_creating_a_missing_import_fixes_the_function(
    host_factory: HostFactory, nc: NatsClient
) -> None:
    host = await host_factory(MANIFEST, {"hello.py": versioned("v1", "import later_4a")})
    assert host.functions["hello"].status == "failed"
    reloader = Reloader(host)
    await save(reloader, host.manifest.root / "later_4a.py", "")
    assert await ask(nc) == {"version": "v1"}
