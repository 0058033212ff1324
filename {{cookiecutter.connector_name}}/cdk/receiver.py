"""Receiving: the HTTP application of a sink (or a webhook source) on top of ``cdk.http``.

:class:`Receiver` owns the routes (``POST``, the ``OPTIONS`` webhook handshake,
``/healthz``, ``/readyz``, ``/metrics``), auth, readiness and the concurrency cap, all
checked on the head; :class:`SinkHandler` is a sink's ``POST /``.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cdk import tracing
from cdk.codec import CodecError, from_http
from cdk.connector import Result, Sink, call
from cdk.http import Handler, HTTPError, HTTPServer, Request, Response, text_answer
from cdk.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from cdk.config import ServerConfig
    from cdk.metrics import Metrics

__all__ = ["RETRY_AFTER", "ReadyCheck", "Receiver", "SinkHandler"]

#: What ``Receiver(ready_check=...)`` takes: the connector's ``ready`` hook, plain or async.
ReadyCheck = Callable[[], bool | Awaitable[bool]]

#: Seconds a client is asked to wait (``Retry-After``) when the concurrency cap is reached.
RETRY_AFTER = 1

_READY_TIMEOUT = 5.0
_POST_ALLOW = "POST, OPTIONS"
_READ_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
_SERVER_KEYS = {"host", "port", "max_body_bytes", "max_header_bytes", "read_timeout"}
_SERVER_KEYS |= {"keepalive_timeout", "max_bytes_in_flight", "access_log"}
#: Counted against ``max_bytes_in_flight`` beside the body: about a small event's size, and
#: (estimated before decoding a body over ``_SMALL_BODY``) JSON's size as objects per byte.
_EVENT_BYTES = 1024
_DECODED_PER_BYTE = 3
_SMALL_BODY = 64 * 1024
_GONE = object()  # what _call_sync returns for a sender that is gone

# Shared answers of the hot path (answers are never mutated once returned).
_OK = Response(200)
_ACCEPTED = Response(202)
_BUSY = Response(503, b"busy: too many events in progress", headers=[("retry-after", "1")])


class Receiver:
    def __init__(
        self,
        post: Handler,
        config: ServerConfig,
        metrics: Metrics,
        *,
        any_path: bool = False,
        ready_check: ReadyCheck | None = None,
    ) -> None:
        """``ready_check`` is asked on each ``GET /readyz`` while :attr:`ready` (concurrent
        probes share one): False, raising or taking over 5 s answers 503 and why."""
        self.ready = False
        #: Said after "ready" on ``/readyz`` (a replica's role under leader election).
        self.note = ""
        #: Why the connector cannot work now ("" when it can): ``/readyz`` answers 503 and it.
        self.trouble: Callable[[], str] | None = None
        self._config = config
        self._post = post
        self._any_path = any_path
        self._ready_check = ready_check
        self._checking: asyncio.Future[Response] | None = None
        self._was_ready = True
        self._metrics = metrics
        self._log = logging.getLogger("cdk.receiver")
        secret = config.auth_token.get_secret_value() if config.auth_token is not None else ""
        self._token: bytes | None = secret.encode("utf-8") if secret else None
        self.in_flight = 0  # POST requests being handled right now
        self._counted: dict[int, Any] = {}

    def record_status(self, status: int) -> None:
        """Count an answer, with one prometheus child per status (labels() is slow)."""
        child = self._counted.get(status)
        if child is None:
            child = self._counted[status] = self._metrics.responses.labels(str(status))
        child.inc()

    def http_server(self) -> HTTPServer:
        """The server for this receiver, with the config's limits, refusing on the head."""
        limits = self._config.model_dump(include=_SERVER_KEYS)  # named as HTTPServer's
        return HTTPServer(
            self.handle, check_head=self._refusal, on_reject=self.record_status, **limits
        )

    async def handle(self, request: Request) -> Response:
        refusal = self._refusal(request)
        if refusal is not None:
            response = refusal
        elif request.method != "POST":
            response = await self._read(request)
        else:
            # Awaited here, not in a helper: each coroutine layer costs on every event.
            self.in_flight += 1
            try:
                response = await self._post(request)
                if not isinstance(response, Response):
                    raise TypeError(
                        f"POST handler returned {type(response).__name__}, not a Response"
                    )
            except HTTPError as exc:
                response = exc.to_response()
            except Exception:
                self._log.exception("POST handler failed")
                response = text_answer(500, "internal error")
            finally:
                self.in_flight -= 1
        self.record_status(response.status)
        return response

    def _refusal(self, request: Request) -> Response | None:
        """The answer refusing ``request`` on its head alone, or None."""
        path = request.path
        method = request.method
        if path in _READ_ROUTES:
            if method in ("GET", "HEAD"):
                return None
            return text_answer(405, "method not allowed", [("allow", "GET, HEAD")])
        if path != "/" and not self._any_path:
            return text_answer(404, "not found")
        if method != "POST":
            if method == "OPTIONS":
                return None
            allow = [("allow", _POST_ALLOW)]
            return text_answer(405, "method not allowed; POST CloudEvents here", allow)
        if self._token is not None and not self._authorized(request):
            challenge = [("www-authenticate", 'Bearer realm="connector"')]
            return text_answer(401, "missing or wrong bearer token", challenge)
        encoding = request.headers.get("content-encoding")
        if encoding is not None and encoding.lower() != "identity":
            # Not decoded: no event sender compresses, and gzip can inflate past any limit.
            return text_answer(415, "send the body uncompressed", [("accept-encoding", "identity")])
        if self.in_flight >= self._config.max_concurrency:
            # Refused, not queued: a queue would hide overload from the sender.
            retry = [("retry-after", str(RETRY_AFTER))]
            return text_answer(429, "too many requests in progress", retry)
        return None

    async def _read(self, request: Request) -> Response:
        """What a GET, HEAD or OPTIONS that passed ``_refusal`` is answered."""
        path = request.path
        if path == "/healthz":
            return text_answer(200, "ok")
        if path == "/readyz":
            if not self.ready:
                return text_answer(503, "not ready")
            if self.trouble is not None and (why := self.trouble()):
                return text_answer(503, f"not ready: {why}")
            if self._ready_check is None:
                return text_answer(200, f"ready{self.note}")
            if self._checking is None or self._checking.done():
                self._checking = asyncio.ensure_future(self._check_ready(self._ready_check))
            return await asyncio.shield(self._checking)
        if path == "/metrics":
            return Response(200, self._metrics.render(), CONTENT_TYPE)
        origin = request.headers.get("webhook-request-origin")
        if origin is None:
            return Response(200, headers=[("allow", _POST_ALLOW)])
        allowed = [("webhook-allowed-origin", origin.strip() or "*"), ("webhook-allowed-rate", "*")]
        return Response(200, headers=[("allow", "POST"), *allowed])

    async def _check_ready(self, check: ReadyCheck) -> Response:
        try:
            ready = bool(await asyncio.wait_for(call(check, thread=True), _READY_TIMEOUT))
            reason = detail = "" if ready else "the connector reports it is not ready"
        except TimeoutError:
            reason = detail = f"the readiness check took more than {_READY_TIMEOUT:g} s"
        except Exception as exc:
            # The probe needs no token: the error's text goes to the log only.
            reason = f"the readiness check raised {type(exc).__name__}"
            detail = self._config.redact(f"{reason}: {exc}")
        if (not reason) != self._was_ready:  # logged when it changes, not on every probe
            self._was_ready = not reason
            if reason:
                self._log.warning("not ready: %s", detail)
            else:
                self._log.info("ready again")
        if reason:
            return text_answer(503, f"not ready: {reason}")
        return text_answer(200, f"ready{self.note}")

    def _authorized(self, request: Request) -> bool:
        token = self._token
        assert token is not None
        scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
        # Header values arrive decoded as latin-1: encoding back gives the raw bytes.
        given = credentials.strip().encode("latin-1")
        if scheme.lower() == "bearer" and hmac.compare_digest(given, token):
            return True
        query = request.query_params() if "access_token" in request.query else {}
        return any(hmac.compare_digest(v.encode(), token) for v in query.get("access_token", ()))


