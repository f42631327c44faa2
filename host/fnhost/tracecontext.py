"""The W3C trace context of an invocation, made only when something needs it.

With ``tracing.exporter: none`` there is no span, so the per-message work of
tracing is just this: when the invocation first publishes, requests or logs,
continue the trace of its ``traceparent`` header (or start one) with a fresh
span id, and cache the result on the invocation. A message that neither
publishes nor logs costs nothing. The span middleware of :mod:`fnhost.tracing`
fills the same two fields eagerly, from its real span.
"""

from __future__ import annotations

from random import getrandbits
from typing import TYPE_CHECKING

from fnhost_sdk import headers as h

if TYPE_CHECKING:
    from fnhost.types import Invocation

_TRACEPARENT = h.TRACEPARENT
_TRACESTATE = h.TRACESTATE


def carried(inv: Invocation) -> dict[str, str]:
    """The ``traceparent`` (and ``tracestate``) headers ``inv`` puts on what it publishes."""
    propagate = inv.propagate
    if propagate is None:
        propagate = _continue(inv)
    return propagate


def trace_id(inv: Invocation) -> str:
    """The trace ``inv`` belongs to (32 hex digits)."""
    found = inv.trace_id
    if found is None:
        _continue(inv)
        found = inv.trace_id
        assert found is not None
    return found


def _continue(inv: Invocation) -> dict[str, str]:
    headers = inv.headers
    parent = headers.get(_TRACEPARENT) if headers else None
    if parent is not None and len(parent) == 55 and parent[2] == "-" and parent[35] == "-":
        trace, flags = parent[3:35], parent[53:55]
    else:
        trace, flags = "%032x" % getrandbits(128), "01"  # noqa: UP031 - faster than f-string
    propagate = {_TRACEPARENT: f"00-{trace}-{getrandbits(64):016x}-{flags}"}
    state = headers.get(_TRACESTATE) if headers else None
    if state:
        propagate[_TRACESTATE] = state
    inv.trace_id = trace
    inv.propagate = propagate
    return propagate
