"""W3C trace context across functions, and OpenTelemetry spans when an exporter is set.

Every invocation continues the trace of its message (``traceparent`` /
``tracestate`` headers) or starts one, and everything it publishes or
requests carries the trace on (the host's outgoing hook). With
``tracing.exporter: none`` (the default) that propagation is all it does, and
lazily (:mod:`fnhost.tracecontext`): no middleware, and the context is made
only when the invocation publishes, requests or logs. With ``console`` or
``otlp`` each invocation is one span (kind SERVER for requests, CONSUMER
otherwise) with messaging semantic-convention attributes; ``sample_ratio``
samples new traces, parents decide for theirs.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from fnhost.errors import ConfigError
from fnhost.logs import current_invocation
from fnhost.manifest import FunctionSpec, TracingConfig
from fnhost.tracecontext import carried
from fnhost.types import CallNext, Invocation, Middleware, Outcome

_ERROR_LABELS = frozenset({"error", "dead_letter", "nak", "term"})
_propagator = TraceContextTextMapPropagator()


class HostTracing:
    """The host's tracer provider (``None`` with exporter none) and its middleware."""

    def __init__(self, config: TracingConfig) -> None:
        self.config = config
        self.provider: TracerProvider | None = None
        if config.exporter != "none":
            self.provider = TracerProvider(
                resource=Resource.create({"service.name": config.service_name}),
                sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
            )
            self.provider.add_span_processor(BatchSpanProcessor(_exporter(config)))

    def middleware(self, function: FunctionSpec) -> Middleware | None:
        """The span middleware; ``None`` with exporter none (propagation needs no middleware)."""
        if self.provider is None:
            return None
        return _span_middleware(function, self.provider.get_tracer("fnhost"))

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()


def outgoing(subject: str, headers: dict[str, str]) -> None:
    """Carry the current invocation's trace onto a message it publishes.

    Headers the publisher set itself win (``setdefault``).
    """
    inv = current_invocation.get()
    if inv is not None:
        for key, value in carried(inv).items():
            headers.setdefault(key, value)


def _span_middleware(function: FunctionSpec, tracer: trace.Tracer) -> Middleware:
    kind = SpanKind.SERVER if function.trigger.kind == "request" else SpanKind.CONSUMER
    name = f"{function.name} process"
    static: dict[str, Any] = {"messaging.system": "nats", "fnhost.function": function.name}
    if function.trigger.stream:
        static["messaging.nats.stream"] = function.trigger.stream
        static["messaging.consumer.group.name"] = function.trigger.durable_name

    async def traced(call: Invocation, call_next: CallNext) -> Outcome:
        parent = _propagator.extract(call.headers or {})
        attributes = {
            **static,
            "messaging.destination.name": call.subject,
            "messaging.operation.type": "process",
            "messaging.nats.delivery_count": call.attempt,
        }
        if call.idempotency_key is not None:
            attributes["messaging.message.id"] = call.idempotency_key
        span = tracer.start_span(name, context=parent, kind=kind, attributes=attributes)
        span_context = trace.set_span_in_context(span, parent)
        call.trace_id = f"{span.get_span_context().trace_id:032x}"
        carried: dict[str, str] = {}
        _propagator.inject(carried, context=span_context)
        call.propagate = carried
        token = otel_context.attach(span_context)
        try:
            outcome = await call_next(call)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        else:
            label = outcome.label
            span.set_attribute("fnhost.outcome", label)
            if label in _ERROR_LABELS:
                span.set_status(Status(StatusCode.ERROR, label))
            return outcome
        finally:
            otel_context.detach(token)
            span.end()

    return traced


def _exporter(config: TracingConfig) -> SpanExporter:
    if config.exporter == "console":
        return ConsoleSpanExporter()
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigError(
            "tracing.exporter: otlp needs the OTLP exporter: pip install 'fnhost[otlp]'"
        ) from None
    exporter: SpanExporter = (
        OTLPSpanExporter(endpoint=config.endpoint) if config.endpoint else OTLPSpanExporter()
    )
    return exporter
