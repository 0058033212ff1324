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
the caller hung up before queueing         499     nothing queued (nobody reads it)
=========================================  ======  ========================================

``error`` is generic and the lists hold event ids: the target's answer (which may name
hosts or echo the token) goes to the log only. Callers retry the 5xx (at-least-once).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from cdk import signature, tracing
from cdk.codec import AnyCloudEvent
from cdk.connector import Tuple, WebhookSource, call
from cdk.delivery import AttemptsExhausted, EncodeError, ShutdownError
from cdk.http import HTTPError, Request, Response

if TYPE_CHECKING:
    from cdk.config import WebhookSourceConfig
    from cdk.metrics import Metrics

__all__ = ["RETRY_AFTER_SHUTDOWN", "WebhookHandler"]

#: Seconds a caller is asked to wait after the connector shut down before delivering.
RETRY_AFTER_SHUTDOWN = 5


def _tuple(event: Any, fate: asyncio.Future[BaseException | None]) -> Tuple:
    """``fate`` gets None once ``event`` is delivered, else the error (on the event loop)."""

    def settle(error: BaseException | None = None) -> None:
        if not fate.done():  # cancelled: the caller went away, or got its 504
            fate.set_result(error)

    return Tuple(event, settle, settle)


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

    def close(self) -> None:
        """Shutdown began: take no more events (callers get 503); ``chan`` is still drained."""
        self._closed = True

    async def __call__(self, request: Request) -> Response:
        if self._secret is not None and not signature.verify(
            self._secret, request.body, request.headers.get(signature.HEADER)
        ):
            return _json_answer(401, {"error": f"missing or wrong {signature.HEADER} signature"})
        if not tracing.active:
            return await self._answer(request)
        with tracing.webhook(request.headers, request.method):
            return await self._answer(request)

    async def _answer(self, request: Request) -> Response:
        try:
            events = await self._make_events(request)
        except HTTPError as exc:
            body = {"error": self._redact(exc.message)}
            return _json_answer(exc.status, body, list(exc.headers))
        if not events:
            return _json_answer(202, {"ids": []})
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
            return _json_answer(503, {"error": "busy: the queue is full"}, [("retry-after", "1")])
        loop = asyncio.get_running_loop()
        fates: list[asyncio.Future[BaseException | None]] = [loop.create_future() for _ in events]
        for event, fate in zip(events, fates, strict=True):
            try:
                chan.put_nowait(_tuple(event, fate))
            except asyncio.QueueFull:  # --max-events reached: the source takes no more
                fate.set_result(ShutdownError("the connector takes no more events"))
        try:
            await asyncio.wait(fates, timeout=self._response_timeout)
        finally:
            for fate in fates:
                fate.cancel()  # those not settled yet stay queued all the same
        pending = [e.get_id() for e, fate in zip(events, fates, strict=True) if fate.cancelled()]
        if pending:
            # GitHub gives up after 10 s; if it sends again, at-least-once allows twice.
            ids = ", ".join(map(str, pending[:20]))
            self.log.warning("not delivered within response_timeout, still queued: %s", ids)
            late = {"error": "not delivered in time; the events stay queued", "pending": pending}
            return _json_answer(504, late)
        errors = {i: failure for i, fate in enumerate(fates) if (failure := fate.result())}
        if not errors:
            return _json_answer(200, {"ids": [event.get_id() for event in events]})
        return self._failure_response(events, errors)

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
        return _json_answer(status, body, headers)


def _timed_out(error: BaseException) -> bool:
    cause = error.last_error if isinstance(error, AttemptsExhausted) else error
    return isinstance(cause, TimeoutError)


def _json_answer(status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, orjson.dumps(body), "application/json", headers or [])
