"""HTTP/1.1 client for POSTing to one target: asyncio Protocols driving ``httptools`` directly.

It owns the wire-level work of sending (a keep-alive pool, the request bytes, parsing the
answer, timeouts) and turns every failure into a :class:`ClientError`; it knows nothing of
CloudEvents. Not aiohttp: a source's throughput is bound by the sender's CPU per request, and a
Protocol feeding llhttp spends a fraction of a general client's. Idle connections are reused
last-in first-out, so a burst's extras age out after ``KEEPALIVE_SECONDS``; ``timeout`` covers
waiting for a connection, connecting, sending and receiving; at most ``max_body`` bytes of an
answer are kept, the rest read and dropped so that the connection stays usable.
"""

from __future__ import annotations

import asyncio
import base64
import ssl as _ssl
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import SplitResult, quote, unquote, urlsplit

import httptools

from cdk.codec import TOKEN_CHARS
from cdk.logs import one_line

__all__ = ["Client", "ClientError", "ClientResponse"]

#: Most bytes of an answer's head (status line and headers) accepted.
MAX_HEAD_BYTES = 64 * 1024
KEEPALIVE_SECONDS = 30.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: Header names the client writes itself; a caller may not send them too.
_RESERVED = frozenset({"host", "content-length", "transfer-encoding", "connection", "user-agent"})
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"


class ClientError(Exception):
    """A request got no complete answer; ``str()`` says why."""


class ConnectError(ClientError):
    """No connection could be made (refused, unreachable, name not found, TLS failure)."""


class ConnectionClosed(ClientError):
    """The connection closed before the whole answer arrived (``received``: any of it)."""

    def __init__(self, message: str, received: bool) -> None:
        super().__init__(message)
        self.received = received


class ProtocolError(ClientError):
    """The server's answer is not valid HTTP/1.1 (or not one this client accepts)."""


class RequestTimeout(ClientError, TimeoutError):
    """No complete answer within the client's timeout."""


@dataclass(slots=True)
class ClientResponse:
    """An answer: status, headers (lower-case names, repeats joined by ", "), body, and
    whether the body was longer than the client keeps."""

    status: int
    headers: dict[str, str]
    body: bytes
    truncated: bool = False


