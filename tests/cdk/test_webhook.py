"""The webhook source end to end: real HTTP in, the runtime's delivery out to a CaptureTarget."""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from waiting import until

import cdk
from cdk import signature
from cdk.codec import decoded_size
from cdk.connector import Tuple
from cdk.delivery import Deliverer
from cdk.http import Request
from cdk.metrics import Metrics
from cdk.receiver import Receiver
from cdk.testing import CaptureTarget
from cdk.testing.client import Reply, SinkClient
from cdk.testing.runner import Running, run_in_thread
from cdk.webhook import RETRY_AFTER_SHUTDOWN, WebhookHandler, _Recent

pytestmark = pytest.mark.timeout(60)


async def post_json(url: str, value: Any) -> Reply:
    """POST from a worker thread, so the server on this test's loop can answer."""
    return await asyncio.to_thread(SinkClient(url).post_json, value)


class JSONWebhook(cdk.WebhookSource):
    """Turns a JSON body into events, with a few switches for the tests.

    ``{"events": n}`` makes n events, ``{"events": 0}`` none, ``{"refuse": status}``
    raises HTTPError, ``{"crash": true}`` raises, ``{"wrong": true}`` returns no event.
    """

    def __init__(self) -> None:
        self.requests: list[Request] = []

    def make_event(self, request: Request) -> cdk.CloudEvent | list[cdk.CloudEvent] | None:
        self.requests.append(request)
        body = request.json()
        if "refuse" in body:
            raise cdk.HTTPError(body["refuse"], "refused by make_event", {"X-Why": "test"})
        if body.get("crash"):
            raise RuntimeError("secret internal detail")
        if body.get("wrong"):
            return "not an event"  # type: ignore[return-value]
        count = body.get("events", 1)
        events = [_event(f"{body.get('id', 'e')}-{n}", body) for n in range(count)]
        return events[0] if count == 1 and "events" not in body else events


class AsyncWebhook(cdk.WebhookSource):
    """An ``async def make_event``: awaited on the event loop."""

    async def make_event(self, request: Request) -> cdk.CloudEvent | None:
        await asyncio.sleep(0)
        if not request.body:
            return None
        return _event(request.query_params()["name"][0], {})


def _event(event_id: str, data: dict[str, Any]) -> cdk.CloudEvent:
    return cdk.CloudEvent({"id": event_id, "source": "/webhook-test", "type": "test.webhook"}, data)


def _config(target: CaptureTarget | None, **extra: Any) -> cdk.WebhookSourceConfig:
    # Fast retries keep failure tests short; two attempts show a retry happened.
    values: dict[str, Any] = {
        "target": target.url if target else "http://127.0.0.1:9/",
        "send_event_attempts": 2,
        "retry_backoff": 0.01,
        "retry_backoff_max": 0.02,
        "attempt_timeout": 2.0,
        "grace_period": 2.0,
    }
    values.update(extra)
    return cdk.WebhookSourceConfig.model_validate(values)


@pytest.fixture
def target() -> Iterator[CaptureTarget]:
    with CaptureTarget.in_thread() as capture:
        yield capture


@pytest.fixture
def webhook(target: CaptureTarget) -> Iterator[tuple[JSONWebhook, Running]]:
    source = JSONWebhook()
    with run_in_thread(source, _config(target)) as running:
        yield source, running


def test_json_post_is_delivered_before_the_answer(
    target: CaptureTarget, webhook: tuple[JSONWebhook, Running]
) -> None:
    source, running = webhook
    reply = SinkClient(running.url).post_json({"id": "order", "total": 3})
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"ids": ["order-0"]}
    # Answered only after delivery: the target already holds the event.
    events = target.events
    assert [e.get_id() for e in events] == ["order-0"]
    assert events[0].get_data() == {"id": "order", "total": 3}
    request = source.requests[0]
    assert (request.method, request.path) == ("POST", "/")
    assert request.headers["content-type"] == "application/json"


