"""Benchmark: cdk.codec against the cloudevents SDK's HTTP binding, in one run.

Run: ``python tests/benchmarks/bench_codec.py [--quick] [--json] [--against OTHER_CODEC.py]``.
Prints per-event cost in microseconds of CPU time (best of N timeit repeats) for encoding
and decoding a small JSON event in binary, structured and batched (100 events) mode, the
SDK's figures side by side, the ratios, and a verdict against the targets: decoding at
least 3x faster than the SDK's ``from_http_event`` in binary and structured mode, batched
decoding under 4 us per event. ``--against`` also times another version of the codec
(``git show main:"{{cookiecutter.connector_name}}/cdk/codec.py" > /tmp/codec_main.py``)
in the same run, interleaved, and prints this one's cost as a ratio of that one's.
``--json`` times only the kit's codec (no SDK) and prints its figures as one JSON line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
import timeit
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from benchkit import Figures, use_kit

use_kit()

from cloudevents.core.bindings import http as sdk_http  # noqa: E402
from cloudevents.core.v1.event import CloudEvent  # noqa: E402

from cdk import codec  # noqa: E402

BATCH = 100
DECODE_TARGET_RATIO = 3.0
BATCH_TARGET_US = 4.0


def _event(i: int) -> CloudEvent:
    return CloudEvent(
        {
            "id": f"8d3c1a2e-5b7f-4c1e-9a0b-{i:012d}",
            "source": "https://example.com/connectors/source-demo",
            "type": "com.example.demo.created",
            "specversion": "1.0",
            "time": datetime(2026, 11, 26, 12, 30, 15, 123000, tzinfo=UTC),
            "datacontenttype": "application/json",
            "subject": "orders/42",
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        },
        {"order": 42, "customer": "ada", "items": [1, 2, 3], "paid": True},
    )


def _best_us(fn: Callable[[], object], per: int, repeat: int, number: int) -> float:
    """Best-of-``repeat`` cost of one call, in microseconds of CPU per event.

    CPU time of this process, not wall time: on a shared machine, time spent descheduled
    would otherwise swamp differences of a microsecond.
    """
    timings = timeit.repeat(fn, repeat=repeat, number=number, timer=time.process_time)
    return min(timings) / number / per * 1e6


def _load(path: str) -> object:
    spec = importlib.util.spec_from_file_location("other_codec", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _versus(other: Any, repeat: int, number: int) -> None:
    """This codec against ``other``, interleaved so both see the same machine load."""
    event = _event(0)
    events = [_event(i) for i in range(BATCH)]
    bin_msg, st_msg, batch_msg = (
        codec.to_binary(event),
        codec.to_structured(event),
        codec.to_batch(events),
    )
    cases: list[tuple[str, Callable[[Any], Callable[[], object]], int]] = [
        ("encode binary", lambda m: lambda: m.to_binary(event), 1),
        ("encode structured", lambda m: lambda: m.to_structured(event), 1),
        (f"encode batch ({BATCH}), per event", lambda m: lambda: m.to_batch(events), BATCH),
        ("decode binary", lambda m: lambda: m.from_http(*bin_msg), 1),
        ("decode structured", lambda m: lambda: m.from_http(*st_msg), 1),
        (f"decode batch ({BATCH}), per event", lambda m: lambda: m.from_http(*batch_msg), BATCH),
    ]
    print(f"\nagainst {sys.argv[sys.argv.index('--against') + 1]}, best of {repeat} rounds")
    print(f"{'operation':<34}{'this':>9}{'other':>9}{'this/other':>12}")
    for name, make, per in cases:
        n = max(1, number // per)
        ours, theirs = float("inf"), float("inf")
        for _ in range(repeat):
            ours = min(ours, _best_us(make(codec), per, 3, n))
            theirs = min(theirs, _best_us(make(other), per, 3, n))
        print(f"{name:<34}{ours:9.2f}{theirs:9.2f}{ours / theirs:11.3f}x")


def json_figures(repeat: int, number: int) -> None:
    """The kit's own costs, for ``--json`` (``against.py`` compares two kits with them)."""
    figures = Figures()
    event = _event(0)
    events = [_event(i) for i in range(BATCH)]
    cases: list[tuple[str, Callable[[], Callable[[], object]], int]] = [
        ("encode binary", lambda: lambda: codec.to_binary(event), 1),
        ("encode structured", lambda: lambda: codec.to_structured(event), 1),
        (f"encode batch of {BATCH}", lambda: lambda: codec.to_batch(events), BATCH),
    ]
    for name, make, per in list(cases):
        with contextlib.suppress(Exception):  # a codec that cannot encode has nothing to decode
            headers, body = make()()
            cases.append(
                (
                    name.replace("encode", "decode"),
                    lambda h=headers, b=body: lambda: codec.from_http(h, b),
                    per,
                )
            )
    for name, make, per in cases:
        try:
            cost = _best_us(make(), per, repeat, max(1, number // per))
        except Exception as exc:
            figures.skip(f"codec: {name}", f"{type(exc).__name__}: {exc}")
            continue
        figures.add(f"codec: {name}, per event", cost, "us", "lower")
    figures.emit()


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    repeat, number = (3, 300) if quick else (15, 2000)
    if "--json" in argv:
        json_figures(repeat, number)
        return 0
    event = _event(0)
    events = [_event(i) for i in range(BATCH)]

    bin_headers, bin_body = codec.to_binary(event)
    batch_headers, batch_body = codec.to_batch(events)
    sdk_bin = sdk_http.to_binary_event(event)
    sdk_st = sdk_http.to_structured_event(event)
    # Both sides decode the same messages: binary as the codec writes it, structured as
    # the SDK writes it (the batch is the codec's; the SDK cannot write one).
    sdk_bin_msg = sdk_http.HTTPMessage(headers=bin_headers, body=bin_body)
    sdk_st_msg = sdk_http.HTTPMessage(headers=sdk_st.headers, body=sdk_st.body)
    st_headers, st_body = sdk_st.headers, sdk_st.body
    assert codec.from_http(sdk_bin.headers, sdk_bin.body)[1][0].get_id() == event.get_id()

    rows: list[tuple[str, float, float | None]] = []

    def row(
        name: str, ours: Callable[[], object], sdk: Callable[[], object] | None, per: int = 1
    ) -> None:
        n = max(1, number // per)
        ours_us = _best_us(ours, per, repeat, n)
        sdk_us = _best_us(sdk, per, repeat, n) if sdk is not None else None
        rows.append((name, ours_us, sdk_us))

    row("encode binary", lambda: codec.to_binary(event), lambda: sdk_http.to_binary_event(event))
    row(
        "encode structured",
        lambda: codec.to_structured(event),
        lambda: sdk_http.to_structured_event(event),
    )
    row(
        f"encode batch ({BATCH}), per event",
        lambda: codec.to_batch(events),
        lambda: [sdk_http.to_structured_event(e) for e in events],
        per=BATCH,
    )
    row(
        "decode binary",
        lambda: codec.from_http(bin_headers, bin_body),
        lambda: sdk_http.from_http_event(sdk_bin_msg),
    )
    row(
        "decode structured",
        lambda: codec.from_http(st_headers, st_body),
        lambda: sdk_http.from_http_event(sdk_st_msg),
    )
    row(
        f"decode batch ({BATCH}), per event",
        lambda: codec.from_http(batch_headers, batch_body),
        lambda: [sdk_http.from_http_event(sdk_st_msg) for _ in range(BATCH)],
        per=BATCH,
    )

    print(f"cdk.codec vs cloudevents SDK, CPU microseconds per event, best of {repeat}")
    print("(SDK has no batch: its column is 100 single structured events)")
    print(f"{'operation':<34}{'cdk':>9}{'SDK':>9}{'SDK/cdk':>9}")
    ratios: dict[str, float] = {}
    for name, ours_us, sdk_us in rows:
        ratio = sdk_us / ours_us if sdk_us is not None else float("nan")
        ratios[name] = ratio
        sdk_text = f"{sdk_us:9.2f}" if sdk_us is not None else f"{'-':>9}"
        print(f"{name:<34}{ours_us:9.2f}{sdk_text}{ratio:8.1f}x")

    batch_us = next(us for name, us, _ in rows if name.startswith("decode batch"))
    checks = {
        "binary decode >= 3x SDK": ratios["decode binary"] >= DECODE_TARGET_RATIO,
        "structured decode >= 3x SDK": ratios["decode structured"] >= DECODE_TARGET_RATIO,
        f"batch decode < {BATCH_TARGET_US} us/event": batch_us < BATCH_TARGET_US,
    }
    verdict = "MET" if all(checks.values()) else "MISSED"
    detail = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in checks.items())
    print(f"verdict: targets {verdict} ({detail})")
    if "--against" in argv:
        _versus(_load(argv[argv.index("--against") + 1]), repeat, number)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
