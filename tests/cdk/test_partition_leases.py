"""Partitions shared out among replicas on a real etcd (:class:`cdk.etcd.PartitionLeases`).

In-process replicas (each its own identity and lease) show the sharing rules: fair shares,
one leader per partition, hand-overs that wait for the old leader to let go, a replica cut
off from etcd (a 3-member cluster). Three processes of a source with partitions, one
killed (SIGKILL) and one frozen (SIGSTOP), show what a crash and a pause do, on a capture
target that records which replica sent which partition's events when.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import signal
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from cloudevents.core.v1.event import CloudEvent
from etcd_support import EtcdCluster, b64, gateway, read_key
from processes import Process, start
from waiting import until

from cdk.etcd import EtcdBackend, PartitionLeases
from cdk.store import NotLeader, PositionStore
from cdk.testing import CaptureTarget
from cdk.testing.runner import wait_on as _wait_on

pytestmark = pytest.mark.timeout(120)

LEASE = 2.0


class Replica:
    """One PartitionLeases with a journal of what its hooks saw: (when, replica, what, name)."""

    def __init__(self, url: str, name: str, journal: list[tuple[float, str, str, str]]) -> None:
        self.name, self.journal = name, journal
        self.leases = PartitionLeases(
            url, "src", LEASE, identity=name, on_gain=self.gained, on_loss=self.lost
        )
        self.running: set[str] = set()  # what its producers would run now
        self.gate_open_in_loss: list[bool] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.starting = asyncio.Event()  # cleared: a producer that takes its time to start
        self.starting.set()

    async def gained(self, partition: str) -> None:
        self.journal.append((time.monotonic(), self.name, "gaining", partition))
        await self.starting.wait()
        assert partition not in self.running
        self.running.add(partition)
        self.journal.append((time.monotonic(), self.name, "gain", partition))

    async def lost(self, partition: str) -> None:
        self.journal.append((time.monotonic(), self.name, "losing", partition))
        self.gate_open_in_loss.append(self.leases.gate(partition) is None)
        await self.hold.wait()  # a producer settling what it holds
        self.running.discard(partition)
        self.journal.append((time.monotonic(), self.name, "lost", partition))


@asynccontextmanager
async def replicas(
    url: str, names: str, partitions: list[str]
) -> AsyncIterator[tuple[list[Replica], list[tuple[float, str, str, str]]]]:
    journal: list[tuple[float, str, str, str]] = []
    started = [Replica(url, name, journal) for name in names]
    for replica in started:
        replica.leases.assign(partitions)
        await replica.leases.start()
    try:
        yield started, journal
    finally:
        for replica in started:
            replica.hold.set()
            await replica.leases.stop()


def shares(group: list[Replica]) -> list[int]:
    return sorted(len(r.leases.owned) for r in group)


def covered(group: list[Replica], partitions: list[str]) -> bool:
    owned = [p for r in group for p in r.leases.owned]
    return sorted(owned) == sorted(partitions)


def holders(url: str) -> dict[str, str]:
    """The partition keys in etcd, read directly: partition -> the identity it holds."""
    endpoint, _, prefix = url.removeprefix("etcd://").partition("/")
    start = f"/{prefix}/src.partitions/"
    end = start[:-1] + "0"
    found = gateway(endpoint, "kv/range", {"key": b64(start), "range_end": b64(end)})
    return {
        base64.b64decode(kv["key"]).decode()[len(start) :]: base64.b64decode(kv["value"]).decode()
        for kv in found.get("kvs", [])
    }


def assert_one_leader_at_a_time(journal: list[tuple[float, str, str, str]]) -> None:
    """Per partition, a replica gains it only once the one before has let it go."""
    running: dict[str, str] = {}
    for _, name, what, partition in sorted(journal):
        if what == "gain":
            assert partition not in running, f"{name} gained {partition} while {running}"
            running[partition] = name
        elif what == "lost":
            assert running.pop(partition) == name


def test_replicas_take_fair_shares_and_every_partition_has_one_leader(etcd_url: str) -> None:
    partitions = [f"p{i}" for i in range(7)]

    async def main() -> None:
        async with replicas(etcd_url, "abc", partitions) as (group, journal):
            await until(lambda: covered(group, partitions) and shares(group) == [2, 2, 3], 20)
            assert holders(etcd_url) == {p: r.name for r in group for p in r.leases.owned}
            # Fewer partitions: the ones gone are released, the shares stay within one.
            fewer = partitions[:4]
            for replica in group:
                replica.leases.assign(fewer)
            await until(lambda: covered(group, fewer) and shares(group) == [1, 1, 2], 20)
            await until(lambda: sorted(holders(etcd_url)) == fewer, 10)
            assert all(r.running == set(r.leases.owned) for r in group)
        assert_one_leader_at_a_time(journal)

    asyncio.run(main())


def test_a_joining_replica_gets_a_partition_only_once_its_leader_let_go(etcd_url: str) -> None:
    partitions = [f"p{i}" for i in range(6)]

    async def main() -> None:
        async with replicas(etcd_url, "a", partitions) as (group, journal):
            (a,) = group
            await until(lambda: covered(group, partitions), 20)
            a.hold.clear()  # a's producers take their time to settle
            b = Replica(etcd_url, "b", journal)
            b.leases.assign(partitions)
            await b.leases.start()
            try:
                await until(lambda: len([j for j in journal if j[2] == "losing"]) == 3, 20)
                # A window to see nothing happen in (no synchronisation): b gains nothing yet.
                await asyncio.sleep(LEASE / 2)
                assert not b.leases.owned
                a.hold.set()
                await until(lambda: shares([a, b]) == [3, 3] and covered([a, b], partitions), 20)
            finally:
                await b.leases.stop()
        # While a settled what it held, it still led those partitions: its gate was open.
        assert a.gate_open_in_loss[:3] == [True, True, True]
        assert_one_leader_at_a_time(journal)

    asyncio.run(main())


def test_a_partition_lost_while_its_producer_starts_is_stopped_once_it_has_started(
    etcd_url: str,
) -> None:
    """on_loss never overlaps on_gain of the same partition: a runner stopping a producer
    that is not there yet would leave it running."""

    async def main() -> None:
        async with replicas(etcd_url, "a", []) as (group, journal):
            (a,) = group
            a.starting.clear()
            a.leases.assign(["p0"])
            await until(lambda: (a.name, "gaining", "p0") in [j[1:] for j in journal], 20)
            endpoint, _, prefix = etcd_url.removeprefix("etcd://").partition("/")
            member = read_key(endpoint, f"/{prefix}/src.members/a")
            assert member is not None
            gateway(endpoint, "lease/revoke", {"ID": member["lease"]})  # as if it expired
            await until(lambda: a.leases.gate("p0") is not None, LEASE * 2)
            a.starting.set()
            await until(lambda: (a.name, "lost", "p0") in [j[1:] for j in journal], 10)
            steps = [what for _, name, what, p in sorted(journal) if p == "p0"]
            assert steps[:4] == ["gaining", "gain", "losing", "lost"], steps
            await until(lambda: a.running == set(a.leases.owned), 10)

    asyncio.run(main())


def test_a_stopping_replica_hands_its_partitions_over_at_once(etcd_url: str) -> None:
    partitions = [f"p{i}" for i in range(4)]

    async def main() -> None:
        async with replicas(etcd_url, "ab", partitions) as (group, journal):
            a, b = group
            await until(lambda: shares(group) == [2, 2] and covered(group, partitions), 20)
            stopped = time.monotonic()
            await a.leases.stop()
            assert not a.leases.owned and a.leases.gate("p0") is not None
            await until(lambda: len(b.leases.owned) == 4, LEASE)
            # Well within a lease: a revoked its lease, nobody waited for it to expire.
            taken = max(when for when, name, what, _ in journal if name == "b" and what == "gain")
            assert taken - stopped < LEASE / 2
        assert_one_leader_at_a_time(journal)

    asyncio.run(main())


def test_position_writes_are_fenced_by_their_partitions_leader_key(etcd_url: str) -> None:
    async def main() -> None:
        async with replicas(etcd_url, "a", ["p0", "p1"]) as (group, journal):
            (a,) = group
            await until(lambda: a.leases.owned == {"p0", "p1"}, 20)
            store = PositionStore("src", backend=EtcdBackend(etcd_url, a.leases))
            await asyncio.to_thread(store.set, "p0", 7)
            with pytest.raises(NotLeader):
                await asyncio.to_thread(store.set, "p9", 1)  # not a partition it leads
            # Its key deleted behind its back (as if its lease had gone): etcd refuses the
            # write, and the replica stops leading the partition at once.
            endpoint, _, prefix = etcd_url.removeprefix("etcd://").partition("/")
            gateway(endpoint, "kv/deleterange", {"key": b64(f"/{prefix}/src.partitions/p1")})
            with pytest.raises(NotLeader):
                await asyncio.to_thread(store.set, "p1", 3)
            # (It may take p1 again afterwards, vacant as it is, under a key of its own.)
            await until(lambda: (a.name, "lost", "p1") in [j[1:] for j in journal], 5)
            assert a.leases.gate("p0") is None
            assert await asyncio.to_thread(store.get, "p1") is None
            assert await asyncio.to_thread(store.get, "p0") == 7
            store.close()

    asyncio.run(main())


def test_a_replica_cut_off_from_etcd_leads_nothing_before_the_others_take_over(
    etcd_cluster: EtcdCluster,
) -> None:
    """c reaches etcd only through member 0, which stops: c's gate closes at its own deadline,
    before a or b can gain any of its partitions (etcd expires its lease later still)."""
    members = etcd_cluster.members
    partitions = [f"p{i}" for i in range(6)]

    async def main() -> None:
        journal: list[tuple[float, str, str, str]] = []
        a, b = (Replica(etcd_cluster.url("cut", members[1:]), n, journal) for n in "ab")
        c = Replica(etcd_cluster.url("cut", [members[0]]), "c", journal)
        closed: dict[str, float] = {}

        async def watch_gates() -> None:  # when c's gate closed, by the clock everyone shares
            while len(closed) < 2:
                for partition in c.running:
                    if c.leases.gate(partition) is not None:
                        closed.setdefault(partition, time.monotonic())
                await asyncio.sleep(0.005)

        group = [a, b, c]
        for replica in group:
            replica.leases.assign(partitions)
            await replica.leases.start()
        try:
            await until(lambda: shares(group) == [2, 2, 2] and covered(group, partitions), 20)
            held = set(c.leases.owned)
            watcher = asyncio.create_task(watch_gates())
            cut = time.monotonic()
            await asyncio.to_thread(members[0].stop)
            await until(lambda: covered([a, b], partitions), LEASE * 4)
            await asyncio.wait_for(watcher, LEASE)
            assert set(closed) == held
            for when, name, what, partition in journal:
                if partition in held and name != "c" and what == "gain" and when > cut:
                    assert closed[partition] < when, f"{name} gained {partition} first"
            assert shares([a, b]) == [3, 3]
        finally:
            for replica in group:
                await replica.leases.stop()

    asyncio.run(main())


# -- the kit: a source with partitions, three replica processes -----------------------------


def wait_on(predicate: Callable[[], bool], timeout: float) -> None:
    """Poll ``predicate`` (every 50 ms) until it holds; fail after ``timeout`` seconds."""
    _wait_on(threading.Condition(), predicate, timeout, lambda: "condition not met in time")


def refused(target: CaptureTarget, replica: str) -> bool:
    """Whether the target answered one of ``replica``'s requests 503 (fail_with(503))."""
    return any(
        r.status == 503 and r.headers.get("ce-replica") == replica for r in target.all_requests
    )


