"""cdk.client: the HTTP/1.1 client against real servers on a loopback port.

Ordinary exchanges go to the kit's own HTTPServer; edge cases (chunked and interim
answers, closes, resets, silence, TLS) go to raw asyncio servers that play a script per
connection. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import struct
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

import cdk
from cdk.client import Client as KitClient
from cdk.client import (
    ClientError,
    ClientResponse,
    ConnectError,
    ConnectionClosed,
    ProtocolError,
    RequestTimeout,
)
from cdk.http import HTTPServer, Request, Response
from cdk.testing import free_port

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")
WAIT = 5.0
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one async test body with an overall bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Client(KitClient):
    """The kit's client with the shortcuts these tests use."""

    async def post(self, body: bytes, headers: Mapping[str, str] | None = None) -> ClientResponse:
        return await self.send(self.encode_request(body, headers))

    @property
    def connections(self) -> int:
        """Connections open now (idle or busy)."""
        return len(self._conns)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)


# -- a scripted raw server -------------------------------------------------------------


@dataclass
class Received:
    line: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Conn:
    """One accepted connection, as the script sees it."""

    number: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    requests: list[Received] = field(default_factory=list)

    async def read_request(self) -> Received | None:
        """The next request, or None when the client closed the connection."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        line, *rest = head.decode("latin-1").split("\r\n")
        headers: dict[str, str] = {}
        for text in rest:
            if text:
                name, _, value = text.partition(":")
                headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        received = Received(line, headers, body)
        self.requests.append(received)
        return received

    async def answer(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0) rather than an orderly FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def until_closed(self) -> None:
        """Wait for the client to close (reading and dropping anything it still sends)."""
        while await self.reader.read(65536):
            pass


Script = Callable[[Conn], Awaitable[None]]


@dataclass
class RawServer:
    """Counts connections (open now, most at once, all time) and records requests."""

    script: Script
    conns: list[Conn] = field(default_factory=list)
    open_now: int = 0
    most_open: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = Conn(len(self.conns), reader, writer)
        self.conns.append(conn)
        self.open_now += 1
        self.most_open = max(self.most_open, self.open_now)
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open_now -= 1
            writer.close()
            self.ended.set()

    @property
    def requests(self) -> list[Received]:
        return [r for c in self.conns for r in c.requests]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    async def wait_ended(self, count: int) -> None:
        """Wait until ``count`` connections have ended on the server side."""
        async with asyncio.timeout(WAIT):
            while len(self.conns) - self.open_now < count:
                self.ended.clear()
                await self.ended.wait()


@asynccontextmanager
async def raw_server(script: Script, tls: ssl.SSLContext | None = None) -> AsyncIterator[RawServer]:
    state = RawServer(script)
    server = await asyncio.start_server(state.handle, "127.0.0.1", 0, ssl=tls)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        # Python 3.11's wait_closed does not wait for handlers; connections end on close.
        await server.wait_closed()


async def keep_answering(conn: Conn) -> None:
    """Answer every request with 200 "ok" on one keep-alive connection."""
    while await conn.read_request() is not None:
        await conn.answer(OK)


@asynccontextmanager
async def kit_server(
    handler: Callable[[Request], Awaitable[Response]],
) -> AsyncIterator[HTTPServer]:
    server = HTTPServer(handler)
    await server.start()
    try:
        yield server
    finally:
        await server.close(grace=1.0)


# -- ordinary exchanges (the kit's own server) -------------------------------------------


def test_post_reaches_the_server_with_the_request_as_given() -> None:
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return Response(201, b"created", headers=[("X-Answer", "yes"), ("X-Answer", "twice")])

    async def main() -> None:
        async with kit_server(handler) as server:
            port = server.port
            client = Client(f"http://127.0.0.1:{port}/in/box?tenant=a%20b&x=1")
            try:
                response = await client.post(b'{"n": 1}', {"ce-id": "1", "Content-Type": "x/y"})
            finally:
                await client.close()
        assert response.status == 201
        assert response.body == b"created"
        assert response.headers["x-answer"] == "yes, twice"
        assert response.headers["content-length"] == "7"
        assert not response.truncated
        (request,) = seen
        assert request.method == "POST"
        assert (request.path, request.query) == ("/in/box", "tenant=a%20b&x=1")
        assert request.body == b'{"n": 1}'
        assert request.headers["host"] == f"127.0.0.1:{port}"
        assert request.headers["content-length"] == "8"
        assert request.headers["user-agent"] == f"cdk/{cdk.__version__}"
        assert request.headers["ce-id"] == "1" and request.headers["content-type"] == "x/y"

    run(main())


def test_sequential_requests_share_one_keep_alive_connection() -> None:
    peers: set[tuple[str, int] | None] = set()

    async def handler(request: Request) -> Response:
        peers.add(request.client)
        return Response(200, request.body)

    async def main() -> None:
        async with kit_server(handler) as server:
            client = Client(f"http://127.0.0.1:{server.port}/", limit=4)
            try:
                for i in range(20):
                    response = await client.post(str(i).encode())
                    assert (response.status, response.body) == (200, str(i).encode())
                assert client.connections == 1 and client.idle_connections == 1
            finally:
                await client.close()
            assert client.connections == 0

    run(main())
    assert len(peers) == 1


def test_pool_limit_holds_under_concurrency() -> None:
    limit = 4
    in_handler = 0
    most_in_handler = 0
    peers: set[tuple[str, int] | None] = set()
    most_connections = 0
    gate = asyncio.Event()
    server_ref: list[HTTPServer] = []

    async def handler(request: Request) -> Response:
        nonlocal in_handler, most_in_handler, most_connections
        peers.add(request.client)
        in_handler += 1
        most_in_handler = max(most_in_handler, in_handler)
        most_connections = max(most_connections, len(server_ref[0].connections))
        if in_handler >= limit:
            gate.set()  # as many requests as the pool allows are waiting here at once
        await gate.wait()
        in_handler -= 1
        return Response(200)

    async def main() -> None:
        async with kit_server(handler) as server:
            server_ref.append(server)
            client = Client(f"http://127.0.0.1:{server.port}/", limit=limit)
            try:
                answers = await asyncio.gather(*(client.post(b"x") for _ in range(50)))
            finally:
                await client.close()
        assert [a.status for a in answers] == [200] * 50

    run(main())
    assert most_in_handler == limit
    assert most_connections == limit
    assert len(peers) == limit  # every connection was reused, none replaced


def test_a_request_encoded_once_can_be_sent_again() -> None:
    bodies: list[bytes] = []

    async def handler(request: Request) -> Response:
        bodies.append(request.body)
        return Response(200, request.headers["ce-id"].encode())

    async def main() -> None:
        async with kit_server(handler) as server:
            client = Client(f"http://127.0.0.1:{server.port}/")
            try:
                request = client.encode_request(b"same", {"ce-id": "7"})
                answers = [await client.send(request) for _ in range(3)]
            finally:
                await client.close()
        assert [(a.status, a.body) for a in answers] == [(200, b"7")] * 3
        assert bodies == [b"same"] * 3

    run(main())


def test_request_bytes() -> None:
    client = Client("https://user:p%40ss@example.com/a b/?q=é")
    data = client.encode_request(b"body", {"ce-id": "1"})
    head, _, body = data.partition(b"\r\n\r\n")
    assert body == b"body"
    assert head.split(b"\r\n") == [
        b"POST /a%20b/?q=%C3%A9 HTTP/1.1",
        b"Host: example.com",  # 443 is the default port of https
        f"User-Agent: cdk/{cdk.__version__}".encode(),
        b"Authorization: Basic dXNlcjpwQHNz",  # user:p@ss
        b"Content-Length: 4",
        b"ce-id: 1",
    ]
    assert b"Host: [::1]:8080\r\n" in Client("http://[::1]:8080").encode_request(b"")


@pytest.mark.parametrize(
    "headers",
    [{"x-a": "one\r\nx-b: two"}, {"x-a": "one\nx-b: two"}, {"x-a": "one\rtwo"}],
)
def test_header_values_with_line_breaks_are_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="line break"):
        Client("http://127.0.0.1:1/").encode_request(b"", headers)


@pytest.mark.parametrize("name", ["Host", "content-length", "Transfer-Encoding", "bad name", ""])
def test_reserved_or_invalid_header_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="header"):
        Client("http://127.0.0.1:1/").encode_request(b"", {name: "x"})


@pytest.mark.parametrize("url", ["ftp://host/", "http:///path", "localhost:8080"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        Client(url)


# -- answers of every shape ----------------------------------------------------------------


def test_chunked_answer_is_decoded() -> None:
    async def script(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.answer(
                b"HTTP/1.1 429 Too Many Requests\r\nTransfer-Encoding: chunked\r\n"
                b"Retry-After: 7\r\n\r\n"
                b"5\r\nslow \r\n" + b"4;ext=1\r\ndown\r\n0\r\nX-Trailer: t\r\n\r\n"
            )

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url)
            try:
                first = await client.post(b"a")
                second = await client.post(b"b")
            finally:
                await client.close()
        assert first.status == 429 and first.body == b"slow down"
        assert first.headers["retry-after"] == "7"
        assert second.body == b"slow down"
        assert len(server.conns) == 1  # a chunked answer leaves the connection usable

    run(main())


def test_trailers_are_not_headers_and_do_not_pile_up() -> None:
    trailers = b"X-Trailer: t\r\n" * 20000  # past the head limit, were they headers

    async def script(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.answer(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nok\r\n0\r\n" + trailers + b"\r\n"
            )

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url)
            try:
                answers = [await client.post(b"x") for _ in range(2)]
            finally:
                await client.close()
        for answer in answers:
            assert (answer.status, answer.body) == (200, b"ok")
            assert "x-trailer" not in answer.headers
        assert len(server.conns) == 1

    run(main())


def test_an_answer_before_the_whole_request_went_out_ends_the_connection() -> None:
    body = b"x" * (16 << 20)  # far more than socket buffers hold while nobody reads
    answered = asyncio.Event()

    async def script(conn: Conn) -> None:
        if conn.number == 0:
            await conn.reader.readuntil(b"\r\n\r\n")
            await conn.answer(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\n\r\n")
            await answered.wait()
            await conn.until_closed()  # drops the rest of the body, and anything after it
            return
        await keep_answering(conn)

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url, timeout=3.0)
            try:
                first = await client.post(body)
                answered.set()
                second = await client.post(b"small")
            finally:
                await client.close()
        assert first.status == 413
        assert (second.status, second.body) == (200, b"ok")
        assert [r.body for r in server.conns[1].requests] == [b"small"]

    run(main())


def test_interim_answers_are_skipped() -> None:
    async def script(conn: Conn) -> None:
        while await conn.read_request() is not None:
            await conn.answer(
                b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n"
                b"HTTP/1.1 202 Accepted\r\nContent-Length: 4\r\n\r\ndone"
            )

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url)
            try:
                answers = [await client.post(b"x") for _ in range(3)]
            finally:
                await client.close()
        assert [(a.status, a.body) for a in answers] == [(202, b"done")] * 3
        assert "link" not in answers[0].headers
        assert len(server.conns) == 1

    run(main())


def test_connection_close_answers_are_not_reused() -> None:
    async def script(conn: Conn) -> None:
        if await conn.read_request() is not None:
            await conn.answer(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
            )

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url)
            try:
                for _ in range(3):
                    assert (await client.post(b"x")).body == b"ok"
                    assert client.connections == 0
            finally:
                await client.close()
        assert len(server.conns) == 3
        assert [len(c.requests) for c in server.conns] == [1, 1, 1]

    run(main())


def test_http10_answer_without_length_reads_to_the_end_and_is_not_reused() -> None:
    async def script(conn: Conn) -> None:
        if await conn.read_request() is not None:
            await conn.answer(b"HTTP/1.0 500 Internal Server Error\r\n\r\nall of this")
            conn.writer.close()  # the end of the body is the end of the connection

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url)
            try:
                first = await client.post(b"x")
                second = await client.post(b"y")
            finally:
                await client.close()
        assert (first.status, first.body) == (500, b"all of this")
        assert (second.status, second.body) == (500, b"all of this")
        assert len(server.conns) == 2

    run(main())


@pytest.mark.parametrize("chunked", [False, True])
def test_large_bodies_are_truncated_but_read_to_the_end(chunked: bool) -> None:
    size = 1 << 20
    payload = bytes(range(256)) * (size // 256)

    async def script(conn: Conn) -> None:
        while await conn.read_request() is not None:
            if chunked:
                head = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
                chunks = b"".join(
                    b"%x\r\n%s\r\n" % (len(part), part)
                    for part in (payload[i : i + 10000] for i in range(0, size, 10000))
                )
                await conn.answer(head + chunks + b"0\r\n\r\n")
            else:
                head = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: %d\r\n\r\n" % size
                await conn.answer(head + payload)

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url, max_body=64 * 1024)
            try:
                first = await client.post(b"x")
                second = await client.post(b"y")
            finally:
                await client.close()
        for answer in (first, second):
            assert answer.status == 503
            assert answer.truncated
            assert answer.body == payload[: 64 * 1024]
        assert len(server.conns) == 1  # the rest was read, so the connection was reusable

    run(main())


# -- failures ------------------------------------------------------------------------------


def test_stale_keep_alive_connection_is_retried_once_on_a_fresh_one() -> None:
    async def script(conn: Conn) -> None:
        if conn.number == 0:
            await conn.read_request()
            await conn.answer(OK)
            # The idle timeout struck just as the next request arrived: it is read, never
            # answered, and the connection closes (what a client sees in that race).
            await conn.read_request()
            return
        await keep_answering(conn)

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url)
            try:
                assert (await client.post(b"first")).status == 200
                second = await client.post(b"second")
            finally:
                await client.close()
        assert (second.status, second.body) == (200, b"ok")
        assert [[r.body for r in c.requests] for c in server.conns] == [
            [b"first", b"second"],
            [b"second"],
        ]

    run(main())


def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async def script(conn: Conn) -> None:
        await conn.read_request()
        await conn.answer(OK)  # and close at once, keep-alive notwithstanding

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url)
            try:
                assert (await client.post(b"1")).status == 200
                await server.wait_ended(1)
                assert (await client.post(b"2")).status == 200
            finally:
                await client.close()
        assert [[r.body for r in c.requests] for c in server.conns][-1] == [b"2"]

    run(main())


def test_no_retry_once_part_of_the_answer_arrived() -> None:
    async def script(conn: Conn) -> None:
        await conn.read_request()
        await conn.answer(OK)
        await conn.read_request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        conn.reset()

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url)
            try:
                assert (await client.post(b"first")).status == 200
                with pytest.raises(ConnectionClosed) as info:
                    await client.post(b"second")
                assert client.connections == 0
            finally:
                await client.close()
        assert info.value.received
        assert "before the answer was complete" in str(info.value)
        assert len(server.conns) == 1 and len(server.requests) == 2

    run(main())


def test_no_retry_when_a_fresh_connection_closes_unanswered() -> None:
    async def script(conn: Conn) -> None:
        await conn.read_request()
        conn.reset()

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url)
            try:
                with pytest.raises(ConnectionClosed) as info:
                    await client.post(b"x")
            finally:
                await client.close()
        assert not info.value.received
        assert len(server.conns) == 1

    run(main())


def test_silent_server_times_out_and_the_connection_is_closed() -> None:
    async def script(conn: Conn) -> None:
        await conn.read_request()
        await conn.until_closed()

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url, timeout=0.2)
            try:
                loop = asyncio.get_running_loop()
                started = loop.time()
                with pytest.raises(RequestTimeout, match=r"no answer within 0\.2 s"):
                    await client.post(b"x")
                assert 0.15 <= loop.time() - started < 2.0
                assert client.connections == 0
                await server.wait_ended(1)  # the client closed its end
            finally:
                await client.close()

    run(main())


def test_timeout_is_a_timeout_error() -> None:
    assert issubclass(RequestTimeout, TimeoutError)
    assert issubclass(RequestTimeout, ClientError)


def test_garbage_answer_is_a_protocol_error() -> None:
    async def script(conn: Conn) -> None:
        await conn.read_request()
        await conn.answer(b"HELLO THERE\r\n\r\n")
        await conn.until_closed()

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url)
            try:
                with pytest.raises(ProtocolError, match="invalid HTTP answer"):
                    await client.post(b"x")
                assert client.connections == 0
                await server.wait_ended(1)
            finally:
                await client.close()

    run(main())


def test_endless_answer_head_is_a_protocol_error() -> None:
    async def script(conn: Conn) -> None:
        await conn.read_request()
        await conn.answer(b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * (80 * 1024))
        await conn.until_closed()

    async def main() -> None:
        async with raw_server(script) as server:
            client = Client(server.url)
            try:
                with pytest.raises(ProtocolError, match="head over"):
                    await client.post(b"x")
            finally:
                await client.close()

    run(main())


def test_connection_refused_is_a_connect_error() -> None:
    port = free_port()

    async def main() -> None:
        client = Client(f"http://127.0.0.1:{port}/")
        try:
            with pytest.raises(ConnectError, match=f"cannot connect to 127.0.0.1:{port}"):
                await client.post(b"x")
            assert client.connections == 0
        finally:
            await client.close()

    run(main())


def test_a_waiter_cancelled_as_its_turn_came_passes_the_turn_on() -> None:
    async def main() -> None:
        async with raw_server(keep_answering) as server:
            client = Client(server.url, limit=1, timeout=3.0)
            try:
                second = asyncio.ensure_future(client.post(b"b"))
                third = asyncio.ensure_future(client.post(b"c"))
                # Takes the only connection before the others start, so both wait; on
                # return it has handed the connection to the second, which has not run.
                assert (await client.post(b"a")).status == 200
                second.cancel()
                assert (await third).status == 200
                with pytest.raises(asyncio.CancelledError):
                    await second
                assert client.connections == 1 and client.idle_connections == 1
            finally:
                await client.close()
        assert [r.body for r in server.requests] == [b"a", b"c"]

    run(main())


def test_close_ends_idle_connections_and_later_posts_fail() -> None:
    async def main() -> None:
        async with raw_server(keep_answering) as server:
            client = Client(server.url, limit=3)
            await asyncio.gather(*(client.post(b"x") for _ in range(3)))
            assert client.idle_connections == 3
            await client.close()
            await server.wait_ended(3)
            assert client.connections == 0
            with pytest.raises(ClientError, match="closed"):
                await client.post(b"x")

    run(main())


# -- TLS ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with the system openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


def test_https_with_a_trusted_self_signed_certificate(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def main() -> None:
        async with raw_server(keep_answering, tls=server_tls) as server:
            url = f"https://127.0.0.1:{server.port}/"
            client = Client(url, ssl=ssl.create_default_context(cafile=str(cert)))
            try:
                answers = [await client.post(b"secret") for _ in range(3)]
            finally:
                await client.close()
            assert [(a.status, a.body) for a in answers] == [(200, b"ok")] * 3
            assert [r.body for r in server.requests] == [b"secret"] * 3
            assert len(server.conns) == 1
            assert server.requests[0].headers["host"] == f"127.0.0.1:{server.port}"

            untrusting = Client(url)  # the default context does not know this certificate
            try:
                with pytest.raises(ConnectError, match=r"certificate of 127\S+ is not trusted"):
                    await untrusting.post(b"x")
            finally:
                await untrusting.close()

    run(main())