def test_a_list_of_events_is_delivered_in_full(
    target: CaptureTarget, webhook: tuple[JSONWebhook, Running]
) -> None:
    _, running = webhook
    reply = SinkClient(running.url).post_json({"id": "batch", "events": 5})
    assert reply.status == 200
    ids = [f"batch-{n}" for n in range(5)]
    assert reply.json() == {"ids": ids}
    assert sorted(e.get_id() for e in target.events) == ids


def test_no_event_answers_202_and_sends_nothing(
    target: CaptureTarget, webhook: tuple[JSONWebhook, Running]
) -> None:
    _, running = webhook
    reply = SinkClient(running.url).post_json({"events": 0})
    assert (reply.status, reply.json()) == (202, {"ids": []})
    # A later event arriving first would mean the empty request sent something.
    assert SinkClient(running.url).post_json({"id": "after"}).status == 200
    assert [e.get_id() for e in target.events] == ["after-0"]
    assert target.attempts == 1


def test_http_error_from_make_event_is_the_answer(
    target: CaptureTarget, webhook: tuple[JSONWebhook, Running]
) -> None:
    _, running = webhook
    client = SinkClient(running.url)
    reply = client.post_json({"refuse": 422})
    assert (reply.status, reply.json()) == (422, {"error": "refused by make_event"})
    assert reply.headers["x-why"] == "test"
    bad_json = client.post(b"{not json", {"Content-Type": "application/json"})
    assert bad_json.status == 400
    assert "not valid JSON" in bad_json.json()["error"]
    assert target.attempts == 0