PARTS_SOURCE = """
import os, time
import cdk


class Config(cdk.SourceConfig):
    pass


class Parts(cdk.Source[Config]):
    def partitions(self):
        return [f"p{i}" for i in range(6)]

    def make_event(self, partition):
        n = (self.positions.get(partition) or 0) + 1
        attributes = {"id": f"{partition}-{n}", "source": "/p", "type": "t"}
        attributes.update(partition=partition, replica=os.environ["REPLICA"])
        return cdk.CloudEvent(attributes, {"n": n, "made": time.monotonic()}), n


cdk.run_source(Config, Parts)
"""


def readyz(process: Process) -> str:
    port = process.wait_for(r"metrics listening on http://127\.0\.0\.1:(\d+)").group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
        return str(answer.read().decode())


def led(process: Process) -> int:
    """``cdk_partitions_led`` of a running replica; -1 when it does not answer."""
    port = process.wait_for(r"metrics listening on http://127\.0\.0\.1:(\d+)").group(1)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=1) as answer:
            text = answer.read().decode()
    except OSError:
        return -1
    found = re.search(r"^cdk_partitions_led (\S+)$", text, re.MULTILINE)
    return -1 if found is None else int(float(found.group(1)))


def test_the_kit_shares_a_sources_partitions_among_three_replicas_one_killed_one_frozen(
    tmp_path: Path, etcd_url: str, started: list[Process]
) -> None:
    def shares(*names: str) -> list[int]:
        return [led(replicas[name]) for name in names]

    with CaptureTarget.in_thread() as target:
        replicas = {}
        for name in "abc":
            directory = tmp_path / name
            directory.mkdir()
            (directory / "config.yml").write_text(
                f"target: {target.url}\nposition_store: {etcd_url}\nleader_election: true\n"
                f"leader_lease: {LEASE}\ninterval: 0.05\nmax_in_flight: 1\n"
                "host: 127.0.0.1\nmetrics_port: 0\n",
                encoding="utf-8",
            )
            replicas[name] = start(started, directory, PARTS_SOURCE, REPLICA=name)
        wait_on(lambda: shares("a", "b", "c") == [2, 2, 2], 30)
        count = len(target.events)
        target.wait_until(lambda: len(target.events) >= count + 60, timeout=30)

        killed = time.monotonic()
        replicas["b"].kill()
        wait_on(lambda: shares("a", "c") == [3, 3], LEASE * 4)
        assert time.monotonic() - killed < LEASE * 2.5, "b's partitions moved too late"

        target.fail_with(503)  # c holds events it could not deliver yet when it freezes
        wait_on(lambda: refused(target, "c"), 10)
        frozen = time.monotonic()
        replicas["c"].send(signal.SIGSTOP)
        target.fail_with(None)
        wait_on(lambda: shares("a") == [6], LEASE * 4)
        assert time.monotonic() - frozen < LEASE * 2.5, "c's partitions moved too late"
        count = len(target.events)
        target.wait_until(lambda: len(target.events) >= count + 60, timeout=30)

        resumed = time.monotonic()
        replicas["c"].send(signal.SIGCONT)
        wait_on(lambda: shares("a", "c") == [3, 3], LEASE * 6)
        count = len(target.events)
        target.wait_until(lambda: len(target.events) >= count + 60, timeout=30)
        assert readyz(replicas["a"]) == "ready (leads 3 partitions)"
        for name in "ac":
            replicas[name].send(signal.SIGTERM)
        for name in "ac":
            assert replicas[name].wait() == 0, replicas[name].stderr
        arrivals = [(r.arrived, e) for r in target.requests for e in r.events]

    def made(event: CloudEvent) -> float:
        return float(event.get_data()["made"])

    taken = {}  # each partition's first event from a made after c froze: a took it over
    for when, event in arrivals:
        if event.get_extension("replica") == "a" and made(event) > frozen:
            taken.setdefault(event.get_extension("partition"), when)
    for when, event in arrivals:
        if event.get_extension("replica") == "c" and made(event) < frozen:
            partition = event.get_extension("partition")
            assert when < resumed, f"c sent {event.get_id()} {when - resumed:.3f} s after SIGCONT"
            assert when < taken.get(partition, math.inf), f"{event.get_id()} after a took over"
    # a handed three partitions back to c on its own will: c resumed each right after a's
    # last event, whose position a wrote before it let go (nothing sent twice).
    handed = 0
    for partition in (f"p{i}" for i in range(6)):
        mine = [(w, e) for w, e in arrivals if e.get_extension("partition") == partition]
        back = [(w, e) for w, e in mine if e.get_extension("replica") == "c" and made(e) > resumed]
        if not back:
            continue
        handed += 1
        first_when, first = back[0]
        before = [e for w, e in mine if w < first_when and e.get_extension("replica") == "a"]
        assert before, partition
        assert int(first.get_data()["n"]) == int(before[-1].get_data()["n"]) + 1, partition
        later = [e for w, e in mine if w > first_when and e.get_extension("replica") == "a"]
        assert not later, f"a sent {partition} after handing it over"
    assert handed == 3, replicas["c"].stderr[-6000:]
    for partition in (f"p{i}" for i in range(6)):
        numbers = {
            int(e.get_data()["n"]) for _, e in arrivals if e.get_extension("partition") == partition
        }
        missing = set(range(1, max(numbers) + 1)) - numbers
        assert not missing, f"{partition}: never delivered: {sorted(missing)[:20]}"
