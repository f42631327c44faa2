"""The ``fnhost`` command, run as a subprocess the way a user runs it.

``validate`` on good and broken projects (exit code, ``file:line:key.path``,
never a traceback); ``invoke`` and ``publish`` against a running ``fnhost
dev`` that they find through ``.fnhost/nats.url`` while port 4222 is busy;
``--help`` on every command.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import typer.main
from nats.aio.msg import Msg
from typer.testing import CliRunner

from fnhost.cli import app
from fnhost.embedded import DEFAULT_PORT
from fnhost_sdk.server import NatsServer, free_port
from fnhost_sdk.testing import NatsServerFactory, assert_no_stray_servers
from fnhost_sdk.waiting import wait_for_sync
from support.cli import DevServer, fnhost, hold_port
from support.journal import JOURNAL_HELPER, Journal

GOOD_MODULE = """\
async def handle(data: str) -> str:
    return data.upper()


async def three(a: str, b: str, c: str) -> str:
    return a
"""


def _project(root: Path, manifest: str, files: dict[str, str] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "fn.yaml").write_text(textwrap.dedent(manifest))
    for name, text in {"ok.py": GOOD_MODULE, **(files or {})}.items():
        (root / name).write_text(textwrap.dedent(text))
    return root


def _assert_user_error(result: subprocess.CompletedProcess[str], *expected: str) -> str:
    """Exit 1, each expected text on stderr, no traceback anywhere; the stderr text."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    return result.stderr


# --------------------------------------------------------------------------- help


