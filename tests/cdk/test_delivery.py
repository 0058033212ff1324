"""Delivery engine over real HTTP on loopback, against a CaptureTarget that misbehaves on cue."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import shutil
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
import pytest
import yaml
from cloudevents.core.v1.event import CloudEvent

from cdk.codec import STRUCTURED_CONTENT_TYPE, from_http
from cdk.config import ConfigError, SourceConfig, load_config, redact_url
from cdk.connector import Tuple
from cdk.delivery import (
    AttemptsExhausted,
    DeadLettered,
    Deliverer,
    DeliveryError,
    DeliveryQueue,
    EncodeError,
    Fenced,
    Gate,
    ShutdownError,
    TargetRejected,
    TargetUnavailable,
    parse_ce_overrides,
    retry_after_seconds,
)
from cdk.metrics import Metrics
from cdk.positions import Checkpoint
from cdk.store import PositionStore
from cdk.testing import CaptureTarget, free_port

pytestmark = pytest.mark.timeout(60)


def make_event(i: int) -> CloudEvent:
    return CloudEvent(
        {
            "id": f"e{i}",
            "source": "/tests/delivery",
            "type": "com.example.test",
            "specversion": "1.0",
            "datacontenttype": "application/json",
        },
        {"n": i},
    )


def data_n(event: CloudEvent) -> int:
    data = event.get_data()
    assert isinstance(data, dict)
    return int(data["n"])


def config(target: str, **overrides: Any) -> SourceConfig:
    values: dict[str, Any] = {
        "target": target,
        "retry_backoff": 0.01,
        "retry_backoff_max": 0.05,
        "attempt_timeout": 5.0,
    }
    values.update(overrides)
    return SourceConfig(**values)


def load_problem(tmp_path: Path, text: str) -> str:
    """The one problem loading a config.yml of ``text`` finds."""
    path = tmp_path / "config.yml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(SourceConfig, path, environ={})
    (problem,) = info.value.problems
    return problem


class Fates:
    """Records every callback; ``wait`` returns once ``expected`` tuples were settled."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.ok: list[str] = []
        self.failed: dict[str, BaseException] = {}
        self.calls: Counter[str] = Counter()
        self.done = asyncio.Event()

    def tuple(self, event: CloudEvent) -> Tuple:
        event_id = event.get_id()
        return Tuple(event, lambda: self._ok(event_id), lambda exc: self._fail(event_id, exc))

    def _ok(self, event_id: str) -> None:
        self.ok.append(event_id)
        self._count(event_id)

    def _fail(self, event_id: str, exc: BaseException) -> None:
        self.failed[event_id] = exc
        self._count(event_id)

    def _count(self, event_id: str) -> None:
        self.calls[event_id] += 1
        if sum(self.calls.values()) >= self.expected:
            self.done.set()

    async def wait(self, within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            await self.done.wait()

    def assert_exactly_once(self, ids: list[str]) -> None:
        assert sorted(self.calls) == sorted(ids)
        assert set(self.calls.values()) == {1}, self.calls.most_common(3)
        assert not set(self.ok) & set(self.failed)


@asynccontextmanager
async def delivering(
    cfg: SourceConfig,
    chan: asyncio.Queue[Tuple] | None = None,
    *,
    grace: float = 5.0,
    overrides: dict[str, Any] | None = None,
    logger: logging.Logger | None = None,
    reminder: float = 30.0,
    gate: Gate | None = None,
) -> AsyncIterator[tuple[Deliverer, asyncio.Queue[Tuple], Metrics]]:
    chan = chan if chan is not None else DeliveryQueue(cfg.queue_size)
    metrics = Metrics()
    deliverer = Deliverer(cfg, metrics, overrides=overrides, gate=gate)
    deliverer.log, deliverer.reminder = logger or deliverer.log, reminder
    task = asyncio.create_task(deliverer.run(chan))
    try:
        yield deliverer, chan, metrics
    finally:
        await deliverer.stop(grace)
        await asyncio.wait_for(task, 5)


def value(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    result = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if result is None else result


async def send(chan: asyncio.Queue[Tuple], fates: Fates, ids: range) -> list[str]:
    for i in ids:
        await chan.put(fates.tuple(make_event(i)))
    return [f"e{i}" for i in ids]


async def deliver(
    cfg: SourceConfig, count: int, *, within: float = 10.0, **options: Any
) -> tuple[Fates, list[str], Metrics]:
    """Deliver ``e0`` .. ``e<count-1>`` with ``cfg`` until each has its fate, then stop the
    deliverer (``options`` as for :func:`delivering`); the fates, the ids and the metrics."""
    fates = Fates(count)
    async with delivering(cfg, **options) as (_, chan, metrics):
        ids = await send(chan, fates, range(count))
        await fates.wait(within)
    return fates, ids, metrics


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


class Logged(logging.Handler):
    """The records of a logger of its own; ``until`` waits for a condition on them."""

    def __init__(self, level: int = logging.DEBUG) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.changed = asyncio.Event()
        self.logger = logging.getLogger(f"tests.delivery.{id(self)}")
        self.logger.setLevel(level)
        self.logger.propagate = False
        self.logger.addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.changed.set()

    def lines(self, level: int = logging.DEBUG, containing: str = "") -> list[str]:
        found = (r.getMessage() for r in self.records if r.levelno >= level)
        return [line for line in found if containing in line]

    async def until(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()


# -- delivery and callbacks ----------------------------------------------------------


def test_every_event_gets_one_callback_and_every_success_arrived() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            fates, ids, metrics = await deliver(config(target.url, max_in_flight=8), 300)
            fates.assert_exactly_once(ids)
            assert sorted(fates.ok) == sorted(ids)
            received = [e.get_id() for e in target.events]
            assert sorted(received) == sorted(ids)
            assert value(metrics, "cdk_events_delivered_total") == 300
            assert value(metrics, "cdk_delivery_in_flight") == 0
            assert value(metrics, "cdk_delivery_latency_seconds_count") == 300

    run(main)


def test_one_in_flight_keeps_strict_order_across_retries() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_next(2, status=503)
            target.drop_next(1)
            target.fail_next(1, status=500)
            cfg = config(target.url, max_in_flight=1, send_event_attempts=10)
            fates, ids, _ = await deliver(cfg, 60)
            assert fates.ok == ids
            assert [e.get_id() for e in target.events] == ids
            assert target.attempts == 64

    run(main)


def test_async_callbacks_are_awaited() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            done: list[str] = []
            all_done = asyncio.Event()

            async def success(event_id: str) -> None:
                await asyncio.sleep(0)
                done.append(event_id)
                if len(done) == 20:
                    all_done.set()

            async with delivering(config(target.url)) as (_, chan, _metrics):
                for i in range(20):
                    await chan.put(Tuple(make_event(i), functools.partial(success, f"e{i}")))
                async with asyncio.timeout(10):
                    await all_done.wait()
            assert sorted(done) == sorted(f"e{i}" for i in range(20))

    run(main)


def test_raising_callbacks_do_not_stop_delivery(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            delivered: list[str] = []

            def success(event_id: str) -> None:
                delivered.append(event_id)
                raise RuntimeError(f"callback of {event_id} broke")

            async with delivering(config(target.url, max_in_flight=2)) as (_, chan, _metrics):
                for i in range(30):
                    await chan.put(Tuple(make_event(i), functools.partial(success, f"e{i}")))
                await target.wait_for(30)
                await target.wait_until_async(lambda: len(delivered) == 30)
            assert sorted(delivered) == sorted(f"e{i}" for i in range(30))

    with caplog.at_level(logging.ERROR, logger="cdk.delivery"):
        run(main)
    assert "success callback of event e0 raised" in caplog.text


def test_a_callback_raising_cancelled_error_does_not_end_its_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            fates = Fates(5)

            async def cancelled_inside() -> None:
                # Awaiting something that got cancelled, not a cancellation of the worker.
                never = asyncio.get_running_loop().create_future()
                never.cancel()
                await never

            chan: asyncio.Queue[Tuple] = asyncio.Queue(10)
            await chan.put(Tuple(make_event(0), cancelled_inside))
            ids = await send(chan, fates, range(1, 5))
            fates.expected = 4
            async with delivering(config(target.url, max_in_flight=1), chan):
                await fates.wait()
            assert fates.ok == ids
            assert [e.get_id() for e in target.events] == ["e0", *ids]

    with caplog.at_level(logging.ERROR, logger="cdk.delivery"):
        run(main)
    assert "success callback of event e0 raised" in caplog.text


def test_cancelled_mid_callbacks_the_rest_of_a_delivered_batch_still_succeeds() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            fates = Fates(4)
            started = asyncio.Event()

            async def stuck() -> None:
                started.set()
                await asyncio.Event().wait()  # outlives the grace period

            chan: asyncio.Queue[Tuple] = asyncio.Queue(10)
            await chan.put(Tuple(make_event(0), stuck, lambda exc: fates._fail("e0", exc)))
            ids = await send(chan, fates, range(1, 5))
            cfg = config(target.url, batch_size=5, max_in_flight=1)
            deliverer = Deliverer(cfg, Metrics())
            task = asyncio.create_task(deliverer.run(chan))
            async with asyncio.timeout(10):
                await started.wait()
            await deliverer.stop(grace=0.1)
            await task
            assert [len(r.events) for r in target.requests] == [5]
            # The target has all five: the four after the stuck callback were delivered.
            fates.assert_exactly_once(ids)
            assert fates.ok == ids

    run(main)


def test_an_item_that_is_not_a_tuple_fails_alone(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            fates = Fates(3)
            chan: asyncio.Queue[Tuple] = asyncio.Queue(10)
            await chan.put(cast(Tuple, make_event(99)))  # the event itself, not a Tuple
            ids = await send(chan, fates, range(3))
            async with delivering(config(target.url, max_in_flight=1), chan):
                await fates.wait()
            assert fates.ok == ids
            assert [e.get_id() for e in target.events] == ids

    with caplog.at_level(logging.WARNING, logger="cdk.delivery"):
        run(main)
    assert "not a cdk.Tuple" in caplog.text
    assert "unexpectedly" not in caplog.text


# -- content modes and batches -------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "content_type"),
    [("binary", "application/json"), ("structured", "application/cloudevents+json")],
)
def test_content_mode_on_the_wire(mode: str, content_type: str) -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            await deliver(config(target.url, content_mode=mode), 3)
            for request in target.requests:
                assert request.mode == mode
                assert request.headers["content-type"].startswith(content_type)
                assert ("ce-id" in request.headers) == (mode == "binary")
                assert len(request.events) == 1
            assert sorted(data_n(e) for e in target.events) == [0, 1, 2]

    run(main)


@pytest.mark.parametrize("queue", [asyncio.Queue, DeliveryQueue])
def test_fast_producer_fills_batches(queue: type[asyncio.Queue[Tuple]]) -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            fates = Fates(25)
            chan: asyncio.Queue[Tuple] = queue(100)
            ids = await send(chan, fates, range(25))  # queued before delivery starts
            cfg = config(target.url, batch_size=10, max_in_flight=1, batch_linger=0.05)
            async with delivering(cfg, chan) as (_, _chan, metrics):
                await fates.wait()
            assert [len(r.events) for r in target.requests] == [10, 10, 5]
            assert {r.mode for r in target.requests} == {"batch"}
            for request in target.requests:
                assert request.headers["content-type"].startswith(
                    "application/cloudevents-batch+json"
                )
            assert [e.get_id() for e in target.events] == ids
            assert value(metrics, "cdk_events_delivered_total") == 25

    run(main)


def test_batches_with_many_in_flight_take_from_chan_in_order() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            fates = Fates(500)
            chan: asyncio.Queue[Tuple] = asyncio.Queue(1000)
            ids = await send(chan, fates, range(500))
            cfg = config(target.url, batch_size=50, max_in_flight=4)
            async with delivering(cfg, chan):
                await fates.wait()
            assert all(len(r.events) == 50 for r in target.requests)
            # Each request holds a contiguous run of the queue, whatever order they landed in.
            runs = sorted(int(r.events[0].get_id()[1:]) for r in target.requests)
            assert runs == list(range(0, 500, 50))
            assert sorted(fates.ok) == sorted(ids)

    run(main)


def test_a_batch_taken_at_once_wakes_a_producer_waiting_for_room() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            fates = Fates(200)
            chan = DeliveryQueue(10)  # the producer waits for room after every 10 events
            cfg = config(target.url, batch_size=5, max_in_flight=2, queue_size=10)
            async with delivering(cfg, chan):
                ids = await send(chan, fates, range(200))
                await fates.wait()
            assert sorted(fates.ok) == sorted(ids)
            assert sorted(e.get_id() for e in target.events) == sorted(ids)
            runs = sorted(int(r.events[0].get_id()[1:]) for r in target.requests)
            assert all(len(r.events) <= 5 for r in target.requests)
            assert len(runs) < 200  # batched, not one request per event

    run(main)


def test_taking_a_batch_wakes_as_many_producers_as_it_made_room_for() -> None:
    async def main() -> None:
        chan = DeliveryQueue(3)
        for i in range(3):
            chan.put_nowait(Tuple(make_event(i)))
        producers = [asyncio.create_task(chan.put(Tuple(make_event(i)))) for i in range(3, 6)]
        await asyncio.sleep(0)  # let each producer find the queue full
        assert not any(p.done() for p in producers)
        taken = chan.take(3)
        assert [t.event.get_id() for t in taken] == ["e0", "e1", "e2"]
        async with asyncio.timeout(5):
            await asyncio.gather(*producers)
        assert [t.event.get_id() for t in chan.take(10)] == ["e3", "e4", "e5"]

    run(main)


def test_linger_flushes_a_partial_batch() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            fates = Fates(3)
            cfg = config(target.url, batch_size=100, batch_linger=0.02)
            async with delivering(cfg) as (_, chan, _metrics):
                started = time.monotonic()
                await send(chan, fates, range(3))
                await fates.wait(within=5)
                elapsed = time.monotonic() - started
            assert [len(r.events) for r in target.requests] == [3]
            assert elapsed < 2.0

    run(main)


def broken_event(i: int) -> CloudEvent:
    """An event the codec accepts but the request head cannot carry (binary mode)."""
    return CloudEvent(
        {
            "id": f"e{i}",
            "source": "/tests/delivery",
            "type": "com.example.test",
            "specversion": "1.0",
            "datacontenttype": "text/plain\r\nX-Injected: 1",
        },
        b"raw",
    )


def test_an_event_the_request_head_cannot_carry_is_an_encode_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            fates = Fates(3)
            async with delivering(config(target.url, max_in_flight=1)) as (_, chan, metrics):
                await send(chan, fates, range(1))
                await chan.put(fates.tuple(broken_event(1)))
                await send(chan, fates, range(2, 3))
                await fates.wait()
            assert sorted(fates.ok) == ["e0", "e2"]
            error = fates.failed["e1"]
            assert isinstance(error, EncodeError) and "datacontenttype" in str(error)
            assert all("x-injected" not in r.headers for r in target.all_requests)
            assert value(metrics, "cdk_events_failed_total", {"reason": "rejected"}) == 1

    with caplog.at_level(logging.WARNING, logger="cdk.delivery"):
        run(main)
    assert "unexpectedly" not in caplog.text


def test_overrides_do_not_fail_a_whole_batch_for_one_bad_item() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            fates = Fates(3)
            chan: asyncio.Queue[Tuple] = asyncio.Queue(10)
            await send(chan, fates, range(2))
            bad = Tuple(cast(CloudEvent, "not an event"), None, lambda e: fates._fail("bad", e))
            await chan.put(bad)
            await send(chan, fates, range(2, 4))
            fates.expected = 5
            cfg = config(target.url, batch_size=10, max_in_flight=1)
            async with delivering(cfg, chan, overrides={"cluster": "east"}):
                await fates.wait()
            assert sorted(fates.ok) == ["e0", "e1", "e2", "e3"]
            assert isinstance(fates.failed["bad"], EncodeError)
            assert [len(r.events) for r in target.requests] == [4]
            assert {e.get_extension("cluster") for e in target.events} == {"east"}

    run(main)


def test_a_batch_of_two_specversions_goes_in_order_one_request_per_run() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            fates = Fates(5)
            chan: asyncio.Queue[Tuple] = asyncio.Queue(10)
            for i, version in enumerate(["1.0", "1.0", "0.3", "0.3", "1.0"]):
                attributes = {"id": f"e{i}", "source": "/s", "type": "t", "specversion": version}
                _, (event,) = from_http(
                    {"content-type": STRUCTURED_CONTENT_TYPE}, orjson.dumps(attributes)
                )
                await chan.put(fates.tuple(event))
            cfg = config(target.url, batch_size=10, max_in_flight=1)
            async with delivering(cfg, chan):
                await fates.wait()
            ids = [f"e{i}" for i in range(5)]
            assert fates.ok == ids
            assert [[e.get_id() for e in r.events] for r in target.requests] == [
                ["e0", "e1"],
                ["e2", "e3"],
                ["e4"],
            ]

    run(main)


def test_a_closed_gate_stops_every_write_after_it_retries_included() -> None:
    """The gate (a lease under leader election) is asked before each write, a retry's too;
    once it says no, what is held fails with Fenced, and nothing more reaches the target."""

    async def main() -> None:
        asked: list[list[str]] = []

        def gate(tuples: Sequence[Tuple]) -> str | None:
            asked.append([t.event.get_id() for t in tuples])
            return None if len(asked) <= 5 else "the lease may have expired"

        logged = Logged()
        async with CaptureTarget() as target:
            target.fail_next(1, status=503)  # e0's first attempt: its retry asks again
            cfg = config(target.url, max_in_flight=1, send_event_attempts=10)
            fates, ids, metrics = await deliver(cfg, 10, gate=gate, logger=logged.logger)
            assert [e.get_id() for e in target.events] == ids[:4]
            assert target.attempts == 5
        assert asked[:6] == [["e0"], ["e0"], ["e1"], ["e2"], ["e3"], ["e4"]]
        assert fates.ok == ids[:4]
        assert sorted(fates.failed) == sorted(ids[4:])
        assert all(isinstance(error, Fenced) for error in fates.failed.values())
        assert "the lease may have expired" in str(fates.failed["e4"])
        assert value(metrics, "cdk_events_failed_total", {"reason": "fenced"}) == 6
        # A deposed leader's events are no failed deliveries: no warning per event.
        assert not logged.lines(logging.WARNING, "delivery failed")

    run(main)


def test_a_batch_the_gate_refuses_fails_only_the_events_it_refuses_one_by_one() -> None:
    """A partition released while its events wait in a batch with others': only those fail
    (Fenced); the rest of the batch goes, so no other partition's checkpoint ends."""

    async def main() -> None:
        def gate(tuples: Sequence[Tuple]) -> str | None:
            odd = [t for t in tuples if int(t.event.get_id()[1:]) % 2]
            return "partition odd is led elsewhere" if odd else None

        async with CaptureTarget() as target:
            cfg = config(target.url, batch_size=4, batch_linger=0.5, max_in_flight=1)
            chan: DeliveryQueue = DeliveryQueue(100)
            fates = Fates(12)
            for i in range(12):  # queued before delivery starts: three full batches
                chan.put_nowait(fates.tuple(make_event(i)))
            async with delivering(cfg, chan, gate=gate) as (_, _, metrics):
                await fates.wait()
            even = sorted(f"e{i}" for i in range(0, 12, 2))
            assert sorted(e.get_id() for e in target.events) == even
            assert target.attempts == 3  # one request per batch, with what it may send
        assert sorted(fates.ok) == even
        assert sorted(fates.failed) == sorted(f"e{i}" for i in range(1, 12, 2))
        assert all(isinstance(error, Fenced) for error in fates.failed.values())
        assert value(metrics, "cdk_events_failed_total", {"reason": "fenced"}) == 6
        assert value(metrics, "cdk_delivery_waiting") == 0

    run(main)


# -- retries -------------------------------------------------------------------------


def test_503_burst_is_retried() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_next(6, status=503)
            cfg = config(target.url, max_in_flight=2, send_event_attempts=10)
            fates, ids, metrics = await deliver(cfg, 10)
            assert sorted(fates.ok) == sorted(ids)
            assert target.attempts == 16
            assert value(metrics, "cdk_delivery_retries_total") == 6

    run(main)


def test_429_retry_after_is_honoured() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_next(1, status=429, retry_after=1)
            await deliver(config(target.url), 1)
            first, second = target.all_requests
            assert first.status == 429 and second.status == 200
            assert second.arrived - first.arrived >= 0.95  # 1 s asked, backoff is 0.01 s

    run(main)


def test_retry_after_is_capped() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_next(1, status=503, retry_after=3600)
            cfg = config(target.url, retry_after_max=0.05)
            fates, _, _ = await deliver(cfg, 1, within=5)
            assert fates.ok == ["e0"]

    run(main)


def test_dropped_connections_are_retried() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.drop_next(3)
            cfg = config(target.url, max_in_flight=1, send_event_attempts=5)
            fates, ids, _ = await deliver(cfg, 4)
            assert fates.ok == ids
            assert [r.status for r in target.all_requests[:3]] == [None, None, None]

    run(main)


def test_slow_answer_over_attempt_timeout_is_retried() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.delay_next(1, 1.0)
            fates = Fates(1)
            cfg = config(target.url, attempt_timeout=0.2)
            async with delivering(cfg) as (_, chan, metrics):
                started = time.monotonic()
                await send(chan, fates, range(1))
                await fates.wait()
                elapsed = time.monotonic() - started
            assert fates.ok == ["e0"]
            assert 0.2 <= elapsed < 1.0  # the retry did not wait for the slow answer
            assert value(metrics, "cdk_delivery_retries_total") == 1

    run(main)


def test_no_backoff_configured_still_does_not_spin_on_a_dead_target() -> None:
    async def main() -> None:
        dead = f"http://127.0.0.1:{free_port()}/"
        fates = Fates(1)
        cfg = config(dead, retry_backoff=0, retry_backoff_max=0, send_event_attempts=0)
        async with delivering(cfg, grace=0) as (_, chan, metrics):
            await send(chan, fates, range(1))
            await asyncio.sleep(0.3)  # the span being measured, not a synchronisation
            retries = value(metrics, "cdk_delivery_retries_total")
        assert 1 <= retries <= 0.3 / 0.01 + 2
        assert isinstance(fates.failed["e0"], ShutdownError)

    run(main)


def test_target_that_starts_late_gets_everything() -> None:
    async def main() -> None:
        port = free_port()
        logged = Logged()
        fates = Fates(5)
        cfg = config(f"http://127.0.0.1:{port}/", send_event_attempts=0, max_in_flight=1)
        async with delivering(cfg, logger=logged.logger) as (_, chan, _metrics):
            ids = await send(chan, fates, range(5))
            # At least one attempt failed: nobody listened yet.
            await logged.until(lambda: bool(logged.lines(containing="retrying")))
            async with CaptureTarget(port=port) as target:
                await fates.wait()
                assert [e.get_id() for e in target.events] == ids
        assert fates.ok == ids

    run(main)


@pytest.mark.parametrize("status", [404, 408, 409, 429, 500, 502, 504, 599])
def test_knative_retryable_statuses_are_retried(status: int) -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_next(2, status=status)
            fates, _, _ = await deliver(config(target.url, send_event_attempts=3), 1)
            assert fates.ok == ["e0"]
            assert [r.status for r in target.all_requests] == [status, status, 200]

    run(main)


@pytest.mark.parametrize("status", [300, 307, 400, 401, 403, 413, 415, 422])
def test_non_retryable_status_fails_at_once(status: int) -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.reject_next(1, status=status, body=f"no thanks ({status})")
            cfg = config(target.url, send_event_attempts=5)
            fates, _, metrics = await deliver(cfg, 1)
            error = fates.failed["e0"]
            assert isinstance(error, TargetRejected)
            assert error.status == status
            assert str(status) in str(error) and f"no thanks ({status})" in str(error)
            assert target.attempts == 1
            assert value(metrics, "cdk_events_failed_total", {"reason": "rejected"}) == 1
            assert value(metrics, "cdk_delivery_retries_total") == 0

    run(main)


def test_rejection_excerpt_is_short() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.reject_next(1, status=400, body="x" * 5000)
            fates, _, _ = await deliver(config(target.url), 1)
            error = fates.failed["e0"]
            assert isinstance(error, TargetRejected)
            assert 0 < len(error.excerpt) <= 200

    run(main)


def test_attempts_exhausted(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_with(503, body="down for maintenance")
            cfg = config(target.url, send_event_attempts=3)
            fates, _, metrics = await deliver(cfg, 1)
            error = fates.failed["e0"]
            assert isinstance(error, AttemptsExhausted)
            assert isinstance(error.last_error, TargetUnavailable)
            assert error.last_error.status == 503
            assert "3 attempt" in str(error) and "down for maintenance" in str(error)
            assert target.attempts == 3
            assert value(metrics, "cdk_events_failed_total", {"reason": "exhausted"}) == 1

    with caplog.at_level(logging.WARNING, logger="cdk.delivery"):
        run(main)
    assert "e0" in caplog.text


def test_zero_attempts_retries_until_delivered() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_next(12, status=502)
            cfg = config(target.url, send_event_attempts=0, retry_backoff_max=0.02)
            fates, _, _ = await deliver(cfg, 1)
            assert fates.ok == ["e0"]
            assert target.attempts == 13

    run(main)


def test_an_event_waiting_for_a_retry_holds_no_slot() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_next(2, status=503, retry_after=1)
            cfg = config(target.url, max_in_flight=2, send_event_attempts=3)
            fates, ids, metrics = await deliver(cfg, 40)
            assert sorted(fates.ok) == sorted(ids)
            # Both slots' first events wait a second for their retry; the 38 others do not
            # wait for them.
            accepted = [e.get_id() for e in target.events]
            assert sorted(accepted[-2:]) == ["e0", "e1"]
            assert value(metrics, "cdk_delivery_waiting") == 0

    run(main)


def test_retries_to_a_failing_target_stay_within_the_retry_window() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_with(503)
            fates = Fates(60)
            cfg = config(target.url, max_in_flight=3, send_event_attempts=0)
            async with delivering(cfg) as (_, chan, metrics):
                ids = await send(chan, fates, range(60))
                await target.wait_until_async(lambda: target.attempts >= 60 + 30)
                tries = Counter(r.headers["ce-id"] for r in target.all_requests)
                # Every event had its first attempt, yet only max_in_flight of them are
                # retried while everything fails: the rest wait their turn.
                assert sorted(tries) == sorted(ids)
                assert len([i for i, n in tries.items() if n > 1]) == 3
                assert value(metrics, "cdk_delivery_retry_window") == 3
                assert value(metrics, "cdk_delivery_waiting") == 60
                target.fail_with(None)
                await fates.wait()
                # Successes widen the window again.
                assert value(metrics, "cdk_delivery_retry_window") > 3
            assert sorted(fates.ok) == sorted(ids)
            assert sorted(e.get_id() for e in target.events) == sorted(ids)

    run(main)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_a_flaky_target_gets_every_event_once(batch_size: int) -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.flaky(fail=0.2, drop=0.05, seed=batch_size)
            cfg = config(target.url, max_in_flight=8, batch_size=batch_size, send_event_attempts=0)
            fates, ids, metrics = await deliver(cfg, 400, within=30)
            fates.assert_exactly_once(ids)
            assert sorted(fates.ok) == sorted(ids)
            assert sorted(e.get_id() for e in target.events) == sorted(ids)
            assert all(r.events for r in target.requests)  # no empty batch between retries
            failed = Counter(r.status for r in target.all_requests if not r.accepted)
            assert set(failed) == {503, None}
            # A connection dropped while reused is sent again at once by the client.
            assert value(metrics, "cdk_delivery_retries_total") >= failed[503]

    run(main)


def retry_waits(logged: Logged) -> list[tuple[int, float]]:
    """(attempt, seconds) of every retry the deliverer scheduled, from its DEBUG lines."""
    return [
        (int(r.args[2]), float(r.args[1]))  # type: ignore[index, arg-type]
        for r in logged.records
        if r.msg.startswith("retrying")
    ]


def until_delivered(url: str, **overrides: Any) -> SourceConfig:
    """Retries until delivered, with room for waits to grow (``retry_backoff_max`` 5 s)."""
    return config(url, send_event_attempts=0, retry_backoff_max=5.0, **overrides)


def test_failures_scattered_among_successes_are_retried_soon() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.flaky(fail=0.2, drop=0.05, seed=7)
            logged = Logged()
            cfg = until_delivered(target.url, max_in_flight=8, retry_backoff=1.0)
            fates, ids, _ = await deliver(cfg, 300, within=50, logger=logged.logger)
            assert sorted(fates.ok) == sorted(ids)
            waits = sorted(seconds for _, seconds in retry_waits(logged))
            assert len(waits) >= 30
            # A quarter of the attempts fail: the wait starts from about a sixteenth of
            # retry_backoff, not from all of it (the room waiting events hold in
            # queue_size would cap the rate).
            assert waits[len(waits) // 2] < cfg.retry_backoff / 3, waits

    run(main)


def test_the_wait_grows_while_every_attempt_fails() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_with(503)
            logged = Logged()
            cfg = until_delivered(target.url, max_in_flight=4, retry_backoff=0.5)
            fates = Fates(60)
            async with delivering(cfg, grace=0, logger=logged.logger) as (_, chan, _metrics):
                await send(chan, fates, range(60))
                # 75 failed attempts in a row put the failing share near 0.9.
                await target.wait_until_async(lambda: target.attempts >= 75, timeout=30)
                seen = len(retry_waits(logged))
                await logged.until(lambda: len(retry_waits(logged)) >= seen + 4, within=30)
            waits = [seconds for _, seconds in retry_waits(logged)]
            # The first failure looks like a scattered one: a short wait. Once every
            # answer fails, each wait is about retry_backoff again, and grows from there.
            assert waits[0] < cfg.retry_backoff / 4, waits
            assert min(waits[seen:]) >= cfg.retry_backoff / 2, waits

    run(main)


# -- shutdown and backpressure -------------------------------------------------------


def test_stop_delivers_what_is_queued() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_next(3, status=503)
            fates = Fates(200)
            chan: asyncio.Queue[Tuple] = asyncio.Queue(1000)
            ids = await send(chan, fates, range(200))
            deliverer = Deliverer(config(target.url, max_in_flight=4, batch_size=7), Metrics())
            task = asyncio.create_task(deliverer.run(chan))
            await deliverer.stop(grace=10)  # the producer is done; drain and finish
            await task
            fates.assert_exactly_once(ids)
            assert sorted(fates.ok) == sorted(ids)
            assert sorted(e.get_id() for e in target.events) == sorted(ids)

    run(main)


def test_stop_with_a_dead_target_fails_the_rest_with_shutdown_error() -> None:
    async def main() -> None:
        dead = f"http://127.0.0.1:{free_port()}/"
        fates = Fates(40)
        chan: asyncio.Queue[Tuple] = asyncio.Queue(100)
        ids = await send(chan, fates, range(40))
        metrics = Metrics()
        cfg = config(dead, send_event_attempts=0, max_in_flight=3, batch_size=2)
        deliverer = Deliverer(cfg, metrics)
        task = asyncio.create_task(deliverer.run(chan))
        started = time.monotonic()
        await deliverer.stop(grace=0.3)
        await task
        assert time.monotonic() - started < 3
        fates.assert_exactly_once(ids)
        assert not fates.ok
        assert all(isinstance(e, ShutdownError) for e in fates.failed.values())
        assert chan.empty()
        assert value(metrics, "cdk_events_failed_total", {"reason": "shutdown"}) == 40

    run(main)


def test_stop_does_not_wait_out_a_retry_after_that_ends_past_the_grace_period() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_next(1, status=503, retry_after=30)
            logged = Logged()
            fates = Fates(1)
            deliverer = Deliverer(config(target.url), Metrics())
            deliverer.log = logged.logger
            chan: asyncio.Queue[Tuple] = asyncio.Queue(10)
            task = asyncio.create_task(deliverer.run(chan))
            await send(chan, fates, range(1))
            # The event now waits 30 s for its next attempt.
            await logged.until(lambda: bool(logged.lines(containing="retrying")))
            started = time.monotonic()
            await deliverer.stop(grace=5)
            await task
            assert time.monotonic() - started < 2
            error = fates.failed["e0"]
            assert isinstance(error, ShutdownError) and "503" in str(error)
            assert target.attempts == 1

    run(main)


def test_stop_fails_a_request_stuck_past_the_grace_period() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.delay_next(1, 3.0)
            fates = Fates(3)
            chan: asyncio.Queue[Tuple] = asyncio.Queue(10)
            cfg = config(target.url, max_in_flight=1, attempt_timeout=10)
            deliverer = Deliverer(cfg, Metrics())
            task = asyncio.create_task(deliverer.run(chan))
            ids = await send(chan, fates, range(3))
            await target.wait_until_async(lambda: target.attempts >= 1)
            await deliverer.stop(grace=0.2)
            await task
            fates.assert_exactly_once(ids)
            assert all(isinstance(e, ShutdownError) for e in fates.failed.values())

    run(main)


def test_bounded_queue_blocks_the_producer_while_the_target_is_down() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_with(503)
            fates = Fates(100)
            queued = 0
            cfg = config(target.url, queue_size=5, max_in_flight=2, send_event_attempts=0)
            async with delivering(cfg) as (_, chan, metrics):

                async def produce() -> None:
                    nonlocal queued
                    for i in range(100):
                        await chan.put(fates.tuple(make_event(i)))
                        queued += 1

                producer = asyncio.create_task(produce())
                await target.wait_until_async(lambda: target.attempts >= 20)
                assert chan.full()
                assert not producer.done()
                # Events waiting for a retry take room in the queue: only the queue plus
                # one event per in-flight slot ever left the producer, and all of them
                # are queued or waiting (in flight again or not).
                assert queued <= 5 + 2 * 1
                held = value(metrics, "cdk_source_queue_depth")
                assert held + value(metrics, "cdk_delivery_waiting") == queued
                target.fail_with(None)
                await fates.wait()
                await producer
            assert sorted(fates.ok) == sorted(f"e{i}" for i in range(100))

    run(main)


def test_drain_settles_waiting_retries_with_no_deadline() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_next(30, status=503, retry_after=0.2)
            fates = Fates(50)
            chan: DeliveryQueue = DeliveryQueue(100)
            ids = await send(chan, fates, range(50))
            cfg = config(target.url, max_in_flight=4, send_event_attempts=0)
            deliverer = Deliverer(cfg, Metrics())
            task = asyncio.create_task(deliverer.run(chan))
            await deliverer.drain()  # the producer is done: everything settles first
            assert task.done()
            fates.assert_exactly_once(ids)
            assert sorted(fates.ok) == sorted(ids)
            assert target.attempts == 80

    run(main)


def test_drain_fails_an_event_once_its_attempts_run_out() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_with(503)
            fates = Fates(10)
            chan: DeliveryQueue = DeliveryQueue(100)
            ids = await send(chan, fates, range(10))
            cfg = config(target.url, max_in_flight=3, send_event_attempts=3)
            deliverer = Deliverer(cfg, Metrics())
            task = asyncio.create_task(deliverer.run(chan))
            await deliverer.drain()
            await task
            fates.assert_exactly_once(ids)
            assert all(isinstance(e, AttemptsExhausted) for e in fates.failed.values())
            assert target.attempts == 30

    run(main)


def test_stop_during_drain_takes_over_with_its_deadline() -> None:
    async def main() -> None:
        dead = f"http://127.0.0.1:{free_port()}/"
        fates = Fates(20)
        chan: DeliveryQueue = DeliveryQueue(100)
        ids = await send(chan, fates, range(20))
        logged = Logged()
        cfg = config(dead, max_in_flight=2, send_event_attempts=0)
        deliverer = Deliverer(cfg, Metrics())
        deliverer.log = logged.logger
        task = asyncio.create_task(deliverer.run(chan))
        draining = asyncio.create_task(deliverer.drain())
        await logged.until(lambda: len(logged.lines(containing="retrying")) >= 5)
        assert not draining.done()  # with attempts: 0, drain() waits for a target that is away
        await deliverer.stop(grace=0.1)
        async with asyncio.timeout(5):
            await draining
            await task
        fates.assert_exactly_once(ids)
        assert all(isinstance(e, ShutdownError) for e in fates.failed.values())

    run(main)


# -- dead letters ----------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3])
def test_an_event_the_target_rejects_goes_to_the_dead_letter_target(batch_size: int) -> None:
    async def main() -> None:
        async with CaptureTarget() as target, CaptureTarget() as dead:
            target.reject_next(1, status=422, body="no such customer")
            cfg = config(
                target.url,
                batch_size=batch_size,
                max_in_flight=1,
                dead_letter_target=dead.url,
                dead_letter_auth_token="dl-7f3e",
            )
            fates, ids, metrics = await deliver(cfg, 6)
            lettered = ids[:batch_size]
            assert fates.ok == ids[batch_size:]
            for event_id in lettered:
                error = fates.failed[event_id]
                assert isinstance(error, DeadLettered) and dead.url in str(error)
                assert isinstance(error.original, TargetRejected)
                assert error.original.status == 422
            assert [e.get_id() for e in dead.events] == lettered
            for event in dead.events:
                assert event.get_extension("knativeerrordest") == target.url
                assert event.get_extension("knativeerrorcode") == "422"
                data = base64.b64decode(str(event.get_extension("knativeerrordata")))
                assert data == b"no such customer"
                assert data_n(event) in range(batch_size)  # the event itself is intact
            assert {r.headers["authorization"] for r in dead.requests} == {"Bearer dl-7f3e"}
            assert value(metrics, "cdk_events_dead_lettered_total") == batch_size
            assert value(metrics, "cdk_events_failed_total", {"reason": "rejected"}) == batch_size

    run(main)


def test_a_dead_lettered_event_moves_the_checkpoint_on_and_async_callbacks_are_awaited() -> None:
    # The dead-letter target holds the event, so the position goes past it; the source's
    # own callbacks, chained behind the checkpoint's, may be async def.
    async def main() -> None:
        async with CaptureTarget() as target, CaptureTarget() as dead:
            target.reject_next(1, status=422)
            store = PositionStore("source-a")
            checkpoint = Checkpoint(store, "offset")
            settled: list[str] = []
            all_settled = asyncio.Event()

            async def note(what: str) -> None:
                settled.append(what)
                if len(settled) == 4:
                    all_settled.set()

            cfg = config(target.url, max_in_flight=1, dead_letter_target=dead.url)
            async with delivering(cfg) as (_, chan, _metrics):
                for n in range(4):
                    await chan.put(
                        checkpoint.tuple(
                            make_event(n),
                            n,
                            lambda n=n: note(f"ok {n}"),
                            lambda _exc, n=n: note(f"dead-lettered {n}"),
                        )
                    )
                async with asyncio.timeout(10):
                    await all_settled.wait()
            await checkpoint.flush()
            assert settled == ["dead-lettered 0", "ok 1", "ok 2", "ok 3"]
            assert [e.get_id() for e in dead.events] == ["e0"]
            assert checkpoint.failed is None
            assert store.get("offset") == 3

    run(main)


def test_exhausted_attempts_go_to_the_dead_letter_target_retried_like_any_request() -> None:
    async def main() -> None:
        async with CaptureTarget() as target, CaptureTarget() as dead:
            target.fail_with(503, body="x" * 3000)
            dead.fail_next(1, status=503)
            cfg = config(target.url, send_event_attempts=2, dead_letter_target=dead.url)
            fates, _, _ = await deliver(cfg, 1)
            error = fates.failed["e0"]
            assert isinstance(error, DeadLettered)
            assert isinstance(error.original, AttemptsExhausted)
            assert target.attempts == 2 and dead.attempts == 2
            (event,) = dead.events
            assert event.get_extension("knativeerrorcode") == "503"
            data = base64.b64decode(str(event.get_extension("knativeerrordata")))
            assert data == b"x" * 1024

    run(main)


def test_a_transport_failure_is_dead_lettered_without_a_status() -> None:
    async def main() -> None:
        async with CaptureTarget() as dead:
            away = f"http://127.0.0.1:{free_port()}/?access_token=tok-5d1c"
            cfg = config(away, send_event_attempts=1, dead_letter_target=dead.url)
            await deliver(cfg, 1)
            (event,) = dead.events
            assert event.get_extension("knativeerrordest") == redact_url(away)
            assert "tok-5d1c" not in str(event.get_extension("knativeerrordest"))
            assert event.get_extension("knativeerrorcode") is None
            assert event.get_extension("knativeerrordata") is None

    run(main)


def test_when_the_dead_letter_target_fails_too_the_event_fails_with_the_original_error() -> None:
    async def main() -> None:
        async with CaptureTarget() as target, CaptureTarget() as dead:
            target.reject_next(1, status=400, body="bad")
            dead.reject_next(1, status=403, body="not you")
            cfg = config(target.url, dead_letter_target=dead.url)
            fates, _, metrics = await deliver(cfg, 1)
            error = fates.failed["e0"]
            assert isinstance(error, TargetRejected) and error.status == 400
            assert "dead-letter target" in str(error) and "403" in str(error)
            assert value(metrics, "cdk_events_dead_lettered_total") == 0

    run(main)


def test_a_shutdown_does_not_dead_letter() -> None:
    async def main() -> None:
        async with CaptureTarget() as dead:
            away = f"http://127.0.0.1:{free_port()}/"
            fates = Fates(5)
            chan: DeliveryQueue = DeliveryQueue(10)
            ids = await send(chan, fates, range(5))
            cfg = config(away, send_event_attempts=0, dead_letter_target=dead.url)
            deliverer = Deliverer(cfg, Metrics())
            task = asyncio.create_task(deliverer.run(chan))
            await deliverer.stop(grace=0.2)
            await task
            fates.assert_exactly_once(ids)
            assert all(isinstance(e, ShutdownError) for e in fates.failed.values())
            assert dead.attempts == 0

    run(main)


def test_a_dead_letter_target_that_is_no_url_is_refused_at_load(tmp_path: Path) -> None:
    problem = load_problem(tmp_path, "target: http://127.0.0.1:1/\ndead_letter_target: ftp://x/\n")
    assert problem.startswith("config: dead_letter_target: must be an http:// or https:// URL")


# -- outages in the log ----------------------------------------------------------------


def test_an_outage_is_one_warning_reminders_while_it_lasts_and_one_info() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_with(503)
            logged = Logged(logging.INFO)
            fates = Fates(3)
            cfg = config(target.url, send_event_attempts=0, max_in_flight=2)
            async with delivering(cfg, logger=logged.logger, reminder=0.05) as (_, chan, _m):
                await send(chan, fates, range(3))
                await logged.until(lambda: len(logged.lines(logging.WARNING)) >= 3)
                target.fail_with(None)
                await fates.wait()
                await logged.until(lambda: bool(logged.lines(containing="succeed again")))
            first, *reminders = logged.lines(logging.WARNING)
            assert f"deliveries to {target.url} are failing (target answered HTTP 503)" in first
            assert "1 event(s) wait for a retry" in first
            assert reminders and all("still fail, for" in line for line in reminders)
            assert len(logged.lines(containing="succeed again")) == 1
            assert not logged.lines(containing="retrying")  # per-retry lines are DEBUG

    run(main)


def test_a_short_outage_logs_one_warning_and_one_info_with_retries_at_debug() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            target.fail_next(4, status=503)
            logged = Logged()
            fates = Fates(3)
            cfg = config(target.url, send_event_attempts=0, max_in_flight=1)
            async with delivering(cfg, logger=logged.logger) as (_, chan, _metrics):
                await send(chan, fates, range(3))
                await fates.wait()
                await logged.until(lambda: bool(logged.lines(containing="succeed again")))
            assert len(logged.lines(logging.WARNING)) == 1
            assert len(logged.lines(logging.INFO)) == 2
            retries = logged.lines(containing="retrying")
            assert len(retries) == 4
            assert all(r.levelno == logging.DEBUG for r in logged.records if "retrying" in r.msg)

    run(main)


# -- secrets ---------------------------------------------------------------------------


def test_a_target_echoing_the_token_leaks_it_nowhere(caplog: pytest.LogCaptureFixture) -> None:
    token = "tok-9f3a2b71"

    async def main() -> None:
        async with CaptureTarget() as target, CaptureTarget() as dead:
            target.reject_next(1, status=400, body=f"bad request: Authorization: Bearer {token}")
            target.fail_next(1, status=503, body=f"busy ({token})")
            cfg = config(
                target.url, target_auth_token=token, max_in_flight=1, dead_letter_target=dead.url
            )
            fates, _, _ = await deliver(cfg, 2, reminder=0)
            error = fates.failed["e0"]
            assert isinstance(error, DeadLettered) and token not in str(error)
            assert "**********" in str(error)
            (event,) = dead.events
            data = base64.b64decode(str(event.get_extension("knativeerrordata")))
            assert token.encode() not in data and b"**********" in data

    with caplog.at_level(logging.DEBUG, logger="cdk.delivery"):
        run(main)
    assert "busy (**********)" in caplog.text
    assert token not in caplog.text


@pytest.mark.parametrize("field", ["target_auth_token", "dead_letter_auth_token"])
@pytest.mark.parametrize("token", ["tok-1\nX-Injected: 1", "tök-1234", "tok-\x00-1234"])
def test_a_token_no_header_can_carry_is_refused_at_load(
    tmp_path: Path, field: str, token: str
) -> None:
    problem = load_problem(
        tmp_path, yaml.safe_dump({"target": "http://127.0.0.1:1/", field: token})
    )
    assert problem.startswith(f"config: {field}: ") and "printable ASCII" in problem
    assert token[4:] not in problem


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate for 127.0.0.1 (its own CA) and its key, made with openssl."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    where = tmp_path_factory.mktemp("tls")
    files = {"cert": where / "cert.pem", "key": where / "key.pem"}
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", "/CN=cdk test CA",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(files["key"]), "-out", str(files["cert"]),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return files


def server_tls(files: dict[str, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files["cert"], files["key"])
    return context


def test_https_targets_signed_by_the_ca_of_target_ca_file(tls_files: dict[str, Path]) -> None:
    async def main() -> None:
        tls = server_tls(tls_files)
        async with CaptureTarget(tls=tls) as target, CaptureTarget(tls=tls) as dead:
            assert target.url.startswith("https://")
            target.reject_next(1, status=400)
            cfg = config(
                target.url,
                target_ca_file=str(tls_files["cert"]),
                max_in_flight=1,
                dead_letter_target=dead.url,
            )
            fates, _, _ = await deliver(cfg, 3)
            assert fates.ok == ["e1", "e2"]
            assert isinstance(fates.failed["e0"], DeadLettered)
            assert [e.get_id() for e in dead.events] == ["e0"]

    run(main)


def test_k_ca_certs_adds_trusted_cas(
    tls_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("K_CA_CERTS", tls_files["cert"].read_text())

    async def main() -> None:
        async with CaptureTarget(tls=server_tls(tls_files)) as target:
            fates, ids, _ = await deliver(config(target.url), 2)
            assert sorted(fates.ok) == ids

    run(main)


def test_an_untrusted_certificate_fails_with_a_certificate_error(
    tls_files: dict[str, Path],
) -> None:
    async def main() -> None:
        async with CaptureTarget(tls=server_tls(tls_files)) as target:
            fates, _, _ = await deliver(config(target.url, send_event_attempts=2), 1)
            error = fates.failed["e0"]
            assert isinstance(error, AttemptsExhausted)
            assert "TLS certificate of 127.0.0.1" in str(error) and "not trusted" in str(error)
            assert target.attempts == 0

    run(main)


def test_k_ca_certs_that_are_not_pem_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("K_CA_CERTS", "-----BEGIN CERTIFICATE-----\nnope\n")
    with pytest.raises(ValueError, match="K_CA_CERTS: not PEM certificates"):
        Deliverer(config("https://127.0.0.1:1/"), Metrics())


def test_a_ca_file_that_cannot_be_read_is_refused_at_load(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    problem = load_problem(tmp_path, f"target: https://127.0.0.1:1/\ntarget_ca_file: {missing}\n")
    assert problem.startswith("config: target_ca_file: cannot be read as PEM certificates")


# -- K_CE_OVERRIDES ------------------------------------------------------------------


def test_overrides_are_set_on_every_event() -> None:
    async def main() -> None:
        overrides = parse_ce_overrides('{"extensions": {"cluster": "east", "tier": 2}}')
        async with CaptureTarget() as target:
            for batch_size in (1, 4):
                cfg = config(target.url, batch_size=batch_size)
                await deliver(cfg, 4, overrides=overrides)
            assert len(target.events) == 8
            for event in target.events:
                assert event.get_extension("cluster") == "east"
                assert str(event.get_extension("tier")) == "2"  # binary headers are text

    run(main)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[1]", "JSON object"),
        ('{"extensions": "x"}', '"extensions"'),
        ('{"extensions": {"Bad-Name": "x"}}', "Bad-Name"),
        ('{"extensions": {"id": "x"}}', "id"),
    ],
)
def test_bad_overrides_are_a_clear_value_error(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match="K_CE_OVERRIDES") as info:
        parse_ce_overrides(text)
    assert problem in str(info.value)


def test_empty_overrides() -> None:
    assert parse_ce_overrides(None) == {}
    assert parse_ce_overrides("  ") == {}
    assert parse_ce_overrides('{"extensions": {}}') == {}


# -- helpers ---------------------------------------------------------------------------


def test_retry_after_values() -> None:
    now = time.time()
    later = datetime.fromtimestamp(now, UTC) + timedelta(seconds=30)
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(" 0 ") == 0.0
    assert retry_after_seconds("-5") == 0.0
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    date_value = retry_after_seconds(format_datetime(later, usegmt=True), now=now)
    assert date_value is not None and 29 <= date_value <= 31
    # The obsolete forms a recipient must still read (RFC 9110 5.6.7); asctime has no zone.
    epoch = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC).timestamp()
    assert retry_after_seconds("Sunday, 06-Nov-94 08:49:37 GMT", now=epoch - 5) == 5.0
    assert retry_after_seconds("Sun Nov  6 08:49:37 1994", now=epoch - 5) == 5.0


def test_error_messages_name_the_cause() -> None:
    rejected = TargetRejected(413, "body too large")
    assert str(rejected) == "target rejected the request with HTTP 413: body too large"
    exhausted = AttemptsExhausted(3, ConnectionRefusedError())
    assert str(exhausted) == "gave up after 3 attempt(s): ConnectionRefusedError"
    assert isinstance(ShutdownError("x"), DeliveryError)


def test_capture_target_in_a_thread_serves_sync_code() -> None:
    with CaptureTarget.in_thread() as target:
        fates_holder: list[Fates] = []

        async def main() -> None:
            fates = Fates(5)
            fates_holder.append(fates)
            async with delivering(config(target.url)) as (_, chan, _metrics):
                await send(chan, fates, range(5))
                await fates.wait()

        asyncio.run(main())
        events = target.wait_for_sync(5, timeout=5)
        assert sorted(e.get_id() for e in events) == [f"e{i}" for i in range(5)]
        assert len(fates_holder[0].ok) == 5


def test_capture_target_answers_malformed_requests_like_a_strict_receiver() -> None:
    async def main() -> None:
        async with CaptureTarget() as target, aiohttp.ClientSession() as session:
            bad = {"content-type": "application/cloudevents+json"}
            async with session.post(target.url, data=b"{not json", headers=bad) as response:
                assert response.status == 400
            async with session.get(target.url) as response:
                assert response.status == 405
            target.fail_next(1, status=503, retry_after=7)
            async with session.post(target.url, data=b"x") as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "7"
            assert target.requests == [] and target.events == []
            assert [r.status for r in target.all_requests] == [400, 405, 503]
            assert target.all_requests[0].error

    run(main)


def test_target_auth_token_is_sent_as_a_bearer_token_on_every_request() -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            cfg = config(target.url, target_auth_token="tok-7c1e", batch_size=2)
            fates, _, _ = await deliver(cfg, 3)
            assert sorted(fates.ok) == ["e0", "e1", "e2"]
            assert [r.headers["authorization"] for r in target.requests] == ["Bearer tok-7c1e"] * 2

    run(main)
