"""cdk.tracing: spans and the CloudEvents distributed-tracing extension.

In process with the SDK's in-memory exporter; in fresh processes configured only by
``OTEL_*`` variables: an OTLP/HTTP receiver on loopback, the console exporter, and a
kit that never imports opentelemetry unless tracing is configured.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cloudevents.core.v1.event import CloudEvent
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cdk import tracing
from cdk.connector import Tuple

TEMPLATE_PROJECT = Path(__file__).resolve().parents[2] / "{{cookiecutter.connector_name}}"
OTHER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER_PARENT = f"00-{OTHER_TRACE}-00f067aa0ba902b7-01"
THIRD_PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def event(event_id: str, **extensions: Any) -> CloudEvent:
    attributes = {"id": event_id, "source": "/tests/tracing", "type": "com.example.t"}
    return CloudEvent({**attributes, **extensions}, {"n": 1})


def ids(span: ReadableSpan) -> tuple[str, str]:
    context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def traceparent_of(span: ReadableSpan) -> str:
    trace_id, span_id = ids(span)
    return f"00-{trace_id}-{span_id}-{span.get_span_context().trace_flags:02x}"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing.setup(provider)
    assert tracing.active
    try:
        yield exporter
    finally:
        tracing.shutdown()
    assert not tracing.active


# --------------------------------------------------------------------------- delivery


def test_a_delivery_is_one_span_whose_context_events_without_a_trace_carry(
    spans: InMemorySpanExporter,
) -> None:
    events = [event("a"), event("b")]
    span, traced, headers = tracing.start_send(events, "http://127.0.0.1:8080/?access_token=s3")
    tracing.end_send(span, 202)
    (finished,) = spans.get_finished_spans()
    assert finished.name == "send" and finished.kind == SpanKind.PRODUCER
    assert finished.parent is None  # no event names a trace: this one starts it
    assert headers["traceparent"] == traceparent_of(finished)
    assert [e.get_extension("traceparent") for e in traced] == [headers["traceparent"]] * 2
    assert [e.get_id() for e in traced] == ["a", "b"]
    assert events[0].get_extension("traceparent") is None  # the caller's events are untouched
    attributes = dict(finished.attributes or {})
    assert attributes["server.address"] == "127.0.0.1" and attributes["server.port"] == 8080
    assert attributes["http.response.status_code"] == 202
    assert attributes["messaging.batch.message_count"] == 2
    assert "s3" not in json.dumps(attributes)
    assert finished.status.status_code == StatusCode.UNSET


def test_an_event_keeps_the_trace_it_started_in_and_delivery_continues_it(
    spans: InMemorySpanExporter,
) -> None:
    events = [event("traced", traceparent=OTHER_PARENT, tracestate="k=v"), event("new")]
    span, traced, headers = tracing.start_send(events, "http://127.0.0.1:1/")
    tracing.end_send(span)
    (finished,) = spans.get_finished_spans()
    assert ids(finished)[0] == OTHER_TRACE  # a child of the one trace the events name
    assert finished.parent is not None and f"{finished.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert traced[0].get_extension("traceparent") == OTHER_PARENT
    assert traced[0].get_extension("tracestate") == "k=v"
    assert traced[1].get_extension("traceparent") == headers["traceparent"]
    assert headers["tracestate"] == "k=v"


def test_a_batch_of_several_traces_links_to_each(spans: InMemorySpanExporter) -> None:
    events = [event("1", traceparent=OTHER_PARENT), event("2", traceparent=THIRD_PARENT)]
    span, _, _ = tracing.start_send(events, "http://127.0.0.1:1/")
    tracing.end_send(span)
    (finished,) = spans.get_finished_spans()
    assert finished.parent is None
    linked = sorted(f"{link.context.trace_id:032x}" for link in finished.links)
    assert linked == sorted([OTHER_TRACE, THIRD_PARENT.split("-")[1]])


def test_a_failed_delivery_is_an_error_span(spans: InMemorySpanExporter) -> None:
    span, _, _ = tracing.start_send([event("x")], "http://127.0.0.1:1/")
    tracing.end_send(span, 503, TimeoutError("target did not answer"))
    (finished,) = spans.get_finished_spans()
    assert finished.status.status_code == StatusCode.ERROR
    assert [e.name for e in finished.events] == ["exception"]
    assert dict(finished.attributes or {})["cloudevents.event_id"] == "x"


# --------------------------------------------------------------------------- receiving


def test_a_webhook_continues_its_callers_trace_and_its_events_carry_it(
    spans: InMemorySpanExporter,
) -> None:
    with tracing.webhook({"traceparent": OTHER_PARENT}, "POST"):
        made = tracing.inject(event("w"))
        kept = tracing.inject(event("k", traceparent=THIRD_PARENT))
    (finished,) = spans.get_finished_spans()
    assert finished.kind == SpanKind.SERVER and finished.name == "POST"
    assert ids(finished)[0] == OTHER_TRACE
    assert made.get_extension("traceparent") == traceparent_of(finished)
    assert kept.get_extension("traceparent") == THIRD_PARENT


def test_a_webhook_request_without_traceparent_starts_a_trace(
    spans: InMemorySpanExporter,
) -> None:
    with pytest.raises(RuntimeError), tracing.webhook({}):
        raise RuntimeError("make_event failed")
    (finished,) = spans.get_finished_spans()
    assert finished.parent is None
    assert finished.status.status_code == StatusCode.ERROR


def test_arrived_is_a_child_of_the_hop_and_links_to_the_events_traces(
    spans: InMemorySpanExporter,
) -> None:
    events = [event("1", traceparent=THIRD_PARENT), event("2")]
    with tracing.arrived(events, {"traceparent": OTHER_PARENT}):
        pass
    (finished,) = spans.get_finished_spans()
    assert finished.name == "process" and finished.kind == SpanKind.CONSUMER
    assert ids(finished)[0] == OTHER_TRACE
    assert [f"{link.context.span_id:016x}" for link in finished.links] == ["b7ad6b7169203331"]


def test_arrived_without_a_traceparent_header_continues_the_events_trace(
    spans: InMemorySpanExporter,
) -> None:
    with pytest.raises(ValueError), tracing.arrived([event("1", traceparent=OTHER_PARENT)], {}):
        raise ValueError("arrived raised")
    (finished,) = spans.get_finished_spans()
    assert ids(finished)[0] == OTHER_TRACE and not finished.links
    assert finished.status.status_code == StatusCode.ERROR
    assert dict(finished.attributes or {})["cloudevents.event_id"] == "1"


def test_a_trace_runs_from_delivery_to_arrived(spans: InMemorySpanExporter) -> None:
    span, traced, headers = tracing.start_send([event("e2e")], "http://127.0.0.1:1/")
    with tracing.arrived(traced, headers):
        pass
    tracing.end_send(span, 200)
    process, send = spans.get_finished_spans()
    assert ids(process)[0] == ids(send)[0]
    assert process.parent is not None and process.parent.span_id == send.context.span_id
    assert not process.links  # the event's trace is the hop's: nothing else to link


# --------------------------------------------------------------------------- a fresh process


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter with the kit importable and only these OTEL_*."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    clean.update(PYTHONPATH=str(TEMPLATE_PROJECT), PYTHONDONTWRITEBYTECODE="1", **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


SEND_AND_SERVE = """
    from cloudevents.core.v1.event import CloudEvent
    from cdk import tracing
    assert tracing.setup(service_name="source-default")
    event = CloudEvent({"id": "1", "source": "/s", "type": "t"})
    with tracing.webhook({"traceparent": "TRACEPARENT"}):
        event = tracing.inject(event)
    span, _, headers = tracing.start_send([event], "http://127.0.0.1:9/")
    tracing.end_send(span, 200)
    tracing.shutdown()
