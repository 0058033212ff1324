"""Benchmark: the cdk sink receiver against a naive aiohttp + cloudevents-SDK receiver.

Run: ``python tests/benchmarks/bench_sink.py [--seconds N] [--rounds N] [--json]`` (needs ``wrk``:
``apt-get install wrk``). Each receiver runs in its own process on uvloop, pinned to
CPU 0; wrk runs pinned to CPU 1 with 64 connections. Two loads:

- ``single``: one small binary-mode CloudEvent per POST;
- ``batch``: 100 events per POST in ``application/cloudevents-batch+json``.

Both receivers hand the events to the same trivial ``async def arrived``. The naive one
is what a user would write by hand: ``aiohttp.web`` and the SDK's ``from_http_event``.
The SDK has no batch support, so for batches the naive receiver parses the JSON array
and builds each event with the SDK's ``CloudEvent`` (parsing ``time`` with dateutil, as
the SDK's own JSON reader does): the cheapest SDK path, which makes that ratio a lower
bound. Batches are also compared with the naive receiver's one-event-per-request rate,
which is what its users get without batch support.

For each load the two receivers take turns in short rounds, so outside load on a
shared machine hits both. Printed per round: requests/s, server CPU time per request and
the share of its core the server got (well under 100% means something else ran on that
core, or the load generator was starved, and the round says little about the server);
the load average before and after. Summary: requests/s and events/s (best round), p99
latency, server CPU time per request over all rounds (barely affected by outside load,
unlike throughput), events per CPU-second, peak RSS (``VmHWM``), and the ratios against
the targets (>= 2.5x with one event per request, >= 15x with batches of 100).

Then the cost of the duplicate filter (``dedupe_window``): the kit's sink without it, with
it in memory and with it in an SQLite file, in turns, each event with a new id (so every
event is looked up and remembered); events/s and CPU time per event against the sink
without it, in the same run.

``--receivers cdk`` loads only the kit's receiver; ``--json`` prints the figures as one line.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from benchkit import Figures, use_kit

use_kit()

BATCH = 100
CONNECTIONS = 64
TARGETS = {"single": 2.5, "batch": 15.0}
#: The dedupe_window of the dedupe rounds: longer than the run, so no key expires.
DEDUPE_WINDOW = 3600.0
#: The kit's sink without and with its duplicate filter (``--serve`` names).
DEDUPE_RECEIVERS = {"cdk": None, "cdk-memory": "memory", "cdk-sqlite": "sqlite"}
SERVER_CPU = 0
LOAD_CPU = 1


# -- the two receivers (run in a child process: ``--serve KIND --port N``) --------------


def event_json(i: int) -> dict[str, object]:
    return {
        "specversion": "1.0",
        "id": f"8d3c1a2e-5b7f-4c1e-9a0b-{i:012d}",
        "source": "https://example.com/connectors/source-bench",
        "type": "com.example.bench.created",
        "time": "2026-11-26T12:30:15.123Z",
        "datacontenttype": "application/json",
        "subject": "orders/42",
        "data": {"order": i, "customer": "ada", "items": [1, 2, 3], "paid": True},
    }


def serve_cdk(port: int, dedupe: str | None = None) -> None:
    """The kit's sink; ``dedupe`` ``memory`` or ``sqlite`` turns its duplicate filter on."""
    import asyncio

    import uvloop

    import cdk
    from cdk.config import SinkConfig
    from cdk.metrics import Metrics
    from cdk.receiver import Receiver, SinkHandler

    class Bench(cdk.Sink):
        async def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
            return cdk.SUCCESS

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        config = SinkConfig.model_validate({"port": port, "host": "127.0.0.1"})
        metrics = Metrics("bench")
        options = {}
        if dedupe:  # only then: a kit from before the duplicate filter runs the plain sink
            from cdk.dedupe import open_dedupe

            store = None if dedupe != "sqlite" else str(Path(tempfile.mkdtemp()) / "dedupe.db")
            options["dedupe"] = open_dedupe(DEDUPE_WINDOW, store, "bench")
        receiver = Receiver(SinkHandler(Bench(), metrics, **options), config, metrics)
        server = receiver.http_server()
        await server.start()
        receiver.ready = True
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_naive(
    port: int,
    arrived: Callable[..., Awaitable[None]] | None = None,
    on_cleanup: Callable[[], None] | None = None,
) -> None:
    """The naive receiver; ``arrived`` (async, given the events) and ``on_cleanup`` (called
    once the server stopped) let other benchmarks watch what it takes."""
    import asyncio
    import json

    import uvloop
    from aiohttp import web
    from cloudevents.core.base import BaseCloudEvent
    from cloudevents.core.bindings.http import HTTPMessage, from_http_event
    from cloudevents.core.v1.event import CloudEvent
    from dateutil.parser import isoparse  # type: ignore[import-untyped, unused-ignore]

    async def ignore(*events: BaseCloudEvent) -> None:
        return None

    handler = arrived or ignore

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        headers = {name.lower(): value for name, value in request.headers.items()}
        try:
            if headers.get("content-type", "").startswith("application/cloudevents-batch"):
                events: list[BaseCloudEvent] = []
                for item in json.loads(body):
                    data = item.pop("data", None)
                    if "time" in item:
                        item["time"] = isoparse(item["time"])
                    events.append(CloudEvent(item, data))
            else:
                events = [from_http_event(HTTPMessage(headers, body))]
        except Exception as exc:  # what a hand-written receiver typically does
            return web.Response(status=400, text=str(exc))
        await handler(*events)
        return web.Response(status=200)

    async def check_loop(app: web.Application) -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)

    app = web.Application()
    app.router.add_post("/", handle)
    app.on_startup.append(check_loop)
    if on_cleanup is not None:

        async def cleanup(app: web.Application) -> None:
            on_cleanup()

        app.on_cleanup.append(cleanup)
    web.run_app(
        app,
        host="127.0.0.1",
        port=port,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


# -- the driver ---------------------------------------------------------------------------


def _lua_string(value: str) -> str:
    return "[==[" + value + "]==]"


def write_scripts(directory: Path) -> dict[str, Path]:
    import orjson

    single_body = orjson.dumps(event_json(0)["data"]).decode()
    single = directory / "post.lua"
    single.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["ce-specversion"] = "1.0"\n'
        'wrk.headers["ce-id"] = "8d3c1a2e-5b7f-4c1e-9a0b-000000000000"\n'
        'wrk.headers["ce-source"] = "https://example.com/connectors/source-bench"\n'
        'wrk.headers["ce-type"] = "com.example.bench.created"\n'
        'wrk.headers["ce-time"] = "2026-11-26T12:30:15.123Z"\n'
        'wrk.headers["ce-subject"] = "orders/42"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {_lua_string(single_body)}\n"
    )
    batch_body = orjson.dumps([event_json(i) for i in range(BATCH)]).decode()
    batch = directory / "post_batch.lua"
    batch.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/cloudevents-batch+json"\n'
        f"wrk.body = {_lua_string(batch_body)}\n"
    )
    # With dedupe on, every event must be new: the same one would only measure the filter's
    # fast path. Each request gets fresh ids (a counter per wrk thread; one thread runs).
    unique = directory / "post_unique.lua"
    unique.write_text(
        single.read_text()
        + "local n = 0\n"
        + "request = function()\n"
        + "  n = n + 1\n"
        + '  wrk.headers["ce-id"] = "e-" .. n\n'
        + "  return wrk.format()\n"
        + "end\n"
    )
    template = orjson.dumps([{**event_json(0), "id": "@ID@"} for _ in range(BATCH)]).decode()
    unique_batch = directory / "post_batch_unique.lua"
    unique_batch.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/cloudevents-batch+json"\n'
        f"local template = {_lua_string(template)}\n"
        "local n = 0\n"
        "local function next_id()\n"
        "  n = n + 1\n"
        '  return "e-" .. n\n'
        "end\n"
        "request = function()\n"
        '  return wrk.format(nil, nil, nil, (template:gsub("@ID@", next_id)))\n'
        "end\n"
    )
    return {"single": single, "batch": batch, "single-unique": unique, "batch-unique": unique_batch}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"server did not listen on port {port} within {timeout} s")


