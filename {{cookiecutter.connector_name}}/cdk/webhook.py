"""The webhook source's request handler: one HTTP request in, its events delivered, one answer.

:class:`WebhookHandler` is the ``POST`` handler the runtime mounts in a
:class:`cdk.receiver.Receiver` for a :class:`cdk.WebhookSource` (the receiver has
already checked auth, size limits and concurrency). For each request it calls the
user's ``make_event(request)``, puts every event it returns into the source's
``chan``, and answers once each of those events was delivered or given up on by the
delivery engine.

How the caller is answered:

==========================================  ======  =======================================
what happened                               status  body (JSON)
==========================================  ======  =======================================
every event delivered                       200     ``{"ids": [...]}``
``make_event`` returned ``None`` or ``[]``  202     ``{"ids": []}``; nothing sent
``make_event`` raised ``cdk.HTTPError``     its     ``{"error": message}``, its headers
``make_event`` raised anything else         500     generic; the traceback is logged
``make_event`` returned something else      500     generic; logged
the target rejected it or kept failing      502     ``{"error", "delivered", "failed"}``
the last attempt timed out                  504     same
the event could not be encoded              500     same (``make_event`` built a bad event)
the connector shut down first               503     same, with ``Retry-After``
not settled within ``response_timeout``     504     ``{"error", "pending"}``; still queued
``chan`` has no room for the events         503     ``{"error"}``, ``Retry-After: 1``
the caller hung up before they were queued  499     nothing queued (nobody reads it)
==========================================  ======  =======================================

Every status the kit chooses for a failed delivery (5xx) is one webhook callers and
Knative retry. ``delivered`` and ``failed`` list event ids; ``error`` is a generic
sentence, as what the target answered goes to the log only (secrets masked by
``config.redact``). A retry sends the delivered events again, which the at-least-once
contract allows.

``make_event`` may be ``async def`` (awaited on the event loop) or a plain ``def``,
which is called directly on the event loop: it is meant to be quick, CPU-only work
(read the request, build an event). One that does blocking I/O should be
``async def`` and use ``await asyncio.to_thread(...)``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson
from cloudevents.core.v03.event import CloudEvent as CloudEventV03
from cloudevents.core.v1.event import CloudEvent

from cdk.connector import Tuple, WebhookSource
from cdk.delivery import AttemptsExhausted, EncodeError, ShutdownError
from cdk.http import HTTPError, Request, Response

if TYPE_CHECKING:
    from cdk.config import WebhookSourceConfig
    from cdk.metrics import Metrics

__all__ = ["RETRY_AFTER_SHUTDOWN", "WebhookHandler"]

#: Seconds a caller is asked to wait after the connector shut down before delivering.
RETRY_AFTER_SHUTDOWN = 5

_JSON = "application/json"
_RETRY_SOON = [("retry-after", "1")]
_EVENT_TYPES = (CloudEvent, CloudEventV03)


class _Outcome:
    """The fates of one request's events; resolves ``done`` once every event has one."""

    __slots__ = ("count", "done", "errors", "loop", "settled")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.done: asyncio.Future[None] = loop.create_future()
        self.count = count
        self.settled: set[int] = set()
        self.errors: dict[int, BaseException] = {}

    def tuple(self, index: int, event: Any) -> Tuple:
        return Tuple(event, lambda: self._resolve(index, None), lambda e: self._resolve(index, e))

    def _resolve(self, index: int, error: BaseException | None) -> None:
        # The delivery engine calls back on the event loop; anything else must hop onto it.
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._settle(index, error)
        else:
            self.loop.call_soon_threadsafe(self._settle, index, error)

    def _settle(self, index: int, error: BaseException | None) -> None:
        if error is not None:
            self.errors[index] = error
        self.settled.add(index)
        # The caller may have gone away (handler cancelled): then nobody awaits `done`,
        # which is harmless because it only ever holds a result, never an exception.
        if len(self.settled) == self.count and not self.done.done():
            self.done.set_result(None)


