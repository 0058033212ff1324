"""Partitions shared out among replicas on a real etcd (:class:`cdk.etcd.PartitionLeases`).

In-process replicas (each its own identity and lease) show the sharing rules: fair shares,
one leader per partition, hand-overs that wait for the old leader to let go. Replica
processes killed (SIGKILL) and frozen (SIGSTOP) show what a crash and a pause do, on a
capture target that records which replica sent which partition's events when.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from etcd_support import b64, gateway
from waiting import until

from cdk.etcd import EtcdBackend, PartitionLeases
from cdk.store import NotLeader, PositionStore

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

    async def gained(self, partition: str) -> None:
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
