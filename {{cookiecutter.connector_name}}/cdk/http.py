"""HTTP/1.1 server: an asyncio Protocol driving the ``httptools`` (llhttp) parser directly.

This module owns the wire-level HTTP work of a receiver: parsing, keep-alive, pipelining,
chunked request bodies, ``Expect: 100-continue``, size limits, timeouts, connection
limits and graceful shutdown. It knows nothing about CloudEvents; the application is one
async :data:`Handler` that maps a :class:`Request` to a :class:`Response`.

Why not a framework: a Protocol on top of httptools answers several times more requests
per second than an ASGI server on the same parser, and a receiver's cost is dominated by
that per-request overhead. The hot path therefore avoids per-request closures and timers,
builds each answer in one join and hands it to ``transport.write`` once.

Behaviour, as clients see it:

- Keep-alive by default for HTTP/1.1, and for HTTP/1.0 with ``Connection: keep-alive``.
  Pipelined requests are answered in order; while a request is being handled, or while
  the client is not reading its answers, reading from that connection is paused, so one
  client cannot queue unbounded work.
- Limits answer and then close the connection: a request head over ``max_header_bytes``
  gets 431, a body over ``max_body_bytes`` gets 413 as soon as ``Content-Length`` or the
  running total of a chunked body says so (``Expect: 100-continue`` with a declared length
  over the limit gets 413 instead of ``100 Continue``), a request that is not valid HTTP
  gets 400, as do (like Go's server) a request line without a version or with repeated
  spaces, an HTTP/1.1 request without exactly one valid ``Host`` and HTTP/1.0 with
  ``Transfer-Encoding``; HTTP/2.0 gets 505. A transfer coding other than ``chunked``
  gets 501 and an ``Expect`` other than ``100-continue`` gets 417. After a refusal the
  server reads and drops what the client still sends for a while (see ``_LINGER_*``).
  A client that takes longer than ``read_timeout`` to send a whole request gets
  408; an idle keep-alive connection is closed after ``keepalive_timeout``; a client that
  stops reading its answers is dropped after ``read_timeout``. Beyond ``max_connections``
  (lowered to fit the process's open-file limit) the keep-alive connection idle longest is
  closed to make room; when none is idle, a new connection gets 503 with ``Retry-After``.
- The server never switches protocols: ``Upgrade`` (h2c, websocket) is ignored, as RFC
  9110, 7.8 allows, and the request is read and answered as HTTP/1.1; CONNECT gets 501.
- A handler raising :class:`HTTPError` answers with its status and message; any other
  exception answers 500 with a generic body (the traceback goes to the log only).

Each request is handled in its own Task, started with a fresh copy of the context
:meth:`HTTPServer.start` ran in: what one request's handler sets in a context variable is
never seen by the next one on the same connection.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import functools
import logging
import math
import resource
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, NoReturn, cast
from urllib.parse import parse_qs, unquote

import httptools
import orjson

__all__ = ["HTTPError", "HTTPServer", "Handler", "Request", "Response"]

_LOG = logging.getLogger("cdk.http")
_ACCESS = logging.getLogger("cdk.access")
#: Refusals logged (at INFO, at most ``_REFUSALS_LOGGED`` lines a second), whether the
#: server or the application made them; 404 and 405 are not news.
_LOGGED_REFUSALS = frozenset({400, 401, 408, 413, 415, 417, 429, 431, 501, 503, 505})
_REFUSALS_LOGGED = 10

_TEXT = "text/plain; charset=utf-8"
_REASONS: dict[int, str] = {status.value: status.phrase for status in HTTPStatus}
_CONTINUE_ANSWER = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Statuses whose answers carry neither a body nor Content-Length (RFC 9110, 8.6).
_NO_BODY_STATUSES = frozenset({204, 304})
#: After refusing a request the server half-closes, then reads and drops what the client
#: still sends, as nginx does (30 s at most, 5 s between reads, here also 64 MiB at most):
#: closing with unread data resets the connection, and the client that writes its whole
#: body before reading (Python's http.client) would lose the answer.
_LINGER_SECONDS = 30.0
_LINGER_IDLE = 5.0
_LINGER_BYTES = 64 << 20
#: After a burst of requests holding this much, the server asks the allocator to return
#: free memory to the system (``malloc_trim``, where the C library has it).
_TRIM_AFTER = 16 << 20
#: File descriptors kept free beside the connections: the listening socket, the 503 answer
#: to one connection too many, logs, the application's own files and sockets.
_FD_RESERVE = 64


@dataclass(slots=True)
class Request:
    """One HTTP request. Header names are lower-case; repeated headers are joined by ", "."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    client: tuple[str, int] | None = None
    _conn: _Connection | None = field(default=None, repr=False, compare=False)
    _held: int = field(default=0, repr=False, compare=False)
    _began: float = field(default=0.0, repr=False, compare=False)

    @property
    def disconnected(self) -> bool:
        """True once the client closed the connection (or its sending side, which clients
        do when they give up, as Go's server also takes it): skip work nobody waits for."""
        conn = self._conn
        return conn is not None and (conn.state != _OPEN or conn.reading == _EOF)

    def reserve(self, nbytes: int) -> bool:
        """Count ``nbytes`` more (say, for what was decoded from the body) against the
        server's ``max_bytes_in_flight`` until this request is answered. False, and nothing
        counted, when that would pass the budget while other requests hold part of it."""
        return self._conn is None or self._conn.server.reserve(self, nbytes)

    def query_params(self) -> dict[str, list[str]]:
        """The query string decoded into name -> values (blank values kept)."""
        return parse_qs(self.query, keep_blank_values=True)

    def json(self) -> Any:
        """The body parsed as JSON; a body that is not JSON raises ``HTTPError(400)``."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}") from None


@dataclass(slots=True)
class Response:
    """An answer. ``content_type`` is sent only with a non-empty body."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = _TEXT
    headers: list[tuple[str, str]] = field(default_factory=list)


