"""fnhost.loader: import a function module, find its handler, read its signature.

Unit tests: no NATS. Every error names the function, the fn.yaml key and its
line, and (for import errors) the file:line inside the module.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fnhost.errors import LoadError
from fnhost.loader import LoadedFunction, load_function
from fnhost.manifest import Manifest, load_manifest
from fnhost_sdk.codec import decoder_for


@pytest.fixture(autouse=True)
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what loading does to sys.path and sys.modules."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def project(
    root: Path, files: dict[str, str], *, module: str = "fn.py", handler: str = "handle"
) -> Manifest:
    """Write ``files`` and an fn.yaml with one request function ``f``; load the manifest.

    The function's ``module:`` is on line 5 and its ``handler:`` on line 6.
    """
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    (root / "fn.yaml").write_text(
        "version: 1\n"
        "http: false\n"
        "functions:\n"
        "  f:\n"
        f"    module: {module}\n"
        f"    handler: {handler}\n"
        "    trigger: {request: t.f}\n"
    )
    return load_manifest(root / "fn.yaml")


def load(manifest: Manifest) -> LoadedFunction:
    return load_function(manifest.functions["f"], manifest)


def load_error(manifest: Manifest) -> str:
    with pytest.raises(LoadError) as raised:
        load(manifest)
    message = str(raised.value)
    assert "Traceback" not in message
    assert "\n" not in message
    return message


# ------------------------------------------------------------------ import errors


def test_a_missing_module_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    message = load_error(project(tmp_path, {}, module="nowhere/gone.py"))
    assert message.startswith("fn.yaml:5:functions.f.module: function 'f': ")
    assert str(tmp_path / "nowhere" / "gone.py") in message
    assert "does not exist" in message


def test_a_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    source = """\
        async def handle(data: dict) -> dict:
            return data


        def broken(:
            pass
    """
    message = load_error(project(tmp_path, {"fn.py": source}))
    assert message.startswith("fn.yaml:5:functions.f.module: function 'f': ")
    assert "syntax error" in message
    assert f"{tmp_path / 'fn.py'}:5" in message


def test_an_error_while_importing_names_the_file_and_line(tmp_path: Path) -> None:
    source = """\
        import os

        LIMIT = 1 / 0


        async def handle(data: dict) -> dict:
            return data
    """
    message = load_error(project(tmp_path, {"fn.py": source}))
    assert message.startswith("fn.yaml:5:functions.f.module: function 'f': ")
    assert f"{tmp_path / 'fn.py'}:3" in message
    assert "ZeroDivisionError" in message


def test_a_module_that_exits_during_import_is_a_load_error_not_an_exit(tmp_path: Path) -> None:
    """sys.exit() at import must not end the host, nor a hot reload's old version."""
    message = load_error(project(tmp_path, {"fn.py": "import sys\n\nsys.exit(3)\n"}))
    assert message == (
        "fn.yaml:5:functions.f.module: function 'f': the module exited during import (sys.exit(3))"
    )


def test_a_failed_import_leaves_no_half_module_behind(tmp_path: Path) -> None:
    # Other tests of this process may have loaded a good `fn`: that one stays.
    before = sys.modules.get("fn")
    load_error(project(tmp_path, {"fn.py": "HALF = True\nraise RuntimeError('no')\n"}))
    assert sys.modules.get("fn") is before
    assert not hasattr(sys.modules.get("fn"), "HALF")


def test_a_missing_dotted_module_is_named(tmp_path: Path) -> None:
    message = load_error(project(tmp_path, {}, module="no_such_package_xyz.handlers"))
    assert message.startswith("fn.yaml:5:functions.f.module: function 'f': ")
    assert "no_such_package_xyz" in message


# ----------------------------------------------------------------- the handler


def test_a_missing_handler_lists_the_functions_in_the_module(tmp_path: Path) -> None:
    source = """\
        from fnhost_sdk import Context


        async def create_order(data: dict) -> dict:
            return data


        def cancel_order(data: dict) -> None:
            pass


        def _private(data):
            pass
    """
    message = load_error(project(tmp_path, {"fn.py": source}, handler="create"))
    assert message.startswith("fn.yaml:6:functions.f.handler: function 'f': ")
    assert "no handler 'create'" in message
    assert "functions in it: cancel_order, create_order" in message
    assert "_private" not in message
    assert "Context" not in message, "imported names are not the module's functions"


def test_a_handler_that_is_not_callable_is_refused(tmp_path: Path) -> None:
    message = load_error(project(tmp_path, {"fn.py": "handle = 42\n"}))
    assert message.startswith("fn.yaml:6:functions.f.handler: ")
    assert "not callable" in message


@pytest.mark.parametrize(
    ("signature", "complaint"),
    [
        ("()", "must take the payload as its first parameter"),
        ("(*, data)", "must take the payload as its first parameter"),
        ("(data, ctx, other)", "takes 3 parameters"),
    ],
)
def test_a_handler_with_an_unfit_signature_is_refused(
    tmp_path: Path, signature: str, complaint: str
) -> None:
    source = f"async def handle{signature}:\n    return None\n"
    message = load_error(project(tmp_path, {"fn.py": source}))
    assert message.startswith("fn.yaml:6:functions.f.handler: function 'f': ")
    assert complaint in message


def test_an_unresolvable_annotation_is_refused_with_the_reason(tmp_path: Path) -> None:
    source = """\
        from __future__ import annotations


        async def handle(data: NoSuchType) -> None:
            pass
    """
    message = load_error(project(tmp_path, {"fn.py": source}))
    assert message.startswith("fn.yaml:6:functions.f.handler: ")
    assert "NoSuchType" in message


# ------------------------------------------------------------- what is detected


SHAPES = """\
    from dataclasses import dataclass

    from pydantic import BaseModel

    from fnhost_sdk import Context


    class Order(BaseModel):
        order_id: str


    @dataclass
    class Point:
        x: int


    async def async_plain(data: dict):
        return data


    def sync_plain(data: bytes):
        return data


    async def with_ctx(order: Order, ctx):
        return order


    def sync_with_ctx(text: str, ctx: Context):
        return text


    async def annotated_ctx_with_default(point: Point, context: Context = None):
        return point


    async def optional_extra(data, flag=False):
        return data
"""


@pytest.mark.parametrize(
    ("handler", "is_async", "passes_context", "payload", "decoded"),
    [
        ("async_plain", True, False, b'{"a": 1}', {"a": 1}),
        ("sync_plain", False, False, b"\x00raw", b"\x00raw"),
        ("with_ctx", True, True, b'{"order_id": "o1"}', "Order(order_id='o1')"),
        ("sync_with_ctx", False, True, b"text", "text"),
        ("annotated_ctx_with_default", True, True, b'{"x": 1}', "Point(x=1)"),
        ("optional_extra", True, False, b"[1]", [1]),
    ],
)
def test_sync_async_ctx_and_payload_type_are_read_from_the_signature(
    tmp_path: Path,
    handler: str,
    is_async: bool,
    passes_context: bool,
    payload: bytes,
    decoded: object,
) -> None:
    loaded = load(project(tmp_path, {"fn.py": SHAPES}, handler=handler))
    assert loaded.is_async is is_async
    assert loaded.passes_context is passes_context
    value = loaded.decode(payload)
    assert (repr(value) if isinstance(decoded, str) and not isinstance(value, str) else value) == (
        decoded
    )
    assert loaded.handler is getattr(loaded.module, handler)


def test_the_payload_decoder_matches_the_codec(tmp_path: Path) -> None:
    loaded = load(project(tmp_path, {"fn.py": SHAPES}, handler="with_ctx"))
    expected = decoder_for(loaded.module.Order)(b'{"order_id": "x"}')
    assert loaded.decode(b'{"order_id": "x"}') == expected


# --------------------------------------------------------- modules and versions


def test_each_load_is_a_fresh_module(tmp_path: Path) -> None:
    source = "CALLS = []\n\n\nasync def handle(data):\n    CALLS.append(data)\n"
    manifest = project(tmp_path, {"fn.py": source})
    first, second = load(manifest), load(manifest)
    assert first.module is not second.module
    first.module.CALLS.append(1)
    assert second.module.CALLS == []


def test_a_path_under_the_root_gets_its_dotted_name(tmp_path: Path) -> None:
    source = "async def handle(data):\n    return data\n"
    loaded = load(project(tmp_path, {"lib/orders.py": source}, module="lib/orders.py"))
    assert loaded.module.__name__ == "lib.orders"
    assert sys.modules["lib.orders"] is loaded.module


def test_a_module_imports_its_siblings_from_the_project_root(tmp_path: Path) -> None:
    files = {
        "helpers_for_loader_test.py": "def double(x):\n    return 2 * x\n",
        "fn.py": (
            "from helpers_for_loader_test import double\n\n\n"
            "async def handle(data: int):\n    return double(data)\n"
        ),
    }
    loaded = load(project(tmp_path, files))
    assert loaded.module.double(21) == 42


def test_a_dotted_module_name_inside_the_project_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``module: pkg.handlers`` finds the package beside fn.yaml, wherever the host runs
    from (``fnhost run /srv/app/fn.yaml`` from another directory included)."""
    monkeypatch.chdir("/")
    files = {
        "loader_test_pkg/__init__.py": "",
        "loader_test_pkg/handlers.py": "async def handle(data: str):\n    return data.upper()\n",
    }
    loaded = load(project(tmp_path, files, module="loader_test_pkg.handlers"))
    assert loaded.module.__name__ == "loader_test_pkg.handlers"
    assert loaded.is_async


def test_an_installed_dotted_module_loads(tmp_path: Path) -> None:
    """A dotted name can point at any importable module, e.g. an installed package."""
    loaded = load(project(tmp_path, {}, module="json", handler="loads"))
    assert loaded.is_async is False
    assert loaded.handler(b'{"a": 1}') == {"a": 1}


def test_the_version_is_the_manifest_version_or_a_digest_of_the_source(tmp_path: Path) -> None:
    source = "async def handle(data):\n    return data\n"
    digest = load(project(tmp_path / "a", {"fn.py": source})).version
    assert len(digest) == 12
    assert load(project(tmp_path / "b", {"fn.py": source})).version == digest
    changed = load(project(tmp_path / "c", {"fn.py": source + "# changed\n"})).version
    assert changed != digest