""".replace("TRACEPARENT", OTHER_PARENT)


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP trace receiver: decodes each POST /v1/traces."""

    requests: ClassVar[list[tuple[str, ExportTraceServiceRequest]]]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.requests.append((self.path, request))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, ExportTraceServiceRequest]]]]:
    class Handler(Collector):
        requests: ClassVar[list[tuple[str, ExportTraceServiceRequest]]] = []

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", Handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.mark.parametrize("service", ["sink-from-env", None])
def test_otlp_http_exports_to_the_configured_endpoint(
    collector: tuple[str, list[tuple[str, ExportTraceServiceRequest]]], service: str | None
) -> None:
    url, requests = collector
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": url}
    if service is not None:
        env["OTEL_SERVICE_NAME"] = service
    result = run_python(SEND_AND_SERVE, **env)
    assert result.returncode == 0, result.stderr
    assert requests and {path for path, _ in requests} == {"/v1/traces"}
    exported = [
        (resource.resource, span)
        for _, request in requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    names = {span.name: span for _, span in exported}
    assert set(names) == {"POST", "send"}
    assert names["send"].trace_id.hex() == OTHER_TRACE  # the webhook's caller's trace
    assert names["send"].parent_span_id == names["POST"].span_id
    resource_attributes = {a.key: a.value.string_value for a in exported[0][0].attributes}
    assert resource_attributes["service.name"] == (service or "source-default")


def test_the_console_exporter_prints_one_json_line_per_span_on_stderr() -> None:
    result = run_python(SEND_AND_SERVE, OTEL_TRACES_EXPORTER="console,zipkin")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # stdout is --dry-run's
    lines = [line for line in result.stderr.splitlines() if line.startswith("{")]
    assert sorted(json.loads(line)["name"] for line in lines) == ["POST", "send"]
    assert "'zipkin' is not console, otlp or none" in result.stderr


NO_OTEL_CHECK = """
    import sys
    import cdk
    from cdk import tracing
    from cdk.testing import SinkClient, run_in_thread
    from cdk.testing.suite import sample_event

    class Sink(cdk.Sink):
        def arrived(self, *events):
            return cdk.SUCCESS

    assert tracing.setup() is False and not tracing.active
    with run_in_thread(Sink(), cdk.SinkConfig()) as running:
        assert SinkClient(running.url).send(sample_event()).status == 200
    loaded = sorted(name for name in sys.modules if name.startswith("opentelemetry"))
    assert not loaded, loaded
"""


@pytest.mark.parametrize("exporter", [None, "none", " NONE "])
def test_without_tracing_configured_the_kit_never_imports_opentelemetry(
    exporter: str | None,
) -> None:
    env = {} if exporter is None else {"OTEL_TRACES_EXPORTER": exporter}
    result = run_python(NO_OTEL_CHECK, **env)
    assert result.returncode == 0, result.stderr


def test_configured_but_not_installed_warns_and_stays_off() -> None:
    code = """
        import sys

        class NoOtel:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "opentelemetry":
                    raise ImportError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoOtel())
        from cdk import tracing
        assert tracing.setup() is False and not tracing.active
    """
    result = run_python(code, OTEL_TRACES_EXPORTER="otlp")
    assert result.returncode == 0, result.stderr
    assert "the otel extra is not installed" in result.stderr


def test_the_otel_extra_is_what_the_kit_is_tested_with() -> None:
    pyproject = (TEMPLATE_PROJECT / "{{cookiecutter.__pyproject_toml}}").read_text("utf-8")
    block = re.search(r"^otel = \[(.*?)^\]", pyproject, re.DOTALL | re.MULTILINE)
    assert block is not None
    extra = set(re.findall(r'"([^"]+)"', block[1]))
    requirements = (TEMPLATE_PROJECT.parent / "tests" / "requirements.txt").read_text("utf-8")
    tested = {line for line in requirements.splitlines() if line.startswith("opentelemetry-")}
    assert extra == tested - {r for r in tested if r.startswith("opentelemetry-proto")}


# ---------------------------------------------------------------- wired into the kit


def test_the_kits_delivery_sends_each_request_in_a_span_on_real_http(
    spans: InMemorySpanExporter,
) -> None:
    from cdk.config import SourceConfig
    from cdk.delivery import Deliverer, DeliveryQueue
    from cdk.metrics import Metrics
    from cdk.testing import CaptureTarget

    async def deliver(url: str) -> None:
        config = SourceConfig(target=url, send_event_attempts=2, retry_backoff=0.01)
        deliverer = Deliverer(config, Metrics(receiving=False))
        chan = DeliveryQueue(10)
        for item in (event("kept", traceparent=OTHER_PARENT), event("new")):
            chan.put_nowait(Tuple(item))
        running = asyncio.ensure_future(deliverer.run(chan))
        await deliverer.drain()
        await running

    with CaptureTarget.in_thread() as target:
        target.fail_next(1, 503)  # the first attempt of the first event is retried
        asyncio.run(deliver(target.url))
        requests = [r for r in target.all_requests if r.accepted]
    sends = [s for s in spans.get_finished_spans() if s.name == "send"]
    assert len(sends) == 2 and all(s.kind == SpanKind.PRODUCER for s in sends)
    by_event = {r.headers["ce-id"]: r for r in requests}
    # The HTTP header carries the hop; an event keeps its own trace, or gets the span's.
    for span in sends:
        event_id = span.attributes["cloudevents.event_id"]
        assert by_event[event_id].headers["traceparent"] == traceparent_of(span)
    assert by_event["kept"].headers["ce-traceparent"] == OTHER_PARENT
    new_span = next(s for s in sends if s.attributes["cloudevents.event_id"] == "new")
    assert by_event["new"].headers["ce-traceparent"] == traceparent_of(new_span)
    retried = next(s for s in sends if s.attributes["cloudevents.event_id"] == "kept")
    assert retried.attributes["http.response.status_code"] == by_event["kept"].status


def test_a_webhook_source_and_a_sink_carry_one_trace_from_caller_to_arrived(
    spans: InMemorySpanExporter,
) -> None:
    import aiohttp

    import cdk
    from cdk.service import service_for

    arrived: list[CloudEvent] = []

    class Sink(cdk.Sink[cdk.SinkConfig]):
        def arrived(self, *events: CloudEvent) -> cdk.Result:
            arrived.extend(events)
            return cdk.SUCCESS

    class Hook(cdk.WebhookSource[cdk.WebhookSourceConfig]):
        def make_event(self, request: cdk.Request) -> CloudEvent:
            return event("hooked")

    async def scenario() -> None:
        sink = service_for(Sink(), cdk.SinkConfig(host="127.0.0.1", port=0))
        await sink.start()
        config = cdk.WebhookSourceConfig(
            target=f"http://127.0.0.1:{sink.port}/", host="127.0.0.1", port=0
        )
        hook = service_for(Hook(), config)
        await hook.start()
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{hook.port}/"
            async with session.post(url, data=b"{}", headers={"traceparent": OTHER_PARENT}) as r:
                assert r.status == 200
        await hook.stop(1.0)
        await sink.stop(1.0)

    asyncio.run(scenario())
    finished = {span.name: span for span in spans.get_finished_spans()}
    assert {"POST", "send", "process"} <= set(finished)
    # Caller -> webhook span -> delivery span -> the sink's span around arrived: one trace.
    assert {ids(span)[0] for span in finished.values()} == {OTHER_TRACE}
    assert finished["send"].parent.span_id == finished["POST"].context.span_id
    assert finished["process"].parent.span_id == finished["send"].context.span_id
    assert arrived[0].get_extension("traceparent") == traceparent_of(finished["POST"])
