"""The services in-process: sink, polling source and webhook source, started and stopped."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from processes import TOKEN
from prometheus_client import Counter
from pydantic import SecretStr

import cdk
from cdk import signature
from cdk.codec import to_binary
from cdk.service import Service, ServiceError, service_for
from cdk.testing import CaptureTarget
from cdk.testing.runner import run_in_thread

# -- the services in-process ------------------------------------------------------------


class RecordingSink(cdk.Sink):
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.events: list[cdk.CloudEvent] = []

    async def initialize(self, config: cdk.SinkConfig) -> None:
        self.calls.append("initialize")

    def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
        self.events.extend(events)
        return cdk.SUCCESS

    def destroy(self) -> None:
        self.calls.append("destroy")


class ListSource(cdk.Source):
    def __init__(self, count: int, fail: bool = False) -> None:
        self.count = count
        self.fail = fail
        self.calls: list[str] = []
        self.delivered: list[int] = []

    def initialize(self, config: cdk.SourceConfig) -> None:
        self.calls.append("initialize")

    async def loop_produce_event(self) -> None:
        for i in range(self.count):
            event = cdk.CloudEvent(
                {"id": f"s{i}", "source": "/list", "type": "t", "specversion": "1.0"}, data="x"
            )
            await self.chan.put(cdk.Tuple(event, success=partial(self.delivered.append, i)))
        if self.fail:
            raise RuntimeError("producer broke")

    async def destroy(self) -> None:
        self.calls.append("destroy")


class EchoWebhook(cdk.WebhookSource):
    def make_event(self, request: cdk.Request) -> cdk.CloudEvent:
        return cdk.CloudEvent(
            {"id": "w1", "source": "/hook", "type": "hook", "specversion": "1.0"},
            data=request.body.decode(),
        )


def sink_config(**extra: Any) -> cdk.SinkConfig:
    return cdk.SinkConfig.model_validate({"host": "127.0.0.1", "port": 0, **extra})


def source_config(url: str, **extra: Any) -> cdk.SourceConfig:
    return cdk.SourceConfig.model_validate({"target": url, **extra})


@asynccontextmanager
async def recording_sink() -> AsyncIterator[tuple[RecordingSink, str]]:
    """A RecordingSink served on a free port, and the URL a source delivers to."""
    sink = RecordingSink()
    service = service_for(sink, sink_config())
    await service.start()
    try:
        yield sink, f"http://127.0.0.1:{service.port}/"
    finally:
        await service.stop(1.0)


async def produce_all(source: cdk.Source, config: cdk.SourceConfig, **options: Any) -> Service:
    """Run ``source`` until its producer is done, then stop it (10 s grace)."""
    service = service_for(source, config, **options)
    await service.start()
    await asyncio.wait_for(service.wait(), 30)  # returns once the producer is done
    await service.stop(grace=10.0)
    return service


async def fetch(method: str, url: str, **kwargs: Any) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as r:
        return r.status, await r.text()


def test_sink_service_round_trip() -> None:
    async def scenario() -> None:
        sink = RecordingSink()
        service = service_for(sink, sink_config(auth_token=SecretStr(TOKEN)))
        await service.start()
        base = f"http://127.0.0.1:{service.port}"
        assert await fetch("GET", f"{base}/readyz") == (200, "ready")
        event = cdk.CloudEvent({"id": "a", "source": "/s", "type": "t", "specversion": "1.0"})
        headers, body = to_binary(event)
        status, _ = await fetch("POST", base + "/", headers=headers, data=body)
        assert status == 401
        headers["Authorization"] = f"Bearer {TOKEN}"
        status, _ = await fetch("POST", base + "/", headers=headers, data=body)
        assert status == 200
        await service.stop(grace=1.0)
        await service.stop(grace=1.0)  # a second stop is harmless
        assert [e.get_id() for e in sink.events] == ["a"]
        assert sink.calls == ["initialize", "destroy"]
        with pytest.raises(aiohttp.ClientConnectionError):
            await fetch("GET", f"{base}/healthz")

    asyncio.run(scenario())


def test_sink_service_initialize_failure() -> None:
    class Broken(RecordingSink):
        async def initialize(self, config: cdk.SinkConfig) -> None:
            self.calls.append("initialize")
            raise OSError("disk full")

    async def scenario() -> None:
        sink = Broken()
        with pytest.raises(ServiceError, match=r"^initialize failed: OSError: disk full$"):
            await service_for(sink, sink_config()).start()
        assert sink.calls == ["initialize"]

    asyncio.run(scenario())


def test_sink_service_port_in_use_destroys_once() -> None:
    async def scenario() -> None:
        first, second = RecordingSink(), RecordingSink()
        running = service_for(first, sink_config())
        await running.start()
        taken = sink_config(port=running.port)
        with pytest.raises(ServiceError, match=r"cannot listen on 127\.0\.0\.1:\d+: "):
            await service_for(second, taken).start()
        assert second.calls == ["initialize", "destroy"]
        await running.stop(1.0)

    asyncio.run(scenario())


def test_source_service_delivers_to_sink_service() -> None:
    async def scenario() -> None:
        async with recording_sink() as (sink, url):
            source = ListSource(5)
            service = await produce_all(source, source_config(url), overrides={"origin": "test"})
            assert source.chan.maxsize == 1000
            assert service.error is None
            assert sorted(source.delivered) == [0, 1, 2, 3, 4]
            assert sorted(e.get_id() for e in sink.events) == ["s0", "s1", "s2", "s3", "s4"]
            assert {e.get_extension("origin") for e in sink.events} == {"test"}
            assert source.calls == ["initialize", "destroy"]

    asyncio.run(scenario())


def test_source_service_producer_failure_is_recorded() -> None:
    async def scenario() -> None:
        async with recording_sink() as (_, url):
            source = ListSource(2, fail=True)
            service = await produce_all(source, source_config(url, queue_size=4))
            assert isinstance(service.error, RuntimeError)
            assert sorted(source.delivered) == [0, 1]
            assert source.calls == ["initialize", "destroy"]

    asyncio.run(scenario())


def test_source_service_metrics_port() -> None:
    async def scenario() -> None:
        source = ListSource(0)
        service = service_for(source, source_config("http://127.0.0.1:9/", metrics_port=0))
        await service.start()
        base = f"http://127.0.0.1:{service.port}"
        status, text = await fetch("GET", f"{base}/metrics")
        assert status == 200 and "cdk_events_delivered" in text
        assert (await fetch("GET", f"{base}/readyz"))[0] == 200
        assert (await fetch("POST", f"{base}/", data=b"{}"))[0] == 405
        await service.wait()
        await service.stop(grace=1.0)
        assert source.calls == ["initialize", "destroy"]

    asyncio.run(scenario())


def test_webhook_source_service_round_trip() -> None:
    async def scenario() -> None:
        async with recording_sink() as (sink, url):
            config = cdk.WebhookSourceConfig.model_validate(
                {"target": url, "host": "127.0.0.1", "port": 0}
            )
            service = service_for(EchoWebhook(), config)
            await service.start()
            status, text = await fetch("POST", f"http://127.0.0.1:{service.port}/", data=b"hi")
            assert status == 200, text
            assert [e.get_data() for e in sink.events] == ["hi"]
            stop_requested = asyncio.ensure_future(service.wait())
            await service.stop(grace=1.0)
            await asyncio.wait_for(stop_requested, 5)

    asyncio.run(scenario())


def test_webhook_source_needs_a_server_config() -> None:
    with pytest.raises(TypeError, match=r"SourceConfig must extend cdk\.WebhookSourceConfig"):
        service_for(EchoWebhook(), source_config("http://127.0.0.1:9/"))


def test_plain_def_producer_is_refused() -> None:
    class Blocking(ListSource):
        def loop_produce_event(self) -> None:  # type: ignore[override]
            pass

    async def scenario() -> None:
        source = Blocking(1)
        with pytest.raises(ServiceError, match="must be an async def"):
            await service_for(source, source_config("http://127.0.0.1:9/")).start()
        assert source.calls == []

    asyncio.run(scenario())


# -- the kit's polling loop -------------------------------------------------------------


class Numbers(cdk.Source[cdk.SourceConfig]):
    """The default loop around a plain make_event: numbered events, with positions."""

    def __init__(self, stop_after: int = 3) -> None:
        self.stop_after = stop_after
        self.threads: set[str] = set()

    def make_event(self) -> tuple[cdk.CloudEvent, int] | None:
        self.threads.add(threading.current_thread().name)
        number = (self.position or 0) + 1
        if number > self.stop_after:
            return None
        event = cdk.CloudEvent({"id": f"n{number}", "source": "/n", "type": "t"}, {"n": number})
        return event, number


def test_default_loop_runs_a_plain_make_event_in_a_worker_thread(tmp_path: Path) -> None:
    db = tmp_path / "positions.db"
    with CaptureTarget.in_thread() as target:
        config = source_config(target.url, interval=0, position_store=str(db))
        source = Numbers(stop_after=3)
        with run_in_thread(source, config):
            target.wait_for_sync(3)
        # 16 in flight: they may arrive in any order.
        assert sorted(e.get_id() for e in target.events) == ["n1", "n2", "n3"]
        assert threading.main_thread().name not in source.threads
        # A restart resumes after the last acknowledged position.
        again = Numbers(stop_after=5)
        with run_in_thread(again, config):
            target.wait_for_sync(5)
        assert sorted(e.get_id() for e in target.events[3:]) == ["n4", "n5"]
    with cdk.PositionStore("Numbers", db) as store:
        assert store.get("position") == 5


def test_default_loop_awaits_an_async_make_event_on_the_loop() -> None:
    class Async(cdk.Source[cdk.SourceConfig]):
        made = 0

        async def make_event(self) -> cdk.CloudEvent | None:
            self.loop_thread = threading.current_thread().name
            self.made += 1
            if self.made > 2:
                return None
            return cdk.CloudEvent({"id": f"a{self.made}", "source": "/a", "type": "t"})

    with CaptureTarget.in_thread() as target:
        source = Async()
        with run_in_thread(source, source_config(target.url, interval=0)):
            target.wait_for_sync(2)
        assert source.loop_thread == "cdk-testing-source"  # the loop thread, not a worker
    assert sorted(e.get_id() for e in target.events) == ["a1", "a2"]


def test_a_finished_producer_settles_every_event_past_the_grace_period() -> None:
    async def scenario(target: CaptureTarget) -> None:
        target.fail_next(6, 503)
        config = source_config(
            target.url, grace_period=0.01, send_event_attempts=0, retry_backoff=0.01
        )
        source = ListSource(3)
        service = service_for(source, config)
        await service.start()
        await asyncio.wait_for(service.wait(), 30)
        await asyncio.wait_for(service.stop(), 30)  # no grace: everything is settled
        assert service.error is None
        assert sorted(source.delivered) == [0, 1, 2]

    with CaptureTarget.in_thread() as target:
        asyncio.run(scenario(target))


def test_an_event_a_checkpoint_tracks_that_fails_stops_the_source(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(target: CaptureTarget) -> None:
        target.reject_next(1, 400)  # n1 is refused for good
        source = Numbers(stop_after=1000)
        service = service_for(source, source_config(target.url, interval=0.001))
        await service.start()
        await asyncio.wait_for(service.wait(), 30)
        await asyncio.wait_for(service.stop(), 30)
        assert isinstance(service.error, ServiceError)
        assert source.checkpoint is not None and source.checkpoint.position is None

    with caplog.at_level(logging.ERROR, logger="cdk.source"), CaptureTarget.in_thread() as t:
        asyncio.run(scenario(t))
    [line] = [r.getMessage() for r in caplog.records if "stopping so no event" in r.getMessage()]
    assert (
        "event n1 (position 1) was not delivered: target rejected the request with HTTP 400" in line
    )
    assert line.endswith("a restart resumes from its start")


def test_dry_run_prints_structured_events_and_max_events_stops(
    capfd: pytest.CaptureFixture[str],
) -> None:
    async def scenario() -> None:
        source = Numbers(stop_after=1000)
        config = source_config("http://dry-run.invalid/", interval=0)
        service = service_for(source, config, dry_run=True, max_events=3)
        await service.start()
        await asyncio.wait_for(service.wait(), 30)
        await asyncio.wait_for(service.stop(), 30)
        assert service.error is None

    asyncio.run(scenario())
    lines = capfd.readouterr().out.splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["n1", "n2", "n3"]
    assert json.loads(lines[0])["specversion"] == "1.0"


def test_metrics_fit_the_kind_and_take_the_connectors_own_series() -> None:
    class Counting(RecordingSink):
        async def initialize(self, config: cdk.SinkConfig) -> None:
            self.rows = Counter(
                "sink_rows_inserted", "Rows inserted.", registry=self.metrics.registry
            )

        def arrived(self, *events: cdk.CloudEvent) -> cdk.Result:
            self.rows.inc(len(events))
            return cdk.SUCCESS

    async def scenario() -> None:
        sink = service_for(Counting(), sink_config())
        await sink.start()
        source = service_for(ListSource(0), source_config("http://127.0.0.1:9/", metrics_port=0))
        await source.start()
        event = cdk.CloudEvent({"id": "a", "source": "/s", "type": "t"})
        headers, body = to_binary(event)
        base = f"http://127.0.0.1:{sink.port}"
        assert (await fetch("POST", base + "/", headers=headers, data=body))[0] == 200
        _, sink_text = await fetch("GET", base + "/metrics")
        _, source_text = await fetch("GET", f"http://127.0.0.1:{source.port}/metrics")
        assert "sink_rows_inserted_total 1.0" in sink_text
        assert "cdk_events_received_total" in sink_text
        assert "cdk_events_delivered" not in sink_text and "cdk_delivery" not in sink_text
        assert "cdk_events_delivered_total" in source_text
        assert "cdk_events_received" not in source_text and "cdk_arrived" not in source_text
        await source.stop(1.0)
        await sink.stop(1.0)

    asyncio.run(scenario())


def test_metrics_port_listens_on_the_configured_host(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        config = source_config("http://127.0.0.1:9/", metrics_port=0, host="127.0.0.1")
        service = service_for(ListSource(0), config)
        await service.start()
        assert service.server is not None and service.server.host == "127.0.0.1"
        await service.stop(1.0)

    with caplog.at_level(logging.INFO, logger="cdk.source"):
        asyncio.run(scenario())
    assert "metrics listening on http://127.0.0.1:" in caplog.text


def test_webhook_dry_run_serves_and_prints_instead_of_delivering(
    capfd: pytest.CaptureFixture[str],
) -> None:
    async def scenario() -> None:
        config = cdk.WebhookSourceConfig.model_validate(
            {"target": "http://dry-run.invalid/", "host": "127.0.0.1", "port": 0}
        )
        service = service_for(EchoWebhook(), config, dry_run=True)
        await service.start()
        status, text = await fetch("POST", f"http://127.0.0.1:{service.port}/", data=b"hi")
        assert status == 200, text
        await service.stop(1.0)

    asyncio.run(scenario())
    [line] = capfd.readouterr().out.splitlines()
    event = json.loads(line)
    assert (event["id"], event["source"], event["data"]) == ("w1", "/hook", "hi")


def test_readyz_follows_the_connectors_ready_hook() -> None:
    class Flaky(RecordingSink):
        healthy = False

        async def ready(self) -> bool:
            return self.healthy

    async def scenario() -> None:
        sink = Flaky()
        service = service_for(sink, sink_config())
        await service.start()
        url = f"http://127.0.0.1:{service.port}/readyz"
        assert await fetch("GET", url) == (503, "not ready: the connector reports it is not ready")
        sink.healthy = True
        assert await fetch("GET", url) == (200, "ready")
        await service.stop(1.0)

    asyncio.run(scenario())


def test_a_webhook_with_a_secret_takes_only_signed_requests() -> None:
    async def scenario(target: CaptureTarget) -> None:
        config = cdk.WebhookSourceConfig.model_validate(
            {"target": target.url, "host": "127.0.0.1", "port": 0, "webhook_secret": "hook-s3cret"}
        )
        service = service_for(EchoWebhook(), config)
        await service.start()
        url = f"http://127.0.0.1:{service.port}/"
        status, text = await fetch("POST", url, data=b"hi")
        assert status == 401 and "x-hub-signature-256" in text
        wrong = {signature.HEADER: signature.sign("other", b"hi")}
        assert (await fetch("POST", url, data=b"hi", headers=wrong))[0] == 401
        signed = {signature.HEADER: signature.sign("hook-s3cret", b"hi")}
        assert (await fetch("POST", url, data=b"hi", headers=signed))[0] == 200
        await service.stop(1.0)

    with CaptureTarget.in_thread() as target:
        asyncio.run(scenario(target))
        assert [e.get_data() for e in target.events] == ["hi"]


def test_connector_info_carries_the_connector_and_kit_versions() -> None:
    from prometheus_client import generate_latest

    from cdk.cli import project_metadata
    from cdk.metrics import Metrics

    # The template has no pyproject.toml ("unknown"); a generated project its version
    # (tests/template/test_image.py reads it from a running image).
    version = project_metadata().get("version", "unknown")
    text = generate_latest(Metrics("Mine").registry).decode()
    labels = f'connector="Mine",kit_version="{cdk.__version__}",version="{version}"'
    assert f"cdk_connector_info{{{labels}}} 1.0" in text