def test_make_event_raising_answers_500_without_details(
    target: CaptureTarget,
    webhook: tuple[JSONWebhook, Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, running = webhook
    client = SinkClient(running.url)
    with caplog.at_level("ERROR", logger="cdk.webhook"):
        crashed = client.post_json({"crash": True})
        wrong = client.post_json({"wrong": True})
    assert crashed.status == 500 and wrong.status == 500
    assert "secret internal detail" not in crashed.text
    assert "secret internal detail" in caplog.text  # the operator sees it in the log
    assert "not str" in caplog.text
    assert target.attempts == 0


def test_rejecting_target_answers_502_and_its_reason_goes_to_the_log_only(
    target: CaptureTarget,
    webhook: tuple[JSONWebhook, Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, running = webhook
    target.reject_next(1, 400, "schema mismatch at http://10.0.0.7:9000/internal")
    with caplog.at_level(logging.WARNING, logger="cdk.webhook"):
        reply = SinkClient(running.url).post_json({"id": "bad"})
    assert reply.status == 502
    assert reply.json() == {
        "error": "the target did not take the events",
        "delivered": [],
        "failed": ["bad-0"],
    }
    assert "10.0.0.7" in caplog.text and "bad-0" in caplog.text
    assert target.events == []


def test_failing_target_answers_502_after_retries_then_recovers(
    target: CaptureTarget, webhook: tuple[JSONWebhook, Running]
) -> None:
    _, running = webhook
    client = SinkClient(running.url)
    target.fail_next(2, 503)
    reply = client.post_json({"id": "flaky"})
    assert (reply.status, reply.json()["failed"]) == (502, ["flaky-0"])
    assert target.attempts == 2
    # The caller retries, as webhook senders do, and this time it goes through.
    retry = client.post_json({"id": "flaky"})
    assert retry.status == 200
    assert [e.get_id() for e in target.events] == ["flaky-0"]


def test_partly_delivered_request_names_what_got_through(target: CaptureTarget) -> None:
    source = JSONWebhook()
    # One request in flight at a time makes "which event failed" deterministic.
    with run_in_thread(source, _config(target, max_in_flight=1)) as running:
        target.delay_next(1, 0.0)  # event 0: accepted (after no delay)
        target.reject_next(1, 400, "no")  # event 1: rejected; event 2: accepted
        reply = SinkClient(running.url).post_json({"id": "mix", "events": 3})
    assert reply.status == 502
    body = reply.json()
    assert (body["delivered"], body["failed"]) == (["mix-0", "mix-2"], ["mix-1"])


def test_timeouts_answer_504(target: CaptureTarget) -> None:
    source = JSONWebhook()
    config = _config(target, send_event_attempts=1, attempt_timeout=0.2)
    with run_in_thread(source, config) as running:
        target.delay_next(1, 2.0)
        reply = SinkClient(running.url).post_json({"id": "slow"})
    assert (reply.status, reply.json()["failed"]) == (504, ["slow-0"])


def test_shutdown_before_delivery_answers_503_with_retry_after(target: CaptureTarget) -> None:
    source = JSONWebhook()
    config = _config(target, send_event_attempts=0, grace_period=1.0)
    target.fail_with(503)  # the target never takes it: only shutdown ends the retries
    replies: list[Any] = []
    with run_in_thread(source, config, grace=1.0) as running:
        url = running.url
        thread = threading.Thread(
            target=lambda: replies.append(SinkClient(url).post_json({"id": "late"}))
        )
        thread.start()
        target.wait_until(lambda: target.attempts >= 1, timeout=10)
        # Leaving the block stops the service while the request waits for its delivery.
    thread.join(timeout=10)
    assert not thread.is_alive()
    (reply,) = replies
    assert reply.status == 503
    assert reply.headers["retry-after"] == str(RETRY_AFTER_SHUTDOWN)
    assert reply.json()["failed"] == ["late-0"]


def test_auth_token_is_required_when_configured(target: CaptureTarget) -> None:
    source = JSONWebhook()
    with run_in_thread(source, _config(target, auth_token="s3cret")) as running:
        anonymous = SinkClient(running.url).post_json({"id": "anon"})
        wrong = SinkClient(running.url, token="nope").post_json({"id": "wrong"})
        good = SinkClient(running.url, token="s3cret").post_json({"id": "good"})
        query = SinkClient(running.url).post_json({"id": "query"}, path="/?access_token=s3cret")
    assert (anonymous.status, wrong.status, good.status, query.status) == (401, 401, 200, 200)
    assert source.requests[0].headers["authorization"] == "Bearer s3cret"
    assert sorted(e.get_id() for e in target.events) == ["good-0", "query-0"]


def test_async_make_event_and_metrics(target: CaptureTarget) -> None:
    source = AsyncWebhook()
    with run_in_thread(source, _config(target)) as running:
        client = SinkClient(running.url)
        assert client.post(b"x", path="/?name=hook").json() == {"ids": ["hook"]}
        assert client.post(b"").status == 202
        metrics = client.get("/metrics").text
    assert 'cdk_events_received_total{mode="webhook"} 1.0' in metrics
    assert "cdk_arrived_latency_seconds_count 2.0" in metrics
    assert "cdk_arrived_in_flight 0.0" in metrics
    assert [e.get_id() for e in target.events] == ["hook"]


def test_concurrent_requests_each_wait_for_their_own_events(target: CaptureTarget) -> None:
    source = JSONWebhook()
    with run_in_thread(source, _config(target)) as running:
        url = running.url
        replies: dict[int, Any] = {}

        def post(n: int) -> None:
            replies[n] = SinkClient(url).post_json({"id": f"r{n}", "events": 3})

        threads = [threading.Thread(target=post, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert all(reply.status == 200 for reply in replies.values())
    for n, reply in replies.items():
        assert reply.json() == {"ids": [f"r{n}-{k}" for k in range(3)]}
    assert len({e.get_id() for e in target.events}) == 24


def test_posts_to_any_path_reach_make_event(
    target: CaptureTarget, webhook: tuple[JSONWebhook, Running]
) -> None:
    source, running = webhook
    client = SinkClient(running.url)
    reply = client.post_json({"id": "gh"}, path="/hooks/github?delivery=7")
    assert reply.status == 200
    assert (source.requests[0].path, source.requests[0].query) == ("/hooks/github", "delivery=7")
    # The read-only endpoints keep their meaning.
    assert client.get("/healthz").status == 200
    assert [e.get_id() for e in target.events] == ["gh-0"]


@asynccontextmanager
async def webhook_server(
    source: cdk.WebhookSource, config: cdk.WebhookSourceConfig, *, deliver: bool = True
) -> AsyncIterator[tuple[str, asyncio.Queue[Tuple], Metrics]]:
    """A webhook source's receiver and delivery, given its config; with ``deliver`` False
    nothing drains the queue."""
    chan: asyncio.Queue[Tuple] = asyncio.Queue(maxsize=config.queue_size)
    metrics = Metrics("test")
    handler = WebhookHandler(source, chan, metrics, config=config)
    server = Receiver(handler, config, metrics, any_path=True).http_server()
    deliverer = Deliverer(config, metrics)
    delivering = asyncio.ensure_future(deliverer.run(chan)) if deliver else None
    await server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", chan, metrics
    finally:
        handler.close()
        await server.close(0.5)
        if delivering is not None:
            await deliverer.stop(0.5)
            await delivering


def undrained(source: cdk.WebhookSource, queue_size: int) -> Any:
    config = _config(None, queue_size=queue_size, host="127.0.0.1", port=0)
    return webhook_server(source, config, deliver=False)


def test_what_the_target_answers_is_logged_with_secrets_masked_and_never_relayed(
    target: CaptureTarget, caplog: pytest.LogCaptureFixture
) -> None:
    token = "tok-7f3a9c2e51d8"
    config = _config(
        target, target_auth_token=token, send_event_attempts=1, host="127.0.0.1", port=0
    )
    echo = f"refused: Authorization: Bearer {token} from 10.0.0.7"
    target.reject_next(1, 400, echo)

    async def scenario() -> Any:
        async with webhook_server(JSONWebhook(), config) as (url, _, _):
            return await post_json(url, {"id": "leak"})

    with caplog.at_level(logging.WARNING, logger="cdk.webhook"):
        reply = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert (reply.status, reply.json()["failed"]) == (502, ["leak-0"])
    assert token not in reply.text and "10.0.0.7" not in reply.text
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "cdk.webhook")
    assert "10.0.0.7" in logged and "leak-0" in logged
    assert token not in logged


def test_past_response_timeout_the_caller_gets_504_and_the_event_is_still_delivered(
    target: CaptureTarget,
) -> None:
    config = _config(target, response_timeout=0.2, attempt_timeout=5.0, host="127.0.0.1", port=0)
    target.delay_next(1, 1.5)

    async def scenario() -> Any:
        async with webhook_server(JSONWebhook(), config) as (url, _, _):
            reply = await post_json(url, {"id": "slow"})
            assert target.events == []  # answered while the target still holds it
            await asyncio.to_thread(target.wait_for_sync, 1)
            return reply

    reply = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert (reply.status, reply.json()["pending"]) == (504, ["slow-0"])
    assert [e.get_id() for e in target.events] == ["slow-0"]


def test_a_full_queue_is_answered_503_at_once_instead_of_waiting(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with undrained(JSONWebhook(), queue_size=1) as (url, chan, _):
            # The first request's event takes the only place; it waits for its delivery.
            first = asyncio.ensure_future(post_json(url, {"id": "first"}))
            await until(lambda: chan.full())
            busy = await post_json(url, {"id": "second"})
            assert (busy.status, busy.headers["retry-after"]) == (503, "1")
            assert "queue is full" in busy.json()["error"]
            # More events than the queue can ever hold: a configuration problem, said so.
            too_many = await post_json(url, {"id": "many", "events": 2})
            assert too_many.status == 500
            assert not first.done()
            assert chan.qsize() == 1
            first.cancel()

    with caplog.at_level(logging.ERROR, logger="cdk.webhook"):
        asyncio.run(asyncio.wait_for(scenario(), 20))
    assert "never fit in queue_size" in caplog.text


class GatedWebhook(cdk.WebhookSource):
    """``make_event`` waits for ``release``, so a caller can hang up meanwhile."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.release = asyncio.Event()

    async def make_event(self, request: Request) -> cdk.CloudEvent:
        self.requests.append(request)
        await self.release.wait()
        return _event("gated", {})


def test_a_caller_gone_before_its_events_are_queued_queues_nothing() -> None:
    async def scenario() -> None:
        source = GatedWebhook()
        async with undrained(source, queue_size=10) as (url, chan, metrics):
            port = int(url.rsplit(":", 1)[1])
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
            await until(lambda: bool(source.requests))
            writer.close()  # the caller gives up while make_event runs
            await until(lambda: source.requests[0].disconnected)
            source.release.set()
            sample = metrics.registry.get_sample_value
            await until(lambda: sample("cdk_http_responses_total", {"status": "499"}) == 1)
            assert chan.empty()

    asyncio.run(asyncio.wait_for(scenario(), 20))


# -- Standard Webhooks: a delivery sent again makes no second event ---------------------------

STANDARD_KEY = b"standard-webhooks-key-of-the-tests"
STANDARD_SECRET = "whsec_" + base64.b64encode(STANDARD_KEY).decode()


def standard_post(
    client: SinkClient, value: Any, delivery_id: str, stamp: float | None = None
) -> Reply:
    body = orjson.dumps(value)
    when = int(time.time() if stamp is None else stamp)
    headers = {
        "Content-Type": "application/json",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(when),
        "webhook-signature": signature.sign_standard(STANDARD_KEY, delivery_id, when, body),
    }
    return client.post(body, headers)


@pytest.fixture
def signed(target: CaptureTarget) -> Iterator[tuple[JSONWebhook, SinkClient]]:
    """A webhook source with a Standard Webhooks secret, and a client of it."""
    source = JSONWebhook()
    with run_in_thread(source, _config(target, webhook_secret=STANDARD_SECRET)) as running:
        yield source, SinkClient(running.url)


def test_a_standard_webhooks_delivery_sent_again_is_answered_without_a_second_event(
    target: CaptureTarget, signed: tuple[JSONWebhook, SinkClient]
) -> None:
    source, client = signed
    first = standard_post(client, {"id": "push"}, "msg_1")
    again = standard_post(client, {"id": "push"}, "msg_1")
    other = standard_post(client, {"id": "push"}, "msg_2")  # a new delivery, same body
    stale = standard_post(client, {"id": "old"}, "msg_3", stamp=time.time() - 301)
    unsigned = client.post_json({"id": "anon"})
    assert (first.status, first.json()) == (200, {"ids": ["push-0"]})
    assert (again.status, again.json()) == (200, {"ids": ["push-0"]})
    assert other.status == 200
    assert (stale.status, unsigned.status) == (401, 401)
    assert "more than 300 s away" in stale.json()["error"]
    assert len(source.requests) == 2  # make_event never saw the repeat
    assert [e.get_id() for e in target.events] == ["push-0", "push-0"]  # msg_1, then msg_2


def test_a_standard_webhooks_delivery_that_failed_is_made_again_when_sent_again(
    target: CaptureTarget, signed: tuple[JSONWebhook, SinkClient]
) -> None:
    source, client = signed
    target.reject_next(1, 400)
    failed = standard_post(client, {"id": "retry"}, "msg_9")
    again = standard_post(client, {"id": "retry"}, "msg_9")
    assert (failed.status, again.status) == (502, 200)
    assert len(source.requests) == 2
    assert [e.get_id() for e in target.events] == ["retry-0"]


def test_a_delivery_sent_again_while_the_first_is_on_its_way_shares_its_outcome(
    target: CaptureTarget, signed: tuple[JSONWebhook, SinkClient]
) -> None:
    source, client = signed
    replies: list[Reply] = []
    target.delay_next(1, 1.0)
    thread = threading.Thread(
        target=lambda: replies.append(standard_post(client, {"id": "slow"}, "msg_5"))
    )
    thread.start()
    target.wait_until(lambda: target.attempts >= 1, timeout=10)
    again = standard_post(client, {"id": "slow"}, "msg_5")
    thread.join(timeout=10)
    assert (again.status, again.json()) == (200, {"ids": ["slow-0"]})
    assert [reply.status for reply in replies] == [200]
    assert len(source.requests) == 1
    assert [e.get_id() for e in target.events] == ["slow-0"]


# -- memory: queued events hold their part of max_bytes_in_flight until settled ---------------

# About 60 KB of empty arrays: cheap on the wire, about 1.3 MB once decoded.
EMPTY_ARRAYS = {"a": [[] for _ in range(20_000)]}


def test_events_answered_504_keep_their_memory_counted_until_delivered(
    target: CaptureTarget,
) -> None:
    # The budget holds one such event: the second caller is refused while the first
    # caller's event waits for the target, though that caller had its 504 long ago.
    cost = decoded_size(orjson.dumps(EMPTY_ARRAYS))
    assert cost < 4 << 20 < 2 * cost
    config = _config(
        target,
        response_timeout=1.0,  # room for the third's delivery on a busy machine
        attempt_timeout=10.0,
        max_bytes_in_flight=4 << 20,
        host="127.0.0.1",
        port=0,
    )
    target.delay_next(1, 4.0)

    async def scenario() -> tuple[Reply, Reply, Reply]:
        async with webhook_server(JSONWebhook(), config) as (url, _, metrics):
            late = await post_json(url, {"id": "first", **EMPTY_ARRAYS})
            busy = await post_json(url, {"id": "second", **EMPTY_ARRAYS})
            delivered = metrics.registry.get_sample_value
            await until(lambda: delivered("cdk_events_delivered_total") == 1, timeout=10)
            after = await post_json(url, {"id": "third", **EMPTY_ARRAYS})
            return late, busy, after

    late, busy, after = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert (late.status, late.json()["pending"]) == (504, ["first-0"])
    assert (busy.status, busy.headers["retry-after"]) == (503, "1")
    assert "hold too much" in busy.json()["error"]
    assert after.status == 200
    assert [e.get_id() for e in target.events] == ["first-0", "third-0"]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"webhook-id": "msg_1", "x-github-delivery": "gh", "idempotency-key": "k"}, "msg_1"),
        ({"x-github-delivery": "gh", "idempotency-key": "k"}, "gh"),
        ({"idempotency-key": "k"}, "k"),
        ({"webhook-id": "", "idempotency-key": "k"}, "k"),
        ({"x-request-id": "r"}, None),
    ],
)
def test_delivery_id_is_the_callers_id_of_the_delivery(
    headers: dict[str, str], expected: str | None
) -> None:
    assert Request("POST", "/", "", headers, b"").delivery_id == expected


def test_the_memory_of_delivery_ids_is_bounded_and_forgets_the_oldest_first() -> None:
    recent = _Recent(seconds=600, limit=2)
    for n in range(3):
        recent.add(f"msg_{n}", [f"e{n}"])
    assert (recent.get("msg_0"), recent.get("msg_1"), recent.get("msg_2")) == (None, ["e1"], ["e2"])
    expired = _Recent(seconds=-1)  # already past
    expired.add("msg_x", ["ex"])
    assert expired.get("msg_x") is None


class BarrierWebhook(cdk.WebhookSource):
    """``make_event`` returns only once two requests are in it at the same time."""

    def __init__(self) -> None:
        self.calls = 0
        self.barrier = threading.Barrier(2)

    async def make_event(self, request: Request) -> cdk.CloudEvent:
        self.calls += 1
        if self.calls <= 2:
            await asyncio.to_thread(self.barrier.wait, 10)
        return _event(f"made-{self.calls}", {})


def test_one_delivery_sent_twice_at_once_is_remembered_without_errors(
    target: CaptureTarget, caplog: pytest.LogCaptureFixture
) -> None:
    # Both copies pass the "seen before?" check while make_event runs: each makes its
    # event (at-least-once), and the one remembered afterwards answers the third copy.
    source = BarrierWebhook()
    config = _config(target, webhook_secret=STANDARD_SECRET)
    with caplog.at_level(logging.ERROR), run_in_thread(source, config) as running:
        client = SinkClient(running.url)
        replies: list[Reply] = []
        copies = [
            threading.Thread(target=lambda: replies.append(standard_post(client, {}, "msg_7")))
            for _ in range(2)
        ]
        for thread in copies:
            thread.start()
        for thread in copies:
            thread.join(timeout=20)
        third = standard_post(client, {}, "msg_7")
    assert sorted(reply.status for reply in replies) == [200, 200]
    assert third.status == 200 and third.json()["ids"][0].startswith("made-")
    assert source.calls == 2
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