class _Connection(asyncio.Protocol):
    """One connection: writes a request, feeds the answer to llhttp, resolves ``waiter``."""

    def __init__(self, pool: Client) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[ClientResponse] | None = None
        self.received = False
        self.closed = False  # set by Client.drop
        self.idle_since = 0.0
        self.keep_alive = True
        self.lost: asyncio.Future[None] | None = None  # made when someone waits for the end
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._kept = 0
        self._truncated = False
        self._head_raw = 0
        self._headers_done = False
        self._until_eof = False

    def send(self, data: bytes) -> asyncio.Future[ClientResponse]:
        """Write one request; the future resolves to its answer or a ClientError."""
        waiter: asyncio.Future[ClientResponse] = self.pool.loop.create_future()
        if self.closed or self.transport is None:
            # Lost between being handed out and now: nothing was sent, nothing received.
            waiter.set_exception(ConnectionClosed("the server closed the connection", False))
            return waiter
        self.received = False
        self._head_raw = 0
        self._headers_done = False  # _until_eof means nothing until they are
        self.waiter = waiter
        self.transport.write(data)
        return waiter

    def close(self, polite: bool = True) -> None:
        """Close and give the slot back: ``polite`` after a whole answer, else at once (the
        state is unknown after an error, a timeout or a cancellation)."""
        if self.transport is not None:
            self.transport.close() if polite else self.transport.abort()
        self.pool.drop(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as such.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            self.waiter = None
            if exc is None and self._until_eof and self._headers_done:
                # An answer without length or chunking ends where the connection does.
                self.keep_alive = False
                waiter.set_result(self._response())
            else:
                waiter.set_exception(self._lost_error(exc))
        self.pool.drop(self)
        if self.lost is not None and not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            # Bytes nobody asked for: the connection's state is unknown, so it goes.
            self.close(polite=False)
            return
        self.received = True
        if not self._headers_done:
            self._head_raw += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the server switched protocols"))
            return
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid HTTP answer: {exc}"))
            return
        if not self._headers_done and self._head_raw > MAX_HEAD_BYTES and self.waiter is not None:
            # llhttp keeps an unfinished header line in memory: bound what a head may cost.
            self._fail(ProtocolError(f"answer head over {MAX_HEAD_BYTES} bytes"))

    def on_message_begin(self) -> None:
        if self.waiter is None:
            self.keep_alive = False  # an answer to no request: out of step, never reuse
        self._headers = {}
        self._body = []
        self._kept = 0
        self._truncated = False
        self._headers_done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headers_done:
            # A trailer (after a chunked body): not part of the answer's head, and a
            # server streaming them must not grow the headers without bound.
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers = self._headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        self._headers_done = True
        self._head_raw = 0
        headers = self._headers
        status = self.parser.get_status_code()
        self._until_eof = (
            status >= 200
            and status not in (204, 304)
            and "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        )

    def on_body(self, body: bytes) -> None:
        room = self.pool.max_body - self._kept
        if len(body) > room:
            body = body[: max(room, 0)]
            self._truncated = True
        if body:
            self._body.append(body)
            self._kept += len(body)

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        waiter = self.waiter
        if waiter is None:
            self.keep_alive = False
            return
        self.waiter = None
        self.keep_alive = (
            self.parser.should_keep_alive()
            and "close" not in self._headers.get("connection", "").lower()
            # An answer before the whole request went out (an early 413, say): what the
            # server makes of the rest of the body is unknown, so the connection goes.
            and not (self.transport is not None and self.transport.get_write_buffer_size())
        )
        if not waiter.done():
            waiter.set_result(self._response())

    def _response(self) -> ClientResponse:
        body = self._body
        data = body[0] if len(body) == 1 else b"".join(body)
        return ClientResponse(self.parser.get_status_code(), self._headers, data, self._truncated)

    def _fail(self, error: ClientError) -> None:
        waiter = self.waiter
        self.waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close(polite=False)

    def _lost_error(self, exc: Exception | None) -> ConnectionClosed:
        when = "before the answer was complete" if self.received else "before answering"
        if exc is None:
            return ConnectionClosed(f"the server closed the connection {when}", self.received)
        return ConnectionClosed(f"connection lost {when} ({one_line(exc)})", self.received)


class Client:
    """POSTs to one URL over a pool of at most ``limit`` keep-alive connections."""

    def __init__(
        self,
        url: str,
        *,
        limit: int = 16,
        timeout: float | None = 5.0,
        max_body: int = 64 * 1024,
        ssl: _ssl.SSLContext | None = None,
        authorization: str | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ValueError(f"not an http:// or https:// URL with a host: {url!r}")
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or _DEFAULT_PORTS[parts.scheme]
        self.limit = limit
        self.timeout = timeout
        self.max_body = max_body
        self._ssl = (ssl or _ssl.create_default_context()) if parts.scheme == "https" else None
        self._head = self._make_head(parts, authorization)
        self._head_lines = self._head.count("\n")
        self._known_names: set[str] = set()
        self.loop: asyncio.AbstractEventLoop  # the loop of the latest send()
        self._idle: list[_Connection] = []
        self._conns: set[_Connection] = set()
        self._count = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False

    def _make_head(self, parts: SplitResult, authorization: str | None) -> str:
        """The request head up to the per-request lines, as text."""
        import cdk  # not at import: cdk/__init__.py imports this module's users first

        host = self.host
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        if ":" in host:
            host = f"[{host}]"
        if self.port != _DEFAULT_PORTS[parts.scheme]:
            host = f"{host}:{self.port}"
        target = quote(parts.path or "/", safe=_PATH_SAFE)
        if parts.query:
            target = f"{target}?{quote(parts.query, safe=_PATH_SAFE + '?')}"
        lines = [
            f"POST {target} HTTP/1.1\r\n",
            f"Host: {host}\r\n",
            f"User-Agent: cdk/{cdk.__version__}\r\n",
        ]
        if authorization is not None:
            lines.append(f"Authorization: {authorization}\r\n")
        elif parts.username is not None:
            # Credentials in the URL mean Basic auth, as most clients read them.
            secret = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            lines.append(f"Authorization: Basic {base64.b64encode(secret).decode('ascii')}\r\n")
        head = "".join(lines)
        if head.count("\n") != len(lines) or head.count("\r") != len(lines):
            raise ValueError("the URL or authorization contains a line break")
        head.encode("latin-1")  # fail here rather than on the first request
        return head

    def encode_request(self, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
        """The bytes of a POST of ``body`` with ``headers``, head and body in one join."""
        parts = [self._head, "Content-Length: ", str(len(body)), "\r\n"]
        lines = 2  # Content-Length and the blank line
        if headers:
            known = self._known_names
            for name, value in headers.items():
                if name not in known:
                    self._check_name(name)
                parts += (name, ": ", value, "\r\n")
            lines += len(headers)
        parts.append("\r\n")
        head = "".join(parts)
        # Two scans of the whole head instead of one per value: any line break beyond
        # the expected ones came from a value.
        expected = self._head_lines + lines
        if head.count("\n") != expected or head.count("\r") != expected:
            raise ValueError("a request header value contains a line break")
        return b"".join((head.encode("latin-1"), body))

    def _check_name(self, name: str) -> None:
        if not name or not TOKEN_CHARS.issuperset(name):
            raise ValueError(f"invalid request header name {name!r}")
        if name.lower() in _RESERVED:
            raise ValueError(f"request header {name!r} is written by the client itself")
        if len(self._known_names) < 1024:
            self._known_names.add(name)

    async def send(
        self, data: bytes, before_write: Callable[[], None] | None = None
    ) -> ClientResponse:
        """Send what :meth:`encode_request` made (once or many times): the answer, any status.
        ``before_write`` is called right before the bytes are written (each time they are):
        what it raises ends the send with nothing written."""
        self.loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._send(data, before_write)
        except TimeoutError:
            raise RequestTimeout(f"no answer within {self.timeout:g} s") from None

    async def _send(self, data: bytes, before_write: Callable[[], None] | None) -> ClientResponse:
        conn, reused = await self._acquire(fresh=False)
        try:
            return await self._exchange(conn, data, before_write)
        except ConnectionClosed as exc:
            if not reused or exc.received:
                raise
        # The server closed the idle connection while the request was on its way (the
        # keep-alive race): it closed without reading it, as a rule, so send it once more.
        # Rarely it was read and then the server died; a sender must expect duplicates.
        conn, _ = await self._acquire(fresh=True)
        return await self._exchange(conn, data, before_write)

    async def _exchange(
        self, conn: _Connection, data: bytes, before_write: Callable[[], None] | None = None
    ) -> ClientResponse:
        if before_write is not None:
            try:  # no await between this and the write: the check holds when the bytes leave
                before_write()
            except BaseException:
                if not conn.closed:
                    self._release(conn)  # untouched: it may serve the next request
                raise
        try:
            response = await conn.send(data)
        except BaseException:
            conn.close(polite=False)
            raise
        if conn.keep_alive and not conn.closed and not self._closed:
            self._release(conn)
        else:
            conn.close()
        return response

    async def _acquire(self, fresh: bool) -> tuple[_Connection, bool]:
        """A connection (and whether it was reused); ``fresh`` always opens a new one."""
        while True:
            if self._closed:
                raise ClientError("the client is closed")
            if not fresh:
                conn = self._pop_idle()
                if conn is not None:
                    return conn, True
            if self._count < self.limit:
                break
            if fresh and self._idle:
                self._idle[0].close()  # make room by closing the longest idle
                continue
            waiter: asyncio.Future[None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # the turn this waiter was given goes to the next one
                else:
                    waiter.cancel()
                raise
        return await self._connect(), False

    def _pop_idle(self) -> _Connection | None:
        idle = self._idle
        if not idle:
            return None
        conn = idle.pop()
        if self.loop.time() - conn.idle_since > KEEPALIVE_SECONDS:
            # The newest idle connection is too old, so every other one is older still.
            for old in [conn, *idle]:
                old.close()
            return None
        return conn

    async def _connect(self) -> _Connection:
        self._count += 1
        conn = _Connection(self)
        try:
            hostname = None if self._ssl is None else self.host
            await self.loop.create_connection(
                lambda: conn, self.host, self.port, ssl=self._ssl, server_hostname=hostname
            )
        except BaseException as exc:
            conn.close(polite=False)
            where = f"{self.host}:{self.port}"
            if isinstance(exc, _ssl.SSLCertVerificationError):
                text = f"TLS certificate of {where} is not trusted: {exc.verify_message}"
                raise ConnectError(text) from exc
            if isinstance(exc, OSError):  # refused, unreachable, DNS, other TLS failures
                raise ConnectError(f"cannot connect to {where}: {one_line(exc)}") from exc
            raise
        if conn.closed:
            raise ConnectionClosed("the server closed the connection at once", False)
        self._conns.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._waiters:
            self._wake()

    def drop(self, conn: _Connection) -> None:
        """Mark ``conn`` closed (or closing), forget it, free its slot; safe to call twice."""
        if conn.closed:
            return
        conn.closed = True
        self._count -= 1
        self._conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        """Close every connection; requests in flight fail, later ones raise ClientError."""
        self._closed = True
        while self._waiters:
            self._wake()  # into the closed check
        lost: list[asyncio.Future[None]] = []
        for conn in list(self._conns):
            if conn.transport is not None and not conn.closed:
                conn.lost = self.loop.create_future()
                lost.append(conn.lost)
            conn.close(polite=conn in self._idle)
        if lost:
            # Closing completes on later loop iterations (a TLS close exchanges messages).
            await asyncio.wait(lost, timeout=1.0)
