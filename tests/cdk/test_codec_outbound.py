"""Events a receiver would refuse fail alone before they are sent, over real HTTP.

A source's own sink refuses control characters in string attributes (and every other
rule of the decoder); delivery must find that when it encodes, fail that event alone
with an encode error, and deliver the rest, in every content mode.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cloudevents.core.v1.event import CloudEvent

from cdk.codec import UnwritableEvent
from cdk.config import SourceConfig
from cdk.connector import Tuple
from cdk.delivery import Deliverer, EncodeError
from cdk.metrics import Metrics
from cdk.testing import CaptureTarget

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
