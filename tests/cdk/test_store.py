"""PositionStore (memory, SQLite, etcd) and Checkpoint, up to a source killed mid-stream."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cdk.positions import Checkpoint
from cdk.store import NotLeader, PositionStore, StoreError

Factory = Callable[[str], PositionStore]


@pytest.fixture(params=["memory", "sqlite", "etcd"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    """Opens stores of one backend; the SQLite (etcd) ones share one file (prefix), like
    real connectors."""
    opened: list[PositionStore] = []
    shared_memory: dict[str, PositionStore] = {}
    # Only the etcd case starts etcd (the session's one member, a prefix per test).
    etcd_url = request.getfixturevalue("etcd_url") if request.param == "etcd" else ""

    def factory(namespace: str) -> PositionStore:
        if request.param == "memory":
            store = shared_memory.setdefault(namespace, PositionStore(namespace))
        elif request.param == "etcd":
            store = PositionStore(namespace, etcd_url)
        else:
            store = PositionStore(namespace, tmp_path / "state" / "positions.db")
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()


# --- PositionStore ---------------------------------------------------------------------


def test_get_set_delete_round_trip_json_values(open_store: Factory) -> None:
    store = open_store("source-a")
    assert store.get("offset") is None
    assert store.get("offset", 0) == 0
    values = [0, 2**53, -1.5, "cursor-é😀", True, None, [1, "two"], {"page": 3, "ids": [1]}]
    for value in values:
        store.set("offset", value)
        assert store.get("offset", "absent") == value
    store.delete("offset")
    assert store.get("offset", "absent") == "absent"
    store.delete("offset")  # deleting what is not there is fine


def test_get_returns_a_copy(open_store: Factory) -> None:
    store = open_store("source-a")
    store.set("cursor", {"ids": [1]})
    store.get("cursor")["ids"].append(2)
    assert store.get("cursor") == {"ids": [1]}


def test_namespaces_are_isolated(open_store: Factory) -> None:
    a, b = open_store("source-a"), open_store("source-b")
    a.set("offset", 10)
    b.set("offset", 20)
    assert (a.get("offset"), b.get("offset")) == (10, 20)
    a.delete("offset")
    assert (a.get("offset"), b.get("offset")) == (None, 20)


@pytest.mark.parametrize("value", [datetime.now(UTC), {1: "int key"}, object(), {"x"}])
def test_values_that_would_not_round_trip_are_refused(open_store: Factory, value: object) -> None:
    store = open_store("source-a")
    with pytest.raises(TypeError, match="'offset' must be a JSON value"):
        store.set("offset", value)
    assert store.get("offset") is None


def test_closed_store_refuses_calls(open_store: Factory) -> None:
    store = open_store("source-a")
    store.close()
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get("offset")


def test_sqlite_values_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "positions.db"
    with PositionStore("source-a", path) as store:
        store.set("offset", 41)
        store.set("offset", 42)
        store.set("cursor", "abc")
        store.delete("cursor")
    with PositionStore("source-a", path) as store:
        assert store.get("offset") == 42
        assert store.get("cursor") is None
    with PositionStore("source-b", path) as other:
        assert other.get("offset") is None


def test_sqlite_file_is_wal_with_one_table(tmp_path: Path) -> None:
    path = tmp_path / "positions.db"
    with PositionStore("source-a", path) as store:
        store.set("offset", 1)
        db = sqlite3.connect(path)
        try:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            rows = db.execute("SELECT namespace, key, value FROM positions").fetchall()
        finally:
            db.close()
    assert rows == [("source-a", "offset", "1")]


def test_sqlite_unopenable_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreError, match=r"position store .*file.*cannot be opened"):
        PositionStore("source-a", blocker / "positions.db")


def test_empty_namespace_is_refused() -> None:
    with pytest.raises(ValueError, match="namespace"):
        PositionStore("")


def test_from_config_uses_position_store_key(tmp_path: Path) -> None:
    from cdk.config import SourceConfig

    path = tmp_path / "p.db"
    target = "http://127.0.0.1:1/"
    config = SourceConfig.model_validate({"target": target, "position_store": str(path)})
    with PositionStore.from_config(config, "source-a") as store:
        store.set("offset", 7)
    assert path.exists()
    memory = PositionStore.from_config(SourceConfig.model_validate({"target": target}), "a")
    assert memory.path is None


def test_reads_and_writes_from_several_threads(open_store: Factory) -> None:
    # Readers and writers share one store (one SQLite connection, one etcd client): each
    # get must read its own key's row, and the last write of every thread stays.
    store = open_store("source-a")
    errors: list[str] = []

    def work(worker: int) -> None:
        for i in range(200):
            store.set(f"w{worker}", i)
            value = store.get(f"w{worker}")
            if value != i:
                errors.append(f"w{worker}: wrote {i}, read {value!r}")

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert [store.get(f"w{n}") for n in range(4)] == [199] * 4


def test_sqlite_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    path.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(StoreError, match=r"position store .*p\.db cannot be opened"):
        PositionStore("source-a", path)


def test_sqlite_locked_by_another_writer_is_a_store_error(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    with PositionStore("source-a", path) as store:
        store._backend._db.execute("PRAGMA busy_timeout = 50")  # type: ignore[attr-defined]
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")  # holds the write lock
            with pytest.raises(StoreError, match="locked"):
                store.set("offset", 1)
            other.execute("ROLLBACK")
        finally:
            other.close()
        store.set("offset", 2)
        assert store.get("offset") == 2


def test_damaged_value_is_a_store_error(tmp_path: Path) -> None:
    # Another program (or a damaged file) may leave a value that is not JSON.
    path = tmp_path / "p.db"
    with PositionStore("source-a", path) as store:
        store.set("offset", 1)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE positions SET value = '{not json' WHERE key = 'offset'")
    db.close()
    with PositionStore("source-a", path) as store:
        with pytest.raises(StoreError, match=r"'offset' is not JSON"):
            store.get("offset")
        with pytest.raises(StoreError):
            Checkpoint(store, "offset")


# --- Checkpoint ------------------------------------------------------------------------


def test_checkpoint_advances_only_over_acknowledged_prefix(open_store: Factory) -> None:
    store = open_store("source-a")
    checkpoint = Checkpoint(store, "offset")
    assert checkpoint.position is None
    callbacks = [checkpoint.track(n) for n in range(6)]
    # Acknowledgements arrive out of order, as with several requests in flight.
    written = []
    for n in (2, 1, 4, 0, 3, 5):
        callbacks[n][0]()
        written.append(store.get("offset"))
    assert written == [None, None, None, 2, 4, 5]
    assert checkpoint.position == 5
    assert not checkpoint._pending


def test_failed_event_stops_the_checkpoint(
    open_store: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store("source-a")
    checkpoint = Checkpoint(store, "offset")
    callbacks = [checkpoint.track(n) for n in range(5)]
    callbacks[0][0]()
    error = RuntimeError("target said 400")
    with caplog.at_level(logging.ERROR, logger="cdk.store"):
        callbacks[2][1](error)
    for n in (1, 3, 4):
        callbacks[n][0]()
    later_success, _ = checkpoint.track(5)
    later_success()
    assert store.get("offset") == 0
    assert checkpoint.failed is error
    assert not checkpoint._pending  # nothing piles up behind the failure
    assert "(position 2) was not delivered: target said 400" in caplog.text
    assert "a restart resumes from after position 0" in caplog.text


def test_events_sharing_a_position_write_it_only_once_all_are_acknowledged(
    open_store: Factory,
) -> None:
    # One record (position 7) became three events: resuming after 7 is safe only once
    # the last of them reached the target.
    store = open_store("source-a")
    checkpoint = Checkpoint(store, "offset")
    callbacks = [checkpoint.track(p) for p in (6, 7, 7, 7, 8)]
    written = []
    for n in (0, 1, 2, 4, 3):
        callbacks[n][0]()
        written.append(store.get("offset"))
    assert written == [6, 6, 6, 6, 8]


def test_positions_need_not_grow(open_store: Factory) -> None:
    # The order of track() calls decides, not the values: a position may go "down".
    store = open_store("source-a")
    checkpoint = Checkpoint(store, "cursor")
    callbacks = [checkpoint.track(p) for p in ("m", "b", "z")]
    callbacks[1][0]()
    assert store.get("cursor") is None
    callbacks[0][0]()
    assert store.get("cursor") == "b"
    callbacks[2][0]()
    assert checkpoint.position == "z"


def test_checkpoint_resumes_from_stored_position(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    with PositionStore("source-a", path) as store:
        checkpoint = Checkpoint(store, "cursor")
        for cursor in ("a", "b", "c"):
            checkpoint.track(cursor)[0]()
    with PositionStore("source-a", path) as store:
        assert Checkpoint(store, "cursor").position == "c"


def test_checkpoint_tuple_chains_the_sources_callbacks(open_store: Factory) -> None:
    from cloudevents.core.v1.event import CloudEvent

    store = open_store("source-a")
    checkpoint = Checkpoint(store, "offset")
    seen: list[object] = []
    event = CloudEvent({"id": "1", "source": "/t", "type": "t"})
    ok = checkpoint.tuple(event, 1, success=lambda: seen.append(store.get("offset")))
    bad = checkpoint.tuple(event, 2, failed=seen.append)
    plain = checkpoint.tuple(event, 3)
    assert ok.event is event and plain.success is not None and plain.failed is not None
    assert ok.success is not None and bad.failed is not None
    ok.success()  # the position is written before the source's own callback runs
    error = RuntimeError("gone")
    bad.failed(error)
    assert seen == [1, error]
    assert checkpoint.position == 1


def test_checkpoint_survives_a_store_that_cannot_write(
    open_store: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store("source-a")
    checkpoint = Checkpoint(store, "offset")
    success, _ = checkpoint.track(1)
    store.close()
    with caplog.at_level(logging.ERROR, logger="cdk.store"):
        success()
    assert checkpoint.position is None
    assert "could not be written" in caplog.text


class _Deposed:
    """A backend whose every write is refused as a fenced one (another replica leads)."""

    def get(self, namespace: str, key: str) -> bytes | None:
        return None

    def set(self, namespace: str, key: str, value: bytes) -> None:
        raise NotLeader("position not written: this replica no longer leads")

    def delete(self, namespace: str, key: str) -> None:
        pass

    def close(self) -> None:
        pass


def test_a_fenced_write_refused_on_the_loop_drops_the_position(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # On an event loop the write runs in a worker thread: the refusal voids the checkpoint
    # there, with no event loop of its own to ask for the current task.
    async def main() -> Checkpoint:
        checkpoint = Checkpoint(PositionStore("source-a", backend=_Deposed()), "offset")
        checkpoint.track(1)[0]()
        await checkpoint.flush()
        return checkpoint

    with caplog.at_level(logging.WARNING, logger="cdk.store"):
        checkpoint = asyncio.run(main())
    assert isinstance(checkpoint.failed, NotLeader)
    assert checkpoint.position is None
    assert "position 1 dropped: position not written" in caplog.text


# --- a source killed mid-stream ----------------------------------------------------------

TEMPLATE_PROJECT = Path(__file__).resolve().parents[2] / "{{cookiecutter.connector_name}}"

NUMBERS_SOURCE = '''
"""Emits events numbered 0..N-1 and keeps its position with a Checkpoint."""

import os

import cdk
from cdk.positions import Checkpoint

COUNT = int(os.environ["NUMBERS_COUNT"])
RUN = os.environ["NUMBERS_RUN"]


class Config(cdk.SourceConfig):
    pass


class Numbers(cdk.Source):
    def initialize(self, config: Config) -> None:
        self.store = cdk.PositionStore.from_config(config, "numbers")
        self.checkpoint = Checkpoint(self.store, "n")
        last = self.checkpoint.position
        self.start = 0 if last is None else last + 1

    async def loop_produce_event(self) -> None:
        for n in range(self.start, COUNT):
            event = cdk.CloudEvent(
                {"id": str(n), "source": "/numbers", "type": "test.number", "run": RUN}, {"n": n}
            )
            await self.chan.put(self.checkpoint.tuple(event, n))

    def destroy(self) -> None:
        self.store.close()


cdk.run_source(Config, Numbers)
'''


@pytest.mark.timeout(120)
def test_source_killed_mid_stream_resumes_without_losing_events(tmp_path: Path) -> None:
    import signal

    from cdk.testing import CaptureTarget
    from cdk.testing.runner import ConnectorProcess

    count, workers = 300, 4
    project = tmp_path / "numbers"
    (project / "cmd").mkdir(parents=True)
    (project / "cmd" / "main.py").write_text(NUMBERS_SOURCE, encoding="utf-8")
    db = tmp_path / "state" / "positions.db"

    def stored(path: Path) -> object:
        with PositionStore("numbers", path) as store:
            return store.get("n")

    def refused_ids(target: CaptureTarget) -> set[int]:
        return {int(r.headers["ce-id"]) for r in target.all_requests if r.status == 503}

    with CaptureTarget.in_thread() as target:
        config = {
            "target": target.url,
            "position_store": str(db),
            "max_in_flight": workers,
            "send_event_attempts": 0,  # retry until delivered: only the kill stops it
            "retry_backoff": 0.02,
            "retry_backoff_max": 0.1,
        }

        def run(label: str) -> ConnectorProcess:
            env = {"PYTHONPATH": str(TEMPLATE_PROJECT), "NUMBERS_COUNT": str(count)}
            return ConnectorProcess(project, config, env={**env, "NUMBERS_RUN": label})

        # Run 1, by request arrival: 50 accepted, one held unanswered (so later events
        # are acknowledged before it: acks out of order), 50 more accepted, then 503 for
        # everything, so events are in flight and queued when the process dies.
        target.delay_next(50, 0.0)  # accepted, after no delay
        target.delay_next(1, 60.0)  # held past the kill
        target.delay_next(50, 0.0)
        target.fail_with(503)
        first = run("1").start()
        try:
            # Once every other delivery worker is stuck on a refused event, each has
            # acknowledged all the events it took before.
            target.wait_until(lambda: len(refused_ids(target)) >= workers - 1, timeout=60)
            seen_first = {int(e.get_id()) for e in target.events}
            assert len(seen_first) == 100
            first_gap = min(set(range(count)) - seen_first)  # the held event
            assert first_gap < max(seen_first)  # later events were acknowledged before it
            # Positions are written at most every 50 ms: wait for the newest one.
            target.wait_until(lambda: stored(db) == first_gap - 1, timeout=10)
        finally:
            assert first.stop(signal.SIGKILL, timeout=10) == -signal.SIGKILL

        with PositionStore("numbers", db) as store:
            position = store.get("n")
        # Every event before the gap was acknowledged; the gap and whatever the target
        # took after it must not count.
        assert position == first_gap - 1

        # Run 2: the target is healthy again; the source resumes and runs to its end.
        target.fail_with(None)
        second = run("2").start()
        try:
            assert second.wait(timeout=60) == 0, second.output
        finally:
            second.stop(timeout=10)
        events = target.events

    numbers = [int(e.get_id()) for e in events]
    missing = set(range(count)) - set(numbers)
    assert not missing, f"events lost across the kill: {sorted(missing)[:20]}"
    resumed = [int(e.get_id()) for e in events if e.get_extension("run") == "2"]
    assert min(resumed) == first_gap
    with PositionStore("numbers", db) as store:
        assert store.get("n") == count - 1
