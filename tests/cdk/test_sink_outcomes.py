"""A sink's per-event outcomes, dead letters and replies, over real loopback HTTP.

Each test runs a sink service in a thread (``cdk.testing.run_in_thread``), posts to it with
``SinkClient`` and, for dead letters, captures what reaches a real ``CaptureTarget``.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import cdk
from cdk.codec import from_http
from cdk.config import SinkConfig
from cdk.testing import CaptureTarget, SinkClient, run_in_thread

pytestmark = pytest.mark.timeout(60)


def event(n: int, **extra: Any) -> cdk.CloudEvent:
    return cdk.CloudEvent({"id": f"e-{n}", "source": "/test", "type": "t", **extra}, {"n": n})


class ScriptedSink(cdk.Sink[SinkConfig]):
    """``arrived`` records its events and answers ``answer(events)``."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[list[str]] = []

    def name(self) -> str:
        return "scripted-sink"

    async def arrived(self, *events: cdk.CloudEvent) -> Any:
        self.calls.append([e.get_id() for e in events])
        return self.answer(events)


def by_id(codes: dict[str, int]) -> Any:
    """An answer: per event, its code in ``codes`` (0 when absent), as a list of Results."""
    return lambda events: [cdk.Result(codes.get(e.get_id(), 0), f"m-{e.get_id()}") for e in events]


def raising(events: Any) -> Any:
    raise RuntimeError("the database said no")


@contextmanager
def sink(answer: Any, **config: Any) -> Iterator[tuple[SinkClient, ScriptedSink]]:
    connector = ScriptedSink(answer)
    settings = SinkConfig(**config)
    with run_in_thread(connector, settings, grace=2.0) as running:
        yield SinkClient(running.url, timeout=20), connector


