"""HTTP/1.1 server: an asyncio Protocol driving the ``httptools`` (llhttp) parser directly.

It owns the wire (framing as strict as Go's server, keep-alive, pipelining, limits,
timeouts, the memory budget, refusal logs, shutdown) and knows nothing of CloudEvents.
No framework: on this parser a Protocol answers several times more requests a second
than an ASGI server, so the hot path has no per-request closures or timers.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
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

__all__ = ["HTTPError", "HTTPServer", "Handler", "Hold", "Request", "Response", "text_answer"]

_LOG = logging.getLogger("cdk.http")
_ACCESS = logging.getLogger("cdk.access")
#: Refusals logged at INFO (at most ``_REFUSALS_LOGGED`` a second); 404 and 405 are not news.
_LOGGED_REFUSALS = frozenset({400, 401, 408, 413, 415, 417, 429, 431, 501, 503, 505})
_REFUSALS_LOGGED = 10

_TEXT = "text/plain; charset=utf-8"
_REASONS: dict[int, str] = {status.value: status.phrase for status in HTTPStatus}
_CONTINUE_ANSWER = b"HTTP/1.1 100 Continue\r\n\r\n"
#: Statuses whose answers carry neither a body nor Content-Length (RFC 9110, 8.6).
_NO_BODY_STATUSES = frozenset({204, 304})
#: After a refusal the server half-closes, then drops what the client still sends, as
#: nginx does (nginx: 30 s, 5 s between reads; here shorter, and 64 MiB at most): closing
#: on unread data resets the connection, losing the answer for a client writing its
#: whole body first (http.client). Such connections leave the connection cap; at most
#: ``HTTPServer.max_lingering`` linger at once, the oldest closed to make room.
_LINGER_SECONDS = 10.0
_LINGER_IDLE = 2.0
_LINGER_BYTES = 64 << 20
#: After a burst holding this much, free memory goes back to the system (glibc keeps it).
_TRIM_AFTER = 16 << 20
#: File descriptors kept free beside connections: listening socket, logs, the app's own.
_FD_RESERVE = 64
Headers = Mapping[str, str] | Iterable[tuple[str, str]]


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
        """True once the client closed the connection, or its sending side: nobody waits."""
        conn = self._conn
        return conn is not None and (conn.state != _OPEN or conn.reading == _EOF)

    def reserve(self, nbytes: int) -> bool:
        """Count ``nbytes`` more against ``max_bytes_in_flight`` until this is answered;
        False, counting nothing, when that passes the budget others hold some of."""
        return self._conn is None or self._conn.server.reserve(self, nbytes)

    def keep(self, nbytes: int) -> Hold:
        """Go on counting ``nbytes`` of what this reserved after it is answered, until the
        returned hold is released: for work that outlives its request (queued events)."""
        conn = self._conn
        if conn is None:
            return Hold(None, 0)
        nbytes = min(nbytes, self._held)
        self._held -= nbytes
        return Hold(conn.server, nbytes)

    @property
    def delivery_id(self) -> str | None:
        """The sender's id of this delivery, kept when it sends the request again:
        ``webhook-id`` (Standard Webhooks), ``X-GitHub-Delivery`` or ``Idempotency-Key``."""
        headers = self.headers
        found = headers.get("webhook-id") or headers.get("x-github-delivery")
        return found or headers.get("idempotency-key") or None

    def query_params(self) -> dict[str, list[str]]:
        """The query string decoded into name -> values (blank values kept)."""
        return parse_qs(self.query, keep_blank_values=True)

    def json(self) -> Any:
        """The body parsed as JSON; a body that is not JSON raises ``HTTPError(400)``."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}") from None


class Hold:
    """Bytes counted against a server's ``max_bytes_in_flight`` until :meth:`release`."""

    __slots__ = ("_server", "nbytes")

    def __init__(self, server: HTTPServer | None, nbytes: int) -> None:
        self._server = server
        self.nbytes = nbytes

    def release(self) -> None:
        if self._server is not None:
            self._server.held -= self.nbytes
        self._server, self.nbytes = None, 0


