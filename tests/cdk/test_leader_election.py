"""Leader election across real source processes: one produces, another takes over.

Two (or three) ``cmd/main.py``-style processes share an etcd ``position_store`` with
``leader_election: true`` and deliver to one capture target. Every event says which
replica made it (the ``replica`` extension), so the target's arrival order shows who
produced when: each replica's events form one run, never interleaved with another's.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from etcd_support import EtcdCluster, read_key
from processes import POLL_SCRIPT, Process, start

from cdk.testing import CaptureTarget
from cdk.testing.runner import wait_on

LEASE = 2.0


def start_replica(
    started: list[Process], tmp_path: Path, name: str, target: str, store: str
) -> Process:
    """Replica ``name``: POLL_SCRIPT in a directory of its own, its events marked with it."""
    directory = tmp_path / name
    directory.mkdir()
    (directory / "config.yml").write_text(
        f"target: {target}\nposition_store: {store}\nleader_election: true\n"
        f"leader_lease: {LEASE}\ninterval: 0.005\nmax_in_flight: 1\n"
        "host: 127.0.0.1\nmetrics_port: 0\n",
        encoding="utf-8",
    )
    return start(started, directory, POLL_SCRIPT, REPLICA=name)


def readyz(process: Process) -> str:
    port = process.wait_for(r"metrics listening on http://127\.0\.0\.1:(\d+)").group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as answer:
        return str(answer.read().decode())


def runs(replicas: list[str]) -> list[str]:
    """The replicas in the order their runs of events arrived (``aab`` -> ``["a", "b"]``)."""
    order: list[str] = []
    for replica in replicas:
        if not order or order[-1] != replica:
            order.append(replica)
    return order


def assert_no_gap(ids: list[str]) -> None:
    numbers = {int(event_id[1:]) for event_id in ids}
    missing = set(range(1, max(numbers) + 1)) - numbers
    assert not missing, f"events never delivered: {sorted(missing)[:20]}"


def stored_position(store: str) -> int | None:
    """The position POLL_SCRIPT's replicas keep under ``store``, read from etcd directly."""
    endpoint, _, prefix = store.removeprefix("etcd://").partition("/")
    record = read_key(endpoint, f"/{prefix}/Numbers/position")
    return None if record is None else int(record["value"])


@contextmanager
def stored_positions(store: str) -> Iterator[list[int]]:
    """Every value the position takes while the block runs, read every few ms from etcd."""
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.005):
            value = stored_position(store)
            if value is not None and (not seen or seen[-1] != value):
                seen.append(value)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        done.set()
        thread.join(10)


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_a_follower_takes_over_from_the_position_stored_when_it_leads(
    tmp_path: Path, etcd_url: str, started: list[Process], stop: signal.Signals
) -> None:
    """The follower started long before the takeover: it must not resume from the position
    it read at start-up (issue 20.1: it re-sent everything and moved the position back)."""
    with CaptureTarget.in_thread() as target, stored_positions(etcd_url) as seen:
        a = start_replica(started, tmp_path, "a", target.url, etcd_url)
        a.wait_for("leading: producing")
        b = start_replica(started, tmp_path, "b", target.url, etcd_url)
        b.wait_for("campaigning to lead")
        following = len(target.events)  # b follows while a makes 100 more
        target.wait_until(lambda: len(target.events) >= following + 100, timeout=30)
        before = stored_position(etcd_url)  # positions only grow: the takeover's is as far
        a.send(stop)
        a.wait()
        resumed = b.wait_for(r"leading: producing from position (\d+)", timeout=LEASE * 3)
        count = len(target.events)
        target.wait_until(lambda: len(target.events) >= count + 20, timeout=30)
        b.send(signal.SIGTERM)
        assert b.wait() == 0, b.stderr
        events = list(target.events)
    position = int(resumed.group(1))
    assert before is not None and before >= 50
    # Not the position b read when it started, 100 events back: the one stored when it led
    # (a loaded machine may hand b the lead a little before a stops: never before `before`).
    assert position >= before and position in seen, (position, before, seen)
    first_of_b = next(int(e.get_id()[1:]) for e in events if e.get_extension("replica") == "b")
    assert first_of_b == position + 1
    assert seen == sorted(seen), f"the stored position moved backwards: {seen}"
    assert_no_gap([e.get_id() for e in events])


def test_a_killed_leader_is_replaced_within_the_lease_and_nothing_is_missing(
    tmp_path: Path, etcd_url: str, started: list[Process]
) -> None:
    with CaptureTarget.in_thread() as target:
        a = start_replica(started, tmp_path, "a", target.url, etcd_url)
        a.wait_for("leading: producing")
        b = start_replica(started, tmp_path, "b", target.url, etcd_url)
        b.wait_for("campaigning to lead")
        target.wait_until(lambda: len(target.events) >= 50, timeout=30)
        assert "leading" not in b.stderr.replace("campaigning to lead", "")
        a.process.send_signal(signal.SIGKILL)
        a.wait()
        count = len(target.events)
        b.wait_for("leading: producing", timeout=LEASE * 3)
        target.wait_until(lambda: len(target.events) >= count + 50, timeout=30)
        b.send(signal.SIGTERM)
        assert b.wait() == 0, b.stderr
        events = list(target.events)
    replicas = [str(e.get_extension("replica")) for e in events]
    assert runs(replicas) == ["a", "b"], "two replicas produced at once"
    assert_no_gap([e.get_id() for e in events])
    # b resumed from a's last acknowledged position, not from the start.
    first_of_b = next(int(e.get_id()[1:]) for e in events if e.get_extension("replica") == "b")
    assert first_of_b > 1


