"""Steady-rate latency: a source and a sink of the kit as processes, 1,000 events/s of 1 KB.

Run: ``python3 tests/dev.py bench --latency [--seconds 20] [--rate 1000] [--quick] [--json]``

Each run starts two processes of the kit's own runtime (``cdk.run_source`` and
``cdk.run_sink``, each with a ``config.yml``, as a generated project's ``cmd/main.py`` runs
them): a source whose ``loop_produce_event`` puts events in ``chan`` at a steady ``--rate``
(each event's data is 1 KB and carries ``time.monotonic_ns()`` taken in ``make_event``), and
a sink whose ``arrived`` takes the clock again. Linux's monotonic clock is one for all
processes, so the difference is the ``make_event`` -> ``arrived`` latency: queueing in the
source, encoding, HTTP on loopback, decoding. Runs: binary mode, then batches
(``batch_size: 100``; a batch leaves after ``batch_linger``, 5 ms by default, at this rate),
each to the kit's sink and to the naive receiver (aiohttp + the SDK's ``from_http_event``,
as in ``bench_sink.py``). After a warm-up, the measured window gives the latency
percentiles of the events made in it, the CPU seconds per 1,000 events of each process
(from ``/proc/PID/stat``) and their peak RSS (``VmHWM``). The processes are not pinned:
they share the machine's cores with whatever else runs, as a deployment would.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

from benchkit import Figures, use_kit

use_kit()

import bench_sink  # noqa: E402
import yaml  # noqa: E402

RATE = 1000
EVENT_BYTES = 1024
#: Seconds between the first event's arrival and the measured window.
WARMUP = 2.0
#: (run name, source config overrides, receiver)
RUNS = [
    ("binary, kit's sink", {}, "cdk"),
    ("binary, naive receiver", {}, "naive"),
    ("batches of 100, kit's sink", {"batch_size": 100}, "cdk"),
    ("batches of 100, naive receiver", {"batch_size": 100}, "naive"),
]


# -- the processes (``--role source|sink|naive``) ----------------------------------------


def run_source(config: str, rate: float) -> None:
    import cdk

    pad = "x" * (EVENT_BYTES - 60)  # with the seq and time fields, about 1 KB of JSON

    class PacedSource(cdk.Source[cdk.SourceConfig]):
        seq = 0

        def make_event(self) -> cdk.CloudEvent:
            self.seq += 1
            attributes = {
                "id": f"latency-{self.seq}",
                "source": "/bench/latency",
                "type": "com.example.bench.latency",
                "specversion": "1.0",
                "datacontenttype": "application/json",
            }
            data = {"seq": self.seq, "made": time.monotonic_ns(), "pad": pad}
            return cdk.CloudEvent(attributes, data)

        async def loop_produce_event(self) -> None:
            # Paced by the clock, not by sleeps in a row: late wake-ups do not lower the rate.
            start, made = time.monotonic(), 0
            while True:
                due = int((time.monotonic() - start) * rate) + 1
                while made < due:
                    await self.chan.put(cdk.Tuple(self.make_event()))
                    made += 1
                await asyncio.sleep(max(0.0, start + made / rate - time.monotonic()))

    cdk.run_source(cdk.SourceConfig, PacedSource, ["--config", config])


class Recorder:
    """(made, latency) pairs in nanoseconds, written to ``path`` when the receiver stops."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pairs = array("q")

    async def arrived(self, *events: Any) -> None:
        now = time.monotonic_ns()
        if not self.pairs:  # tells the driver that events flow: the warm-up starts
            Path(self.path + ".started").touch()
        for event in events:
            made = event.get_data()["made"]
            self.pairs.append(made)
            self.pairs.append(now - made)

    def write(self) -> None:
        with open(self.path, "wb") as out:
            self.pairs.tofile(out)


def run_sink(config: str, out: str) -> None:
    import cdk

    recorder = Recorder(out)

    class LatencySink(cdk.Sink[cdk.SinkConfig]):
        async def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
            await recorder.arrived(*events)
            return cdk.SUCCESS

        def destroy(self) -> None:
            recorder.write()

    cdk.run_sink(cdk.SinkConfig, LatencySink, ["--config", config])


def run_naive(port: int, out: str) -> None:
    recorder = Recorder(out)
    bench_sink.serve_naive(port, recorder.arrived, recorder.write)


# -- the driver ----------------------------------------------------------------------------


def percentile(sorted_values: list[int], share: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(share * len(sorted_values)))] / 1e6


def stop(proc: subprocess.Popen[bytes], name: str) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the {name} did not stop within 20 s of SIGTERM") from None


