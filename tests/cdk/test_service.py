"""The services in-process: sink, polling source and webhook source, started and stopped."""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Any

import aiohttp
import pytest
from processes import (
    TOKEN,
)
from pydantic import SecretStr

import cdk
from cdk.codec import to_binary
from cdk.service import ServiceError, service_for

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
        sink = RecordingSink()
        sink_service = service_for(sink, sink_config())
        await sink_service.start()
        source = ListSource(5)
        url = f"http://127.0.0.1:{sink_service.port}/"
        service = service_for(source, source_config(url), overrides={"origin": "test"})
        await service.start()
        assert source.chan.maxsize == 1000
        await asyncio.wait_for(service.wait(), 30)  # returns once the producer is done
        await service.stop(grace=10.0)
        assert service.error is None
        assert sorted(source.delivered) == [0, 1, 2, 3, 4]
        assert sorted(e.get_id() for e in sink.events) == ["s0", "s1", "s2", "s3", "s4"]
        assert {e.get_extension("origin") for e in sink.events} == {"test"}
        assert source.calls == ["initialize", "destroy"]
        await sink_service.stop(1.0)

    asyncio.run(scenario())


def test_source_service_producer_failure_is_recorded() -> None:
    async def scenario() -> None:
        sink_service = service_for(RecordingSink(), sink_config())
        await sink_service.start()
        source = ListSource(2, fail=True)
        url = f"http://127.0.0.1:{sink_service.port}/"
        service = service_for(source, source_config(url, queue_size=4))
        await service.start()
        await asyncio.wait_for(service.wait(), 30)
        await service.stop(grace=10.0)
        assert isinstance(service.error, RuntimeError)
        assert sorted(source.delivered) == [0, 1]
        assert source.calls == ["initialize", "destroy"]
        await sink_service.stop(1.0)

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
        sink = RecordingSink()
        sink_service = service_for(sink, sink_config())
        await sink_service.start()
        config = cdk.WebhookSourceConfig.model_validate(
            {"target": f"http://127.0.0.1:{sink_service.port}/", "host": "127.0.0.1", "port": 0}
        )
        service = service_for(EchoWebhook(), config)
        await service.start()
        status, text = await fetch("POST", f"http://127.0.0.1:{service.port}/", data=b"hi")
        assert status == 200, text
        assert [e.get_data() for e in sink.events] == ["hi"]
        stop_requested = asyncio.ensure_future(service.wait())
        await service.stop(grace=1.0)
        await asyncio.wait_for(stop_requested, 5)
        await sink_service.stop(1.0)

    asyncio.run(scenario())


def test_webhook_source_needs_a_server_config() -> None:
    with pytest.raises(TypeError, match="SourceConfig must extend cdk.WebhookSourceConfig"):
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
