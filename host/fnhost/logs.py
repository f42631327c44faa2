"""Log output: readable lines under ``fnhost dev``, one JSON object per line under ``fnhost run``.

Invocation fields (function, subject, message id, attempt) that a logger
adapter or ``extra=`` attaches appear in both formats.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Literal

from rich.console import Console
from rich.logging import RichHandler

LogFormat = Literal["text", "json"]

INVOCATION_FIELDS = ("function", "subject", "message_id", "attempt", "trace_id")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in INVOCATION_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _InvocationFields(logging.Filter):
    """Append invocation fields to readable lines, e.g. ``[payment attempt=2]``."""

    def filter(self, record: logging.LogRecord) -> bool:
        function = record.__dict__.get("function")
        if function is not None and not getattr(record, "_fnhost_tagged", False):
            attempt = record.__dict__.get("attempt")
            tag = f"[{function}" + (f" attempt={attempt}" if attempt and attempt > 1 else "") + "] "
            record.msg = tag + str(record.msg)
            record._fnhost_tagged = True
        return True


def setup_logging(fmt: LogFormat, level: str = "INFO") -> None:
    """Configure the root logger once for the host process."""
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        handler = RichHandler(
            console=Console(stderr=True),
            show_path=False,
            rich_tracebacks=True,
            log_time_format="%H:%M:%S",
        )
        handler.addFilter(_InvocationFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # nats-py logs reconnect noise at ERROR through its own logger; fnhost logs those events itself.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
