"""Header names on the wire (see docs/wire.md)."""

from __future__ import annotations

MSG_ID = "Nats-Msg-Id"
SERVICE_ERROR = "Nats-Service-Error"
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"

ORIGINAL_SUBJECT = "Fnhost-Original-Subject"
FUNCTION = "Fnhost-Function"
STREAM = "Fnhost-Stream"
STREAM_SEQ = "Fnhost-Stream-Seq"
ATTEMPTS = "Fnhost-Attempts"
ERROR = "Fnhost-Error"
REPLAYED = "Fnhost-Replayed"

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