class WebhookHandler:
    """``await handler(request) -> Response``: make the events, deliver them, answer."""

    def __init__(
        self,
        source: WebhookSource,
        chan: asyncio.Queue[Tuple],
        metrics: Metrics,
        logger: logging.Logger | None = None,
        *,
        config: WebhookSourceConfig | None = None,
    ) -> None:
        """``config`` gives ``response_timeout`` and ``redact`` (for what is logged and
        answered)."""
        self.source = source
        self.chan = chan
        self.metrics = metrics
        self.log = logger or logging.getLogger("cdk.webhook")
        self._redact: Callable[[str], str] = config.redact if config else str
        self._response_timeout = config.response_timeout if config else 8.0
        self._closed = False

    def close(self) -> None:
        """Shutdown began: take no more events (callers get 503 with ``Retry-After``).

        Events already in ``chan`` are still delivered (or failed) by the delivery
        engine's drain.
        """
        self._closed = True

    async def __call__(self, request: Request) -> Response:
        try:
            events = await self._make_events(request)
        except HTTPError as exc:
            body = {"error": self._redact(exc.message)}
            return _json_response(exc.status, body, list(exc.headers))
        if not events:
            return _json_response(202, {"ids": []})
        self.metrics.received.labels("webhook").inc(len(events))
        chan = self.chan
        if self._closed:
            error = ShutdownError("shut down before the event was queued")
            return self._failure_response(events, dict.fromkeys(range(len(events)), error))
        if request.disconnected:
            # Nobody waits for the answer: the caller will send again, nothing is queued.
            return _json_response(499, {"error": "the caller closed the connection"})
        if chan.maxsize and chan.qsize() + len(events) > chan.maxsize:
            if len(events) > chan.maxsize:
                self.log.error(
                    "make_event returned %d events, more than queue_size (%d) holds: "
                    "raise queue_size; answering 500",
                    len(events),
                    chan.maxsize,
                )
                return _json_response(500, {"error": "internal error while queueing events"})
            # Answered at once rather than waiting for room: the caller retries later, and
            # waiting callers would hold their connection and memory meanwhile.
            return _json_response(503, {"error": "busy: the queue is full"}, _RETRY_SOON)
        outcome = _Outcome(asyncio.get_running_loop(), len(events))
        for index, event in enumerate(events):
            chan.put_nowait(outcome.tuple(index, event))
        done, _ = await asyncio.wait((outcome.done,), timeout=self._response_timeout)
        if not done:
            # GitHub, for one, gives up after 10 s. The events stay queued: a caller that
            # sends them again gets them delivered twice, which at-least-once allows.
            pending = [e.get_id() for i, e in enumerate(events) if i not in outcome.settled]
            self.log.warning(
                "events not delivered within response_timeout (%s s), answering 504; "
                "still queued: %s",
                self._response_timeout,
                ", ".join(map(str, pending[:20])),
            )
            late = {"error": "not delivered in time; the events stay queued", "pending": pending}
            return _json_response(504, late)
        if not outcome.errors:
            return _json_response(200, {"ids": [event.get_id() for event in events]})
        return self._failure_response(events, outcome.errors)

    async def _make_events(self, request: Request) -> list[Any]:
        """Call ``make_event`` and normalise its answer to a list of events."""
        self.metrics.handler_in_flight.inc()
        started = time.perf_counter()
        try:
            made = self.source.make_event(request)
            if inspect.isawaitable(made):
                made = await made
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
        if isinstance(made, _EVENT_TYPES):
            return [made]
        if isinstance(made, Sequence) and all(isinstance(e, _EVENT_TYPES) for e in made):
            return list(made)
        self.log.error(
            "make_event must return a CloudEvent, a list of them or None, not %s; answering 500",
            type(made).__name__,
        )
        raise HTTPError(500, "internal error while making the event")

    def _failure_response(self, events: list[Any], errors: dict[int, BaseException]) -> Response:
        # The target's own words stay in the log: they may name internal hosts, or echo
        # the request with its token, to a caller who need not be trusted.
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
        self.log.warning(
            "%d of %d event(s) not delivered (ids: %s), answering %d: %s",
            len(failures),
            len(events),
            ", ".join(map(str, failed[:20])),
            status,
            self._redact(str(failures[0])),
        )
        delivered = [e.get_id() for i, e in enumerate(events) if i not in errors]
        body = {"error": message, "delivered": delivered, "failed": failed}
        return _json_response(status, body, headers)


def _timed_out(error: BaseException) -> bool:
    if isinstance(error, AttemptsExhausted):
        return isinstance(error.last_error, TimeoutError)
    return isinstance(error, TimeoutError)


def _json_response(
    status: int, body: Any, headers: list[tuple[str, str]] | None = None
) -> Response:
    return Response(
        status=status, body=orjson.dumps(body), content_type=_JSON, headers=headers or []
    )