def measure(
    name: str, overrides: dict[str, Any], receiver: str, seconds: float, rate: float, tmp: Path
) -> dict[str, Any]:
    me = [sys.executable, "-B", __file__]
    port = bench_sink.free_port()
    out = tmp / f"{receiver}-{port}.bin"
    quiet = {"log_level": "WARNING"}
    if receiver == "cdk":
        sink_config = tmp / f"sink-{port}.yml"
        sink_config.write_text(yaml.safe_dump({"port": port, "host": "127.0.0.1", **quiet}))
        argv = [*me, "--role", "sink", "--config", str(sink_config), "--out", str(out)]
    else:
        argv = [*me, "--role", "naive", "--port", str(port), "--out", str(out)]
    sink = subprocess.Popen(argv)
    try:
        bench_sink.wait_listening(port, sink)
        source_config = tmp / f"source-{port}.yml"
        target = {"target": f"http://127.0.0.1:{port}/"}
        source_config.write_text(yaml.safe_dump({**target, **quiet, **overrides}))
        argv = [*me, "--role", "source", "--config", str(source_config), "--rate", str(rate)]
        source = subprocess.Popen(argv)
        try:
            started, deadline = Path(f"{out}.started"), time.monotonic() + 60
            while not started.exists():
                if source.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name}: no event arrived (source status {source.poll()})")
                time.sleep(0.05)
            time.sleep(WARMUP)
            procs = {"source": source.pid, "sink": sink.pid}
            cpu = {side: bench_sink.cpu_seconds(pid) for side, pid in procs.items()}
            start = time.monotonic_ns()
            time.sleep(seconds)
            end = time.monotonic_ns()
            cpu = {side: bench_sink.cpu_seconds(pid) - cpu[side] for side, pid in procs.items()}
            rss = {side: bench_sink.peak_rss_mib(pid) for side, pid in procs.items()}
        finally:
            stop(source, "source")
    finally:
        stop(sink, "sink")
    pairs = array("q")
    pairs.frombytes(out.read_bytes())
    # The source stopped (delivering what it had) before the sink: every event made in the
    # window arrived, and the sink recorded it.
    latencies = sorted(pairs[i + 1] for i in range(0, len(pairs), 2) if start <= pairs[i] < end)
    events = len(latencies)
    if not events:
        raise RuntimeError(f"{name}: no event made in the measured window arrived")
    return {
        "name": name,
        "rate": events / ((end - start) / 1e9),
        "p50": percentile(latencies, 0.50),
        "p90": percentile(latencies, 0.90),
        "p99": percentile(latencies, 0.99),
        "max": latencies[-1] / 1e6,
        "mean": statistics.fmean(latencies) / 1e6,
        "cpu_source": cpu["source"] * 1000 / events,
        "cpu_sink": cpu["sink"] * 1000 / events,
        "rss_source": rss["source"],
        "rss_sink": rss["sink"],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    parser.add_argument("--rate", type=float, default=RATE, help="events per second")
    parser.add_argument("--quick", action="store_true", help="5 s per run instead of 20")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    parser.add_argument("--only", help="run only the runs whose name contains this")
    parser.add_argument("--role", choices=["source", "sink", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "source":
        run_source(args.config, args.rate)
        return 0
    if args.role == "sink":
        run_sink(args.config, args.out)
        return 0
    if args.role == "naive":
        run_naive(args.port, args.out)
        return 0
    seconds = 5.0 if args.quick else args.seconds
    runs = [run for run in RUNS if not args.only or args.only in run[0]]
    say = print if not args.json else lambda *_, **__: None
    say(
        f"source paced at {args.rate:,.0f} events/s of about {EVENT_BYTES} B; per run "
        f"{WARMUP:g} s of warm-up, then {seconds:g} s measured; load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="cdk-latency-") as tmp:
        for name, overrides, receiver in runs:
            results.append(measure(name, overrides, receiver, seconds, args.rate, Path(tmp)))
            say(f"  {name}: done (load average {os.getloadavg()[0]:.1f})", flush=True)
    if args.json:
        figures = Figures()
        for r in results:
            for key in ("p50", "p90", "p99", "max"):
                figures.add(f"latency: {r['name']}, {key}", r[key], "ms", "lower")
            figures.add(f"latency: {r['name']}, source CPU", r["cpu_source"], "s/1k", "lower")
            figures.add(f"latency: {r['name']}, sink CPU", r["cpu_sink"], "s/1k", "lower")
        figures.emit()
        return 0
    print()
    print(
        f"{'run':<32} {'events/s':>8} {'p50 ms':>7} {'p90 ms':>7} {'p99 ms':>7} {'max ms':>7} "
        f"{'CPU s/1k events: source':>24} {'sink':>6} {'peak RSS MiB: source':>21} {'sink':>6}"
    )
    for r in results:
        print(
            f"{r['name']:<32} {r['rate']:>8,.0f} {r['p50']:>7.2f} {r['p90']:>7.2f} "
            f"{r['p99']:>7.2f} {r['max']:>7.1f} {r['cpu_source']:>24.3f} {r['cpu_sink']:>6.3f} "
            f"{r['rss_source']:>21.1f} {r['rss_sink']:>6.1f}"
        )
    print(
        "\nReference (published, not measured here): Dapr pub/sub over HTTP adds p90 0.49 ms / "
        "p99 1.21 ms at 1,000 msg/s of 1 KB, its sidecar about 0.2 vCPU (0.2 CPU s per "
        "1,000 messages) and 30 MB."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