class HTTPError(Exception):
    """Raised by a handler to answer with ``status``, ``message`` as the body and ``headers``."""

    def __init__(
        self,
        status: int,
        message: str = "",
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        self.status = status
        self.message = message or _REASONS.get(status, "error")
        if headers is None:
            self.headers: list[tuple[str, str]] = []
        elif isinstance(headers, Mapping):
            self.headers = list(headers.items())
        else:
            self.headers = list(headers)
        super().__init__(status, self.message)

    def __str__(self) -> str:
        return f"{self.status} {self.message}"

    def to_response(self) -> Response:
        """The answer this error stands for."""
        return Response(self.status, self.message.encode("utf-8"), _TEXT, list(self.headers))


Handler = Callable[[Request], Awaitable[Response]]

_HEAD_CACHE: dict[tuple[int, bool, bool], bytes] = {}


def _status_line(status: int) -> str:
    return f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"


def encode_response(
    response: Response, keep_alive: bool = True, http10: bool = False, head: bool = False
) -> bytes:
    """The bytes of ``response`` on the wire, head and body joined.

    ``keep_alive`` False adds ``Connection: close``; an HTTP/1.0 client that asked for
    keep-alive gets ``Connection: keep-alive``; ``head`` leaves the body out.
    """
    status = response.status
    body = response.body
    headers = response.headers
    if not body and not headers:
        # The common answers (200/202 with nothing to say) are cached whole.
        key = (status, keep_alive, http10)
        cached = _HEAD_CACHE.get(key)
        if cached is None:
            cached = _HEAD_CACHE.setdefault(
                key, _encode_head(status, b"", None, (), keep_alive, http10)
            )
        return cached
    data = _encode_head(status, body, response.content_type, headers, keep_alive, http10)
    if body and not head and status not in _NO_BODY_STATUSES:
        return data + body
    return data


def _encode_head(
    status: int,
    body: bytes,
    content_type: str | None,
    headers: Iterable[tuple[str, str]],
    keep_alive: bool,
    http10: bool,
) -> bytes:
    parts = [_status_line(status)]
    if status not in _NO_BODY_STATUSES and status >= 200:
        if body and content_type:
            parts.append(f"content-type: {content_type}\r\n")
        parts.append(f"content-length: {len(body)}\r\n")
    for name, value in headers:
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"response header {name!r} contains a line break")
        parts.append(f"{name}: {value}\r\n")
    if not keep_alive:
        parts.append("connection: close\r\n")
    elif http10:
        parts.append("connection: keep-alive\r\n")
    parts.append("\r\n")
    return "".join(parts).encode("latin-1")


