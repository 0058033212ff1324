"""The codec where it meets real sockets: what a source sends, what a sink reads.

- A source's own sink refuses control characters in string attributes (and every other
  rule of the decoder); delivery must find that when it encodes, fail that event alone
  with an encode error, and deliver the rest, in every content mode.
- Senders that do not percent-encode ``ce-`` headers (sdk-go writes raw UTF-8 and bare
  ``%``) reach the kit's sink, whose HTTP layer reads header bytes as Latin-1.
"""

from __future__ import annotations

import asyncio
import http.client
from typing import Any

import pytest
from cloudevents.core.v1.event import CloudEvent

import cdk
from cdk.codec import UnwritableEvent
from cdk.config import SourceConfig
from cdk.connector import Tuple
from cdk.delivery import Deliverer, EncodeError
from cdk.metrics import Metrics
from cdk.testing import CaptureTarget, run_in_thread

pytestmark = pytest.mark.timeout(60)

BAD = {
    "crlf": {"subject": "a\r\nb"},
    "nul": {"type": "t\x00"},
    "source": {"source": "not a uri"},
    "extension": {"myext": "x\ny"},
}


def event(name: str, **attributes: Any) -> CloudEvent:
    base = {"id": name, "source": "/tests/outbound", "type": "com.example.test"}
    return CloudEvent({**base, **attributes}, {"name": name})


async def deliver(target: CaptureTarget, events: list[CloudEvent], **config: Any) -> dict[str, Any]:
    """Deliver ``events`` in one go; the fate of each (True or the exception) by id."""
    fates: dict[str, Any] = {}
    done = asyncio.Event()

    def settle(event_id: str, fate: Any) -> None:
        fates[event_id] = fate
        if len(fates) == len(events):
            done.set()

    chan: asyncio.Queue[Tuple] = asyncio.Queue(len(events))
    for item in events:
        event_id = item.get_id()
        chan.put_nowait(
            Tuple(
                item,
                lambda i=event_id: settle(i, True),  # type: ignore[misc]
                lambda exc, i=event_id: settle(i, exc),  # type: ignore[misc]
            )
        )
    cfg = SourceConfig(target=target.url, max_in_flight=1, **config)
    deliverer = Deliverer(cfg, Metrics())
    task = asyncio.create_task(deliverer.run(chan))
    try:
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        await deliverer.stop(5.0)
        await asyncio.wait_for(task, 5)
    return fates


@pytest.mark.parametrize(
    "config",
    [{}, {"content_mode": "structured"}, {"batch_size": 10}],
    ids=["binary", "structured", "batch"],
)
def test_a_bad_event_fails_alone_and_is_never_sent(config: dict[str, Any]) -> None:
    async def main() -> None:
        async with CaptureTarget() as target:
            events = [event("good0")]
            events += [event(name, **attributes) for name, attributes in BAD.items()]
            events += [event("good1")]
            fates = await deliver(target, events, **config)
            assert fates["good0"] is True and fates["good1"] is True
            for name, attributes in BAD.items():
                error = fates[name]
                assert isinstance(error, EncodeError), (name, error)
                # The codec's typed error, naming the attribute, is what the callback reads.
                assert UnwritableEvent.__name__ in str(error), error
                assert f"'{next(iter(attributes))}'" in str(error), error
            # The target decodes with the same rules: it saw only the good events and
            # refused nothing.
            assert [e.get_id() for e in target.events] == ["good0", "good1"]
            assert all(r.accepted for r in target.all_requests)

    asyncio.run(main())


class Recording(cdk.Sink):
    def __init__(self) -> None:
        self.events: list[CloudEvent] = []

    async def arrived(self, *events: CloudEvent) -> cdk.Result:
        self.events.extend(events)
        return cdk.SUCCESS


def post_raw(port: int, headers: dict[str, bytes]) -> int:
    """POST a binary-mode event whose ce- header values are these exact bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("POST", "/", skip_accept_encoding=True)
        base = {"ce-specversion": b"1.0", "ce-id": b"raw-1", "ce-source": b"/go", "ce-type": b"t"}
        for name, value in {**base, **headers, "content-length": b"0"}.items():
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("raw", "read"),
    [
        ("héllo wörld 😀".encode(), "héllo wörld 😀"),  # raw UTF-8, as sdk-go writes it
        (b"100% sure", "100% sure"),  # a '%' that starts no escape is a literal
        (b"50%zz off", "50%zz off"),
        ("é%20x".encode(), "é x"),  # raw UTF-8 and an escape together
        (b"Euro%20%E2%82%AC", "Euro €"),  # percent-encoded, as the binding says
    ],
    ids=["raw-utf8", "bare-percent", "percent-non-hex", "raw-and-escape", "encoded"],
)
def test_the_sink_reads_raw_utf8_and_bare_percent_in_headers(raw: bytes, read: str) -> None:
    sink = Recording()
    with run_in_thread(sink, cdk.SinkConfig()) as running:
        assert post_raw(running.port, {"ce-subject": raw, "ce-myext": raw}) == 200
    (event,) = sink.events
    assert event.get_subject() == read
    assert event.get_extension("myext") == read


@pytest.mark.parametrize(
    "raw", [b"%C0%A0", "é%C0%A0".encode(), b"a%0Db"], ids=["overlong", "raw-and-overlong", "cr"]
)
def test_the_sink_refuses_invalid_utf8_or_control_characters_once_decoded(raw: bytes) -> None:
    sink = Recording()
    with run_in_thread(sink, cdk.SinkConfig()) as running:
        assert post_raw(running.port, {"ce-subject": raw}) == 400
    assert sink.events == []