@dataclass(slots=True)
class Response:
    """An answer. ``content_type`` is sent only with a non-empty body."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = _TEXT
    headers: list[tuple[str, str]] = field(default_factory=list)


class HTTPError(Exception):
    """Raised by a handler to answer with ``status``, ``message`` as the body and ``headers``."""

    def __init__(self, status: int, message: str = "", headers: Headers | None = None) -> None:
        self.status = status
        self.message = message or _REASONS.get(status, "error")
        pairs = headers.items() if isinstance(headers, Mapping) else headers or ()
        self.headers: list[tuple[str, str]] = list(pairs)
        super().__init__(status, self.message)

    def __str__(self) -> str:
        return f"{self.status} {self.message}"

    def to_response(self) -> Response:
        return text_answer(self.status, self.message, list(self.headers))


Handler = Callable[[Request], Awaitable[Response]]

_HEAD_CACHE: dict[tuple[int, bool, bool], bytes] = {}
#: Header names as received -> lower-cased: clients send the same few on every request.
_HEADER_NAMES: dict[bytes, str] = {}
_HEADER_NAMES_KEPT = 1024


def encode_response(
    response: Response, keep_alive: bool = True, http10: bool = False, head: bool = False
) -> bytes:
    """The bytes of ``response`` on the wire: ``keep_alive`` False adds ``Connection:
    close``, ``http10`` with keep-alive ``Connection: keep-alive``; ``head`` drops the body."""
    status, body, headers = response.status, response.body, response.headers
    # The common answers (200/202 with nothing to say) are cached whole.
    key = (status, keep_alive, http10) if not body and not headers else None
    if key is not None and (cached := _HEAD_CACHE.get(key)) is not None:
        return cached
    parts = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"]
    if status not in _NO_BODY_STATUSES and status >= 200:
        if body and response.content_type:
            parts.append(f"content-type: {response.content_type}\r\n")
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
    data = "".join(parts).encode("latin-1")
    if key is not None:
        _HEAD_CACHE[key] = data
    if body and not head and status not in _NO_BODY_STATUSES:
        return data + body
    return data


def text_answer(status: int, text: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, text.encode("utf-8"), headers=headers or [])


def _escaped(text: str) -> str:
    # For a log line: "%0d%0a" decoded in a path must not start a forged line.
    return text.encode("unicode_escape").decode("ascii")


def _shown(request: Request) -> str:
    return f"{request.method} {_escaped(request.path)}"


_INTERNAL_ERROR = Response(500, b"internal error")
_BUSY = text_answer(503, "busy: requests in progress hold too much; retry", [("retry-after", "1")])


class _Stop(Exception):
    """Raised in a parser callback to stop parsing, with the refusal in ``_reject``."""


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

# Where the reading side is in a request line (``_Connection._line``), for its check.
_LINE_NONE = 0  # past it
_LINE_START = 1  # before it: blank lines may come first
_LINE_IN = 2  # in it, after a byte other than a space
_LINE_SPACE = 3  # in it, after a space

# Where a connection is in its life (``_Connection.state``).
_OPEN = 0
_CLOSED = 1  # closed or aborted here; connection_lost is still to come
_LOST = 2  # connection_lost came: the server forgets it once no handler runs


class _Connection(asyncio.Protocol):
    """One client connection: feeds the parser, queues whole requests, answers them in order.

    Apart, as in uvicorn: its life (``state``), the request read (``reading``, ``_`` fields),
    flow control (``*_paused``); ``task`` runs the handler. ``queue`` holds ``(request,
    keep_alive, http10, canned)``, ``canned`` a refusal's bytes (``request`` None).
    """

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport  # set by connection_made, called first
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
        self._url = b""
        self._headers: dict[str, str] = {}
        self._request: Request | None = None
        self._head_bytes = 0
        self._head_raw = 0
        self._head_fresh = False
        self._body: list[bytes] = []
        self._body_len = 0
        self._declared = 0
        self._version = "1.1"
        self._line = _LINE_START
        self._tail = b""
        #: Bytes read but not parsed yet (from ``_unparsed_at``): a request waits its turn.
        self._unparsed = b""
        self._unparsed_at = 0

    @property
    def idle(self) -> bool:
        """Between two requests of a keep-alive connection."""
        return self.reading == _IDLE and self.task is None and not self.queue

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
            refusal = text_answer(503, "too many connections", [("retry-after", "1")])
            transport.write(self._refused(refusal))
            transport.close()
            return
        server.connections.add(self)
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
        if self._unparsed:  # read before pause_reading took effect: after what waits
            data = self._unparsed[self._unparsed_at :] + data
            self._unparsed = b""
        self._parse(data, 0)
        if self.task is None and self.queue:
            self._next()
        if (
            (self._unparsed or self.task is not None or self.write_paused)
            and (self._unparsed or self.queue or _HEAD <= self.reading <= _UPGRADE)
            and not self.read_paused
            and self.state == _OPEN
        ):
            # Pipelining: read on once answered, so one client cannot queue unbounded work.
            self.read_paused = True
            self.transport.pause_reading()

    def _parse(self, data: bytes, pos: int) -> None:
        """Feed ``data[pos:]`` to the parser a message at a time, and stop once a request
        waits for its turn: the rest is kept (``_unparsed``, reading paused) until the
        answers before are out, so a connection holds a read and a request or two, never
        thousands of parsed pipelined requests."""
        size = len(data)
        parser = self.parser
        try:
            while pos < size:
                reading = self.reading
                # A body of declared length is fed whole, up to its end.
                if _BODY <= reading <= _CONTINUE and self._declared > self._body_len:
                    end = min(size, pos + self._declared - self._body_len)
                elif pos == 0 and self._tail:
                    end = self._message_end(data)
                else:
                    end = data.find(b"\r\n\r\n", pos) + 4
                    if end < 4:
                        end = size
                if self._line:
                    newline = data.find(b"\n", pos, end)
                    if (
                        newline < 0
                        or self._line != _LINE_START
                        or data[pos] in b"\r\n"
                        or data.find(b"  ", pos, newline) >= 0
                    ):
                        self._check_request_line(data, pos, end)
                    else:  # the usual case, inline: a whole request line, well-formed
                        self._line = _LINE_NONE
                if pos == 0 and end == size:
                    piece: bytes | memoryview = data
                else:  # a copy of a head, a view of a body
                    piece = data[pos:end] if end - pos <= 4096 else memoryview(data)[pos:end]
                self._head_fresh = False
                try:
                    parser.feed_data(piece)
                except httptools.HttpParserUpgrade as exc:
                    self._feed_without_upgrade(piece[exc.args[0] :])
                    parser = self.parser
                reading = self.reading
                if _HEAD <= reading <= _TRAILER:
                    self._head_read(data, pos, end)
                elif self._tail:
                    self._tail = b""
                pos = end
                if self.queue or reading >= _DONE:
                    break
        except (httptools.HttpParserError, _Stop) as exc:
            # httptools wraps a callback's exception: unless it is a _Stop, the fault is ours.
            cause = exc.__context__
            if self._reject is None and cause is not None and not isinstance(cause, _Stop):
                _LOG.error("failed to read a request", exc_info=cause)
                self._reject = text_answer(500, "internal error")
            self._reject_request(self._reject or text_answer(400, "malformed HTTP request"))
            return
        if pos < size and self.reading < _DONE:
            self._unparsed, self._unparsed_at = data, pos

    def _message_end(self, data: bytes) -> int:
        """Where to stop feeding a read: past the first CRLFCRLF (where a head, or a chunked
        body, ends: llhttp requires CRLF), one begun by the last read (``_tail``) included."""
        tail = self._tail
        found = (tail + data[:3]).find(b"\r\n\r\n")
        if found >= 0:
            return found + 4 - len(tail)
        found = data.find(b"\r\n\r\n")
        return len(data) if found < 0 else found + 4

    def _check_request_line(self, data: bytes, pos: int, end: int) -> None:
        """llhttp skips repeated spaces in a request line; Go refuses them, and so does
        this, on every request line, also one split across reads."""
        if self._line == _LINE_START:
            while pos < end and data[pos] in b"\r\n":  # blank lines may come first
                pos += 1
            if pos == end:
                return
        elif self._line == _LINE_SPACE and data[pos] == 32:
            self._stop(400, "malformed request line")
        newline = data.find(b"\n", pos, end)
        stop = end if newline < 0 else newline
        if data.find(b"  ", pos, stop) >= 0:
            self._stop(400, "malformed request line")
        if newline >= 0:
            self._line = _LINE_NONE
        else:
            self._line = _LINE_SPACE if data[end - 1] == 32 else _LINE_IN

    def _feed_without_upgrade(self, rest: bytes | memoryview) -> None:
        piece = self._without_upgrade(rest)
        while True:
            try:
                self.parser.feed_data(piece)
                return
            except httptools.HttpParserUpgrade as exc:
                piece = self._without_upgrade(piece[exc.args[0] :])

    def _head_read(self, data: bytes, pos: int, end: int) -> None:
        """After a piece of a head (or of chunk sizes and trailers): its size limit, and
        what ``_message_end`` needs of a read that ends inside one."""
        if not self._head_fresh:
            # httptools buffers a header line until it ends: count an endless one.
            self._head_raw += end - pos
        limit = self.server.max_header_bytes
        if self._head_raw > limit or self._head_bytes + len(self._url) > limit:
            self._stop(431, "request header fields too large")
        # The read may end inside a CRLFCRLF: its last bytes are kept for the next.
        self._tail = (self._tail + data[max(pos, end - 3) :])[-3:] if end == len(data) else b""

    def eof_received(self) -> bool | None:
        # The client half-closed: answer what was received, then close.
        self.reading = _EOF
        if self.task is None and not self.queue:
            self._close()
        return True

    def on_message_begin(self) -> None:
        self.reading = _HEAD
        self._url = b""
        self._headers = {}
        self._head_bytes = 0
        self._head_raw = 0
        self._head_fresh = True
        self._body = []
        self._body_len = 0
        self._declared = 0
        if self.task is None and not self.queue and not self.write_paused:
            self.deadline = self.loop.time() + self.server.read_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        # Checked per read, not per header; 4 more bytes a line (": ", CRLF): repeats count.
        self._head_bytes += len(name) + len(value) + 4
        if self.reading != _HEAD:
            # A trailer, counted then dropped (RFC 9110, 6.5.1): no Authorization after the body.
            self._check_head_size()
            return
        key = _HEADER_NAMES.get(name)
        if key is None:
            key = name.decode("latin-1").lower()
            if len(_HEADER_NAMES) < _HEADER_NAMES_KEPT:
                _HEADER_NAMES[name] = key
        text = value.decode("latin-1")
        headers = self._headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def _check_head_size(self) -> None:
        if self._head_bytes + len(self._url) > self.server.max_header_bytes:
            self._stop(431, "request header fields too large")

    def on_headers_complete(self) -> None:
        parser = self.parser
        if parser.should_upgrade():
            if parser.get_method() == b"CONNECT":
                self._stop(501, "CONNECT is not supported")
            # httptools then skips the body: the head is checked when parsed again.
            self.reading = _UPGRADE
            return
        self.reading = _BODY
        headers = self._headers
        server = self.server
        version = self._version = parser.get_http_version()
        # As Go's server does: llhttp reads a request line without a version as HTTP/0.9.
        if version == "2.0":
            self._stop(505, "only HTTP/1.1 and HTTP/1.0 are supported")
        if version not in ("1.1", "1.0"):
            self._stop(400, "malformed request line")
        self._check_head_size()
        # RFC 9112, 3.2: exactly one valid Host (repeats are joined by ", "; no host has ",").
        host = headers.get("host")
        if host is None and version == "1.1":
            self._stop(400, "a Host header is required")
        if host and ("," in host or " " in host or not (host.isascii() and host.isprintable())):
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
        if coding is not None and version == "1.0":
            self._stop(400, "Transfer-Encoding is not allowed in HTTP/1.0")  # RFC 9112, 6.1
        if coding is not None and coding.lower() != "chunked":
            # llhttp undoes only a final "chunked": the body would stay compressed.
            self._stop(501, "only the chunked transfer coding is supported")
        expect = headers.get("expect")
        if expect is not None and expect.lower() != "100-continue":
            self._stop(417, "only Expect: 100-continue is supported")  # RFC 9110, 10.1.1
        url = self._url
        if url[:1] == b"/":
            if b"#" in url:  # clients do not send fragments, but llhttp lets them through
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
        method = parser.get_method().decode("ascii")
        query = raw_query.decode("latin-1")
        request = Request(method, path, query, headers, b"", self.client, self)
        self._request = request
        if server.access_log:
            request._began = self.loop.time()
        if server.check_head is not None and (declared or coding is not None):
            self._reject = server.check_head(request)
            if self._reject is not None:
                raise _Stop
        self._declared = declared
        if declared and not server.reserve(request, declared):
            self._reject = _BUSY
            raise _Stop
        if expect is not None and version == "1.1":  # HTTP/1.0 knows no 100 Continue
            if self.task is not None or self.queue:
                self.reading = _CONTINUE
            else:
                self.transport.write(_CONTINUE_ANSWER)

    def _stop(self, status: int, message: str) -> NoReturn:
        self._reject = text_answer(status, message)
        raise _Stop

    def on_chunk_header(self) -> None:
        # A size line, and the trailers after the last, are buffered like header lines.
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
        self._line = _LINE_START
        request = self._request
        assert request is not None
        self._request = None
        body = self._body
        if body:
            request.body = body[0] if len(body) == 1 else b"".join(body)
            self._body = []
        self.queue.append((request, self.parser.should_keep_alive(), self._version == "1.0", b""))

    def _without_upgrade(self, rest: bytes | memoryview) -> bytes:
        """The head that asked for an upgrade, without ``Upgrade``, and ``rest``, for a fresh
        parser: the server never switches protocols (RFC 9110, 7.8), and the body of an h2c
        request (Java's HttpClient, ``curl --http2``) must be read as usual."""
        version = self.parser.get_http_version().encode()
        line = b"%s %s HTTP/%s\r\n" % (self.parser.get_method(), self._url, version)
        fields = "".join(f"{k}: {v}\r\n" for k, v in self._headers.items() if k != "upgrade")
        self.parser = httptools.HttpRequestParser(self)
        return line + fields.encode("latin-1") + b"\r\n" + rest

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
            server.on_reject(refusal.status)
        server.log(self._request, refusal, len(data), self.client)
        return data

    def _next(self) -> None:
        """Start the next queued request, or go back to reading when there is none."""
        if self.state != _OPEN or self.task is not None or self.write_paused:
            return
        queue = self.queue
        if not queue and self._unparsed and not self.server.draining:
            data, self._unparsed = self._unparsed, b""
            self._parse(data, self._unparsed_at)
        if queue:
            request, keep_alive, http10, canned = queue.popleft()
            if request is None:
                self._write_and_linger(canned)
                return
            self.deadline = math.inf
            # A Task even for handlers that never wait: answers of one loop pass then go out
            # together. A fresh context: this may run in the Task of the request before.
            self.task = self.loop.create_task(
                self._respond(request, keep_alive, http10), context=self.server.context.copy()
            )
            return
        in_message = _HEAD <= self.reading <= _UPGRADE
        if self.reading >= _DONE or (self.server.draining and not in_message):
            self._close()
            return
        if self.read_paused and not self._unparsed:
            self.read_paused = False
            self.transport.resume_reading()
        if in_message:
            if self.reading == _CONTINUE:
                self.reading = _BODY
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
            _LOG.exception("handler failed on %s", _shown(request))
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
            _LOG.exception("handler answer cannot be sent on %s", _shown(request))
            data = encode_response(_INTERNAL_ERROR, keep_alive, http10, head)
        self.transport.write(data)
        if server.access_log or response.status in _LOGGED_REFUSALS:
            server.log(request, response, len(data), self.client)
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
        self._unparsed = b""
        if self._request is not None:
            self.server.release(self._request)
            self._request = None

    def _write_and_linger(self, data: bytes) -> None:
        transport = self.transport
        transport.write(data)
        self._drop()
        if not transport.can_write_eof():
            self._close()
            return
        transport.write_eof()
        self.reading = _LINGER
        self.server.linger(self)
        self._linger_end = self.loop.time() + _LINGER_SECONDS
        self.deadline = self._linger_deadline()
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()

    def _linger_deadline(self) -> float:
        return self.loop.time() + min(_LINGER_IDLE, self.server.read_timeout)

    def _close(self, abort: bool = False) -> None:
        """Close once what is written went out, or with ``abort`` drop the connection now."""
        if self.state == _OPEN or abort:
            self.state = max(self.state, _CLOSED)
            self.deadline = math.inf
            self._drop()
            (self.transport.abort if abort else self.transport.close)()

    def expire(self) -> None:
        """The deadline passed (the server's sweep): what it means depends on the state."""
        self.deadline = math.inf
        if self.state != _OPEN:
            return
        if self.write_paused or self.reading == _LINGER:
            # The client stopped reading its answers, or a refused client keeps sending.
            self._close(abort=True)
        elif self.task is not None:
            return
        elif _HEAD <= self.reading <= _UPGRADE and not self.queue:
            self.reading = _DONE
            self._write_and_linger(self._refused(text_answer(408, "request not received in time")))
        else:
            self._close()

    def drain(self) -> None:
        """Shutdown began: close now if idle, else after the answer in progress."""
        if self.reading == _LINGER:
            self._close(abort=True)
        elif self.task is None and not self.queue and not _HEAD <= self.reading <= _UPGRADE:
            self._close()

    def kill(self) -> None:
        """The grace period is over: drop the connection and cancel its handler."""
        self._close(abort=True)
        if self.task is not None:
            self.task.cancel()


try:
    _MALLOC_TRIM: Callable[[int], int] | None = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError):  # not glibc
    _MALLOC_TRIM = None