def _ids(events: tuple[Any, ...] | list[Any]) -> str:
    ids = [str(event.get_id()) for event in events[:20]]
    more = f" (+{len(events) - 20} more)" if len(events) > 20 else ""
    return ", ".join(ids) + more


class SinkHandler:
    """A sink's ``POST /``: decode, call ``arrived`` (a plain ``def`` in a worker thread),
    answer: 400 or 415 (the codec's message) for what it cannot read; 202 for an empty
    batch; 200 for ``SUCCESS``; a failed Result's code and message; 500 when ``arrived``
    raises or returns something else (details and event ids go to the log)."""

    def __init__(self, sink: Sink[Any], metrics: Metrics) -> None:
        self._sink = sink
        self._arrived = sink.arrived
        self._is_async = inspect.iscoroutinefunction(self._arrived)
        self._metrics = metrics
        self._log = logging.getLogger("cdk.sink")
        self._received: dict[str, Any] = {}
        # Read by the in-flight gauge when scraped, as the delivery engine's gauges do.
        self._calls = 0
        metrics.handler_in_flight.set_function(lambda: self._calls)

    async def __call__(self, request: Request) -> Response:
        # Decoding counts against the budget: by size before (a burst is refused without
        # being decoded), by the events after.
        size = len(request.body)
        estimate = size * _DECODED_PER_BYTE if size > _SMALL_BODY else 0
        if estimate and not request.reserve(estimate):
            return _BUSY
        try:
            mode, events = from_http(request.headers, request.body)
        except CodecError as exc:
            return text_answer(exc.status, str(exc))
        if not events:
            return _ACCEPTED
        extra = len(events) * _EVENT_BYTES - estimate
        if len(events) > 1 and extra > 0 and not request.reserve(extra):
            return _BUSY
        counter = self._received.get(mode)
        if counter is None:
            counter = self._received.setdefault(mode, self._metrics.received.labels(mode))
        counter.inc(len(events))
        self._calls += 1
        started = time.perf_counter()
        try:
            if tracing.active:
                with tracing.arrived(events, request.headers):
                    result = await call(self._call_sync, request, events, thread=not self._is_async)
            elif self._is_async:
                result = await self._arrived(*events)  # type: ignore[misc]
            else:
                result = await call(self._call_sync, request, events, thread=True)
        except Exception:
            self._log.exception("arrived raised; event ids: %s", _ids(events))
            return text_answer(500, "internal error")
        finally:
            self._calls -= 1
            self._metrics.handler_latency.observe(time.perf_counter() - started)
        if result is _GONE:
            return text_answer(499, "client closed the connection")
        if not isinstance(result, Result):
            self._log.error(
                "%s.arrived returned %r, not a cdk.Result (return cdk.SUCCESS or "
                "cdk.Result(code, message)); event ids: %s",
                type(self._sink).__name__,
                type(result).__name__,
                _ids(events),
            )
            return text_answer(500, "internal error")
        if result.code == 0:
            return _OK
        return text_answer(result.code, result.message)

    def _call_sync(self, request: Request, events: list[Any]) -> Any:
        if request.disconnected:
            # The sender gave up while this waited for a worker thread: it will send again.
            return _GONE
        return self._arrived(*events)
