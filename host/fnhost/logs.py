"""Log output: readable lines under ``fnhost dev``, one JSON object per line under ``fnhost run``.

While a message is handled, its :class:`~fnhost.types.Invocation` is in
:data:`current_invocation`; a filter stamps every record logged meanwhile, by
the host, a plugin or the handler (threads included), with the function,
subject, message id, attempt and trace id.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import TYPE_CHECKING, Literal

from rich.console import Console
from rich.logging import RichHandler

from fnhost.tracecontext import trace_id

if TYPE_CHECKING:
    from fnhost.types import Invocation

LogFormat = Literal["text", "json"]

INVOCATION_FIELDS = ("function", "subject", "message_id", "attempt", "trace_id")

current_invocation: ContextVar[Invocation | None] = ContextVar("fnhost_invocation", default=None)
"""The invocation being handled in this task or thread, for log records."""


class InvocationContext(logging.Filter):
    """Stamp records with the fields of the invocation being handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        inv = current_invocation.get()
        if inv is not None:
            fields = record.__dict__
            fields.setdefault("function", inv.function)
            fields.setdefault("subject", inv.subject)
            fields.setdefault("message_id", inv.idempotency_key)
            fields.setdefault("attempt", inv.attempt)
            if "trace_id" not in fields:
                fields["trace_id"] = trace_id(inv)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers; ``worker`` (``--workers``) on every line."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._worker is not None:
            entry["worker"] = self._worker
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


def setup_logging(fmt: LogFormat, level: str = "INFO", *, worker: int | None = None) -> None:
    """Configure the root logger once for the host process; ``worker`` is its number
    under ``fnhost run --workers`` (every line says which process wrote it)."""
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter(worker))
        handler.addFilter(InvocationContext())
    elif sys.stderr.isatty():
        handler = RichHandler(
            console=Console(stderr=True),
            show_path=False,
            rich_tracebacks=True,
            log_time_format="%H:%M:%S",
        )
        handler.addFilter(InvocationContext())
        handler.addFilter(_InvocationFields())
    else:
        # Piped or redirected: one line per record, so grep finds a message whole
        # (rich wraps at 80 columns when it cannot ask a terminal for its width).
        handler = logging.StreamHandler(sys.stderr)
        tag = "" if worker is None else f"[worker {worker}] "
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {tag}%(message)s", datefmt="%H:%M:%S")
        )
        handler.addFilter(InvocationContext())
        handler.addFilter(_InvocationFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # nats-py logs reconnect noise at ERROR through its own logger; fnhost logs those events itself.
    logging.getLogger("nats").setLevel(logging.CRITICAL)
