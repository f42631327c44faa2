"""Test plugin: record every finished span of a host as one JSON line in a file.

Loaded with ``plugins: [plugins_for_tests.span_recorder]`` in fn.yaml (with
``tests/`` on ``PYTHONPATH``), in a host whose ``tracing.exporter`` is not
``none``. The file is named by ``$FNHOST_SPAN_FILE``, so a test running several
host processes gives each its own file and reads them after the fact, the
way an in-memory exporter is read in-process.

A ``SimpleSpanProcessor`` exports in ``span.end()``, so a span is in the file
before the invocation's outcome is acted on (before the reply or the ack):
a test that has seen the effect can wait for the line without racing a batch.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from fnhost.plugins import hookimpl

if TYPE_CHECKING:
    from fnhost.host import Host

SPAN_FILE_ENV = "FNHOST_SPAN_FILE"


class JsonLinesExporter(SpanExporter):
    """Append each span as one JSON object per line."""

    def __init__(self, path: Path) -> None:
        self._path = path
        # Spans end on the event loop and, for plain-def handlers, never in threads,
        # but the exporter contract allows concurrent calls: keep lines whole.
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = [json.dumps(span_record(span)) + "\n" for span in spans]
        with self._lock, self._path.open("a", encoding="utf-8") as out:
            out.writelines(lines)
        return SpanExportResult.SUCCESS


def span_record(span: ReadableSpan) -> dict[str, object]:
    context = span.get_span_context()
    assert context is not None
    return {
        "trace_id": f"{context.trace_id:032x}",
        "span_id": f"{context.span_id:016x}",
        "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "pid": os.getpid(),
    }


@hookimpl
def fnhost_startup(host: Host) -> None:
    path = os.environ.get(SPAN_FILE_ENV)
    if path and host.tracing.provider is not None:
        host.tracing.provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(Path(path))))
