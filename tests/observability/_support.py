"""Helpers shared by the observability tests: HTTP from a thread, spans in memory."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from fnhost.plugins import hookimpl

if TYPE_CHECKING:
    from fnhost.host import Host

HostFactory = Callable[..., Awaitable["Host"]]
"""The ``host_factory`` fixture of tests/conftest.py."""


@dataclass
class HttpResult:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def _fetch(url: str, method: str, body: bytes | None, headers: dict[str, str]) -> HttpResult:
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return HttpResult(response.status, dict(response.headers), response.read())
    except urllib.error.HTTPError as error:
        with error:
            return HttpResult(error.code, dict(error.headers), error.read())


async def http(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> HttpResult:
    """One HTTP request from a worker thread, so the host in this loop can answer it."""
    return await asyncio.to_thread(_fetch, url, method, body, headers or {})


class SpanMemory:
    """A plugin object: every finished span of the host it is registered with, in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()

    @hookimpl
    def fnhost_startup(self, host: Host) -> None:
        assert host.tracing.provider is not None, "tracing.exporter is none: no spans"
        host.tracing.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    @property
    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans if span.name == name]
