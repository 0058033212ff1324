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
from cdk.codec import AnyCloudEvent, CodecError, decoded_size, from_http, to_binary
from cdk.connector import SUCCESS, Result, Sink, call
from cdk.http import Handler, HTTPError, HTTPServer, Request, Response, text_answer
from cdk.logs import one_line
from cdk.metrics import CONTENT_TYPE, Tally

if TYPE_CHECKING:
    from cdk.config import ServerConfig
    from cdk.deadletter import DeadLetters
    from cdk.dedupe import Dedupe
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
#: Counted against ``max_bytes_in_flight`` for each event of a batch, beside the body and
#: what decoding it may take (``codec.decoded_size``): its attributes and event object.
_EVENT_BYTES = 1024
_LARGE_BODY = 64 * 1024
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
        self._counted: dict[int, Tally] = {}

    def record_status(self, status: int) -> None:
        """Count an answer, in a tally per status (labels() and inc() are slow)."""
        tally = self._counted.get(status)
        if tally is None:
            child = self._metrics.responses.labels(str(status))
            tally = self._counted[status] = self._metrics.tally(child)
        tally.count += 1

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


def _retried(code: int) -> bool:
    """Whether a sender retries a request answered ``code`` (the statuses a sink answers
    with to have a batch sent again): 408, 429 and every 5xx."""
    return code >= 500 or code in (408, 429)


class SinkHandler:
    """A sink's ``POST /``: decode, call ``arrived`` (a plain ``def`` in a worker thread),
    answer: 400 or 415 (the codec's message) for what it cannot read; 202 for an empty
    batch; 200 for ``SUCCESS``; a failed Result's code and message; 500 when ``arrived``
    raises or returns something else (details and event ids go to the log).

    ``arrived`` may return one Result for all its events, a list of Results (one per event,
    in order), or, called with one event, a CloudEvent: the reply, answered 200 in binary
    mode. With ``dead_letters``, an event refused for good (a 4xx other than 408 and 429)
    or whose ``arrived`` raised goes there and counts as handled; the request is answered
    the first retryable status among its events, else 502 if the dead-letter target failed
    for one, else 2xx. With ``dedupe``, events handled within the window skip ``arrived``."""

    def __init__(
        self,
        sink: Sink[Any],
        metrics: Metrics,
        *,
        dead_letters: DeadLetters | None = None,
        dedupe: Dedupe | None = None,
    ) -> None:
        self._sink = sink
        self._arrived = sink.arrived
        self._is_async = inspect.iscoroutinefunction(self._arrived)
        self._metrics = metrics
        self._log = logging.getLogger("cdk.sink")
        self._received: dict[str, Tally] = {}
        self._dead_letters = dead_letters
        self._dedupe = dedupe
        # Without either, a single Result is the answer: nothing else to settle.
        self._plain = dead_letters is None and dedupe is None
        # Read by the in-flight gauge when scraped, as the delivery engine's gauges do.
        self._calls = 0
        metrics.handler_in_flight.set_function(lambda: self._calls)

    async def __call__(self, request: Request) -> Response:
        # Decoding counts against the budget: what the body may decode into, before (so a
        # burst is refused without being decoded), and a batch's events after. A large
        # body's price takes a pass over it: first, does its size alone fit?
        body = request.body
        counted = len(body) if len(body) > _LARGE_BODY else 0
        if counted and not request.reserve(counted):
            return _BUSY
        if not request.reserve(decoded_size(body) - counted):
            return _BUSY
        try:
            mode, events = from_http(request.headers, body)
        except CodecError as exc:
            return text_answer(exc.status, str(exc))
        if not events:
            return _ACCEPTED
        if len(events) > 1 and not request.reserve(len(events) * _EVENT_BYTES):
            return _BUSY
        tally = self._received.get(mode)
        if tally is None:
            tally = self._received[mode] = self._metrics.tally(self._metrics.received.labels(mode))
        tally.count += len(events)
        if self._dedupe is not None:
            fresh = await self._dedupe.fresh(events)
            if len(fresh) < len(events):
                self._metrics.duplicates.inc(len(events) - len(fresh))
                if not fresh:
                    return _OK
                events = fresh
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
        except Exception as exc:
            self._log.exception("arrived raised; event ids: %s", _ids(events))
            if self._dead_letters is None:
                return text_answer(500, "internal error")
            result = exc
        finally:
            self._calls -= 1
            self._metrics.handler_latency.observe(time.perf_counter() - started)
        if result is _GONE:
            return text_answer(499, "client closed the connection")
        if self._plain and type(result) is Result:
            return _OK if result.code == 0 else text_answer(result.code, result.message)
        return await self._settle(events, result)

    async def _settle(self, events: list[Any], result: Any) -> Response:
        """The answer to ``events`` once each outcome ``arrived`` gave (or the exception it
        raised) is settled: refused ones dead-lettered, handled ones remembered."""
        outcomes, reply = self._outcomes(events, result)
        if outcomes is None:
            return text_answer(500, "internal error")
        raised = isinstance(result, Exception)
        retry: Result | None = None
        refused: Result | None = None
        handled: list[Any] = []
        letters: list[tuple[Any, int, str]] = []
        for event, outcome in zip(events, outcomes, strict=True):
            code = outcome.code
            if code == 0:
                handled.append(event)
            elif _retried(code) and not raised:
                retry = retry or outcome
            elif self._dead_letters is not None:
                letters.append((event, code, outcome.message))
            else:
                refused = refused or outcome
        lost = False
        if letters:
            assert self._dead_letters is not None
            took = await self._dead_letters.send(letters)
            handled += [event for (event, _, _), ok in zip(letters, took, strict=True) if ok]
            lost = not all(took)
        if self._dedupe is not None and handled:
            await self._dedupe.remember(handled)
        if retry is not None:
            return text_answer(retry.code, retry.message)
        if lost:
            # Why is logged by the delivery engine; the sender only needs to send again.
            return text_answer(502, "the dead-letter target failed; send the request again")
        if refused is not None:
            return text_answer(refused.code, refused.message)
        return _OK if reply is None else reply

    def _outcomes(self, events: list[Any], result: Any) -> tuple[list[Result] | None, Any]:
        """(one Result per event, the reply's Response or None); (None, None) for an answer
        ``arrived`` may not give, with a log line that says what it should have been."""
        count = len(events)
        if isinstance(result, Result):
            return [result] * count, None
        if isinstance(result, Exception):
            return [Result(500, one_line(result))] * count, None
        if isinstance(result, list) and all(isinstance(item, Result) for item in result):
            if len(result) == count:
                return result, None
            problem = f"a list of {len(result)} Results for {count} event(s) (one per event)"
        elif isinstance(result, AnyCloudEvent):
            if count == 1:
                try:
                    headers, body = to_binary(result)
                except CodecError as exc:
                    problem = f"a reply that cannot be sent: {exc}"
                else:
                    content_type = headers.pop("content-type", None)
                    return [SUCCESS], Response(200, body, content_type, list(headers.items()))
            else:
                problem = f"an event for {count} events (only a single event can be replied to)"
        else:
            problem = f"{type(result).__name__}, not a cdk.Result"
        self._log.error(
            "%s.arrived returned %s: return cdk.SUCCESS, cdk.Result(code, message), a list "
            "of them (one per event), or a cdk.CloudEvent for one event; event ids: %s",
            type(self._sink).__name__,
            problem,
            _ids(events),
        )
        return None, None

    def _call_sync(self, request: Request, events: list[Any]) -> Any:
        if request.disconnected:
            # The sender gave up while this waited for a worker thread: it will send again.
            return _GONE
        return self._arrived(*events)