def _fit_fd_limit(wanted: int) -> int:
    """``wanted``, or fewer to fit the file limit: past it clients wait, with no 503."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - _FD_RESERVE))


class HTTPServer:
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
        max_bytes_in_flight: int = 64 << 20,
        check_head: Callable[[Request], Response | None] | None = None,
        on_reject: Callable[[int], None] | None = None,
        access_log: bool = False,
    ) -> None:
        """``check_head`` sees each request with a body once its head is complete: a Response
        it returns is sent before the body is read, then the connection closes. ``on_reject``
        gets the status of each refusal the server makes (those included)."""
        self.handler = handler
        self.host = host
        self.requested_port = port
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.read_timeout = read_timeout
        self.keepalive_timeout = keepalive_timeout
        # Refused connections linger outside the cap, in file descriptors of their own:
        # an eighth more, both shrunk alike when the open-file limit is lower.
        lingering = max(1, max_connections // 8)
        fitted = _fit_fd_limit(max_connections + lingering)
        self.max_lingering = max(1, lingering * fitted // (max_connections + lingering))
        self.max_connections = max(1, fitted - self.max_lingering)
        self.max_bytes_in_flight = max_bytes_in_flight
        #: Bytes the requests in progress hold (bodies, and what handlers reserve).
        self.held = 0
        self._held_peak = 0
        self.check_head = check_head
        self.access_log = access_log
        self._refusals = 0
        self._refusals_until = 0.0
        self.on_reject = on_reject
        self.connections: set[_Connection] = set()
        #: Refused connections dropping what their client still sends, oldest first.
        self.lingering: dict[_Connection, None] = {}
        self.draining = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle  # set by start()
        self._all_gone = asyncio.Event()
        # One sweep for all deadlines, not a timer per request: late by a tick at most.
        self._tick = max(0.005, min(1.0, read_timeout / 4, keepalive_timeout / 4))
        self.loop: asyncio.AbstractEventLoop  # set by start()
        #: What each request's Task starts from: the context ``start()`` was called in.
        self.context = contextvars.Context()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("HTTPServer already started")
        self.loop = asyncio.get_running_loop()
        self.context = contextvars.copy_context()
        self._server = await self.loop.create_server(
            lambda: _Connection(self),
            self.host,
            self.requested_port,
            backlog=1024,
            reuse_address=True,
        )
        self._sweeper = self.loop.call_later(self._tick, self._sweep)

    @property
    def port(self) -> int:
        """The bound port (``port=0`` picks a free one)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("HTTPServer is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self, grace: float = 10.0) -> None:
        """Stop accepting, close idle connections, give handlers ``grace`` seconds, drop."""
        if self._server is None or self.draining:
            return
        self.draining = True
        self._server.close()
        for conn in [*self.connections, *self.lingering]:
            conn.drain()
        if self.connections:
            try:
                await asyncio.wait_for(self._all_gone.wait(), grace)
            except TimeoutError:
                busy = len(self.connections)
                _LOG.warning("%d connection(s) busy after %.1f s; closing", busy, grace)
        tasks = [conn.task for conn in self.connections if conn.task is not None]
        for conn in [*self.connections, *self.lingering]:
            conn.kill()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        self._sweeper.cancel()
        await self._server.wait_closed()

    def make_room(self) -> bool:
        """Close the keep-alive connection idle longest, as nginx does; False if none is."""
        idle = [conn for conn in self.connections if conn.idle and conn.state == _OPEN]
        if idle:  # their deadlines all count from when they went idle
            min(idle, key=lambda conn: conn.deadline)._close()
        return bool(idle)

    def linger(self, conn: _Connection) -> None:
        """``conn`` was refused and lingers: out of the cap, the oldest closed if too many."""
        self.connections.discard(conn)
        if len(self.lingering) >= self.max_lingering:
            oldest = next(iter(self.lingering))
            del self.lingering[oldest]
            oldest._close(abort=True)
        self.lingering[conn] = None
        if self.draining and not self.connections:
            self._all_gone.set()

    def forget(self, conn: _Connection) -> None:
        self.connections.discard(conn)
        self.lingering.pop(conn, None)
        if self.draining and not self.connections:
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

    def log(
        self, request: Request | None, answer: Response, size: int, client: tuple[str, int] | None
    ) -> None:
        """A refusal's INFO line (at most ``_REFUSALS_LOGGED`` a second), an access line."""
        what = _shown(request) if request is not None else "- -"
        host = client[0] if client else "-"
        status = answer.status
        if status in _LOGGED_REFUSALS:
            self._refusals += 1  # in this second: the sweep counts those left out
            if self._refusals <= _REFUSALS_LOGGED:
                reason = _escaped(answer.body[:200].decode("utf-8", "replace"))
                _LOG.info("refused %s from %s: %d %s", what, host, status, reason)
        if self.access_log:
            ms = round((self.loop.time() - request._began) * 1000, 1) if request else 0.0
            method, _, path = what.partition(" ")
            fields = {"client": host, "method": method, "path": path, "status": status}
            fields.update(bytes=size, duration_ms=ms)
            _ACCESS.info('%s "%s" %d %d %.1fms', host, what, status, size, ms, extra=fields)

    def _sweep(self) -> None:
        loop = self.loop
        now = loop.time()
        expired = [conn for conn in self.connections if conn.deadline <= now]
        expired += [conn for conn in self.lingering if conn.deadline <= now]
        for conn in expired:
            conn.expire()
        if now >= self._refusals_until:
            if self._refusals > _REFUSALS_LOGGED:
                left_out = self._refusals - _REFUSALS_LOGGED
                _LOG.info("%d more requests refused in a second, not logged", left_out)
            self._refusals, self._refusals_until = 0, now + 1.0
        self._held_peak = max(self._held_peak, self.held)
        if self._held_peak >= _TRIM_AFTER and self.held * 4 <= self._held_peak:
            self._held_peak = self.held
            if _MALLOC_TRIM is not None:
                _MALLOC_TRIM(0)
        self._sweeper = loop.call_later(self._tick, self._sweep)
