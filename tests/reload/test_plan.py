"""fnhost.reload, the pure layer: dependency scan, change plans, manifest diffs, the
change filter. No NATS, no file watching."""

from __future__ import annotations

from pathlib import Path

from watchfiles import Change

from conftest import write_project
from fnhost.manifest import Manifest, load_manifest
from fnhost.reload import ChangeFilter, Dependencies, diff_manifests, plan, scan_dependencies

MANIFEST = """\
    version: 1
    http: false
    functions:
      order:
        module: functions/order.py
        trigger: {request: orders.create}
      payment:
        module: functions.payment
        trigger: {subject: orders.created}
      lone:
        module: lone.py
        trigger: {subject: lone}
"""

FILES = {
    "functions/__init__.py": "",
    "functions/order.py": """\
        import json

        from functions.contracts import Order
        from . import pricing

        async def handle(data: dict) -> dict:
            import helpers  # an import inside a function counts too
            return {}
    """,
    "functions/payment.py": """\
        from .contracts import Order

        async def handle(data: dict) -> None: ...
    """,
    "functions/contracts.py": """\
        from functions import money
    """,
    "functions/money.py": "",
    "functions/pricing.py": "",
    "helpers.py": "",
    "lone.py": "async def handle(data: bytes) -> None: ...\n",
}


def project(tmp_path: Path, manifest: str = MANIFEST, files: dict[str, str] = FILES) -> Manifest:
    return load_manifest(write_project(tmp_path, manifest, files))


def test_scan_follows_local_imports_through_modules_and_packages(tmp_path: Path) -> None:
    deps = scan_dependencies(project(tmp_path))
    root = tmp_path.resolve()
    f = root / "functions"
    order = deps.functions["order"]
    for path in ("order.py", "__init__.py", "contracts.py", "money.py", "pricing.py"):
        assert f / path in order, path
    assert root / "helpers.py" in order
    # `import json` would run a json.py written beside fn.yaml (the root is first on
    # sys.path), so that file is watched; the standard library is not.
    assert root / "json.py" in order
    assert all(path.is_relative_to(root) for path in order)
    payment = deps.functions["payment"]
    assert {f / "payment.py", f / "contracts.py", f / "money.py"} <= payment
    assert f / "pricing.py" not in payment
    assert root / "helpers.py" not in payment
    assert deps.functions["lone"] == {root / "lone.py"}
    # Each existing local module maps to its own closure.
    assert deps.modules[f / "contracts.py"] >= {f / "contracts.py", f / "money.py"}
    assert f / "pricing.py" not in deps.modules[f / "contracts.py"]


def test_scan_includes_missing_files_and_survives_broken_ones(tmp_path: Path) -> None:
    files = {
        "fn.py": "import not_written_yet\nasync def handle(data: bytes) -> None: ...\n",
        "broken.py": "def oops(:\n",
        "other.py": "import broken\nasync def handle(data: bytes) -> None: ...\n",
    }
    manifest = """\
        version: 1
        http: false
        functions:
          a: {module: fn.py, trigger: {subject: a}}
          b: {module: other.py, trigger: {subject: b}}
          gone: {module: gone.py, trigger: {subject: c}}
    """
    deps = scan_dependencies(project(tmp_path, manifest, files))
    root = tmp_path.resolve()
    # Creating the missing module is what fixes `a`: it must be watched.
    assert root / "not_written_yet.py" in deps.functions["a"]
    assert root / "broken.py" in deps.functions["b"]
    assert deps.functions["gone"] == {root / "gone.py"}
    assert root / "gone.py" not in deps.modules  # only existing files are modules


