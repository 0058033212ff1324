"""Quick-start demo: scaffold a source and a sink, run them together, watch the events flow.

    python tests/e2e/demo.py [--seconds 10] [--events 20] [--mode binary|structured]
                             [--batch-size N] [--interval SECONDS]

It renders the template twice with its defaults (a polling source and a sink) into a
temporary directory, starts the sink on a free loopback port and the source targeting
it, both as ``python cmd/main.py`` processes, and prints what each one says, prefixed
``[source]`` / ``[sink]``. After ``--events`` deliveries (or ``--seconds``) it stops
both with SIGTERM and prints a summary. Exit status 0 means every event the source
reported delivered arrived at the sink and both processes exited 0.

The end-to-end tests (``test_end_to_end.py``) drive the same functions.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_PROJECT = REPO / "{{cookiecutter.connector_name}}"
if str(TEMPLATE_PROJECT) not in sys.path:
    sys.path.insert(0, str(TEMPLATE_PROJECT))

from cdk.testing import ConnectorProcess, SinkClient, free_port  # noqa: E402

# What the untouched examples print: the source logs each delivery (and failure) with
# the event id, the sink prints the key/value pairs of each event's data. The sink's
# prints come from worker threads, so two of them may share a line ("number 6number 7"):
# every match on a line counts.
DELIVERED = re.compile(r"send event success: id-(\d+)")
FAILED = re.compile(r"send event failed: id-(\d+)")
ARRIVED = re.compile(r"number (\d+)")
RECEIVED_METRIC = re.compile(r'^cdk_events_received_total\{mode="(\w+)"\} (\S+)$', re.M)


def render(connector_type: str, output_dir: Path, **answers: str) -> Path:
    """Render the template with its defaults (plus ``answers``); return the project dir."""
    from cookiecutter.main import cookiecutter

    # cookiecutter keeps replay files and clones under the user's home by default; a
    # config of our own keeps them beside the output instead.
    state = output_dir / ".cookiecutter-state"
    state.mkdir(parents=True, exist_ok=True)
    config = state / "config.yaml"
    settings = {"cookiecutters_dir": str(state / "templates"), "replay_dir": str(state / "replay")}
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    project = cookiecutter(
        str(REPO),
        no_input=True,
        output_dir=str(output_dir),
        config_file=str(config),
        extra_context={"connector_type": connector_type, **answers},
    )
    return Path(project)


@dataclass
class PairRun:
    """What one source -> sink run showed."""

    delivered: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    arrived: list[int] = field(default_factory=list)
    received_by_mode: dict[str, float] = field(default_factory=dict)
    source_status: int | None = None
    sink_status: int | None = None
    source_output: str = ""
    sink_output: str = ""
    seconds: float = 0.0

    @property
    def missing(self) -> list[int]:
        """Events the source reported delivered that the sink never printed."""
        arrived = set(self.arrived)
        return sorted(n for n in set(self.delivered) if n not in arrived)

    @property
    def ok(self) -> bool:
        return (
            bool(self.delivered)
            and not self.missing
            and not self.failed
            and self.source_status == 0
            and self.sink_status == 0
        )

    def summary(self) -> str:
        modes = ", ".join(f"{mode} {int(n)}" for mode, n in sorted(self.received_by_mode.items()))
        return (
            f"{len(set(self.delivered))} event(s) sent and confirmed by the source, "
            f"{len(set(self.arrived))} arrived at the sink"
            + (f" (by mode: {modes})" if modes else "")
            + f", {len(self.missing)} missing, {len(self.failed)} failed; "
            f"source exited {self.source_status}, sink exited {self.sink_status} "
            f"({self.seconds:.1f} s)"
        )


def _count(pattern: re.Pattern[str], lines: list[str]) -> int:
    return sum(len(pattern.findall(line)) for line in lines)


def _numbers(pattern: re.Pattern[str], lines: list[str]) -> list[int]:
    return [int(number) for line in lines for number in pattern.findall(line)]


def _received_by_mode(url: str) -> dict[str, float]:
    reply = SinkClient(url, timeout=10).get("/metrics")
    if not reply.ok:
        return {}
    return {mode: float(n) for mode, n in RECEIVED_METRIC.findall(reply.text)}


def run_pair(
    source_dir: Path,
    sink_dir: Path,
    *,
    content_mode: str = "binary",
    batch_size: int = 1,
    interval: float = 0.2,
    events: int = 20,
    seconds: float = 10.0,
    require_events: bool = False,
    on_source_line: Callable[[str], None] | None = None,
    on_sink_line: Callable[[str], None] | None = None,
) -> PairRun:
    """Run sink and source together until ``events`` deliveries or ``seconds``; stop both.

    With ``require_events`` a run that ends on time rather than on count raises
    ``TimeoutError``. The source is stopped first: it delivers what it queued before
    exiting, so once it exited everything it reported delivered has reached the sink.
    """
    started = time.monotonic()
    port = free_port()
    sink_config: dict[str, Any] = {"host": "127.0.0.1", "port": port, "log_level": "INFO"}
    source_config: dict[str, Any] = {
        "target": f"http://127.0.0.1:{port}/",
        "content_mode": content_mode,
        "batch_size": batch_size,
        "interval": interval,
        "log_level": "INFO",
    }
    if batch_size > 1:
        # Give a batch time to fill with the example's paced events.
        source_config["batch_linger"] = max(0.05, interval * batch_size)
    run = PairRun()
    sink = ConnectorProcess(sink_dir, sink_config, on_line=on_sink_line)
    source = ConnectorProcess(source_dir, source_config, on_line=on_source_line)
    with sink:
        try:
            with source:
                try:
                    source.wait_until(lambda lines: _count(DELIVERED, lines) >= events, seconds)
                except TimeoutError:
                    if require_events or not source.running:
                        raise
                run.source_status = source.stop()
            run.received_by_mode = _received_by_mode(sink.url)
        finally:
            run.sink_status = sink.stop()
    run.source_output = source.output
    run.sink_output = sink.output
    run.delivered = _numbers(DELIVERED, source.lines)
    run.failed = _numbers(FAILED, source.lines)
    run.arrived = _numbers(ARRIVED, sink.lines)
    run.seconds = time.monotonic() - started
    return run


def _printer(prefix: str) -> Callable[[str], None]:
    lock = _PRINT_LOCK

    def show(line: str) -> None:
        with lock:
            print(f"{prefix} {line}", flush=True)

    return show


_PRINT_LOCK = threading.Lock()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="stop after this long")
    parser.add_argument("--events", type=int, default=20, help="stop after this many deliveries")
    parser.add_argument("--mode", choices=("binary", "structured"), default="binary")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between events")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="connector-demo-") as tmp:
        out = Path(tmp)
        print(f"scaffolding a source and a sink into {out} ...", flush=True)
        try:
            source_dir = render("source", out)
            sink_dir = render("sink", out)
        except Exception as exc:  # the template itself is broken: say so in one line
            print(f"demo failed: cannot render the template: {type(exc).__name__}: {exc}")
            return 1
        width = max(len(source_dir.name), len(sink_dir.name)) + 1
        print(f"  {source_dir.name + '/':<{width}}  a polling source", flush=True)
        print(f"  {sink_dir.name + '/':<{width}}  a sink", flush=True)
        print(
            f"running both on 127.0.0.1 ({args.mode} mode, batch size {args.batch_size}); "
            f"stopping after {args.events} events or {args.seconds:g} s ...",
            flush=True,
        )
        try:
            run = run_pair(
                source_dir,
                sink_dir,
                content_mode=args.mode,
                batch_size=args.batch_size,
                interval=args.interval,
                events=args.events,
                seconds=args.seconds,
                on_source_line=_printer("[source]"),
                on_sink_line=_printer("[sink]  "),
            )
        except TimeoutError as exc:
            print(f"demo failed: {exc}", flush=True)
            return 1
    print("", flush=True)
    print(f"summary: {run.summary()}", flush=True)
    if run.missing:
        print(f"missing at the sink: {run.missing}", flush=True)
    print("OK: every event arrived" if run.ok else "FAILED", flush=True)
    return 0 if run.ok else 1


if __name__ == "__main__":
    sys.exit(main())