def test_a_leader_cut_off_from_etcd_stops_producing_before_another_leads(
    tmp_path: Path, etcd_cluster: EtcdCluster, started: list[Process]
) -> None:
    members = etcd_cluster.members
    with CaptureTarget.in_thread() as target:
        a_store = etcd_cluster.url("cut", [members[0]])  # a reaches etcd only through member 0
        b_store = etcd_cluster.url("cut", members[1:])
        a = start_replica(started, tmp_path, "a", target.url, a_store)
        a.wait_for("leading: producing")
        b = start_replica(started, tmp_path, "b", target.url, b_store)
        b.wait_for("campaigning to lead")
        target.wait_until(lambda: len(target.events) >= 30, timeout=30)
        members[0].stop()
        a.wait_for("lost the lead", timeout=LEASE * 3)
        b.wait_for("leading: producing", timeout=LEASE * 5)
        count = len(target.events)
        target.wait_until(lambda: len(target.events) >= count + 30, timeout=30)
        for process in (a, b):
            process.send(signal.SIGTERM)
        assert b.wait() == 0, b.stderr
        a.wait()
        events = list(target.events)
    replicas = [str(e.get_extension("replica")) for e in events]
    assert runs(replicas) == ["a", "b"], "the cut-off leader went on producing"
    assert_no_gap([e.get_id() for e in events])


def test_only_one_of_three_replicas_produces(
    tmp_path: Path, etcd_url: str, started: list[Process]
) -> None:
    with CaptureTarget.in_thread() as target:
        processes = [start_replica(started, tmp_path, n, target.url, etcd_url) for n in "abc"]
        for process in processes:
            process.wait_for("campaigning to lead")
        target.wait_until(lambda: len(target.events) >= 60, timeout=30)
        leaders = [p for p in processes if "leading: producing" in p.stderr]
        # /readyz says who leads; every replica is ready (the followers wait, ready).
        roles = sorted(readyz(p) for p in processes)
        assert roles == ["ready (follower)", "ready (follower)", "ready (leader)"]
        # Followers first: a leader stopping first resigns, and a follower would take over.
        for process in sorted(processes, key=lambda p: p in leaders):
            process.send(signal.SIGTERM)
            assert process.wait() == 0, process.stderr
        events = list(target.events)
    assert len(leaders) == 1
    assert len({e.get_extension("replica") for e in events}) == 1


def metric(process: Process, sample: str) -> float:
    """The value of one ``/metrics`` sample of ``process`` (``name{labels}``), 0 when absent."""
    port = process.wait_for(r"metrics listening on http://127\.0\.0\.1:(\d+)").group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            name, _, value = line.rpartition(" ")
            if name == sample:
                return float(value)
    return 0.0


def until(predicate: Callable[[], bool], timeout: float) -> None:
    """Poll ``predicate`` (every 50 ms) until it holds; fail after ``timeout`` seconds."""
    wait_on(threading.Condition(), predicate, timeout, lambda: "condition not met in time")


def test_a_frozen_leader_sends_nothing_once_its_lease_may_have_expired(
    tmp_path: Path, etcd_url: str, started: list[Process]
) -> None:
    """Issue 20.2: a leader frozen past its lease, then resumed, delivered the events it held
    after the new leader had delivered them. It must settle them unsent and lead no more."""
    with CaptureTarget.in_thread() as target:
        a = start_replica(started, tmp_path, "a", target.url, etcd_url)
        a.wait_for("leading: producing")
        b = start_replica(started, tmp_path, "b", target.url, etcd_url)
        b.wait_for("campaigning to lead")
        target.wait_until(lambda: len(target.events) >= 30, timeout=30)
        # One answer held back: a's events queue up behind it, and it holds them when frozen.
        target.delay_next(1, LEASE / 2)
        depth = "cdk_source_queue_depth"
        until(lambda: metric(a, depth) >= 20, timeout=10)
        frozen = time.monotonic()
        a.send(signal.SIGSTOP)
        b.wait_for("leading: producing", timeout=LEASE * 5)
        count = len(target.events)
        target.wait_until(lambda: len(target.events) >= count + 20, timeout=30)
        resumed = time.monotonic()
        a.send(signal.SIGCONT)
        a.wait_for("lost the lead", timeout=10)
        count = len(target.events)
        target.wait_until(lambda: len(target.events) >= count + 20, timeout=30)
        fenced = metric(a, 'cdk_events_failed_total{reason="fenced"}')
        alive = a.process.poll() is None
        for process in (a, b):
            process.send(signal.SIGTERM)
        assert b.wait() == 0, b.stderr
        a.wait()
        records = target.requests
    arrivals = [(r.arrived, str(e.get_extension("replica"))) for r in records for e in r.events]
    takeover = min(when for when, replica in arrivals if replica == "b")
    last_of_a = max(when for when, replica in arrivals if replica == "a")
    # Its lease may be gone from the moment it was frozen plus a lease at the latest (its last
    # renewal came before); nothing of a's may arrive then, nor after b took over.
    assert last_of_a < min(takeover, frozen + LEASE), (last_of_a - frozen, takeover - frozen)
    assert last_of_a < resumed
    assert_no_gap([e.get_id() for e in (e for r in records for e in r.events)])
    # What a held was settled unsent, as no gap that stops it: it lived on as a follower.
    assert fenced >= 20, a.stderr
    assert "left to the replica that leads now" in a.stderr
    assert "send event failed" not in a.stderr  # said once, not per event
    assert alive and a.process.returncode == 0, a.stderr