def _command_paths(group: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command and sub-command of a click group (typer vendors its own click)."""
    for name, command in group.commands.items():
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from _command_paths(command, (*prefix, name))


def test_help_works_for_every_command() -> None:
    paths = list(_command_paths(typer.main.get_command(app)))
    names = {path[0] for path in paths}
    assert {"run", "dev", "validate", "invoke", "publish"} <= names, names
    runner = CliRunner()
    for path in [(), *paths]:
        result = runner.invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "Usage:" in result.output, (path, result.output)


def test_python_dash_m_fnhost_help(tmp_path: Path) -> None:
    result = fnhost("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    for command in ("run", "dev", "validate", "invoke", "publish"):
        assert re.search(rf"^\W*{command}\b", result.stdout, re.MULTILINE), result.stdout


# --------------------------------------------------------------------------- validate

OK_FUNCTION = """\
version: 1
http: false
functions:
  shout:
    module: ok.py
    trigger: {request: shout}
"""


def test_validate_a_good_project_exits_0_and_lists_its_functions(tmp_path: Path) -> None:
    project = _project(tmp_path, OK_FUNCTION)
    result = fnhost("validate", cwd=project)  # fn.yaml in the working directory by default
    assert result.returncode == 0, result.stderr
    assert "shout" in result.stdout and "request shout" in result.stdout
    assert "ok: 1 functions" in result.stdout


BROKEN = {
    "bad-yaml": (
        """\
        version: 1
        functions:
          f:
            module: ok.py
            trigger: {request: a.b
        """,
        {},
        ["fn.yaml:", "invalid YAML"],
    ),
    "unknown-key": (
        """\
        version: 1
        functions:
          f:
            module: ok.py
            trigger: {request: a.b}
            retries: 3
        """,
        {},
        ["fn.yaml:6:functions.f.retries: unknown key 'retries'", "did you mean 'retry'"],
    ),
    "missing-module": (
        """\
        version: 1
        functions:
          f:
            module: nope.py
            trigger: {request: a.b}
        """,
        {},
        ["fn.yaml:4:functions.f.module: function 'f'", "nope.py does not exist"],
    ),
    "missing-handler": (
        """\
        version: 1
        functions:
          f:
            module: ok.py
            handler: absent
            trigger: {request: a.b}
        """,
        {},
        ["fn.yaml:5:functions.f.handler: function 'f'", "no handler 'absent'"],
    ),
    "wrong-signature": (
        """\
        version: 1
        functions:
          f:
            module: ok.py
            handler: three
            trigger: {request: a.b}
        """,
        {},
        ["fn.yaml:5:functions.f.handler: function 'f'", "takes 3 parameters"],
    ),
    "syntax-error": (
        """\
        version: 1
        functions:
          f:
            module: broken.py
            trigger: {request: a.b}
        """,
        {"broken.py": "async def handle(data: str) -> str\n    return data\n"},
        ["fn.yaml:4:functions.f.module: function 'f'", "syntax error", "broken.py:1"],
    ),
    "raises-on-import": (
        """\
        version: 1
        functions:
          f:
            module: boom.py
            trigger: {request: a.b}
        """,
        {"boom.py": "x = 1\nraise RuntimeError('no config')\n"},
        ["fn.yaml:4:functions.f.module: function 'f'", "boom.py:2", "RuntimeError: no config"],
    ),
    "exits-on-import": (
        """\
        version: 1
        functions:
          f:
            module: quits.py
            trigger: {request: a.b}
        """,
        {"quits.py": "import sys\n\nsys.exit(3)\n"},
        [
            "fn.yaml:4:functions.f.module: function 'f'",
            "the module exited during import (sys.exit(3))",
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_validate_reports_user_errors_with_key_path_and_line(tmp_path: Path, case: str) -> None:
    manifest, files, expected = BROKEN[case]
    project = _project(tmp_path, manifest, files)
    result = fnhost("validate", "fn.yaml", cwd=project)
    _assert_user_error(result, *expected)
    assert "ok:" not in result.stdout


def test_validate_reports_every_broken_function_and_a_missing_manifest(tmp_path: Path) -> None:
    project = _project(
        tmp_path,
        """\
        version: 1
        functions:
          one:
            module: nope.py
            trigger: {request: a.one}
          two:
            module: ok.py
            handler: absent
            trigger: {request: a.two}
          fine:
            module: ok.py
            trigger: {request: a.fine}
        """,
    )
    stderr = _assert_user_error(fnhost("validate", cwd=project), "function 'one'", "function 'two'")
    assert "function 'fine'" not in stderr
    _assert_user_error(fnhost("validate", "missing.yaml", cwd=project), "missing.yaml")


# --------------------------------------------------------------------------- run

RUN_MANIFEST = """\
version: 1
http: false
nats:
  url: {url}
  user: fnhost
  password: wrong-password
functions:
  shout:
    module: ok.py
    trigger: {{request: shout}}
"""


def test_options_that_do_not_go_together_are_a_usage_error_exit_2(tmp_path: Path) -> None:
    """Like click's own usage errors (docs/cli.md): the usage line, exit 2."""
    project = _project(tmp_path, STREAM_MANIFEST)
    result = fnhost("run", "--workers", "2", "--reload", cwd=project)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Usage:" in result.stderr and "--reload" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr

    unknown_loop = fnhost("run", "--loop", "trio", cwd=project)
    assert unknown_loop.returncode == 2, (unknown_loop.stdout, unknown_loop.stderr)
    assert "'trio' is not one of auto, uvloop, asyncio" in unknown_loop.stderr


def test_run_with_refused_credentials_exits_1_with_one_clear_line(
    tmp_path: Path, nats_server_factory: NatsServerFactory
) -> None:
    server = nats_server_factory(config_extra='authorization { user: fnhost, password: "right" }')
    project = _project(tmp_path, RUN_MANIFEST.format(url=server.url))
    # Not forever: the server refuses these credentials, retrying cannot help.
    result = fnhost("run", "fn.yaml", cwd=project, timeout=60)
    stderr = _assert_user_error(result, f"127.0.0.1:{server.port}", "Authorization Violation")
    assert sum(line.startswith("error:") for line in stderr.splitlines()) == 1, stderr


def test_run_with_an_invalid_manifest_exits_1_without_connecting(tmp_path: Path) -> None:
    project = _project(tmp_path, BROKEN["unknown-key"][0])
    result = fnhost("run", cwd=project, timeout=60)
    _assert_user_error(result, "fn.yaml:6:functions.f.retries")


# --------------------------------------------------------------------------- against fnhost dev

DEV_MANIFEST = """\
version: 1
nats: {url: embedded}
http: false
streams:
  ORDERS: {subjects: ["orders.>"], duplicate_window: 10m}
functions:
  shout:
    module: ok.py
    trigger: {request: svc.shout}
  broken:
    module: failing.py
    trigger: {request: fails}
  record:
    module: record.py
    trigger: {stream: ORDERS, subjects: [orders.placed], durable: record}
"""

DEV_FILES = {
    "failing.py": """\
        async def handle(data: str) -> str:
            raise ValueError("cannot handle " + data)
    """,
    "record.py": JOURNAL_HELPER
    + """

async def handle(data: str, ctx) -> None:
    note(ctx.config.get("journal", "journal.txt"), "handled", data, ctx.attempt, os.getpid())
""",
}


@pytest.fixture(scope="module")
def dev_project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project served by ``fnhost dev`` while port 4222 is busy; stopped at the end."""
    project = _project(tmp_path_factory.mktemp("dev") / "project", DEV_MANIFEST, DEV_FILES)
    with hold_port(DEFAULT_PORT):
        dev = DevServer(project)
        try:
            dev.wait_ready()
            yield project
        finally:
            code = dev.stop()
    assert code == 0, dev.log()
    assert not (project / ".fnhost" / "nats.url").exists()
    assert_no_stray_servers([], project)


def _dev_url(project: Path) -> str:
    return (project / ".fnhost" / "nats.url").read_text().strip()


def test_dev_takes_another_port_when_4222_is_busy_and_writes_it_down(dev_project: Path) -> None:
    url = _dev_url(dev_project)
    assert re.fullmatch(r"nats://127\.0\.0\.1:\d+", url), url
    assert not url.endswith(f":{DEFAULT_PORT}")


def test_invoke_prints_the_reply(dev_project: Path) -> None:
    result = fnhost("invoke", "shout", "hello there", cwd=dev_project)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "HELLO THERE\n"


def test_invoke_reads_stdin_for_dash(dev_project: Path) -> None:
    result = fnhost("invoke", "shout", "-", cwd=dev_project, input="from stdin")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "FROM STDIN\n"


def test_invoke_by_subject(dev_project: Path) -> None:
    by_subject = fnhost("invoke", "svc.shout", "x", "--timeout", "5", cwd=dev_project)
    assert by_subject.returncode == 0, by_subject.stderr
    assert by_subject.stdout == "X\n"


def test_invoke_an_error_reply_exits_non_zero_with_the_error(dev_project: Path) -> None:
    result = fnhost("invoke", "broken", "payload-9", cwd=dev_project)
    _assert_user_error(result, "500", "ValueError: cannot handle payload-9")
    assert result.stdout == ""


def test_invoke_a_function_that_is_not_request_reply_says_so(dev_project: Path) -> None:
    result = fnhost("invoke", "record", "x", cwd=dev_project)
    _assert_user_error(result, "'record'", "stream trigger", "fnhost publish")


def test_invoke_a_subject_nobody_answers(dev_project: Path) -> None:
    result = fnhost("invoke", "nobody.home", "x", cwd=dev_project)
    _assert_user_error(result, "no function answers on 'nobody.home'")


def test_publish_with_an_id_is_stored_once(dev_project: Path) -> None:
    first = fnhost("publish", "orders.placed", "order-1", "--id", "order-1", cwd=dev_project)
    again = fnhost("publish", "orders.placed", "order-1", "--id", "order-1", cwd=dev_project)
    other = fnhost("publish", "orders.placed", "order-2", "--id", "order-2", cwd=dev_project)
    for result in (first, again, other):
        assert result.returncode == 0, result.stderr
    assert "stored in stream ORDERS" in first.stdout and "duplicate" not in first.stdout
    assert "duplicate" in again.stdout
    seq = re.search(r"sequence (\d+)", first.stdout)
    assert seq is not None and f"sequence {seq.group(1)}" in again.stdout, again.stdout
    assert f"sequence {int(seq.group(1)) + 1}" in other.stdout, other.stdout

    journal = Journal(dev_project / "journal.txt")
    wait_for_sync(
        lambda: journal.items("handled") == {"order-1": 1, "order-2": 1},
        timeout=30,
        message="each published order handled once",
    )


def test_publish_to_a_subject_no_stream_captures(dev_project: Path) -> None:
    result = fnhost("publish", "just.core", "x", cwd=dev_project)
    assert result.returncode == 0, result.stderr
    assert "core NATS" in result.stdout


async def test_publish_reads_stdin_and_the_stream_holds_the_bytes(dev_project: Path) -> None:
    body = json.dumps({"order": 3, "note": "from stdin"})
    result = fnhost("publish", "orders.other", "-", "--id", "stdin-1", cwd=dev_project, input=body)
    assert result.returncode == 0, result.stderr
    seq = re.search(r"sequence (\d+)", result.stdout)
    assert seq is not None, result.stdout
    nc = await nats.connect(_dev_url(dev_project))
    try:
        stored = await nc.jetstream().get_msg("ORDERS", int(seq.group(1)))
    finally:
        await nc.close()
    assert stored.data == body.encode()
    assert stored.headers is not None and stored.headers.get("Nats-Msg-Id") == "stdin-1"


STREAM_MANIFEST = """\
version: 1
http: false
streams:
  ODD: {subjects: ["odd.>"]}
functions:
  shout:
    module: ok.py
    trigger: {request: shout}
"""


async def test_publish_answered_by_something_else_than_a_stream_says_so(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """The manifest's stream ODD is not on the server; a core responder answers on odd.x."""
    project = _project(tmp_path, STREAM_MANIFEST)
    nc = await nats.connect(nats_server.url)
    try:

        async def answer(msg: Msg) -> None:
            await msg.respond(b"HELLO, not a PubAck")

        await nc.subscribe("odd.x", cb=answer)
        await nc.flush()
        args = ("publish", "odd.x", "x", "--nats", nats_server.url)
        result = await asyncio.to_thread(fnhost, *args, cwd=project)
    finally:
        await nc.close()
    _assert_user_error(result, "'odd.x'", "not a JetStream PubAck", "HELLO, not a PubAck")


def test_client_commands_without_a_running_dev_server_say_so(tmp_path: Path) -> None:
    project = _project(tmp_path, DEV_MANIFEST, DEV_FILES)
    for args in (("invoke", "shout", "x"), ("publish", "orders.placed", "x")):
        result = fnhost(*args, cwd=project)
        _assert_user_error(result, "no embedded nats-server is running", "fnhost dev")


def test_client_commands_connect_with_the_manifests_credentials(
    tmp_path: Path, nats_server_factory: NatsServerFactory
) -> None:
    server = nats_server_factory(config_extra='authorization { user: fnhost, password: "right" }')
    manifest = RUN_MANIFEST.format(url=server.url).replace("wrong-password", "right")
    project = _project(tmp_path, manifest)

    result = fnhost("publish", "anything", "x", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "published to anything" in result.stdout

    wrong = _project(tmp_path / "wrong", RUN_MANIFEST.format(url=server.url))
    result = fnhost("publish", "anything", "x", cwd=wrong)
    _assert_user_error(result, f"cannot connect to NATS at {server.url}", "Authorization")


def test_client_commands_give_up_on_an_unreachable_server_with_one_line(tmp_path: Path) -> None:
    project = _project(tmp_path, DEV_MANIFEST, DEV_FILES)
    dead = f"nats://127.0.0.1:{free_port()}"
    for args in (("invoke", "shout", "x"), ("publish", "orders.placed", "x"), ("ls",)):
        result = fnhost(*args, "--nats", dead, cwd=project)
        stderr = _assert_user_error(result, f"cannot connect to NATS at {dead}")
        assert sum(line.startswith("error:") for line in stderr.splitlines()) == 1, stderr


def test_dev_serves_http_on_another_port_when_the_manifests_is_taken(tmp_path: Path) -> None:
    """A second project under `fnhost dev` is not an error; under `run` a taken port is."""
    taken = free_port()
    manifest = DEV_MANIFEST.replace("http: false", f"http: {{port: {taken}}}")
    project = _project(tmp_path / "dev", manifest, DEV_FILES)
    with hold_port(taken):
        dev = DevServer(project)
        try:
            dev.wait_ready()
            found = re.search(rf"HTTP port {taken} is taken; serving on (\d+) instead", dev.log())
            assert found, dev.log()
            with urllib.request.urlopen(f"http://127.0.0.1:{found[1]}/healthz", timeout=10) as r:
                assert r.status == 200
        finally:
            assert dev.stop() == 0, dev.log()

        run = _project(tmp_path / "run", manifest, DEV_FILES)
        result = fnhost("run", "fn.yaml", cwd=run, timeout=60)
        _assert_user_error(result, f"cannot serve HTTP on 127.0.0.1:{taken}", "http.port")


async def test_publish_to_a_full_stream_fails_at_once_with_the_reason(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """JetStream refuses a message over max_msgs (discard new) with err_code 10077: final."""
    project = _project(tmp_path, STREAM_MANIFEST)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="ODD", subjects=["odd.>"], max_msgs=1, discard="new")
        await js.publish("odd.x", b"first")
        args = ("publish", "odd.x", "second", "--nats", nats_server.url)
        result = await asyncio.to_thread(fnhost, *args, cwd=project)
    finally:
        await nc.close()
    _assert_user_error(result, "'odd.x'", "maximum messages exceeded")


def test_rm_and_rollback_without_a_registry_say_nothing_is_deployed(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    project = _project(tmp_path, STREAM_MANIFEST)
    for args in (("rm", "shout"), ("rollback", "shout")):
        result = fnhost(*args, "--no-wait", "--nats", nats_server.url, cwd=project)
        stderr = _assert_user_error(result, "nothing is deployed")
        assert "cannot reach NATS" not in stderr