def _refusal(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, message.encode("utf-8"), headers=headers or [])


def _escaped(text: str) -> str:
    # For a log line: "%0d%0a" decoded in a path must not start a forged line.
    return text.encode("unicode_escape").decode("ascii")


def _shown(request: Request) -> str:
    return f"{request.method} {_escaped(request.path)}"


_INTERNAL_ERROR = Response(500, b"internal error")
_BUSY = _refusal(503, "busy: requests in progress hold too much; retry", [("retry-after", "1")])


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing; the reason is on the connection."""


# What the reading side of a connection is doing (``_Connection.reading``).
_NEW = 0  # no request yet
_IDLE = 1  # between requests (keep-alive)
_HEAD = 2  # a request line and headers arriving
_TRAILER = 3  # a chunk-size line or the trailers: buffered by httptools like a head
_BODY = 4  # the body arriving (or none to come)
_CONTINUE = 5  # the client waits for a 100 Continue, owed once the answers before are out
_UPGRADE = 6  # the head asked for an upgrade: it is read again without (_without_upgrade)
_DONE = 7  # no more requests are read: one was refused
_EOF = 8  # no more requests are read: the client half-closed (Request.disconnected)
_LINGER = 9  # after refusing: what the client still sends is read and dropped, briefly

# Where a connection is in its life (``_Connection.state``).
_OPEN = 0
_CLOSED = 1  # closed or aborted here; connection_lost is still to come
_LOST = 2  # connection_lost came: the server forgets it once no handler runs


class _Connection(asyncio.Protocol):
    """One client connection: feeds the parser, queues whole requests, answers them in order.

    Three things are tracked apart, as in uvicorn: the connection's life (``state``), the
    request being read (``reading`` and the fields of the message), and flow control
    (``read_paused`` while answers are due, ``write_paused`` while the client does not
    read). A handler runs while ``task`` is set. A ``queue`` item is ``(request,
    keep_alive, http10, canned)``: ``canned`` is a finished refusal (then ``request`` is
    None), written once the answers before it went out. One ``deadline`` at a time; what
    passing it means follows from the state (see :meth:`expire`).
    """

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client: tuple[str, int] | None = None
        self.queue: deque[tuple[Request | None, bool, bool, bytes]] = deque()
        self.deadline = math.inf
        self.task: asyncio.Task[None] | None = None
        self.state = _OPEN
        self.reading = _NEW
        self.read_paused = False
        self.write_paused = False
        self._linger_bytes = 0
        self._linger_end = 0.0
        self._reject: Response | None = None
        # The message being read.
        self._url = b""
        self._headers: dict[str, str] = {}
        self._request: Request | None = None
        self._head_bytes = 0
        self._head_raw = 0
        self._head_fresh = False
        self._body: list[bytes] = []
        self._body_len = 0
        self._version = "1.1"

    @property
    def in_message(self) -> bool:
        return _HEAD <= self.reading <= _UPGRADE

    # -- transport events -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as such.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        server = self.server
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        if server.draining:
            self.state = _CLOSED
            transport.abort()
            return
        if len(server.connections) >= server.max_connections and not server.make_room():
            self.state = _CLOSED
            # Senders retry a 503 and honour Retry-After (Knative, the cdk's own client).
            refusal = _refusal(503, "too many connections", [("retry-after", "1")])
            transport.write(self._refused(refusal))
            transport.close()
            return
        server.connections.add(self)
        # A fresh connection must start its request promptly.
        self.deadline = self.loop.time() + min(server.read_timeout, server.keepalive_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _LOST
        self._drop()
        self.deadline = math.inf
        if self.task is None:
            self.server.forget(self)

    def pause_writing(self) -> None:
        self.write_paused = True
        self.deadline = self.loop.time() + self.server.read_timeout

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.reading == _LINGER:
            return
        self.deadline = math.inf
        if self.task is None:
            self._next()

    def data_received(self, data: bytes) -> None:
        if self.state != _OPEN:
            return
        if self.reading >= _DONE:
            if self.reading == _LINGER:
                self._linger_bytes += len(data)
                if self._linger_bytes > _LINGER_BYTES:
                    self._close(abort=True)
                else:
                    self.deadline = min(self._linger_end, self._linger_deadline())
            return
        self._head_fresh = False
        try:
            # llhttp skips repeated spaces in a request line, which Go's server refuses as
            # malformed: checked on the line a read begins with.
            if self.reading <= _IDLE and data.find(b"  ", 0, data.find(b"\n")) >= 0:
                self._stop(400, "malformed request line")
            while True:
                try:
                    self.parser.feed_data(data)
                    break
                except httptools.HttpParserUpgrade as exc:
                    data = self._without_upgrade(data[exc.args[0] :])
        except (httptools.HttpParserError, _Stop) as exc:
            reject = self._reject
            if reject is None:
                # httptools turns an exception raised in a callback into a parser error,
                # with the original as its context: that is a fault here, not the client's.
                cause = exc.__context__
                if cause is not None and not isinstance(cause, _Stop):
                    self.server.logger.error("failed to read a request", exc_info=cause)
                    reject = _refusal(500, "internal error")
                else:
                    reject = _refusal(400, "malformed HTTP request")
            self._reject_request(reject)
        else:
            if _HEAD <= self.reading <= _TRAILER:
                if not self._head_fresh:
                    # The whole chunk belongs to a head (or trailers) begun earlier and
                    # still unfinished. httptools buffers a header line until it ends, so
                    # raw bytes count too: one endless header line must not grow memory
                    # without limit.
                    self._head_raw += len(data)
                limit = self.server.max_header_bytes
                if self._head_raw > limit or self._head_bytes + len(self._url) > limit:
                    self._reject_request(_refusal(431, "request header fields too large"))
        if self.task is None and self.queue:
            self._next()
        if (
            (self.task is not None or self.write_paused)
            and (self.queue or self.in_message)
            and not self.read_paused
            and self.state == _OPEN
        ):
            # More arrived while a request is being handled or while its answer cannot be
            # sent yet (pipelining): stop reading until the answers are out, so one client
            # cannot queue unbounded work.
            self.read_paused = True
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        # The client half-closed: answer what was received, then close.
        self.reading = _EOF
        if self.task is None and not self.queue:
            self._close()
        return True

    # -- parser callbacks (called by httptools from feed_data) ------------------------

    def on_message_begin(self) -> None:
        self.reading = _HEAD
        self._url = b""
        self._headers = {}
        self._head_bytes = 0
        self._head_raw = 0
        self._head_fresh = True
        self._body = []
        self._body_len = 0
        if self.task is None and not self.queue and not self.write_paused:
            self.deadline = self.loop.time() + self.server.read_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # The size limit is checked once per read and at the end of the head, not here:
        # this runs for every header of every request. Each line costs at least 4 bytes
        # beyond its name and value (": ", CRLF), counted here so that a name repeated
        # thousands of times counts as many lines, not one.
        self._head_bytes += len(name) + len(value) + 4
        if self.reading != _HEAD:
            self._on_trailer()
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        if key in headers:
            headers[key] = f"{headers[key]}, {text}"
        else:
            headers[key] = text

    def _on_trailer(self) -> None:
        # Fields after a chunked body are dropped, not merged into the headers (RFC 9110,
        # 6.5.1): the application decided on the head alone, and an Authorization or a
        # Content-Type arriving after the body must not override what it checked. They
        # still count toward the head limit, as they are held in memory until parsed.
        if self._head_bytes + len(self._url) > self.server.max_header_bytes:
            self._stop(431, "request header fields too large")

    def on_headers_complete(self) -> None:
        parser = self.parser
        if parser.should_upgrade():
            if parser.get_method() == b"CONNECT":
                self._stop(501, "CONNECT is not supported")
            # httptools then skips the body and stops after the head; the head is checked
            # once, when _without_upgrade has it parsed again.
            self.reading = _UPGRADE
            return
        self.reading = _BODY
        headers = self._headers
        server = self.server
        version = self._version = parser.get_http_version()
        if version != "1.1":
            # llhttp takes a request line without a version as HTTP/0.9, and HTTP/2.0.
            if version == "2.0":
                self._stop(505, "only HTTP/1.1 and HTTP/1.0 are supported")
            if version != "1.0":
                self._stop(400, "malformed request line")
        if self._head_bytes + len(self._url) > server.max_header_bytes:
            self._stop(431, "request header fields too large")
        host = headers.get("host")
        if host is None:
            if version == "1.1":
                # RFC 9112, 3.2: an HTTP/1.1 request without Host, or with more than one, gets
                # 400. Repeats are joined by ", " above, and no valid host has a comma.
                self._stop(400, "a Host header is required")
        elif "," in host or " " in host or not (host.isascii() and host.isprintable()):
            self._stop(400, "exactly one valid Host header is required")
        declared = 0
        length = headers.get("content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                self._stop(400, "bad Content-Length")
            if declared > server.max_body_bytes:
                self._stop(413, "request body too large")
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if version == "1.0":
                # RFC 9112, 6.1: framing an HTTP/1.0 message so is faulty: refuse and close.
                self._stop(400, "Transfer-Encoding is not allowed in HTTP/1.0")
            if coding.lower() != "chunked":
                # llhttp accepts codings before a final "chunked" and undoes only that one:
                # the body would reach the handler still compressed. RFC 9112, 6.1: 501.
                self._stop(501, "only the chunked transfer coding is supported")
        expect = headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            # RFC 9110, 10.1.1: an expectation the server cannot meet gets 417.
            self._stop(417, "only Expect: 100-continue is supported")
        request = self._request = self._make_request()
        if server.check_head is not None and (declared or coding is not None):
            # Refused before a byte of the body is read or asked for (100 Continue).
            self._reject = server.check_head(request)
            if self._reject is not None:
                raise _Stop
        if declared and not server.reserve(request, declared):
            self._reject = _BUSY
            raise _Stop
        if expect is not None and version == "1.1":
            # An HTTP/1.0 client cannot understand 100 Continue: its expectation is ignored.
            if self.task is not None or self.queue:
                self.reading = _CONTINUE
            else:
                assert self.transport is not None
                self.transport.write(_CONTINUE_ANSWER)

    def _stop(self, status: int, message: str) -> NoReturn:
        self._reject = _refusal(status, message)
        raise _Stop

    def _make_request(self) -> Request:
        url = self._url
        if url[:1] == b"/":
            if b"#" in url:
                # Clients do not send fragments, but llhttp lets them through.
                url = url.partition(b"#")[0]
            raw_path, _, raw_query = url.partition(b"?")
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raw_path, raw_query = url, b""
            else:
                raw_path, raw_query = parsed.path or b"/", parsed.query or b""
        path = raw_path.decode("latin-1")
        if "%" in path:
            path = unquote(path)
        method = self.parser.get_method().decode("ascii")
        query = raw_query.decode("latin-1")
        request = Request(method, path, query, self._headers, b"", self.client, self)
        if self.server.access_log:
            request._began = self.loop.time()
        return request

    def on_chunk_header(self) -> None:
        # After the last chunk's size line come the trailers, buffered by httptools like
        # header lines: count their raw bytes as a head's until on_chunk_complete. After
        # any other size line, the chunk's data follows and on_body stops the count.
        self.reading = _TRAILER
        self._head_fresh = True

    def on_chunk_complete(self) -> None:
        self.reading = _BODY

    def on_body(self, body: bytes) -> None:
        self.reading = _BODY
        length = self._body_len = self._body_len + len(body)
        server = self.server
        if length > server.max_body_bytes:
            self._stop(413, "request body too large")
        request = self._request
        assert request is not None
        # A chunked body is counted against the budget as it comes.
        if length > request._held and not server.reserve(request, length - request._held):
            self._reject = _BUSY
            raise _Stop
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self.reading == _UPGRADE:
            return
        self.reading = _IDLE
        request = self._request
        assert request is not None
        self._request = None
        body = self._body
        if body:
            request.body = body[0] if len(body) == 1 else b"".join(body)
            self._body = []
        parser = self.parser
        self.queue.append((request, parser.should_keep_alive(), self._version == "1.0", b""))

    def _without_upgrade(self, rest: bytes) -> bytes:
        """The head of the request that asked for an upgrade, without ``Upgrade``, + ``rest``.

        The server never switches protocols (RFC 9110, 7.8 lets it ignore the header):
        Java's HttpClient and ``curl --http2`` ask for h2c on requests with a body, and
        that body, then any pipelined request, must be read as HTTP/1.1. A fresh parser
        reads the head again without the header, so the body is framed as usual.
        """
        parser = self.parser
        version = parser.get_http_version().encode()
        lines = [b"%s %s HTTP/%s\r\n" % (parser.get_method(), self._url, version)]
        lines += [
            f"{name}: {value}\r\n".encode("latin-1")
            for name, value in self._headers.items()
            if name != "upgrade"
        ]
        self.parser = httptools.HttpRequestParser(self)
        return b"".join(lines) + b"\r\n" + rest

    # -- answering ----------------------------------------------------------------------

    def _reject_request(self, refusal: Response) -> None:
        """Queue a refusal after the answers already due, and stop reading requests."""
        self.reading = _DONE
        self._reject = None
        self.queue.append((None, False, False, self._refused(refusal)))
        if self._request is not None:
            self.server.release(self._request)
            self._request = None

    def _refused(self, refusal: Response) -> bytes:
        """The bytes of a refusal the server makes itself, counted and logged."""
        server = self.server
        data = encode_response(refusal, keep_alive=False)
        if server.on_reject is not None:
            try:
                server.on_reject(refusal.status)
            except Exception:
                server.logger.exception("on_reject callback failed")
        if refusal.status in _LOGGED_REFUSALS:
            server.log_refusal(self._request, refusal, self.client)
        if server.access_log:
            server.log_access(self._request, refusal.status, len(data), self.client)
        return data

    def _next(self) -> None:
        """Start the next queued request, or go back to reading when there is none."""
        if self.state != _OPEN or self.task is not None or self.write_paused:
            return
        queue = self.queue
        if queue:
            request, keep_alive, http10, canned = queue.popleft()
            if request is None:
                self._write_and_linger(canned)
                return
            self.deadline = math.inf
            # A Task per request, even for handlers that never wait: running those right
            # here would save the Task, but then every answer is written on its own
            # instead of together with the others due in this pass of the loop, and
            # waking the clients one write at a time costs more than the Task saves.
            # The Task runs in a fresh copy of the server's context: this may be called
            # from the Task of the request before, whose context is not this one's.
            self.task = self.loop.create_task(
                self._respond(request, keep_alive, http10), context=self.server.context.copy()
            )
            return
        in_message = _HEAD <= self.reading <= _UPGRADE
        if self.reading >= _DONE or (self.server.draining and not in_message):
            self._close()
            return
        if self.read_paused:
            self.read_paused = False
            assert self.transport is not None
            self.transport.resume_reading()
        if in_message:
            if self.reading == _CONTINUE:
                self.reading = _BODY
                assert self.transport is not None
                self.transport.write(_CONTINUE_ANSWER)
            self.deadline = self.loop.time() + self.server.read_timeout
        else:
            self.deadline = self.loop.time() + self.server.keepalive_timeout

    async def _respond(self, request: Request, keep_alive: bool, http10: bool) -> None:
        server = self.server
        try:
            response = await server.handler(request)
            if not isinstance(response, Response):
                raise TypeError(f"handler returned {type(response).__name__}, not a Response")
        except HTTPError as exc:
            response = exc.to_response()
        except asyncio.CancelledError:
            self._handled(request)
            raise
        except Exception:
            server.logger.exception("handler failed on %s", _shown(request))
            response = _INTERNAL_ERROR
        self._handled(request)
        if self.state != _OPEN:
            return  # dropped while the handler ran (client gone, or it stopped reading)
        if server.draining or (self.reading >= _DONE and not self.queue):
            keep_alive = False
        head = request.method == "HEAD"
        try:
            data = encode_response(response, keep_alive, http10, head)
        except (ValueError, UnicodeError):
            server.logger.exception("handler answer cannot be sent on %s", _shown(request))
            data = encode_response(_INTERNAL_ERROR, keep_alive, http10, head)
        assert self.transport is not None
        self.transport.write(data)
        if response.status in _LOGGED_REFUSALS:
            server.log_refusal(request, response, self.client)
        if server.access_log:
            server.log_access(request, response.status, len(data), self.client)
        if keep_alive:
            self._next()
        else:
            self._close()

    def _handled(self, request: Request) -> None:
        self.task = None
        if request._held:
            self.server.release(request)
        if self.state == _LOST:
            self.server.forget(self)

    def _drop(self) -> None:
        """Forget the requests not handled yet, and what they held of the budget."""
        for request, *_ in self.queue:
            if request is not None:
                self.server.release(request)
        self.queue.clear()
        if self._request is not None:
            self.server.release(self._request)
            self._request = None

    def _write_and_linger(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        transport.write(data)
        self._drop()
        if not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        self.reading = _LINGER
        self._linger_end = self.loop.time() + _LINGER_SECONDS
        self.deadline = self._linger_deadline()
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()

    def _linger_deadline(self) -> float:
        return self.loop.time() + min(_LINGER_IDLE, self.server.read_timeout)

    def _close(self, abort: bool = False) -> None:
        """Close once what is written went out, or with ``abort`` drop the connection now."""
        if self.state == _OPEN:
            self.state = _CLOSED
        elif not abort:
            return
        self.deadline = math.inf
        self._drop()
        assert self.transport is not None
        if abort:
            self.transport.abort()
        else:
            self.transport.close()

    # -- server-driven events -----------------------------------------------------------

    def expire(self) -> None:
        """The deadline passed (called by the server's sweep): what that means depends on
        what the connection is doing."""
        self.deadline = math.inf
        if self.state != _OPEN:
            return
        if self.write_paused or self.reading == _LINGER:
            # The client stopped reading its answers, or a refused client keeps sending.
            self._close(abort=True)
        elif self.task is not None:
            return
        elif self.in_message and not self.queue:
            self.reading = _DONE
            self._write_and_linger(self._refused(_refusal(408, "request not received in time")))
        else:
            self._close()

    def drain(self) -> None:
        """Shutdown began: close now if idle, else after the answer in progress."""
        if self.reading == _LINGER:
            self._close(abort=True)
        elif self.task is None and not self.queue and not self.in_message:
            self._close()

    def kill(self) -> None:
        """The grace period is over: drop the connection and cancel its handler."""
        self._close(abort=True)
        if self.task is not None:
            self.task.cancel()


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return cast(Callable[[int], int], ctypes.CDLL(None).malloc_trim)
    except (OSError, AttributeError):
        return None  # not glibc


_MALLOC_TRIM = _malloc_trim()


def _fit_fd_limit(wanted: int) -> int:
    """``wanted`` connections, or fewer when the open-file limit cannot hold them all.

    Past that limit accept() fails: the event loop logs an error, stops accepting for a
    while and new clients wait unanswered, instead of getting a 503 they can retry on.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - _FD_RESERVE))