def test_plan_maps_changes_to_functions_and_modules(tmp_path: Path) -> None:
    manifest = project(tmp_path)
    deps = scan_dependencies(manifest)
    root = tmp_path.resolve()
    f = root / "functions"
    fn_yaml = manifest.path.resolve()

    money = plan([f / "money.py"], deps, fn_yaml)
    assert money.functions == {"order", "payment"}
    # money changed: it and every local module importing it, directly or not, run anew.
    assert {f / "money.py", f / "contracts.py", f / "order.py", f / "payment.py"} <= money.modules
    assert f / "pricing.py" not in money.modules
    assert not money.manifest

    assert plan([root / "lone.py"], deps, fn_yaml).functions == {"lone"}
    assert plan([root / "unrelated.py"], deps, fn_yaml).empty
    only_manifest = plan([fn_yaml], deps, fn_yaml)
    assert only_manifest.manifest and not only_manifest.functions


def test_plan_of_nothing_is_empty() -> None:
    assert plan([], Dependencies(), Path("/x/fn.yaml")).empty


BASE = """\
    version: 1
    http: false
    streams:
      ORDERS: {subjects: ["orders.>"]}
      DLQ: {subjects: ["dlq.>"]}
    defaults:
      timeout: 5s
    functions:
      a: {module: a.py, trigger: {request: a}}
      b: {module: b.py, trigger: {subject: b}}
      c: {module: c.py, trigger: {stream: ORDERS, subjects: [orders.x]}}
"""


def _manifest(tmp_path: Path, name: str, text: str) -> Manifest:
    """fn.yaml as saved with ``text`` (one project folder: module paths are relative to it)."""
    return project(tmp_path, text, {})


def test_diff_lists_only_what_changed(tmp_path: Path) -> None:
    old = _manifest(tmp_path, "old", BASE)
    assert (
        diff_manifests(old, _manifest(tmp_path, "same", BASE + "\n# a comment\n")).functions == ()
    )

    new = BASE.replace(
        "b: {module: b.py, trigger: {subject: b}}", "d: {module: d.py, trigger: {subject: d}}"
    )
    new = new.replace(
        "c.py, trigger: {stream: ORDERS, subjects: [orders.x]}",
        "c.py, trigger: {stream: ORDERS, subjects: [orders.y]}",
    )
    diff = diff_manifests(old, _manifest(tmp_path, "new", new))
    assert (diff.added, diff.removed, diff.changed) == (("d",), ("b",), ("c",))
    assert diff.streams == () and diff.restart == ()


def test_diff_sees_defaults_streams_queues_and_restart_sections(tmp_path: Path) -> None:
    old = _manifest(tmp_path, "old", BASE)

    defaults = diff_manifests(old, _manifest(tmp_path, "d", BASE.replace("5s", "6s")))
    assert defaults.changed == ("a", "b", "c")  # defaults merge into every function

    stream = BASE.replace('DLQ: {subjects: ["dlq.>"]}', 'DLQ: {subjects: ["dlq.>"], max_age: 1d}')
    stream += "    kv:\n      CACHE: {}\n"
    diff = diff_manifests(old, _manifest(tmp_path, "s", stream))
    assert (diff.streams, diff.kv, diff.functions) == (("DLQ",), ("CACHE",), ())

    # `queue: null` (every host) differs from no queue (the function's name as group).
    queue = BASE.replace("trigger: {subject: b}", "trigger: {subject: b, queue: null}")
    assert diff_manifests(old, _manifest(tmp_path, "q", queue)).changed == ("b",)

    http = BASE.replace("http: false", "http: {port: 0}")
    assert diff_manifests(old, _manifest(tmp_path, "h", http)).restart == ("http",)


def test_change_filter(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    keep = ChangeFilter(root, root / "fn.yaml")
    assert keep(Change.modified, str(root / "fn.yaml"))
    assert keep(Change.added, str(root / "functions" / "order.py"))
    assert not keep(Change.modified, str(root / "other.yaml"))
    assert not keep(Change.modified, str(root / "functions" / "__pycache__" / "order.py"))
    assert not keep(Change.modified, str(root / ".venv" / "lib" / "x.py"))
    assert not keep(Change.modified, str(root / "functions" / ".order.py.swp"))
    assert not keep(Change.modified, str(root / "functions" / "order.py~"))
    assert not keep(Change.modified, str(root / "functions" / ".#order.py"))
    assert not keep(Change.modified, str(root.parent / "elsewhere.py"))
