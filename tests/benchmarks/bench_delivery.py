"""Source delivery throughput: the cdk Deliverer against the one-request-in-flight pattern.

Run: ``.venv/bin/python tests/benchmarks/bench_delivery.py [--seconds 4]``

A fast receiver (asyncio Protocol + httptools on uvloop, reads each body, answers 200)
runs in its own process pinned to one core, beside a faulty one on another port (the same,
but a seeded 20% of answers are 503 and 5% of connections are dropped unanswered); each
scenario runs in a fresh sender process pinned to the other core, so its peak RSS is its
own. Every scenario drains a bounded queue that a producer keeps full with ``cdk.Tuple``
objects, and counts events whose ``success`` callback ran during the measured window.
Ratios are against the baseline measured in the same run: one aiohttp request in flight,
one event per request, binary mode (the cdk-go pattern). The Deliverer sends with the
kit's own client (``cdk.client``); the "aiohttp, 16 in flight" row shows what the same
concurrency gets from aiohttp's client, for reference. The faulty scenario retries until
delivered and is compared with the healthy binary one (``--only faulty`` runs just those).
``--pages`` measures instead a polling source through the whole kit: ``make_event`` pages
against the same source's hand-written ``loop_produce_event``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TEMPLATE_PROJECT = Path(__file__).resolve().parents[2] / "{{cookiecutter.connector_name}}"
if str(TEMPLATE_PROJECT) not in sys.path:
    sys.path.insert(0, str(TEMPLATE_PROJECT))
sys.dont_write_bytecode = True  # keep __pycache__ out of the template

RECEIVER_CORE = 0
SENDER_CORE = 1
WARMUP = 0.3

#: The faulty receiver's share of 503 answers and of connections dropped unanswered.
FAULTY_503 = 0.20
FAULTY_DROP = 0.05
#: Retries of the faulty scenarios: until delivered, so every event counts once.
RETRYING = {"send_event_attempts": 0, "retry_backoff": 0.05, "retry_backoff_max": 1.0}

#: name -> (kind, Deliverer config overrides); the "faulty" kind is a Deliverer sending to
#: the faulty receiver.
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline: 1 in flight, binary": ("baseline", {}),
    "aiohttp, 16 in flight, binary": ("aiohttp", {"max_in_flight": 16}),
    "Deliverer binary, 16 in flight": ("deliverer", {"max_in_flight": 16}),
    "Deliverer binary, 32 in flight": ("deliverer", {"max_in_flight": 32}),
    "Deliverer structured, 16 in flight": (
        "deliverer",
        {"max_in_flight": 16, "content_mode": "structured"},
    ),
    "Deliverer batch 100, 16 in flight": ("deliverer", {"max_in_flight": 16, "batch_size": 100}),
    "Deliverer binary, 16 in flight, faulty": ("faulty", {"max_in_flight": 16, **RETRYING}),
}
HEALTHY = "Deliverer binary, 16 in flight"
FAULTY = "Deliverer binary, 16 in flight, faulty"


def pin(core: int) -> None:
    cores = os.sched_getaffinity(0)
    if core in cores and len(cores) > 1:
        os.sched_setaffinity(0, {core})


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


# -- receiver ------------------------------------------------------------------------

_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
_UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


class _Receiver(asyncio.Protocol):
    """Parses requests with httptools, reads each body, answers 200 (keep-alive).

    With ``faults`` (a seeded random generator), answers a share of requests 503 and
    drops the connection of another share without answering.
    """

    def __init__(self, faults: Any = None) -> None:
        import httptools

        self.faults = faults
        self.parser = httptools.HttpRequestParser(self)
        self.transport: Any = None
        self.body_bytes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception:  # a broken client just loses its connection
            if self.transport is not None:
                self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.body_bytes += len(body)

    def on_message_complete(self) -> None:
        if self.transport is None:
            return
        draw = self.faults.random() if self.faults is not None else 1.0
        if draw < FAULTY_DROP:
            self.transport.abort()
            self.transport = None
            return
        self.transport.write(_UNAVAILABLE if draw < FAULTY_DROP + FAULTY_503 else _OK)
        if not self.parser.should_keep_alive():
            self.transport.close()


def serve() -> None:
    pin(RECEIVER_CORE)
    install_uvloop()

    async def main() -> None:
        import random

        loop = asyncio.get_running_loop()
        faults = random.Random(11)
        healthy = await loop.create_server(_Receiver, "127.0.0.1", 0, backlog=1024)
        faulty = await loop.create_server(lambda: _Receiver(faults), "127.0.0.1", 0, backlog=1024)
        ports = [server.sockets[0].getsockname()[1] for server in (healthy, faulty)]
        print(*ports, flush=True)
        # Runs until the parent closes our stdin.
        await loop.run_in_executor(None, sys.stdin.read)
        healthy.close()
        faulty.close()

    asyncio.run(main())


# -- senders -------------------------------------------------------------------------


class _Count:
    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def hit(self) -> None:
        self.n += 1


def _events(n: int) -> list[Any]:
    from cdk import CloudEvent

    return [
        CloudEvent(
            {
                "id": f"bench-{i}",
                "source": "/bench/delivery",
                "type": "com.example.bench",
                "specversion": "1.0",
                "datacontenttype": "application/json",
                "subject": f"item-{i % 97}",
            },
            {"n": i, "message": "hello world", "tags": ["a", "b"]},
        )
        for i in range(n)
    ]


async def _produce(chan: asyncio.Queue[Any], events: list[Any], count: _Count) -> None:
    from cdk import Tuple

    hit = count.hit
    i = 0
    size = len(events)
    while True:
        await chan.put(Tuple(events[i % size], hit))
        i += 1


async def _baseline(url: str, chan: asyncio.Queue[Any]) -> None:
    """The cdk-go pattern: take one event, POST it in binary mode, wait, repeat."""
    import aiohttp

    from cdk.codec import to_binary

    async with aiohttp.ClientSession() as session:
        while True:
            item = await chan.get()
            headers, body = to_binary(item.event)
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if 200 <= response.status < 300:
                    item.success()


async def _aiohttp_many(url: str, chan: asyncio.Queue[Any], in_flight: int) -> None:
    """The baseline loop run by ``in_flight`` workers over one aiohttp connection pool."""
    import aiohttp

    from cdk.codec import to_binary

    async def worker(session: aiohttp.ClientSession) -> None:
        while True:
            item = await chan.get()
            headers, body = to_binary(item.event)
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if 200 <= response.status < 300:
                    item.success()

    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(in_flight)))


async def _measure(
    kind: str, url: str, overrides: dict[str, Any], seconds: float
) -> tuple[float, float]:
    import cdk.delivery
    from cdk.config import SourceConfig
    from cdk.delivery import Deliverer
    from cdk.metrics import Metrics

    count = _Count()
    # Events waiting for a retry count against the queue where the kit has such a queue.
    chan: asyncio.Queue[Any] = getattr(cdk.delivery, "DeliveryQueue", asyncio.Queue)(1000)
    producer = asyncio.create_task(_produce(chan, _events(1000), count))
    deliverer: Deliverer | None = None
    if kind == "baseline":
        sender = asyncio.create_task(_baseline(url, chan))
    elif kind == "aiohttp":
        sender = asyncio.create_task(_aiohttp_many(url, chan, overrides["max_in_flight"]))
    else:
        config = SourceConfig(target=url, batch_linger=0.002, **overrides)
        deliverer = Deliverer(config, Metrics())
        sender = asyncio.create_task(deliverer.run(chan))
    await asyncio.sleep(WARMUP)
    start_count, started, cpu = count.n, time.perf_counter(), time.process_time()
    await asyncio.sleep(seconds)
    delivered, elapsed = count.n - start_count, time.perf_counter() - started
    cpu = time.process_time() - cpu
    producer.cancel()
    if deliverer is not None:
        await deliverer.stop(grace=2.0)
    sender.cancel()
    await asyncio.gather(producer, sender, return_exceptions=True)
    return delivered / elapsed, cpu / max(delivered, 1)


def run_scenario(name: str, url: str, seconds: float) -> None:
    pin(SENDER_CORE)
    loop_name = install_uvloop()
    kind, overrides = SCENARIOS[name]
    import aiohttp  # noqa: F401 - loaded before the memory reference point

    import cdk.delivery  # noqa: F401

    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rate, cpu = asyncio.run(_measure(kind, url, overrides, seconds))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "rate": rate,
        "cpu": cpu,
        "peak_kib": peak_kib,
        "growth_kib": peak_kib - before_kib,
        "loop": loop_name,
    }
    print(json.dumps(result), flush=True)


# -- driver --------------------------------------------------------------------------


def main() -> None:
    if "--pages" in sys.argv:  # a figure of its own: see pages_against_a_hand_written_loop
        pages_against_a_hand_written_loop()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="measured time per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per scenario (best kept)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--only", help="run only the scenarios whose name contains this")
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    if args.scenario:
        run_scenario(args.scenario, args.url, args.seconds)
        return

    me = [sys.executable, "-B", __file__]
    receiver = subprocess.Popen(
        [*me, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    names = [n for n in SCENARIOS if n == HEALTHY or not args.only or args.only in n]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    try:
        assert receiver.stdout is not None
        healthy, faulty = (f"http://127.0.0.1:{p}/" for p in receiver.stdout.readline().split())
        print(
            f"receivers {healthy} (healthy), {faulty} (faulty) on core {RECEIVER_CORE}; "
            f"senders on core {SENDER_CORE}; "
            f"{args.rounds} rounds of {args.seconds:g} s per scenario (after {WARMUP:g} s "
            "warm-up), interleaved; best round kept, as other load only slows a run down"
        )
        for _ in range(args.rounds):
            for name in names:
                url = faulty if SCENARIOS[name][0] == "faulty" else healthy
                out = subprocess.run(
                    [*me, "--scenario", name, "--url", url, "--seconds", str(args.seconds)],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=60,
                )
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    finally:
        if receiver.stdin is not None:
            receiver.stdin.close()
        receiver.wait(timeout=10)
    report(runs)


def report(runs: dict[str, list[dict[str, Any]]]) -> None:
    best = {name: max(results, key=lambda r: r["rate"]) for name, results in runs.items()}
    baseline = best.get(next(iter(SCENARIOS)), best[HEALTHY])
    print(f"sender loop: {baseline['loop']}")
    print(
        f"{'scenario':<40} {'events/s':>9} {'x base':>7} {'all rounds (events/s)':>22} "
        f"{'CPU/event':>10} {'peak RSS (growth while sending)':>31}"
    )
    for name, result in best.items():
        rounds = "/".join(f"{r['rate'] / 1000:.1f}k" for r in runs[name])
        peak = max(r["peak_kib"] for r in runs[name]) / 1024
        growth = max(r["growth_kib"] for r in runs[name]) / 1024
        print(
            f"{name:<40} {result['rate']:>9,.0f} {result['rate'] / baseline['rate']:>6.1f}x "
            f"{rounds:>22} {result['cpu'] * 1e6:>7.1f} us {peak:>12.1f} MiB (+{growth:.1f} MiB)"
        )
    if FAULTY in best:
        share = best[FAULTY]["rate"] / best[HEALTHY]["rate"]
        print(
            f"faulty receiver ({FAULTY_503:.0%} 503, {FAULTY_DROP:.0%} dropped): "
            f"{share:.0%} of the healthy rate"
        )


# -- a source returning pages, against the same source with its own loop ------------------

#: Rows per page: what a ``SELECT ... WHERE id > :position ORDER BY id LIMIT 500`` returns.
PAGE = 500


async def _source_rate(url: str, hand_written: bool, seconds: float) -> float:
    """Events/s that a polling source delivers through the whole kit (its service, the
    queue, the Deliverer, positions in SQLite in memory), fed by ``make_event`` pages of
    PAGE ``(event, position)`` pairs, or by a ``loop_produce_event`` putting the same
    pairs into ``chan`` itself through ``self.checkpoint``."""
    import cdk
    from cdk.service import service_for

    events = _events(PAGE)

    class Pages(cdk.Source[cdk.SourceConfig]):
        def make_event(self) -> list[tuple[Any, int]]:
            first = self.position or 0
            return [(events[i], first + i + 1) for i in range(PAGE)]

    class HandWritten(cdk.Source[cdk.SourceConfig]):
        async def loop_produce_event(self) -> None:
            n = self.checkpoint.position or 0
            while True:
                for event in events:
                    n += 1
                    await self.chan.put(self.checkpoint.tuple(event, n))

    config = cdk.SourceConfig(target=url, interval=0, batch_linger=0.002)
    service = service_for(HandWritten() if hand_written else Pages(), config)
    delivered = service.metrics.delivered._value  # read twice, outside the measured path
    await service.start()
    await asyncio.sleep(WARMUP)
    start_count, started = delivered.get(), time.perf_counter()
    await asyncio.sleep(seconds)
    rate = (delivered.get() - start_count) / (time.perf_counter() - started)
    await service.stop(grace=2.0)
    return rate


def pages_against_a_hand_written_loop() -> None:
    """``--pages [--seconds S] [--rounds N]``: the rates of the two sources, interleaved
    rounds in one process pinned to the sender core, best kept; the ratio is the figure."""
    parser = argparse.ArgumentParser(description=_source_rate.__doc__)
    parser.add_argument("--pages", action="store_true")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    me = [sys.executable, "-B", __file__]
    receiver = subprocess.Popen(
        [*me, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    rates: dict[bool, list[float]] = {False: [], True: []}
    try:
        assert receiver.stdout is not None
        url = f"http://127.0.0.1:{receiver.stdout.readline().split()[0]}/"
        pin(SENDER_CORE)
        loop_name = install_uvloop()
        for _ in range(args.rounds):
            for hand_written in (True, False):
                rates[hand_written].append(
                    asyncio.run(_source_rate(url, hand_written, args.seconds))
                )
    finally:
        if receiver.stdin is not None:
            receiver.stdin.close()
        receiver.wait(timeout=10)
    loop_rate, page_rate = max(rates[True]), max(rates[False])
    print(f"sender loop: {loop_name}; {args.rounds} rounds of {args.seconds:g} s, best kept")
    print(f"{'source':<46} {'events/s':>9} {'all rounds (events/s)':>24}")
    for name, hand_written in (
        ("hand-written loop_produce_event (baseline)", True),
        (f"make_event pages of {PAGE}", False),
    ):
        rounds = "/".join(f"{r / 1000:.1f}k" for r in rates[hand_written])
        print(f"{name:<46} {max(rates[hand_written]):>9,.0f} {rounds:>24}")
    print(f"pages / hand-written loop: {page_rate / loop_rate:.2f}x")


if __name__ == "__main__":
    main()
