"""Benchmark: what tracing costs a request, off and on, against encoding the request.

Run: ``python tests/benchmarks/bench_tracing.py [--quick]``. Prints CPU microseconds per
call (best of N timeit repeats) of the check a request pays with tracing off, and of the
spans a delivery, a webhook request and a sink request make with tracing on (an SDK
TracerProvider whose spans go to a processor that drops them), each beside the cost of
encoding one event in binary mode, the ratio the disabled check must keep near zero.
"""

from __future__ import annotations

import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.dont_write_bytecode = True  # keep __pycache__ out of the template directory
TEMPLATE_PROJECT = Path(__file__).resolve().parents[2] / "{{cookiecutter.connector_name}}"
if str(TEMPLATE_PROJECT) not in sys.path:
    sys.path.insert(0, str(TEMPLATE_PROJECT))

from cloudevents.core.v1.event import CloudEvent  # noqa: E402
from opentelemetry.sdk.trace import TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)

from cdk import codec, tracing  # noqa: E402
from cdk.testing import sample_event  # noqa: E402


class _Drop(SpanExporter):
    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def _best_us(fn: Callable[[], object], repeat: int, number: int) -> float:
    timings = timeit.repeat(fn, repeat=repeat, number=number, timer=time.process_time)
    return min(timings) / number * 1e6


def main(argv: list[str]) -> int:
    repeat, number = (3, 2000) if "--quick" in argv else (9, 20000)
    event = sample_event(0)
    batch = [sample_event(i) for i in range(100)]
    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}

    def off() -> None:
        if tracing.active:
            raise AssertionError("tracing is on")

    def send(events: list[CloudEvent]) -> Callable[[], None]:
        def run() -> None:
            span, traced, _ = tracing.start_send(events, "http://127.0.0.1:8080/")
            codec.to_binary(traced[0]) if len(traced) == 1 else codec.to_batch(traced)
            tracing.end_send(span, 200)

        return run

    def webhook() -> None:
        with tracing.webhook(headers):
            tracing.inject(event)

    def arrived() -> None:
        with tracing.arrived([event], headers):
            pass

    encode = _best_us(lambda: codec.to_binary(event), repeat, number)
    rows = [("tracing off: the check", _best_us(off, repeat, number * 5))]
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_Drop()))
    tracing.setup(provider)
    try:
        encode_batch = _best_us(lambda: codec.to_batch(batch), repeat, number // 100)
        rows += [
            (
                "on: delivery of 1 event (span, inject, encode)",
                _best_us(send([event]), repeat, number // 4),
            ),
            (
                "on: delivery of 100 events, per request",
                _best_us(send(batch), repeat, number // 100),
            ),
            ("on: webhook span + inject", _best_us(webhook, repeat, number // 4)),
            ("on: arrived span", _best_us(arrived, repeat, number // 4)),
        ]
    finally:
        tracing.shutdown()
    print(f"encode 1 event (binary): {encode:.2f} us; a batch of 100: {encode_batch:.1f} us")
    print(f"{'operation':<50}{'us':>9}{'x encode':>10}")
    for name, us in rows:
        print(f"{name:<50}{us:9.3f}{us / encode:9.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
