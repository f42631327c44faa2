"""The SDK stays light: a calling service must not pull in the host's stack."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("starlette", "uvicorn", "watchfiles", "prometheus_client", "fnhost")


def test_sdk_imports_none_of_the_host_stack() -> None:
    code = (
        "import json, sys\n"
        "import fnhost_sdk, fnhost_sdk.client, fnhost_sdk.context, fnhost_sdk.codec\n"
        "import fnhost_sdk.session, fnhost_sdk.server, fnhost_sdk.errors, fnhost_sdk.headers\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []


def test_the_sdk_exports_what_handlers_need() -> None:
    import fnhost_sdk

    for name in ("Context", "Retry", "Reject", "Client", "ServiceError"):
        assert hasattr(fnhost_sdk, name), name
