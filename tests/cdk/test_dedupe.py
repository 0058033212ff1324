"""A sink's duplicate filter (``dedupe_window``): memory, an SQLite file, a real Redis.

Sinks run as services in threads on loopback ports; the Redis tests start a real
``redis-server`` (tests/redis_support.py) on a free port.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from processes import READY, SINK_SCRIPT, Process, markers, post_event, sink_dir, start
from pydantic import ValidationError
from redis_support import RedisServer

import cdk
from cdk.config import SinkConfig, masked_dump
from cdk.dedupe import _MemoryStore
from cdk.service import ServiceError
from cdk.testing import CaptureTarget, SinkClient, run_in_thread

pytestmark = pytest.mark.timeout(60)


def event(n: int, source: str = "/test") -> cdk.CloudEvent:
    return cdk.CloudEvent({"id": f"e-{n}", "source": source, "type": "t"}, {"n": n})


class CountingSink(cdk.Sink[SinkConfig]):
    """Records the ids ``arrived`` saw; answers ``codes[id]`` per event (0 when absent)."""

    def __init__(self, codes: dict[str, int] | None = None) -> None:
        self.codes = codes or {}
        self.seen: list[str] = []

    def name(self) -> str:
        return "counting-sink"

    async def arrived(self, *events: cdk.CloudEvent) -> list[cdk.Result]:
        self.seen.extend(e.get_id() for e in events)
        return [cdk.Result(self.codes.get(e.get_id(), 0), "no") for e in events]


@contextmanager
def serving(sink: CountingSink, **config: Any) -> Iterator[SinkClient]:
    settings = SinkConfig.model_validate({"dedupe_window": 60, **config})
    with run_in_thread(sink, settings, grace=2.0) as running:
        yield SinkClient(running.url, timeout=20)


def duplicates(client: SinkClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("cdk_sink_duplicates_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no cdk_sink_duplicates_total series")


def test_a_repeated_event_is_acknowledged_without_calling_arrived() -> None:
    sink = CountingSink()
    with serving(sink) as client:
        first = client.send(event(1))
        again = client.send(event(1))
        other_source = client.send(event(1, source="/elsewhere"))
        batch = client.send(event(1), event(2), mode="batch")
        counted = duplicates(client)
    assert [r.status for r in (first, again, other_source, batch)] == [200] * 4
    assert sink.seen == ["e-1", "e-1", "e-2"]  # the second e-1 came from another source
    assert counted == 2


def test_off_by_default() -> None:
    sink = CountingSink()
    with run_in_thread(sink, SinkConfig(), grace=2.0) as running:
        client = SinkClient(running.url, timeout=20)
        client.send(event(1))
        client.send(event(1))
    assert sink.seen == ["e-1", "e-1"]


def test_only_successes_are_remembered_so_a_retried_batch_reaches_only_what_failed() -> None:
    sink = CountingSink({"e-2": 503})
    with serving(sink) as client:
        failed = client.send(event(1), event(2), event(3), mode="batch")
        sink.codes.clear()
        retried = client.send(event(1), event(2), event(3), mode="batch")
    assert (failed.status, retried.status) == (503, 200)
    assert sink.seen == ["e-1", "e-2", "e-3", "e-2"]


def test_dead_lettered_events_count_as_handled() -> None:
    sink = CountingSink({"e-2": 400})
    with CaptureTarget.in_thread() as dead, serving(sink, dead_letter_target=dead.url) as client:
        first = client.send(event(1), event(2), mode="batch")
        again = client.send(event(1), event(2), mode="batch")
        lettered = [e.get_id() for e in dead.events]
    assert (first.status, again.status) == (200, 200)
    assert sink.seen == ["e-1", "e-2"]
    assert lettered == ["e-2"]


def test_the_window_ends() -> None:
    sink = CountingSink()
    with serving(sink, dedupe_window=0.2) as client:
        client.send(event(1))
        deadline = time.monotonic() + 10
        # Sent again until the window is over and arrived sees it a second time.
        while sink.seen.count("e-1") < 2 and time.monotonic() < deadline:
            assert client.send(event(1)).status == 200
    assert sink.seen.count("e-1") == 2


def test_the_memory_store_is_bounded_and_forgets_the_oldest_first(caplog: Any) -> None:
    caplog.set_level(logging.WARNING, "cdk.dedupe")
    store = _MemoryStore(60, entries=3)

    async def scenario() -> list[bool]:
        await store.remember(["a", "b", "c"])
        await store.remember(["d", "b"])  # b is known: its window still runs from before
        return await store.seen(["a", "b", "c", "d"])

    assert asyncio.run(scenario()) == [False, True, True, True]
    assert "keeps the last 3 events in memory" in caplog.text


def test_an_sqlite_store_survives_a_restart(tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "dedupe.db")
    first = CountingSink()
    with serving(first, dedupe_store=path) as client:
        client.send(event(1), event(2), mode="batch")
    second = CountingSink()
    with serving(second, dedupe_store=path) as client:
        reply = client.send(event(1), event(2), event(3), mode="batch")
        counted = duplicates(client)
    assert reply.status == 200
    assert (first.seen, second.seen, counted) == (["e-1", "e-2"], ["e-3"], 2)


def test_a_sink_killed_with_sigkill_remembers_what_it_acknowledged(
    tmp_path: Path, started: list[Process]
) -> None:
    store = tmp_path / "dedupe.db"
    directory = sink_dir(tmp_path, f"dedupe_window: 60\ndedupe_store: {store}\n")
    first = start(started, directory, SINK_SCRIPT)
    port = int(first.wait_for(READY).group(1))
    assert [post_event(port, "e-1"), post_event(port, "e-2")] == [200, 200]
    first.kill()  # SIGKILL: nothing is flushed on the way out
    second = start(started, directory, SINK_SCRIPT)
    port = int(second.wait_for(READY).group(1))
    assert [post_event(port, f"e-{n}") for n in (1, 2, 3)] == [200, 200, 200]
    arrived = [line for line in markers(tmp_path) if line.startswith("arrived")]
    assert arrived == ["arrived e-1", "arrived e-2", "arrived e-3"]


def test_an_unwritable_sqlite_store_stops_the_sink_with_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = str(blocker / "dedupe.db")
    with (
        pytest.raises(ServiceError, match="cannot open the dedupe store"),
        serving(CountingSink(), dedupe_store=store),
    ):
        pass


def test_two_replicas_sharing_redis_call_arrived_once_per_event(
    redis_server: RedisServer,
) -> None:
    url = redis_server.url(3)
    one, two = CountingSink(), CountingSink()
    with serving(one, dedupe_store=url) as a, serving(two, dedupe_store=url) as b:
        replies = [
            a.send(event(1), event(2), mode="batch"),
            b.send(event(1), event(2), event(3), mode="batch"),
            a.send(event(3)),
            b.send(event(1)),
        ]
    assert all(r.status == 200 for r in replies), [r.text for r in replies]
    assert (one.seen, two.seen) == (["e-1", "e-2"], ["e-3"])
    # Restarted, a replica still knows what either of them handled.
    three = CountingSink()
    with serving(three, dedupe_store=url) as c:
        c.send(event(1), event(2), event(3), event(4), mode="batch")
    assert three.seen == ["e-4"]


def test_sinks_of_different_names_do_not_share_keys(redis_server: RedisServer) -> None:
    class OtherSink(CountingSink):
        def name(self) -> str:
            return "other-sink"

    one, other = CountingSink(), OtherSink()
    url = redis_server.url()
    with serving(one, dedupe_store=url) as a, serving(other, dedupe_store=url) as b:
        a.send(event(1))
        b.send(event(1))
    assert (one.seen, other.seen) == (["e-1"], ["e-1"])


def test_with_redis_down_events_reach_arrived_and_dedupe_resumes_after(
    redis_server: RedisServer, caplog: Any
) -> None:
    caplog.set_level(logging.INFO, "cdk.dedupe")
    sink = CountingSink()
    with serving(sink, dedupe_store=redis_server.url()) as client:
        redis_server.stop()
        down = [client.send(event(1)), client.send(event(1))]
        redis_server.start()
        client.send(event(2))
        client.send(event(2))
    assert [r.status for r in down] == [200, 200]
    assert sink.seen == ["e-1", "e-1", "e-2"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, "one warning while the store fails, not one per request"
    assert "events go to arrived unfiltered" in warnings[0].getMessage()
    assert "works again" in caplog.text


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("redis://127.0.0.1/0", "redis://HOST:PORT/DB"),
        ("redis://127.0.0.1:6379/x", "redis://HOST:PORT/DB"),
        ("memcached://127.0.0.1:1/0", "redis://HOST:PORT/DB"),
        ("  ", "must not be empty"),
    ],
)
def test_a_bad_dedupe_store_is_a_config_error_naming_it(value: str, problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        SinkConfig.model_validate({"dedupe_store": value})
    assert "dedupe_store" in str(caught.value) and problem in str(caught.value)


def test_a_redis_password_is_masked_where_the_config_is_shown() -> None:
    config = SinkConfig.model_validate({"dedupe_store": "redis://:hunter22@127.0.0.1:6379/0"})
    assert "hunter22" not in str(masked_dump(config))


def test_a_redis_store_without_the_redis_package_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # what an install without the extra has
    with pytest.raises(ValidationError, match=r"dedupe_store[\s\S]*the project's `redis` extra"):
        SinkConfig.model_validate({"dedupe_store": "redis://127.0.0.1:6379/0"})