def pinned(cpu: int, argv: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > max(SERVER_CPU, LOAD_CPU):
        return ["taskset", "-c", str(cpu), *argv]
    return argv


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else float("nan")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other work on this machine shows there)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


@dataclass
class Round:
    """One wrk run against one server."""

    requests_per_s: float
    requests: int
    p99_ms: float
    bad_answers: int
    socket_errors: str
    cpu_s: float = float("nan")
    wall_s: float = float("nan")

    @property
    def cpu_share(self) -> float:
        """The share of its core the server used while loaded."""
        return self.cpu_s / self.wall_s


def run_wrk(port: int, script: Path, seconds: int) -> Round:
    argv = pinned(
        LOAD_CPU,
        [
            "wrk",
            "-t1",
            f"-c{CONNECTIONS}",
            f"-d{seconds}s",
            "-s",
            str(script),
            "--latency",
            f"http://127.0.0.1:{port}/",
        ],
    )
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout

    def find(pattern: str) -> re.Match[str] | None:
        return re.search(pattern, out, re.MULTILINE)

    rps = find(r"Requests/sec:\s+([\d.]+)")
    count = find(r"(\d+) requests in")
    p99 = find(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$")
    bad = find(r"Non-2xx or 3xx responses:\s+(\d+)")
    errors = find(r"Socket errors:\s+(.*)")
    return Round(
        requests_per_s=float(rps.group(1)) if rps else 0.0,
        requests=int(count.group(1)) if count else 0,
        p99_ms=float(p99.group(1)) * _UNITS[p99.group(2)] if p99 else float("nan"),
        bad_answers=int(bad.group(1)) if bad else 0,
        socket_errors=errors.group(1) if errors else "none",
    )


@dataclass
class Run:
    """A receiver under one load: its best round, and totals over all rounds."""

    receiver: str
    load: str
    best: Round
    cpu_us_per_request: float
    peak_rss_mib: float
    bad_answers: int

    @property
    def per_request(self) -> int:
        return BATCH if self.load == "batch" else 1

    @property
    def events_per_s(self) -> float:
        return self.best.requests_per_s * self.per_request

    @property
    def events_per_cpu_s(self) -> float:
        return self.per_request * 1e6 / self.cpu_us_per_request


class Server:
    """A receiver in a child process pinned to the server CPU."""

    def __init__(self, receiver: str) -> None:
        self.receiver = receiver
        self.port = free_port()
        argv = [sys.executable, __file__, "--serve", receiver, "--port", str(self.port)]
        self.proc = subprocess.Popen(pinned(SERVER_CPU, argv))
        wait_listening(self.port, self.proc)

    def load(self, script: Path, seconds: int) -> Round:
        before = cpu_seconds(self.proc.pid)
        started = time.monotonic()
        result = run_wrk(self.port, script, seconds)
        result.cpu_s = cpu_seconds(self.proc.pid) - before
        result.wall_s = time.monotonic() - started
        return result

    def stop(self) -> float:
        """Stop the process; return its peak RSS in MiB."""
        rss = peak_rss_mib(self.proc.pid)
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return rss


def take_turns(
    receivers: list[str],
    script: Path,
    seconds: int,
    warmup: int,
    rounds: int,
    show: Callable[[str, Round], None] | None = None,
) -> tuple[dict[str, list[Round]], dict[str, float]]:
    """Run ``receivers`` side by side and load them in turns: (rounds, peak RSS MiB) each."""
    servers = [Server(name) for name in receivers]
    rounds_of: dict[str, list[Round]] = {name: [] for name in receivers}
    try:
        for server in servers:
            if warmup > 0:
                server.load(script, warmup)
        for _ in range(rounds):
            for server in servers:
                result = server.load(script, seconds)
                rounds_of[server.receiver].append(result)
                if show is not None:
                    show(server.receiver, result)
    finally:
        rss = {server.receiver: server.stop() for server in servers}
    return rounds_of, rss


def measure_load(
    load: str,
    script: Path,
    seconds: int,
    warmup: int,
    rounds: int,
    receivers: tuple[str, ...] = ("cdk", "naive"),
    say: Callable[..., None] = print,
) -> list[Run]:
    """Both receivers under one load, in alternating rounds.

    The two servers run side by side (only one is loaded at a time) and take turns, so
    a burst of outside load on the shared machine hits both rather than one of them.
    Throughput is the best round's; CPU time per request is over all rounds, which
    outside load barely changes.
    """
    say(f"{load}: load average before {load_average()}", flush=True)

    def show(receiver: str, result: Round) -> None:
        say(
            f"  {receiver:<6} {load:<7} {result.requests_per_s:>10,.0f} req/s "
            f"{result.cpu_s * 1e6 / max(result.requests, 1):>8.1f} CPU us/request "
            f"{result.cpu_share:>6.0%} of a core",
            flush=True,
        )

    rounds_of, rss = take_turns(list(receivers), script, seconds, warmup, rounds, show)
    say(f"{load}: load average after {load_average()}", flush=True)
    runs = []
    for name, results in rounds_of.items():
        requests = sum(result.requests for result in results)
        cpu = sum(result.cpu_s for result in results)
        runs.append(
            Run(
                receiver=name,
                load=load,
                best=max(results, key=lambda result: result.requests_per_s),
                cpu_us_per_request=cpu * 1e6 / max(requests, 1),
                peak_rss_mib=rss[name],
                bad_answers=sum(result.bad_answers for result in results),
            )
        )
    return runs


def measure_dedupe(load: str, script: Path, seconds: int, warmup: int, rounds: int) -> None:
    """What the duplicate filter costs: the kit's sink without it, with it in memory and
    with it in an SQLite file, taking turns under ``load`` with a new id on every event.
    Printed: best round's events/s, CPU time per event over all rounds, peak RSS, and
    each against the sink without dedupe."""
    per_request = BATCH if load == "batch" else 1
    print(f"\ndedupe, {load}: load average before {load_average()}", flush=True)
    rounds_of, rss = take_turns(list(DEDUPE_RECEIVERS), script, seconds, warmup, rounds)
    print(f"dedupe, {load}: load average after {load_average()}")
    print(
        f"{'receiver':<11} {'events/s':>10} {'CPU us/event':>12} {'peak RSS MiB':>12}"
        f" {'vs no dedupe: events/s':>23} {'CPU/event':>10}  non-2xx"
    )
    base_rate = base_cpu = 0.0
    for name, results in rounds_of.items():
        rate = max(result.requests_per_s for result in results) * per_request
        events = sum(result.requests for result in results) * per_request
        cpu = sum(result.cpu_s for result in results) * 1e6 / max(events, 1)
        if name == "cdk":
            base_rate, base_cpu = rate, cpu
        bad = sum(result.bad_answers for result in results)
        print(
            f"{name:<11} {rate:>10,.0f} {cpu:>12.2f} {rss[name]:>12.1f}"
            f" {_ratio(rate, base_rate):>22.2f}x {_ratio(cpu, base_cpu):>9.2f}x  {bad:>7}"
        )


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("inf")


def report(runs: list[Run]) -> None:
    """The summary and the comparisons (both receivers measured)."""
    report_plain(runs)
    by = {(run.receiver, run.load): run for run in runs}
    comparisons = [
        ("single: cdk vs naive, one event per request", "single", "single", TARGETS["single"]),
        # Like for like: the naive receiver given batch parsing it does not have built in.
        ("batch:  cdk vs naive, both taking batches of 100", "batch", "batch", TARGETS["batch"]),
        # The naive receiver as users write it has no batch mode: one event per request.
        ("batch:  cdk batches vs naive one event per request", "batch", "single", TARGETS["batch"]),
    ]
    print()
    print(f"{'comparison':<52} {'events/s':>9} {'events/CPU-s':>13}  target")
    for label, cdk_load, naive_load, target in comparisons:
        ours, theirs = by[("cdk", cdk_load)], by[("naive", naive_load)]
        ratio = _ratio(ours.events_per_s, theirs.events_per_s)
        cpu_ratio = _ratio(ours.events_per_cpu_s, theirs.events_per_cpu_s)
        verdict = "PASS" if ratio >= target and ours.bad_answers == 0 else "FAIL"
        print(f"{label:<52} {ratio:>8.1f}x {cpu_ratio:>12.1f}x  >= {target:g}x {verdict}")


def report_plain(runs: list[Run]) -> None:
    """The summary; ``core`` is the share of its core the server got in its best round."""
    print()
    print(
        f"{'receiver':<8} {'load':<7} {'req/s':>9} {'core':>5} {'events/s':>10} {'p99 ms':>8} "
        f"{'CPU us/req':>10} {'events/CPU-s':>12} {'peak RSS MiB':>12}  non-2xx  socket errors"
    )
    for run in runs:
        print(
            f"{run.receiver:<8} {run.load:<7} {run.best.requests_per_s:>9,.0f} "
            f"{run.best.cpu_share:>5.0%} {run.events_per_s:>10,.0f} {run.best.p99_ms:>8.2f} "
            f"{run.cpu_us_per_request:>10.1f} {run.events_per_cpu_s:>12,.0f} "
            f"{run.peak_rss_mib:>12.1f}  {run.bad_answers:>7}  {run.best.socket_errors}"
        )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", choices=["naive", *DEDUPE_RECEIVERS], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=int, default=2, help="seconds of load per round")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per server")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per load")
    parser.add_argument("--receivers", default="cdk,naive", help="comma-separated: cdk, naive")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    args = parser.parse_args(argv)
    receivers = tuple(args.receivers.split(","))
    if args.serve:
        if args.serve == "naive":
            serve_naive(args.port)
        else:
            serve_cdk(args.port, DEDUPE_RECEIVERS[args.serve])
        return 0
    if shutil.which("wrk") is None:
        print(
            "bench_sink: the load generator `wrk` is not installed; "
            "install it (Debian/Ubuntu: apt-get install -y wrk) and run again.",
            file=sys.stderr,
        )
        return 2
    say = print if not args.json else lambda *_, **__: None
    say(
        f"server pinned to CPU {SERVER_CPU} (uvloop), wrk pinned to CPU {LOAD_CPU}, "
        f"{CONNECTIONS} connections; per load, {args.rounds} alternating rounds of "
        f"{args.seconds} s per receiver (best round shown) after {args.warmup} s warm-up"
    )
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        scripts = write_scripts(Path(tmp))
        for load in ("single", "batch"):
            runs += measure_load(
                load, scripts[load], args.seconds, args.warmup, args.rounds, receivers, say
            )
    if args.json:
        figures = Figures()
        for run in runs:
            what = f"sink: {run.receiver}, {'one event' if run.load == 'single' else 'batches'}"
            figures.add(f"{what}, requests/s", run.best.requests_per_s, "req/s")
            figures.add(f"{what}, CPU/request", run.cpu_us_per_request, "us", "lower")
        figures.emit()
    elif set(receivers) == {"cdk", "naive"}:
        report(runs)
        with tempfile.TemporaryDirectory() as tmp:
            scripts = write_scripts(Path(tmp))
            for load in ("single", "batch"):
                script = scripts[f"{load}-unique"]
                measure_dedupe(load, script, args.seconds, args.warmup, args.rounds)
    else:
        report_plain(runs)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
