"""The polling loop (cdk.polling) in-process: pages, pacing, partitions, a failing make_event.

Each source here reads a made-up table (rows numbered from 1) through ``make_event`` and
delivers to a real capture target on loopback; positions go to a real SQLite file.
"""

from __future__ import annotations

import re
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from processes import Process, start

import cdk
from cdk.positions import partition_key
from cdk.testing import CaptureTarget
from cdk.testing.runner import run_in_thread


def row_event(table: str, row: int) -> cdk.CloudEvent:
    return cdk.CloudEvent(
        {"id": f"{table}-{row}", "source": f"/{table}", "type": "row"}, {"row": row}
    )


def config(target: str, db: Path | None = None, **extra: Any) -> cdk.SourceConfig:
    settings = {"target": target, "interval": 0, "idle_interval": 60, "max_in_flight": 1, **extra}
    if db is not None:
        settings["position_store"] = str(db)
    return cdk.SourceConfig.model_validate(settings)


class Table(cdk.Source[cdk.SourceConfig]):
    """``SELECT ... WHERE id > position ORDER BY id LIMIT page``, over rows 1..rows."""

    def __init__(self, rows: int, page: int) -> None:
        self.rows, self.page = rows, page
        self.started_from: list[Any] = []
        self.calls = 0

    def make_event(self) -> list[tuple[cdk.CloudEvent, int]]:
        self.calls += 1
        if self.calls == 1:
            self.started_from.append(self.position)
        first = (self.position or 0) + 1
        return [
            (row_event("t", n), n) for n in range(first, min(self.rows, first + self.page - 1) + 1)
        ]


def test_pages_are_delivered_in_order_and_a_restart_resumes_after_the_last(tmp_path: Path) -> None:
    db = tmp_path / "positions.db"
    with CaptureTarget.in_thread() as target:
        source = Table(rows=12, page=5)
        with run_in_thread(source, config(target.url, db)):
            target.wait_for_sync(12)
        # Three pages, then [] (nothing now): idle_interval 60 s, so no fifth call.
        assert source.calls == 4
        assert [e.get_id() for e in target.events] == [f"t-{n}" for n in range(1, 13)]
        again = Table(rows=15, page=5)
        with run_in_thread(again, config(target.url, db)):
            target.wait_for_sync(15)
        assert again.started_from == [12]
        assert [e.get_id() for e in target.events[12:]] == ["t-13", "t-14", "t-15"]
    with cdk.PositionStore("Table", db) as store:
        assert store.get("position") == 15


def test_idle_interval_is_the_pause_after_a_call_that_returned_nothing() -> None:
    class Quiet(cdk.Source[cdk.SourceConfig]):
        calls = 0

        async def make_event(self) -> list[cdk.CloudEvent] | None:
            self.calls += 1
            if self.calls == 1:
                return None
            if self.calls == 2:
                return []
            return [row_event("q", self.calls), row_event("q", self.calls + 100)]

    with CaptureTarget.in_thread() as target:
        source = Quiet()
        # interval 60 s: only the short idle_interval lets the third call come soon.
        with run_in_thread(source, config(target.url, interval=60, idle_interval=0.01)):
            target.wait_for_sync(2)
        assert source.calls == 3  # after a page: interval (60 s), no fourth call
    assert [e.get_id() for e in target.events] == ["q-3", "q-103"]


class Shards(cdk.Source[cdk.SourceConfig]):
    """Partitions ``names`` (changed by the test), each a table of ``rows`` rows."""

    def __init__(self, names: list[str], rows: int, broken: frozenset[str] = frozenset()):
        self.names, self.rows, self.broken = names, rows, broken
        self.started_from: dict[str, Any] = {}
        self.lock = threading.Lock()
        self.calls: dict[str, int] = {}

    def partitions(self) -> list[str]:
        return list(self.names)

    def make_event(self, partition: str) -> list[tuple[cdk.CloudEvent, int]]:
        with self.lock:
            self.calls[partition] = self.calls.get(partition, 0) + 1
            self.started_from.setdefault(partition, self.positions[partition])
        if partition in self.broken:
            raise ConnectionError(f"shard {partition} is down")
        first = (self.positions[partition] or 0) + 1
        last = min(self.rows, first + 2)
        return [(row_event(partition, n), n) for n in range(first, last + 1)]


