"""Tracing with OpenTelemetry, optional (the ``otel`` extra), configured by ``OTEL_*`` only.

Nothing imports ``opentelemetry`` until ``setup()`` finds ``OTEL_TRACES_EXPORTER`` naming
``console`` (a JSON line per span on stderr: stdout carries ``--dry-run`` events) or
``otlp`` (OTLP/HTTP); else ``active`` stays False, the one check a request pays. As the
CloudEvents distributed-tracing extension says, ``traceparent``/``tracestate`` name the
trace an event started in (kept; one without gets the span that sends it) and the HTTP
``traceparent`` header each hop: a receiving span is its child, linked to the events'.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

from cloudevents.core.v1.event import CloudEvent

from cdk.codec import with_extensions

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

__all__ = ["active", "arrived", "end_send", "inject", "setup", "shutdown", "start_send", "webhook"]

active = False  # True once setup() has configured tracing
_log = logging.getLogger("cdk.tracing")
_otel: dict[str, Any] = {}  # what setup() imported and made: only ever read when active


def setup(provider: TracerProvider | None = None, service_name: str = "connector") -> bool:
    """Configure tracing from the environment, once per process (or use ``provider``, for
    tests); True when it is on. ``service_name`` stands in for an unset OTEL_SERVICE_NAME."""
    global active
    if active:
        return True
    wanted = os.environ.get("OTEL_TRACES_EXPORTER", "none").replace(" ", "").lower()
    exporters = [name for name in wanted.split(",") if name not in ("", "none")]
    if provider is None and not exporters:
        return False
    try:
        from opentelemetry import propagate, trace
        from opentelemetry.sdk import resources
        from opentelemetry.sdk import trace as sdk
        from opentelemetry.sdk.trace import export
        from opentelemetry.trace.propagation import tracecontext
    except ImportError:
        _log.warning("OTEL_TRACES_EXPORTER=%s, but the otel extra is not installed", wanted)
        return False
    if provider is None:
        resource = resources.Resource.create()
        if str(resource.attributes.get("service.name")).startswith("unknown_service"):
            resource = resource.merge(resources.Resource({"service.name": service_name}))
        provider = sdk.TracerProvider(resource=resource)
        for name in exporters:
            if name == "console":
                line = lambda span: span.to_json(indent=None) + "\n"  # noqa: E731
                console = export.ConsoleSpanExporter(out=sys.stderr, formatter=line)
                provider.add_span_processor(export.SimpleSpanProcessor(console))
            elif name == "otlp":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

                provider.add_span_processor(export.BatchSpanProcessor(OTLPSpanExporter()))
            else:
                _log.warning("OTEL_TRACES_EXPORTER: %r is not console, otlp or none", name)
        trace.set_tracer_provider(provider)
    w3c, tracer = tracecontext.TraceContextTextMapPropagator(), provider.get_tracer("cdk")
    _otel.update(provider=provider, trace=trace, http=propagate, w3c=w3c, tracer=tracer)
    active = True
    return True


def shutdown() -> None:
    """Send the spans still buffered (at process stop); tracing is off afterwards."""
    global active
    if active:
        active = False
        _otel["provider"].shutdown()


def _start(name: str, kind: str, events: Sequence[CloudEvent], hop: Any = None) -> Span:
    """A span under ``hop``, else under the one trace ``events`` share; others are links."""
    trace = _otel["trace"]
    if hop is not None and not trace.get_current_span(hop).get_span_context().is_valid:
        hop = None  # no traceparent header
    carriers = ({n: e.get_extension(n) for n in ("traceparent", "tracestate")} for e in events)
    spans = (trace.get_current_span(_otel["w3c"].extract(c)).get_span_context() for c in carriers)
    traces = {ctx.span_id: ctx for ctx in spans if ctx.is_valid}
    if hop is None and len(traces) == 1:
        hop = trace.set_span_in_context(trace.NonRecordingSpan(*traces.values()))
    parent_id = trace.get_current_span(hop).get_span_context().span_id
    links = [trace.Link(ctx) for span_id, ctx in traces.items() if span_id != parent_id]
    attributes: dict[str, Any] = {}
    if len(events) > 1:
        attributes["messaging.batch.message_count"] = len(events)
    for key in ("id", "type", "source") if len(events) == 1 else ():
        attributes[f"cloudevents.event_{key}"] = events[0].get_attributes()[key]
    span: Span = _otel["tracer"].start_span(name, hop, trace.SpanKind[kind], attributes, links)
    return span


_Send = tuple["Span", list[CloudEvent], dict[str, str]]
_Current = AbstractContextManager["Span"]  # a span made current for a with-block


def start_send(events: Sequence[CloudEvent], target: str) -> _Send:
    """A delivery's span, the events to encode (those without a trace get it), its headers."""
    span = _start("send", "PRODUCER", events)
    url = urlsplit(target)  # host and port only: a query may hold a token
    span.set_attributes({"server.address": url.hostname or "", "server.port": url.port or 0})
    context = _otel["trace"].set_span_in_context(span)
    headers: dict[str, str] = {}
    _otel["http"].inject(headers, context)  # as OTEL_PROPAGATORS says (W3C by default)
    return span, [inject(event, context) for event in events], headers


def end_send(span: Span, status: int = 0, error: BaseException | None = None) -> None:
    """End a delivery span: the target's last answer (0: none) and the error, if any."""
    if status:
        span.set_attribute("http.response.status_code", status)
    if error is not None:
        span.record_exception(error)
        span.set_status(_otel["trace"].StatusCode.ERROR, type(error).__name__)
    span.end()


def webhook(headers: Mapping[str, str], method: str = "POST") -> _Current:
    """The current span while a webhook request is served, continuing its caller's trace."""
    span = _start(method, "SERVER", (), _otel["http"].extract(headers))
    return cast(_Current, _otel["trace"].use_span(span, end_on_exit=True))


def inject(event: CloudEvent, context: Any = None) -> CloudEvent:
    """``event`` with the span of ``context`` (default: current) as its trace, unless it has one."""
    carrier: dict[str, str] = {}
    if event.get_extension("traceparent") is None:
        _otel["w3c"].inject(carrier, context)
    return with_extensions(event, carrier) if carrier else event


def arrived(events: Sequence[CloudEvent], headers: Mapping[str, str]) -> _Current:
    """The current span around ``arrived``: one per request, a batch's traces as links."""
    span = _start("process", "CONSUMER", events, _otel["http"].extract(headers))
    return cast(_Current, _otel["trace"].use_span(span, end_on_exit=True))
