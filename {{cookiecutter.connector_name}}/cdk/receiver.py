"""Receiving: the HTTP application of a sink (or a webhook source) on top of ``cdk.http``.

:class:`Receiver` owns routing, auth, the concurrency cap and the answer counters;
:class:`SinkHandler` is a sink's ``POST /``: decode the CloudEvents, call the user's
``arrived``, turn its :class:`~cdk.connector.Result` into an HTTP answer.

Routes:

==================  ==================================================================
``POST /``          the connector's handler (needs the token when ``auth_token`` is set);
                    with ``any_path=True`` (webhook sources) a POST to any path
``OPTIONS /``       the CloudEvents webhook handshake (``WebHook-Request-Origin`` in,
                    ``WebHook-Allowed-Origin``, ``WebHook-Allowed-Rate`` and ``Allow`` out);
                    with ``any_path=True`` on any path, as the handshake goes to the URL
                    events are sent to
``GET /healthz``    200 while the process serves
``GET /readyz``     200 while :attr:`Receiver.ready` is True (after ``initialize``, until
                    shutdown begins), else 503
``GET /metrics``    Prometheus text format
other method, /     405 with ``Allow: POST, OPTIONS`` (any path with ``any_path=True``)
other path          404
==================  ==================================================================

Auth: with ``auth_token`` set, a POST needs ``Authorization: Bearer <token>`` or
``?access_token=<token>`` (compared in constant time), else 401 with
``WWW-Authenticate: Bearer``. Health, readiness, metrics and OPTIONS need no token.
Route, method, token, content coding (415 but for ``identity``: compressed bodies are not
decoded) and capacity are checked on the head: a refused request's body is never read
(nor asked for with ``100 Continue``), so refusals cost no memory.

Concurrency cap: at most ``max_concurrency`` POSTs are handled at once. Beyond that the
receiver answers **429 with ``Retry-After: 1`` instead of queueing**: a queue would hide
overload from the sender while holding its connection and memory, whereas 429 with
``Retry-After`` is what the CloudEvents webhook spec prescribes and what Knative and
the cdk's own delivery retry on. Over-capacity requests cost the server almost nothing.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cdk.codec import CodecError, from_http
from cdk.connector import Result, Sink
from cdk.http import Handler, HTTPError, HTTPServer, Request, Response
from cdk.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from prometheus_client import Counter

    from cdk.config import ServerConfig
    from cdk.metrics import Metrics

__all__ = ["RETRY_AFTER", "ReadyCheck", "Receiver", "SinkHandler"]

#: What ``Receiver(ready_check=...)`` takes: the connector's ``ready`` hook, plain or async.
ReadyCheck = Callable[[], bool | Awaitable[bool]]

#: Seconds a client is asked to wait (``Retry-After``) when the concurrency cap is reached.
RETRY_AFTER = 1

_READY_TIMEOUT = 5.0
_POST_ALLOW = "POST, OPTIONS"
_READ_ALLOW = "GET, HEAD"
_READ_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})


#: What decoding is counted as against ``max_bytes_in_flight``, beside the body itself:
#: about what a small event takes in memory, and (estimated before decoding a body over
#: ``_SMALL_BODY``) what JSON takes as Python objects per byte.
_EVENT_BYTES = 1024
_DECODED_PER_BYTE = 3
_SMALL_BODY = 64 * 1024
_GONE = object()  # what _call_sync returns for a sender that is gone

# Shared answers of the hot path (answers are never mutated once returned).
_OK = Response(200)
_ACCEPTED = Response(202)
_BUSY = Response(503, b"busy: too many events in progress", headers=[("retry-after", "1")])


def _text(status: int, text: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, text.encode("utf-8"), headers=headers or [])


class _StatusCounter:
    """Counts answers by status, caching one prometheus child per status (labels() is slow)."""

    __slots__ = ("_children", "_counter")

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self._children: dict[int, Any] = {}

    def __call__(self, status: int) -> None:
        child = self._children.get(status)
        if child is None:
            child = self._children.setdefault(status, self._counter.labels(str(status)))
        child.inc()


class Receiver:
    """Routes requests to the POST handler, health, readiness and metrics; see the module doc.

    :meth:`handle` is an HTTP :data:`~cdk.http.Handler`; :meth:`http_server` builds the
    server for it, which also counts the answers the server makes itself.
    """

    def __init__(
        self,
        post: Handler,
        config: ServerConfig,
        metrics: Metrics,
        logger: logging.Logger | None = None,
        *,
        any_path: bool = False,
        ready_check: ReadyCheck | None = None,
    ) -> None:
        """``ready_check`` (a plain ``def`` runs in a worker thread) is asked on each
        ``GET /readyz`` while :attr:`ready`: False, raising or taking longer than 5 s
        answers 503 with a short reason; one check at a time serves concurrent probes."""
        self.ready = False
        self._ready_check = ready_check
        self._checking: asyncio.Future[Response] | None = None
        self._was_ready = True
        self._config = config
        self._post = post
        # A webhook source takes POSTs on any path (make_event sees request.path);
        # a sink only on "/".
        self._any_path = any_path
        self._metrics = metrics
        self._log = logger or logging.getLogger("cdk.receiver")
        secret = config.auth_token.get_secret_value() if config.auth_token is not None else ""
        self._token: bytes | None = secret.encode("utf-8") if secret else None
        self._max_concurrency = config.max_concurrency
        self._in_flight = 0
        self.record_status = _StatusCounter(metrics.responses)

    @property
    def in_flight(self) -> int:
        """POST requests being handled right now."""
        return self._in_flight

    def http_server(self, logger: logging.Logger | None = None) -> HTTPServer:
        """The server for this receiver, with the config's limits; requests with a body are
        refused on their head (route, method, token, capacity) before it is read."""
        config = self._config
        return HTTPServer(
            self.handle,
            host=config.host,
            port=config.port,
            max_body_bytes=config.max_body_bytes,
            max_header_bytes=config.max_header_bytes,
            read_timeout=config.read_timeout,
            keepalive_timeout=config.keepalive_timeout,
            max_bytes_in_flight=config.max_bytes_in_flight,
            check_head=self._refusal,
            on_reject=self.record_status,
            logger=logger,
            access_log=config.access_log,
        )

    async def handle(self, request: Request) -> Response:
        """Answer one request and count the answer."""
        refusal = self._refusal(request)
        if refusal is not None:
            response = refusal
        elif request.method != "POST":
            response = await self._read(request)
        else:
            # The POST handler is awaited right here, not in a helper coroutine: this is
            # the path of every event, and each coroutine layer costs on every request.
            self._in_flight += 1
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
                response = _text(500, "internal error")
            finally:
                self._in_flight -= 1
        self.record_status(response.status)
        return response

    def _refusal(self, request: Request) -> Response | None:
        """The answer refusing ``request`` on its head alone (route, method, token,
        capacity), or None when it is to be served."""
        path = request.path
        method = request.method
        if path in _READ_ROUTES:
            if method in ("GET", "HEAD"):
                return None
            return _text(405, "method not allowed", [("allow", _READ_ALLOW)])
        if path != "/" and not self._any_path:
            return _text(404, "not found")
        if method != "POST":
            if method == "OPTIONS":
                return None
            # With any_path every path takes POSTs, so every path is a delivery target:
            # the webhook handshake goes to that same URL, and other methods get 405.
            return _text(405, "method not allowed; POST CloudEvents here", [("allow", _POST_ALLOW)])
        if self._token is not None and not self._authorized(request):
            return _text(
                401,
                "missing or wrong bearer token",
                [("www-authenticate", 'Bearer realm="connector"')],
            )
        encoding = request.headers.get("content-encoding")
        if encoding is not None and encoding.lower() != "identity":
            # Not decoded: no sender of events compresses, and a small gzip body can
            # inflate far past max_body_bytes.
            return _text(415, "send the body uncompressed", [("accept-encoding", "identity")])
        if self._in_flight >= self._max_concurrency:
            return _text(429, "too many requests in progress", [("retry-after", str(RETRY_AFTER))])
        return None

    async def _read(self, request: Request) -> Response:
        """What a GET, HEAD or OPTIONS that passed ``_refusal`` is answered."""
        path = request.path
        if path == "/healthz":
            return _text(200, "ok")
        if path == "/readyz":
            if not self.ready:
                return _text(503, "not ready")
            if self._ready_check is None:
                return _text(200, "ready")
            if self._checking is None or self._checking.done():
                self._checking = asyncio.ensure_future(self._check_ready(self._ready_check))
            return await asyncio.shield(self._checking)
        if path == "/metrics":
            return Response(200, self._metrics.render(), CONTENT_TYPE)
        return self._options(request)

    async def _check_ready(self, check: ReadyCheck) -> Response:
        try:
            if inspect.iscoroutinefunction(check):
                result = await asyncio.wait_for(check(), _READY_TIMEOUT)
            else:
                loop = asyncio.get_running_loop()
                result = await asyncio.wait_for(loop.run_in_executor(None, check), _READY_TIMEOUT)
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, _READY_TIMEOUT)
            reason = detail = "" if result else "the connector reports it is not ready"
        except TimeoutError:
            reason = detail = f"the readiness check took more than {_READY_TIMEOUT:g} s"
        except Exception as exc:
            # The probe needs no token: the error's text goes to the log only.
            reason = f"the readiness check raised {type(exc).__name__}"
            detail = self._config.redact(f"{reason}: {exc}")
        ready = not reason
        if ready != self._was_ready:  # logged when it changes, not on every probe
            self._was_ready = ready
            if ready:
                self._log.info("ready again")
            else:
                self._log.warning("not ready: %s", detail)
        return _text(200, "ready") if ready else _text(503, f"not ready: {reason}")

    def _options(self, request: Request) -> Response:
        origin = request.headers.get("webhook-request-origin")
        if origin is None:
            return Response(200, headers=[("allow", _POST_ALLOW)])
        return Response(
            200,
            headers=[
                ("allow", "POST"),
                ("webhook-allowed-origin", origin.strip() or "*"),
                ("webhook-allowed-rate", "*"),
            ],
        )

    def _authorized(self, request: Request) -> bool:
        token = self._token
        assert token is not None
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, credentials = header.strip().partition(" ")
            # Header values arrive decoded as latin-1: encoding back gives the raw bytes.
            if scheme.lower() == "bearer" and hmac.compare_digest(
                credentials.strip().encode("latin-1"), token
            ):
                return True
        if "access_token" in request.query:
            for value in request.query_params().get("access_token", ()):
                if hmac.compare_digest(value.encode("utf-8"), token):
                    return True
        return False


def _ids(events: tuple[Any, ...] | list[Any]) -> str:
    ids = [str(event.get_id()) for event in events[:20]]
    more = f" (+{len(events) - 20} more)" if len(events) > 20 else ""
    return ", ".join(ids) + more


class SinkHandler:
    """A sink's ``POST /``: decode, call ``arrived`` (a plain ``def`` in a worker thread),
    and answer.

    ======================================  ====================================
    what happened                           answer
    ======================================  ====================================
    not a valid CloudEvent                  400, the codec's message
    unsupported event format or charset     415, the codec's message
    an empty batch                          202; ``arrived`` is not called
    ``arrived`` returned ``SUCCESS``        200
    ``arrived`` returned a failed Result    its code, its message as the body
    ``arrived`` raised                      500 ``internal error`` (traceback and event ids
                                            go to the log, never to the client)
    ``arrived`` returned something else     500, logged as a programming error
    ======================================  ====================================
    """

    def __init__(self, sink: Sink, metrics: Metrics, logger: logging.Logger | None = None) -> None:
        self._sink = sink
        self._arrived = sink.arrived
        self._is_async = inspect.iscoroutinefunction(self._arrived)
        self._metrics = metrics
        self._log = logger or logging.getLogger("cdk.sink")
        self._received: dict[str, Any] = {}
        # The in-flight gauge reads this count when scraped, as the delivery engine's
        # gauges do, rather than being raised and lowered around every call.
        self._calls = 0
        metrics.handler_in_flight.set_function(lambda: self._calls)

    async def __call__(self, request: Request) -> Response:
        # What decoding will take is counted against the server's budget: before, by the
        # body's size (so a burst is refused without decoding it), then by the events.
        size = len(request.body)
        estimate = size * _DECODED_PER_BYTE if size > _SMALL_BODY else 0
        if estimate and not request.reserve(estimate):
            return _BUSY
        try:
            mode, events = from_http(request.headers, request.body)
        except CodecError as exc:
            return _text(exc.status, str(exc))
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
            if self._is_async:
                result = await self._arrived(*events)  # type: ignore[misc]
            else:
                loop = asyncio.get_running_loop()
                result = await loop.run_in_executor(None, self._call_sync, request, events)
                if inspect.isawaitable(result):
                    # A plain def that returned an awaitable: finish it here, on the loop.
                    result = await result
        except Exception:
            self._log.exception("arrived raised; event ids: %s", _ids(events))
            return _text(500, "internal error")
        finally:
            self._calls -= 1
            self._metrics.handler_latency.observe(time.perf_counter() - started)
        if result is _GONE:
            return _text(499, "client closed the connection")
        if not isinstance(result, Result):
            self._log.error(
                "%s.arrived returned %r, not a cdk.Result (return cdk.SUCCESS or "
                "cdk.Result(code, message)); event ids: %s",
                type(self._sink).__name__,
                type(result).__name__,
                _ids(events),
            )
            return _text(500, "internal error")
        if result.code == 0:
            return _OK
        return _text(result.code, result.message)

    def _call_sync(self, request: Request, events: list[Any]) -> Any:
        if request.disconnected:
            # The sender gave up while this waited for a worker thread: it will send again.
            return _GONE
        return self._arrived(*events)
