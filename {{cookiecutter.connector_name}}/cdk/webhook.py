"""The webhook source's request handler: one HTTP request in, its events delivered, one answer.

:class:`WebhookHandler` checks the signature, calls ``make_event(request)`` (a plain
``def`` runs on the loop: keep it quick), queues the events and answers in JSON once each
was delivered or given up on, or ``response_timeout`` passed:

=========================================  ======  ========================================
every event delivered                      200     ``{"ids": [...]}``
no event (``None`` or ``[]``)              202     ``{"ids": []}``
``make_event`` raised ``cdk.HTTPError``    its     ``{"error": message}``, its headers
``make_event`` raised or returned junk     500     generic; the details are logged
the target refused or kept failing         502     ``{"error", "delivered", "failed"}``
the last attempt timed out                 504     same
an event could not be encoded              500     same
shutdown came first                        503     same, ``Retry-After: 5``
not settled within ``response_timeout``    504     ``{"error", "pending"}``: still queued
no room in ``chan``                        503     ``{"error"}``, ``Retry-After: 1``
no room in ``max_bytes_in_flight``         503     ``{"error"}``, ``Retry-After: 1``
the caller hung up before queueing         499     nothing queued (nobody reads it)
not signed as ``webhook_secret`` requires  401     ``{"error"}``: what is wrong
a Standard Webhooks delivery seen before   as it   the first one's answer, no new event
=========================================  ======  ========================================

``error`` is generic and the lists hold event ids: the target's answer (which may name
hosts or echo the token) goes to the log only. Callers retry the 5xx (at-least-once).

Memory: a request counts :func:`cdk.codec.decoded_size` of its body against ``max_bytes_in_flight``
before ``make_event`` decodes it, and its events keep that count until the last of them
is settled, whether the caller still waits, got its 504 or hung up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from cdk import signature, tracing
from cdk.codec import AnyCloudEvent, decoded_size
from cdk.connector import Tuple, WebhookSource, call
from cdk.delivery import AttemptsExhausted, EncodeError, ShutdownError
from cdk.http import Hold, HTTPError, Request, Response

if TYPE_CHECKING:
    from cdk.config import WebhookSourceConfig
    from cdk.metrics import Metrics

__all__ = ["RETRY_AFTER_SHUTDOWN", "WebhookHandler"]

#: Seconds a caller is asked to wait after the connector shut down before delivering.
RETRY_AFTER_SHUTDOWN = 5
#: Counted against ``max_bytes_in_flight`` for each event beside its data: attributes,
#: the queue's Tuple, the delivery's request bytes.
_EVENT_BYTES = 1024
#: Standard Webhooks delivery ids remembered (those delivered within the tolerance).
_RECENT_IDS = 10_000


class _Delivery:
    """The events of one request on their way: each one's outcome, and the memory they hold
    against ``max_bytes_in_flight`` until the last is settled, whether or not anyone waits."""

    __slots__ = ("_hold", "_then", "done", "events", "outcomes")

    def __init__(
        self, events: list[Any], hold: Hold, then: Callable[[_Delivery], None] | None = None
    ) -> None:
        self.events = events
        #: Event index -> None (delivered) or the error; the settled ones only.
        self.outcomes: dict[int, BaseException | None] = {}
        self.done = asyncio.get_running_loop().create_future()
        self._hold = hold
        self._then = then

    def tuple(self, index: int) -> Tuple:
        return Tuple(
            self.events[index], partial(self.settle, index, None), partial(self.settle, index)
        )

    def settle(self, index: int, error: BaseException | None = None) -> None:
        if index in self.outcomes:
            return
        self.outcomes[index] = error
        if len(self.outcomes) == len(self.events):
            self._hold.release()
            self.done.set_result(None)
            if self._then is not None:
                self._then(self)

    @property
    def errors(self) -> dict[int, BaseException]:
        return {i: error for i, error in self.outcomes.items() if error is not None}

    def ids(self, *, pending: bool = False) -> list[Any]:
        """The ids of all its events, or of those not settled yet."""
        events = enumerate(self.events)
        return [e.get_id() for i, e in events if not pending or i not in self.outcomes]


class _Recent:
    """Standard Webhooks delivery ids whose events were delivered, with those events' ids,
    for as long as the same request could still pass the timestamp check; the oldest go
    first past ``limit`` (a redelivery then makes its events again: at-least-once)."""

    def __init__(self, seconds: float, limit: int = _RECENT_IDS) -> None:
        self._seconds = seconds
        self._limit = limit
        self._ids: OrderedDict[str, tuple[float, list[Any]]] = OrderedDict()

    def get(self, delivery_id: str) -> list[Any] | None:
        found = self._ids.get(delivery_id)
        return None if found is None or found[0] < time.monotonic() else found[1]

    def add(self, delivery_id: str, ids: list[Any]) -> None:
        now = time.monotonic()
        ids_by_age = self._ids
        while ids_by_age and (
            len(ids_by_age) >= self._limit or next(iter(ids_by_age.values()))[0] < now
        ):
            ids_by_age.popitem(last=False)
        ids_by_age[delivery_id] = (now + self._seconds, ids)


class WebhookHandler:
    def __init__(
        self,
        source: WebhookSource[Any],
        chan: asyncio.Queue[Tuple],
        metrics: Metrics,
        *,
        config: WebhookSourceConfig,
    ) -> None:
        self.source = source
        self.chan = chan
        self.metrics = metrics
        self.log = logging.getLogger("cdk.webhook")
        self._redact = config.redact
        self._response_timeout = config.response_timeout
        secret = config.webhook_secret
        self._secret = None if secret is None else secret.get_secret_value()
        self._closed = False
        # A request signed at most TOLERANCE s ago, or ahead, passes for twice that long.
        self._recent = _Recent(2 * signature.TOLERANCE)
        self._underway: dict[str, _Delivery] = {}

    def close(self) -> None:
        """Shutdown began: take no more events (callers get 503); ``chan`` is still drained."""
        self._closed = True

    async def __call__(self, request: Request) -> Response:
        delivery_id = None
        if self._secret is not None:
            try:
                delivery_id = signature.check(self._secret, request.headers, request.body)
            except signature.SignatureError as exc:
                return _json_answer(401, {"error": str(exc)})
            if delivery_id is not None:
                underway = self._underway.get(delivery_id)
                if underway is not None:  # sent again before the first was settled
                    return await self._outcome(underway)
                if (ids := self._recent.get(delivery_id)) is not None:
                    return _json_answer(200, {"ids": ids})
        if not tracing.active:
            return await self._answer(request, delivery_id)
        with tracing.webhook(request.headers, request.method):
            return await self._answer(request, delivery_id)

    async def _answer(self, request: Request, delivery_id: str | None) -> Response:
        # Decoding counts against the budget, before make_event: a burst is refused undecoded.
        cost = decoded_size(request.body) + _EVENT_BYTES
        if not request.reserve(cost):
            return _MEMORY_BUSY
        try:
            events = await self._make_events(request)
        except HTTPError as exc:
            body = {"error": self._redact(exc.message)}
            return _json_answer(exc.status, body, list(exc.headers))
        if not events:
            return _json_answer(202, {"ids": []})
        more = (len(events) - 1) * _EVENT_BYTES
        if more and not request.reserve(more):
            return _MEMORY_BUSY
        self.metrics.received.labels("webhook").inc(len(events))
        chan = self.chan
        if self._closed:
            error = ShutdownError("shut down before the event was queued")
            return self._failure_response(events, dict.fromkeys(range(len(events)), error))
        if request.disconnected:
            # Nobody waits for the answer: the caller will send again, nothing is queued.
            return _json_answer(499, {"error": "the caller closed the connection"})
        if tracing.active:
            events = [tracing.inject(event) for event in events]  # delivery continues the trace
        # Events waiting for a retry take room too (cdk.delivery.DeliveryQueue).
        if chan.maxsize and chan.qsize() + getattr(chan, "waiting", 0) + len(events) > chan.maxsize:
            if len(events) > chan.maxsize:
                self.log.error("%d events never fit in queue_size: raise it", len(events))
                return _json_answer(500, {"error": "internal error while queueing events"})
            # At once: waiting for room would hold the caller's connection and memory.
            return _json_answer(503, {"error": "busy: the queue is full"}, _SOON)
        # Queued events hold their memory until settled, long after a 504 or a caller gone.
        then = None if delivery_id is None else partial(self._delivered, delivery_id)
        delivery = _Delivery(events, request.keep(cost + more), then)
        if delivery_id is not None:
            self._underway.setdefault(delivery_id, delivery)
        for index in range(len(events)):
            try:
                chan.put_nowait(delivery.tuple(index))
            except asyncio.QueueFull:  # --max-events reached: the source takes no more
                delivery.settle(index, ShutdownError("the connector takes no more events"))
        return await self._outcome(delivery)

    def _delivered(self, delivery_id: str, delivery: _Delivery) -> None:
        # Two requests with one id may both pass the check while make_event runs.
        if self._underway.get(delivery_id) is delivery:
            del self._underway[delivery_id]
        if not delivery.errors:
            self._recent.add(delivery_id, delivery.ids())

    async def _outcome(self, delivery: _Delivery) -> Response:
        """The answer once ``delivery`` is settled, or 504 past ``response_timeout``."""
        try:
            await asyncio.wait_for(asyncio.shield(delivery.done), self._response_timeout)
        except TimeoutError:
            # GitHub gives up after 10 s; if it sends again, at-least-once allows twice.
            pending = delivery.ids(pending=True)
            ids = ", ".join(map(str, pending[:20]))
            self.log.warning("not delivered within response_timeout, still queued: %s", ids)
            late = {"error": "not delivered in time; the events stay queued", "pending": pending}
            return _json_answer(504, late)
        errors = delivery.errors
        if not errors:
            return _json_answer(200, {"ids": delivery.ids()})
        return self._failure_response(delivery.events, errors)

    async def _make_events(self, request: Request) -> list[Any]:
        self.metrics.handler_in_flight.inc()
        started = time.perf_counter()
        try:
            made = await call(self.source.make_event, request)
        except HTTPError:
            raise
        except Exception:
            self.log.exception("make_event raised; answering 500")
            raise HTTPError(500, "internal error while making the event") from None
        finally:
            self.metrics.handler_latency.observe(time.perf_counter() - started)
            self.metrics.handler_in_flight.dec()
        if made is None:
            return []
        if isinstance(made, AnyCloudEvent):
            return [made]
        if isinstance(made, Sequence) and all(isinstance(e, AnyCloudEvent) for e in made):
            return list(made)
        self.log.error(
            "make_event must return a CloudEvent, a list of them or None, not %s; answering 500",
            type(made).__name__,
        )
        raise HTTPError(500, "internal error while making the event")

    def _failure_response(self, events: list[Any], errors: Mapping[int, BaseException]) -> Response:
        failures = list(errors.values())
        headers: list[tuple[str, str]] = []
        if any(isinstance(e, ShutdownError) for e in failures):
            status, message = 503, "the connector is shutting down; send the events again"
            headers.append(("retry-after", str(RETRY_AFTER_SHUTDOWN)))
        elif any(isinstance(e, EncodeError) for e in failures):
            status, message = 500, "internal error: an event could not be encoded"
        elif all(_timed_out(e) for e in failures):
            status, message = 504, "the target did not answer in time"
        else:
            status, message = 502, "the target did not take the events"
        failed = [events[i].get_id() for i in errors]
        # A shutdown fails every waiting caller at once: cdk.delivery sums it up in one line.
        level = logging.DEBUG if status == 503 else logging.WARNING
        self.log.log(
            level,
            "%d of %d event(s) not delivered (ids: %s), answering %d: %s",
            len(failures),
            len(events),
            ", ".join(map(str, failed[:20])),
            status,
            self._redact(str(failures[0])),
        )
        delivered = [e.get_id() for i, e in enumerate(events) if i not in errors]
        body = {"error": message, "delivered": delivered, "failed": failed}
        return _json_answer(status, body, headers)


_SOON = [("retry-after", "1")]


def _timed_out(error: BaseException) -> bool:
    cause = error.last_error if isinstance(error, AttemptsExhausted) else error
    return isinstance(cause, TimeoutError)


def _json_answer(status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, orjson.dumps(body), "application/json", headers or [])


_MEMORY_BUSY = _json_answer(503, {"error": "busy: events in progress hold too much"}, _SOON)