def metric(client: SinkClient, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- 1. per-event outcomes ------------------------------------------------------------


def test_a_list_of_results_all_successes_answers_200() -> None:
    with sink(by_id({})) as (client, connector):
        reply = client.send(*(event(n) for n in range(3)), mode="batch")
    assert reply.status == 200, reply.text
    assert connector.calls == [["e-0", "e-1", "e-2"]]


def test_one_retryable_failure_in_a_batch_answers_its_status() -> None:
    with sink(by_id({"e-1": 503, "e-2": 0})) as (client, _):
        reply = client.send(*(event(n) for n in range(3)), mode="batch")
    assert reply.status == 503, reply.text
    assert reply.text == "m-e-1"


def test_a_refused_event_without_dead_letter_target_answers_its_status() -> None:
    with sink(by_id({"e-2": 422})) as (client, _):
        reply = client.send(*(event(n) for n in range(3)), mode="batch")
    assert reply.status == 422, reply.text


def test_a_retryable_status_wins_over_a_refusal() -> None:
    with sink(by_id({"e-0": 400, "e-2": 429})) as (client, _):
        reply = client.send(*(event(n) for n in range(3)), mode="batch")
    assert reply.status == 429, reply.text


@pytest.mark.parametrize("answer", [[cdk.SUCCESS], [cdk.SUCCESS] * 3, ["not a result"] * 2])
def test_a_wrong_list_is_a_500_with_a_log_line(answer: list[Any], caplog: Any) -> None:
    caplog.set_level(logging.ERROR, "cdk.sink")
    with sink(lambda events: answer) as (client, _):
        reply = client.send(event(0), event(1), mode="batch")
    assert reply.status == 500, reply.text
    assert "internal error" in reply.text
    (line,) = [r.getMessage() for r in caplog.records if r.name == "cdk.sink"]
    assert "ScriptedSink.arrived returned" in line and "e-0, e-1" in line
    if len(answer) != 2:
        assert f"a list of {len(answer)} Results for 2 event(s)" in line


# -- 2. dead letters ----------------------------------------------------------------------


def test_a_batch_with_one_refused_event_is_answered_2xx_and_the_event_dead_lettered() -> None:
    with CaptureTarget.in_thread() as dead:
        with sink(by_id({"e-1": 422}), dead_letter_target=dead.url) as (client, connector):
            reply = client.send(*(event(n) for n in range(3)), mode="batch")
            counted = metric(client, 'cdk_sink_dead_lettered_total{code="422"}')
        lettered = dead.events
    assert reply.status == 200, reply.text
    assert connector.calls == [["e-0", "e-1", "e-2"]]  # sent once: nothing comes back
    (letter,) = lettered
    assert letter.get_id() == "e-1"
    attributes = letter.get_attributes()
    assert attributes["knativeerrordest"] == "scripted-sink"
    assert attributes["knativeerrorcode"] == "422"
    assert base64.b64decode(attributes["knativeerrordata"]) == b"m-e-1"
    assert counted == 1


def test_an_event_whose_arrived_raised_is_dead_lettered_with_the_error() -> None:
    with CaptureTarget.in_thread() as dead:
        with sink(raising, dead_letter_target=dead.url) as (client, _):
            reply = client.send(event(0), event(1), mode="batch")
            counted = metric(client, 'cdk_sink_dead_lettered_total{code="500"}')
        lettered = dead.events
    assert reply.status == 200, reply.text
    assert [e.get_id() for e in lettered] == ["e-0", "e-1"]
    data = base64.b64decode(lettered[0].get_attributes()["knativeerrordata"])
    assert data == b"RuntimeError: the database said no"
    assert counted == 2


def test_dead_letter_data_is_cut_at_1024_bytes_and_the_token_goes_along() -> None:
    long = "x" * 5000
    with CaptureTarget.in_thread() as dead:
        config = {"dead_letter_target": dead.url, "dead_letter_auth_token": "dl-token-1"}
        with sink(lambda events: cdk.Result(400, long), **config) as (client, _):
            reply = client.send(event(0))
        (request,) = dead.requests
    assert reply.status == 200, reply.text
    assert request.headers["authorization"] == "Bearer dl-token-1"
    _, (letter,) = from_http(request.headers, request.body)
    assert base64.b64decode(letter.get_attributes()["knativeerrordata"]) == b"x" * 1024


def test_retryable_failures_are_not_dead_lettered() -> None:
    with CaptureTarget.in_thread() as dead:
        with sink(by_id({"e-0": 500}), dead_letter_target=dead.url) as (client, _):
            reply = client.send(event(0), event(1), mode="batch")
        lettered = dead.events
    assert reply.status == 500, reply.text
    assert lettered == []


def test_a_failing_dead_letter_target_makes_the_sink_answer_5xx() -> None:
    with CaptureTarget.in_thread() as dead:
        dead.fail_with(503)
        with sink(by_id({"e-1": 400}), dead_letter_target=dead.url) as (client, _):
            reply = client.send(event(0), event(1), mode="batch")
            counted = metric(client, "cdk_sink_dead_lettered_total")
        attempts = dead.attempts
    assert reply.status == 502, reply.text
    assert "dead-letter target" in reply.text
    assert attempts == 3  # the source's default send_event_attempts
    assert counted == 0


def test_a_dead_letter_target_that_is_down_makes_the_sink_answer_5xx() -> None:
    with CaptureTarget.in_thread() as dead:
        url = dead.url
    with sink(by_id({"e-0": 400}), dead_letter_target=url) as (client, _):
        reply = client.send(event(0))
    assert reply.status == 502, reply.text


# -- 4. replies ---------------------------------------------------------------------------


def test_a_single_event_can_be_answered_with_a_reply_in_binary_mode() -> None:
    def reply_to(events: Any) -> cdk.CloudEvent:
        (request,) = events
        attributes = {"id": "r-1", "source": "/sink", "type": "reply", "subject": "héllo wörld"}
        return cdk.CloudEvent(attributes, {"to": request.get_id()})

    with sink(reply_to) as (client, _):
        reply = client.send(event(7))
    assert reply.status == 200, reply.text
    assert reply.headers["ce-id"] == "r-1"
    assert reply.headers["content-type"] == "application/json"
    _, (answer,) = from_http(reply.headers, reply.body)
    assert answer.get_type() == "reply"
    assert answer.get_subject() == "héllo wörld"
    assert answer.get_data() == {"to": "e-7"}


def test_a_reply_to_a_batch_is_a_500_with_a_log_line(caplog: Any) -> None:
    caplog.set_level(logging.ERROR, "cdk.sink")
    with sink(lambda events: event(99)) as (client, _):
        reply = client.send(event(0), event(1), mode="batch")
    assert reply.status == 500, reply.text
    assert any("only a single event can be replied to" in r.getMessage() for r in caplog.records)