class HTTPServer:
    """An HTTP/1.1 server calling ``handler`` for every request; see the module docstring."""

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = 1 << 20,
        max_header_bytes: int = 16384,
        read_timeout: float = 10.0,
        keepalive_timeout: float = 75.0,
        max_connections: int = 10_000,
        backlog: int = 1024,
        max_bytes_in_flight: int = 64 << 20,
        check_head: Callable[[Request], Response | None] | None = None,
        on_reject: Callable[[int], None] | None = None,
        logger: logging.Logger | None = None,
        access_log: bool = False,
    ) -> None:
        """``check_head`` sees each request with a body once its head is complete (its
        ``body`` still empty): a Response it returns is the answer, sent before the body
        is read or a ``100 Continue`` is, and the connection closes after it. ``on_reject``
        is called with the status of every answer the server makes itself (those
        included), so the application can count them."""
        self.handler = handler
        self.host = host
        self.requested_port = port
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = _fit_fd_limit(max_connections)
        self.backlog = backlog
        self.max_bytes_in_flight = max_bytes_in_flight
        #: Bytes the requests in progress hold (bodies, and what handlers reserve).
        self.held = 0
        self._held_peak = 0
        self.check_head = check_head
        self.access_log = access_log
        self._refusals = 0
        self._refusals_until = 0.0
        self.on_reject = on_reject
        self.logger = logger or _LOG
        self.connections: set[_Connection] = set()
        self.draining = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._all_gone: asyncio.Event | None = None
        # Deadlines are checked by one periodic sweep rather than a timer per request;
        # a deadline fires at most a quarter of the shortest timeout late.
        self._tick = max(0.005, min(1.0, read_timeout / 4, keepalive_timeout / 4))
        self._loop: asyncio.AbstractEventLoop | None = None
        #: What each request's Task starts from: the context ``start()`` was called in.
        self.context = contextvars.Context()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "HTTPServer.start() was not called"
        return self._loop

    async def start(self) -> None:
        """Bind and start accepting connections."""
        if self._server is not None:
            raise RuntimeError("HTTPServer already started")
        self._loop = asyncio.get_running_loop()
        self.context = contextvars.copy_context()
        self._all_gone = asyncio.Event()
        self._server = await self._loop.create_server(
            functools.partial(_Connection, self),
            self.host,
            self.requested_port,
            backlog=self.backlog,
            reuse_address=True,
        )
        self._sweeper = self._loop.call_later(self._tick, self._sweep)

    @property
    def port(self) -> int:
        """The bound port (``port=0`` picks a free one)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("HTTPServer is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, let in-flight handlers finish within ``grace``, close every
        connection (idle ones at once), then drop whatever is left."""
        if self._server is None or self.draining:
            return
        self.draining = True
        self._server.close()
        for conn in list(self.connections):
            conn.drain()
        assert self._all_gone is not None
        if self.connections:
            try:
                await asyncio.wait_for(self._all_gone.wait(), grace)
            except TimeoutError:
                self.logger.warning(
                    "%d connection(s) still busy after the %.1f s grace period; closing them",
                    len(self.connections),
                    grace,
                )
        tasks = [conn.task for conn in self.connections if conn.task is not None]
        for conn in list(self.connections):
            conn.kill()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        await self._server.wait_closed()

    # -- used by connections ------------------------------------------------------------

    def make_room(self) -> bool:
        """Close the keep-alive connection idle for longest (as nginx does), or False if
        none is: idle clients must not lock new ones out of a full server."""
        idle = [
            conn
            for conn in self.connections
            if conn.state == _OPEN
            and conn.reading == _IDLE
            and conn.task is None
            and not conn.queue
        ]
        if not idle:
            return False
        # Their deadlines all count from when they went idle.
        min(idle, key=lambda conn: conn.deadline)._close()
        return True

    def forget(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        if self.draining and not self.connections and self._all_gone is not None:
            self._all_gone.set()

    def reserve(self, request: Request, nbytes: int) -> bool:
        held = self.held
        if held + nbytes > self.max_bytes_in_flight and held > request._held:
            return False
        self.held = held + nbytes
        request._held += nbytes
        return True

    def release(self, request: Request) -> None:
        self.held -= request._held
        request._held = 0

    def log_refusal(
        self, request: Request | None, answer: Response, client: tuple[str, int] | None
    ) -> None:
        """One INFO line per refused request; under a flood at most ``_REFUSALS_LOGGED`` a
        second, then how many were left out."""
        now = self.loop.time()
        if now >= self._refusals_until:
            self._count_unlogged_refusals()
            self._refusals_until = now + 1.0
        self._refusals += 1
        if self._refusals <= _REFUSALS_LOGGED:
            reason = _escaped(answer.body[:200].decode("utf-8", "replace"))
            what = _shown(request) if request is not None else "a request"
            host = client[0] if client else "?"
            self.logger.info("refused %s from %s: %d %s", what, host, answer.status, reason)

    def _count_unlogged_refusals(self) -> None:
        if self._refusals > _REFUSALS_LOGGED:
            left_out = self._refusals - _REFUSALS_LOGGED
            self.logger.info("%d more requests refused in a second, not logged", left_out)
        self._refusals = 0

    def log_access(
        self, request: Request | None, status: int, size: int, client: tuple[str, int] | None
    ) -> None:
        ms = (self.loop.time() - request._began) * 1000 if request is not None else 0.0
        what = _shown(request) if request is not None else "- -"
        host = client[0] if client else "-"
        method, _, path = what.partition(" ")
        fields = {"client": host, "method": method, "path": path, "status": status}
        fields.update(bytes=size, duration_ms=round(ms, 1))
        _ACCESS.info('%s "%s" %d %d %.1fms', host, what, status, size, ms, extra=fields)

    def _sweep(self) -> None:
        loop = self.loop
        now = loop.time()
        expired = [conn for conn in self.connections if conn.deadline <= now]
        for conn in expired:
            conn.expire()
        if now >= self._refusals_until:
            self._count_unlogged_refusals()
        self._held_peak = max(self._held_peak, self.held)
        if self._held_peak >= _TRIM_AFTER and self.held * 4 <= self._held_peak:
            # A burst is over: hand the memory its requests held back to the system,
            # which glibc's allocator otherwise keeps for the process.
            self._held_peak = self.held
            if _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)
        self._sweeper = loop.call_later(self._tick, self._sweep)