def by_partition(events: list[cdk.CloudEvent]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for event in events:
        name, _, row = event.get_id().rpartition("-")
        found.setdefault(name, []).append(int(row))
    return found


def test_each_partition_keeps_its_own_position_and_resumes_from_it(tmp_path: Path) -> None:
    db = tmp_path / "positions.db"
    with CaptureTarget.in_thread() as target:
        source = Shards(["a", "b"], rows=7)
        with run_in_thread(source, config(target.url, db)):
            target.wait_for_sync(14)
        assert by_partition(target.events) == {"a": list(range(1, 8)), "b": list(range(1, 8))}
        assert source.positions == {"a": 7, "b": 7}
        with cdk.PositionStore("Shards", db) as store:
            store.set(partition_key("a"), 5)  # as if a's last two were never acknowledged
        again = Shards(["a", "b", "c"], rows=8)
        with run_in_thread(again, config(target.url, db)):
            target.wait_for_sync(14 + 3 + 1 + 8)
        assert again.started_from == {"a": 5, "b": 7, "c": None}
        assert by_partition(target.events[14:]) == {
            "a": [6, 7, 8],
            "b": [8],
            "c": list(range(1, 9)),
        }
    with cdk.PositionStore("Shards", db) as store:
        assert [store.get(partition_key(n)) for n in "abc"] == [8, 8, 8]
        assert store.get("position") is None


def test_a_failing_partition_does_not_hold_up_the_others_and_refresh_starts_and_stops() -> None:
    with CaptureTarget.in_thread() as target:
        source = Shards(["down", "a"], rows=3, broken=frozenset({"down"}))
        with run_in_thread(source, config(target.url, partition_refresh=0.05)) as running:
            target.wait_for_sync(3)
            poller = running.service.poller  # type: ignore[attr-defined]
            assert poller.trouble() == "make_event('down') fails: ConnectionError"
            source.names = ["b"]  # "down" and "a" removed, "b" added
            target.wait_for_sync(6)
            target.wait_until(lambda: set(poller.running) == {"b"})
            calls = source.calls["down"]
        assert source.calls["down"] == calls  # stopped: not called again
        assert set(source.positions) == {"b"}
    assert by_partition(target.events) == {"a": [1, 2, 3], "b": [1, 2, 3]}


def test_async_partitions_and_a_fatal_error_there_stop_the_source() -> None:
    class Accounts(cdk.Source[cdk.SourceConfig]):
        asked = 0

        async def partitions(self) -> list[str]:
            self.asked += 1
            if self.asked > 1:
                raise cdk.FatalError("the accounts table is gone")
            return ["acme"]

        async def make_event(self, partition: str) -> list[tuple[cdk.CloudEvent, int]]:
            n = (self.positions[partition] or 0) + 1
            return [(row_event(partition, n), n)] if n <= 2 else []

    with CaptureTarget.in_thread() as target:
        source = Accounts()
        settings = {"partition_refresh": 0.5, "idle_interval": 0.01}
        with run_in_thread(source, config(target.url, **settings)) as running:
            running.call(running.service.wait(), 10)
            error = running.service.error
        assert isinstance(error, cdk.FatalError) and str(error) == "the accounts table is gone"
        assert source.positions == {"acme": 2}
    assert [e.get_id() for e in target.events] == ["acme-1", "acme-2"]


@pytest.mark.parametrize("made", ["text", ["text"], (1, 2)])
def test_make_event_returning_something_else_stops_with_one_line(made: object) -> None:
    class Wrong(cdk.Source[cdk.SourceConfig]):
        def make_event(self) -> Any:
            return made

    with CaptureTarget.in_thread() as target:
        with run_in_thread(Wrong(), config(target.url)) as running:
            running.call(running.service.wait(), 10)
            error = running.service.error
        assert isinstance(error, cdk.FatalError)
        assert "make_event must return None, an event, (event, position) or a list" in str(error)
        assert target.events == []


# -- real processes -----------------------------------------------------------------------

ROWS_SCRIPT = """
import os
import cdk


class Config(cdk.SourceConfig):
    down_file: str | None = None  # make_event raises while this file exists
    fatal_after: int | None = None  # make_event raises cdk.FatalError past this row


class Rows(cdk.Source[Config]):
    def make_event(self, partition=None):
        if self.config.down_file and os.path.exists(self.config.down_file):
            raise ConnectionError("database unreachable")
        position = self.position if partition is None else self.positions[partition]
        n = (position or 0) + 1
        if self.config.fatal_after is not None and n > self.config.fatal_after:
            raise cdk.FatalError("table rows was dropped")
        name = partition or "r"
        return [
            (cdk.CloudEvent({"id": f"{name}-{k}", "source": "/rows", "type": "row"}, {"k": k}), k)
            for k in range(n, n + 3)
        ]


class Partitioned(Rows):
    def partitions(self):
        return os.environ["PARTITIONS"].split(",")


cdk.run_source(Config, Partitioned if os.environ.get("PARTITIONS") else Rows)
"""


def rows_dir(tmp_path: Path, target: str, extra: str = "") -> Path:
    (tmp_path / "config.yml").write_text(
        f"target: {target}\nhost: 127.0.0.1\nmetrics_port: 0\n"
        f"position_store: {tmp_path / 'positions.db'}\n{extra}",
        encoding="utf-8",
    )
    return tmp_path


def get(process: Process, path: str) -> tuple[int, str]:
    port = process.wait_for(r"metrics listening on http://127\.0\.0\.1:(\d+)").group(1)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def numbers(events: list[cdk.CloudEvent], name: str = "r") -> list[int]:
    return [int(e.get_id().rpartition("-")[2]) for e in events if e.get_id().startswith(name + "-")]


def stored(tmp_path: Path, namespace: str = "Rows", key: str = "position") -> Any:
    with cdk.PositionStore(namespace, tmp_path / "positions.db") as store:
        return store.get(key)


def test_a_failing_make_event_heals_and_readyz_says_why(
    tmp_path: Path, started: list[Process]
) -> None:
    down = tmp_path / "down"
    down.touch()
    with CaptureTarget.in_thread() as target:
        rows_dir(tmp_path, target.url, f"interval: 0.05\ndown_file: {down}\n")
        source = start(started, tmp_path, ROWS_SCRIPT)
        source.wait_for(
            "make_event failed: ConnectionError: database unreachable; calling it again"
        )
        assert get(source, "/readyz") == (503, "not ready: make_event fails: ConnectionError")
        failures = re.search(
            r"^cdk_make_event_failures_total (\S+)$", get(source, "/metrics")[1], re.M
        )
        assert failures is not None and float(failures.group(1)) >= 1
        down.unlink()
        source.wait_for(r"make_event succeeds again, after \d")
        target.wait_until(lambda: len(target.events) >= 9, timeout=30)
        assert get(source, "/readyz")[0] == 200
        source.send(signal.SIGTERM)
        assert source.wait() == 0, source.stderr
    assert source.stderr.count("make_event failed") == 1  # once, not per call
    got = numbers(target.events)
    assert got == list(range(1, len(got) + 1))  # nothing skipped while it failed


def test_fatal_error_settles_what_is_in_flight_and_exits_1_with_its_line(
    tmp_path: Path, started: list[Process]
) -> None:
    with CaptureTarget.in_thread() as target:
        rows_dir(tmp_path, target.url, "interval: 0\nfatal_after: 6\n")
        source = start(started, tmp_path, ROWS_SCRIPT)
        assert source.wait() == 1, source.stderr
        assert numbers(target.events) == [1, 2, 3, 4, 5, 6]
    errors = [line for line in source.lines if " ERROR " in line]
    assert len(errors) == 1 and errors[0].endswith("table rows was dropped"), source.stderr
    assert "Traceback" not in source.stderr
    assert stored(tmp_path) == 6


def test_an_outage_with_default_attempts_pauses_production_and_resumes_by_itself(
    tmp_path: Path, started: list[Process]
) -> None:
    with CaptureTarget.in_thread() as target:
        target.fail_with(503)
        # send_event_attempts stays 3 (the default): before, the source exited 1 at once.
        rows_dir(
            tmp_path, target.url, "interval: 0.01\nretry_backoff: 0.02\nretry_backoff_max: 0.1\n"
        )
        source = start(started, tmp_path, ROWS_SCRIPT)
        source.wait_for("production paused: event r-\\d+ .* was not delivered: gave up after 3")
        status, why = get(source, "/readyz")
        assert (status, why) == (
            503,
            "not ready: production paused: tracked events are not delivered",
        )
        # Far more attempts than 3 per event: the held events are sent again and again.
        target.wait_until(lambda: target.attempts >= 60, timeout=30)
        assert source.process.poll() is None, source.stderr
        made = len(target.all_requests)
        target.fail_with(None)
        source.wait_for(r"production resumes: the target took the held events, after \d")
        target.wait_until(lambda: len(target.events) >= 30, timeout=30)
        assert get(source, "/readyz")[0] == 200
        source.send(signal.SIGTERM)
        assert source.wait() == 0, source.stderr
    assert made >= 60
    paused = [line for line in source.lines if "WARNING cdk.source production paused" in line]
    assert len(paused) == 1, paused  # one warning (reminders: every 30 s)
    got = sorted(set(numbers(target.events)))
    assert got == list(range(1, len(got) + 1)), "an event was skipped"
    assert stored(tmp_path) == got[-1]


def test_sigterm_during_an_outage_stops_within_the_grace_period(
    tmp_path: Path, started: list[Process]
) -> None:
    with CaptureTarget.in_thread() as target:
        target.fail_with(503)
        extra = "interval: 0.01\nretry_backoff: 0.02\nretry_backoff_max: 0.1\ngrace_period: 2\n"
        rows_dir(tmp_path, target.url, extra)
        source = start(started, tmp_path, ROWS_SCRIPT)
        source.wait_for("production paused")
        source.send(signal.SIGTERM)
        # grace_period, and a margin for the interpreter's exit; a stop asked for is no gap
        assert source.wait(timeout=2 + 5) == 0, source.stderr
        assert "source stopped" in source.stderr
        assert target.events == []
    assert stored(tmp_path) is None  # nothing was acknowledged: nothing may be skipped


def test_a_source_with_partitions_killed_and_restarted_skips_nothing(
    tmp_path: Path, started: list[Process]
) -> None:
    with CaptureTarget.in_thread() as target:
        rows_dir(tmp_path, target.url, "interval: 0.01\nmax_in_flight: 4\n")
        first = start(started, tmp_path, ROWS_SCRIPT, PARTITIONS="a,b,c")
        target.wait_until(lambda: all(len(numbers(target.events, n)) >= 30 for n in "abc"), 30)
        first.process.kill()
        first.wait()
        before = len(target.events)
        kept = {n: stored(tmp_path, "Partitioned", partition_key(n)) for n in "abc"}
        assert all(isinstance(kept[n], int) and kept[n] >= 3 for n in "abc"), kept
        second = start(started, tmp_path, ROWS_SCRIPT, PARTITIONS="a,b,c")
        line = second.wait_for(r"partitions: 3 running; started (.*); stopped none").group(1)
        assert line == ", ".join(f"{n} (after position {kept[n]})" for n in "abc")
        target.wait_until(
            lambda: all(max(numbers(target.events, n)) >= kept[n] + 30 for n in "abc"), 30
        )
        second.send(signal.SIGTERM)
        assert second.wait() == 0, second.stderr
    for name in "abc":
        got = set(numbers(target.events, name))
        assert got == set(range(1, max(got) + 1)), f"partition {name} skipped events"
        assert min(numbers(target.events[before:], name)) == kept[name] + 1
        assert stored(tmp_path, "Partitioned", partition_key(name)) == max(got)
