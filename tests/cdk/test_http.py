"""cdk.http: the HTTP/1.1 server against real clients on a loopback port.

Protocol edge cases go over raw sockets (asyncio streams) and are read back with
httptools' response parser; ordinary requests use aiohttp. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextvars
import http.client
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import httptools
import pytest
from waiting import until

from cdk.http import _HEAD, HTTPError, HTTPServer, Request, Response, encode_response

pytestmark = pytest.mark.timeout(30)

T = TypeVar("T")
WAIT = 5.0


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one async test body with an overall bound."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class RawClient:
    """A raw TCP client that writes bytes and reads back parsed HTTP answers in order."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    answers: deque[Answer] = field(default_factory=deque)
    eof: bool = False

    def __post_init__(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._headers = {}
        self._body = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        self.answers.append(Answer(status, self._headers, b"".join(self._body)))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def _read_more(self, timeout: float) -> None:
        try:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.eof = True
            raise ConnectionError("connection closed by the server")
        self._parser.feed_data(data)

    async def answer(self, timeout: float = WAIT) -> Answer:
        """The next whole answer (interim 1xx answers included)."""
        while not self.answers:
            await self._read_more(timeout)
        return self.answers.popleft()

    async def closed(self, timeout: float = WAIT) -> bool:
        """Wait until the server closes the connection; True once it did."""
        while not self.eof:
            try:
                await self._read_more(timeout)
            except ConnectionError:
                return True
        return True

    async def aclose(self) -> None:
        self.writer.close()
        with suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def echo(request: Request) -> Response:
    """Answers with what it saw, as JSON-ish text."""
    if request.path == "/http-error":
        raise HTTPError(418, "short and stout", {"X-Kind": "teapot"})
    if request.path == "/crash":
        raise RuntimeError("secret detail /etc/passwd")
    text = f"{request.method} {request.path} q={request.query} len={len(request.body)}"
    return Response(200, text.encode() + b"|" + request.body, headers=[("x-echo", "1")])


@asynccontextmanager
async def serving(
    handler: Callable[[Request], Awaitable[Response]] = echo, **options: Any
) -> AsyncIterator[HTTPServer]:
    server = HTTPServer(handler, port=0, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.close(1.0)


@asynccontextmanager
async def connected(
    handler: Callable[[Request], Awaitable[Response]] = echo, **options: Any
) -> AsyncIterator[RawClient]:
    """A server as :func:`serving` starts it, and a raw client connected to it."""
    async with serving(handler, **options) as server:
        yield await RawClient.connect(server.port)


def request_bytes(
    method: str = "GET",
    path: str = "/",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: test"]
    all_headers = dict(headers or {})
    if body and "Transfer-Encoding" not in all_headers:
        all_headers.setdefault("Content-Length", str(len(body)))
    lines += [f"{name}: {value}" for name, value in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


# -- ordinary requests --------------------------------------------------------------------


def test_request_fields_reach_the_handler_and_the_answer_is_well_formed() -> None:
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return Response(201, b'{"ok":true}', "application/json", [("X-Id", "7")])

    async def body() -> None:
        async with serving(handler) as server, aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.port}/a%20b/c?x=1&y=&x=2"
            headers = {"X-Multi": "one", "Content-Type": "text/plain"}
            async with session.post(url, data=b"payload", headers=headers) as reply:
                assert reply.status == 201
                assert reply.headers["Content-Type"] == "application/json"
                assert reply.headers["Content-Length"] == "11"
                assert reply.headers["X-Id"] == "7"
                assert await reply.read() == b'{"ok":true}'
        (request,) = seen
        assert request.method == "POST"
        assert request.path == "/a b/c"
        assert request.query == "x=1&y=&x=2"
        assert request.query_params() == {"x": ["1", "2"], "y": [""]}
        assert request.headers["x-multi"] == "one"
        assert request.headers["content-type"] == "text/plain"
        assert request.body == b"payload"
        assert request.client is not None and request.client[0] == "127.0.0.1"

    run(body())


def test_repeated_headers_are_joined_and_names_lower_cased() -> None:
    async def body() -> None:
        seen: list[dict[str, str]] = []

        async def handler(request: Request) -> Response:
            seen.append(request.headers)
            return Response(204)

        async with connected(handler) as client:
            await client.send(b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\nHOST: h\r\n\r\n")
            answer = await client.answer()
            assert answer.status == 204
            assert "content-length" not in answer.headers  # none on 204 (RFC 9110)
            await client.aclose()
        assert seen[0]["x-a"] == "1, 2"
        assert seen[0]["host"] == "h"

    run(body())


def test_request_json_parses_and_rejects_with_400() -> None:
    request = Request("POST", "/", "", {}, b'{"a": [1, 2]}')
    assert request.json() == {"a": [1, 2]}
    with pytest.raises(HTTPError) as caught:
        Request("POST", "/", "", {}, b"{nope").json()
    assert caught.value.status == 400
    deep = b"[" * 5000 + b"]" * 5000
    with pytest.raises(HTTPError):
        Request("POST", "/", "", {}, deep).json()


def test_encode_response_head_only_and_http10_keep_alive() -> None:
    data = encode_response(Response(200, b"hello"), keep_alive=True, http10=True, head=True)
    assert data.endswith(b"\r\n\r\n")
    assert b"content-length: 5\r\n" in data
    assert b"connection: keep-alive\r\n" in data
    assert b"hello" not in data
    with pytest.raises(ValueError, match="line break"):
        encode_response(Response(200, b"x", headers=[("x-a", "1\r\nSet-Cookie: a=b")]))


def test_handler_http_error_answers_its_status_message_and_headers() -> None:
    async def body() -> None:
        async with (
            serving() as server,
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.port}/http-error") as reply,
        ):
            assert reply.status == 418
            assert reply.headers["X-Kind"] == "teapot"
            assert await reply.text() == "short and stout"

    run(body())


def test_handler_crash_answers_500_without_details_and_logs_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        async with connected() as client:
            await client.send(request_bytes("GET", "/crash") + request_bytes("GET", "/after"))
            crashed = await client.answer()
            assert crashed.status == 500
            assert crashed.body == b"internal error"
            # The connection survives a handler crash.
            after = await client.answer()
            assert after.status == 200
            assert after.body.startswith(b"GET /after")
            await client.aclose()

    with caplog.at_level(logging.ERROR, logger="cdk.http"):
        run(body())
    assert "secret detail" in caplog.text  # in the log, never on the wire
    assert "Traceback" in caplog.text


def test_a_logged_path_is_escaped_so_it_cannot_forge_log_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def crash(request: Request) -> Response:
        raise RuntimeError("boom")

    async def body() -> None:
        async with connected(crash) as client:
            await client.send(request_bytes("GET", "/x%0d%0aFORGED%20line%E2%82%AC"))
            assert (await client.answer()).status == 500

    with caplog.at_level(logging.ERROR, logger="cdk.http"):
        run(body())
    (message,) = [r.getMessage() for r in caplog.records if r.name == "cdk.http"]
    assert "\r" not in message and "\n" not in message
    assert "GET /x\\r\\nFORGED line\\u20ac" in message


def test_a_client_writing_its_whole_large_body_before_reading_gets_the_413() -> None:
    # Python's http.client (and requests) send all of the body first: closing at once
    # would reset the connection under it and lose the answer.
    async def body() -> tuple[int, bytes]:
        async with serving() as server:

            def post() -> tuple[int, bytes]:
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
                try:
                    connection.request("POST", "/big", body=b"x" * (50 << 20))
                    response = connection.getresponse()
                    return response.status, response.read()
                finally:
                    connection.close()

            return await asyncio.to_thread(post)

    assert run(body()) == (413, b"request body too large")


def test_head_request_gets_headers_only() -> None:
    async def body() -> None:
        async with connected() as client:
            # A HEAD answer has no body, so the next answer must follow right after it.
            await client.send(request_bytes("HEAD", "/h") + request_bytes("GET", "/g"))
            raw = b""
            while raw.count(b"HTTP/1.1") < 2 or not raw.endswith(b"|"):
                chunk = await asyncio.wait_for(client.reader.read(4096), WAIT)
                assert chunk
                raw += chunk
            head, _, rest = raw.partition(b"\r\n\r\n")
            assert b"content-length: 17" in head.lower()
            assert rest.startswith(b"HTTP/1.1 200 OK")
            await client.aclose()

    run(body())


# -- handlers that answer at once and handlers that wait ----------------------------------


def test_handlers_that_wait_and_ones_that_do_not_are_answered_in_order() -> None:
    async def handler(request: Request) -> Response:
        if request.path.startswith("/wait"):
            for _ in range(3):
                await asyncio.sleep(0)
            await asyncio.get_running_loop().run_in_executor(None, lambda: None)
        if request.path.endswith("/teapot"):
            raise HTTPError(418, "short and stout")
        if request.path.endswith("/crash"):
            raise RuntimeError("boom")
        return Response(200, request.path.encode())

    paths = ["/now", "/wait", "/now/teapot", "/wait/teapot", "/now/crash", "/wait/crash"]
    paths += ["/wait", "/now"]

    async def body() -> None:
        async with connected(handler) as client:
            # Pipelined, and one at a time.
            await client.send(b"".join(request_bytes("GET", path) for path in paths))
            pipelined = [await client.answer() for _ in paths]
            one_by_one = []
            for path in paths:
                await client.send(request_bytes("GET", path))
                one_by_one.append(await client.answer())
            await client.aclose()
        for answers in (pipelined, one_by_one):
            assert [a.status for a in answers] == [200, 200, 418, 418, 500, 500, 200, 200]
            assert answers[0].body == b"/now"
            assert answers[1].body == b"/wait"
            assert answers[3].body == b"short and stout"
            assert answers[5].body == b"internal error"

    run(body())


def test_each_request_runs_in_its_own_context() -> None:
    current: contextvars.ContextVar[str] = contextvars.ContextVar("current", default="unset")
    seen: list[tuple[str, str, str]] = []

    async def handler(request: Request) -> Response:
        before = current.get()
        current.set(request.path)
        if request.path.startswith("/wait"):
            await asyncio.sleep(0)
        seen.append((request.path, before, current.get()))
        return Response()

    async def body() -> None:
        async with connected(handler) as client:
            paths = ["/now-1", "/wait-1", "/now-2", "/wait-2"]
            await client.send(b"".join(request_bytes("GET", path) for path in paths))
            for _ in paths:
                assert (await client.answer()).status == 200
            await client.aclose()
        assert current.get() == "unset"
        # No request sees what an earlier one set; one that waited still sees its own.
        assert seen == [(path, "unset", path) for path in paths]

    run(body())


def test_a_handler_returning_a_future_or_a_non_response() -> None:
    def future_handler(request: Request) -> Awaitable[Response]:
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        if request.path == "/odd":
            future.set_result("not a response")  # type: ignore[arg-type]
        else:
            asyncio.get_running_loop().call_soon(future.set_result, Response(200, b"later"))
        return future

    async def body() -> None:
        async with connected(future_handler) as client:
            await client.send(request_bytes("GET", "/f") + request_bytes("GET", "/odd"))
            assert (await client.answer()).body == b"later"
            assert (await client.answer()).status == 500
            await client.aclose()

    run(body())


def test_a_waiting_handler_that_is_cancelled_sees_the_cancellation() -> None:
    async def body() -> None:
        entered = asyncio.Event()
        cleaned_up = asyncio.Event()

        async def handler(request: Request) -> Response:
            await asyncio.sleep(0)  # suspends once, then waits again
            entered.set()
            try:
                await asyncio.Event().wait()
            finally:
                await asyncio.sleep(0)  # a handler may still wait while cleaning up
                cleaned_up.set()
            return Response()

        server = HTTPServer(handler, port=0)
        await server.start()
        client = await RawClient.connect(server.port)
        await client.send(request_bytes())
        await asyncio.wait_for(entered.wait(), WAIT)
        await server.close(grace=0.1)
        assert cleaned_up.is_set()
        assert await client.closed()
        assert not client.answers

    run(body())


# -- keep-alive and pipelining ------------------------------------------------------------


def test_keep_alive_serves_several_requests_on_one_connection() -> None:
    async def body() -> None:
        async with connected() as client:
            for n in range(3):
                await client.send(request_bytes("POST", f"/{n}", b"x" * n))
                answer = await client.answer()
                assert answer.status == 200
                assert answer.body.startswith(f"POST /{n}".encode())
                assert "connection" not in answer.headers
            await client.aclose()

    run(body())


def test_http10_closes_unless_keep_alive_is_asked_for() -> None:
    async def body() -> None:
        async with connected() as client:
            await client.send(request_bytes(version="1.0", headers={"Connection": "keep-alive"}))
            answer = await client.answer()
            assert answer.headers.get("connection") == "keep-alive"
            await client.send(request_bytes(version="1.0"))
            answer = await client.answer()
            assert answer.headers.get("connection") == "close"
            assert await client.closed()

    run(body())


def test_connection_close_from_the_client_is_honoured() -> None:
    async def body() -> None:
        async with connected() as client:
            await client.send(request_bytes(headers={"Connection": "close"}))
            answer = await client.answer()
            assert answer.status == 200
            assert answer.headers.get("connection") == "close"
            assert await client.closed()

    run(body())


def test_pipelined_requests_are_answered_in_order_one_at_a_time() -> None:
    async def body() -> None:
        release_first = asyncio.Event()
        first_started = asyncio.Event()
        running: list[str] = []
        overlap: list[bool] = []

        async def handler(request: Request) -> Response:
            running.append(request.path)
            overlap.append(len(running) > 1)
            if request.path == "/slow":
                first_started.set()
                await release_first.wait()
            running.remove(request.path)
            return Response(200, request.path.encode())

        async with connected(handler) as client:
            await client.send(
                request_bytes("POST", "/slow", b"a")
                + request_bytes("GET", "/fast")
                + request_bytes("POST", "/third", b"ccc", {"Transfer-Encoding": "chunked"})[:-3]
                + b"3\r\nccc\r\n0\r\n\r\n"
            )
            await asyncio.wait_for(first_started.wait(), WAIT)
            release_first.set()
            bodies = [(await client.answer()).body for _ in range(3)]
            assert bodies == [b"/slow", b"/fast", b"/third"]
            await client.aclose()
        assert overlap == [False, False, False]

    run(body())


def test_many_pipelined_requests_in_one_write() -> None:
    async def body() -> None:
        async with connected() as client:
            await client.send(b"".join(request_bytes("GET", f"/{n}") for n in range(200)))
            for n in range(200):
                answer = await client.answer()
                assert answer.body.startswith(f"GET /{n} ".encode())
            await client.aclose()

    run(body())


def test_pipelined_requests_in_pieces_of_every_size_are_answered_in_order() -> None:
    # Heads, declared and chunked bodies cut anywhere, CRLFCRLF split across reads.
    requests = [
        request_bytes("GET", "/a"),
        request_bytes("POST", "/b", b"x\r\n\r\ny"),
        request_bytes("POST", "/c", b"", {"Transfer-Encoding": "chunked"})
        + b"4\r\n\r\n\r\n\r\n0\r\n\r\n",
        request_bytes("GET", "/d"),
        b"\r\n" + request_bytes("POST", "/e", b"eeee"),
    ]
    stream = b"".join(requests) * 3

    async def body() -> None:
        for size in (1, 2, 3, 5, 7, 64, len(stream)):
            async with connected() as client:
                for at in range(0, len(stream), size):
                    await client.send(stream[at : at + size])
                paths = [(await client.answer()).body.split(b"|")[0] for _ in range(15)]
                expected = [b"GET /a q= len=0", b"POST /b q= len=6", b"POST /c q= len=4"]
                expected += [b"GET /d q= len=0", b"POST /e q= len=4"]
                assert paths == expected * 3, size
                await client.aclose()

    run(body())


def test_a_connection_parses_one_request_ahead_of_the_one_being_answered() -> None:
    async def body() -> None:
        release = asyncio.Event()

        async def handler(request: Request) -> Response:
            await release.wait()
            return Response(200, request.path.encode())

        async with serving(handler) as server:
            client = await RawClient.connect(server.port)
            await client.send(b"".join(request_bytes("GET", f"/{n}") for n in range(1000)))
            (conn,) = server.connections
            await until(lambda: bool(conn._unparsed))  # the server stopped parsing
            assert conn.task is not None and len(conn.queue) <= 1
            release.set()
            for n in range(1000):
                assert (await client.answer()).body == f"/{n}".encode()
            await client.aclose()

    run(body())


def test_a_slow_reader_of_pipelined_answers_gets_them_all() -> None:
    async def body() -> None:
        padding = b"." * 8192

        async def handler(request: Request) -> Response:
            return Response(200, request.path.encode() + padding)

        async with serving(handler, read_timeout=5.0) as server:
            client = await RawClient.connect(server.port)
            count = 2000  # 16 MiB of answers: more than the socket buffers hold
            await client.send(b"".join(request_bytes("GET", f"/{n}") for n in range(count)))
            (conn,) = server.connections
            await until(lambda: conn.write_paused)  # nobody reads: the server waits
            for n in range(count):
                answer = await client.answer()
                assert answer.body == f"/{n}".encode() + padding
                if n % 200 == 0:
                    await asyncio.sleep(0.05)  # a reader that keeps falling behind
            await client.aclose()

    run(body(), 25)


# -- bodies and limits --------------------------------------------------------------------


def test_chunked_body_is_decoded() -> None:
    async def body() -> None:
        async with connected() as client:
            head = b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            await client.send(head + b"5\r\nhello\r\n")
            await client.send(b"6\r\n world\r\n0\r\n\r\n")
            answer = await client.answer()
            assert answer.status == 200
            assert answer.body.endswith(b"|hello world")
            await client.aclose()

    run(body())


def test_body_over_the_limit_by_content_length_gets_413_before_the_body() -> None:
    async def body() -> None:
        rejected: list[int] = []
        async with serving(max_body_bytes=1000, on_reject=rejected.append) as server:
            client = await RawClient.connect(server.port)
            await client.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n")
            answer = await client.answer()
            assert answer.status == 413
            assert answer.headers["connection"] == "close"
            assert await client.closed()
            # Exactly at the limit is fine.
            client = await RawClient.connect(server.port)
            await client.send(request_bytes("POST", "/", b"y" * 1000))
            assert (await client.answer()).status == 200
            await client.aclose()
        assert rejected == [413]

    run(body())


def test_chunked_body_over_the_limit_gets_413_and_close() -> None:
    async def body() -> None:
        calls: list[str] = []

        async def handler(request: Request) -> Response:
            calls.append(request.path)
            return Response()

        async with connected(handler, max_body_bytes=1000) as client:
            await client.send(
                b"POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            await client.send(b"3e8\r\n" + b"z" * 1000 + b"\r\n")
            await client.send(b"1\r\nz\r\n")
            answer = await client.answer()
            assert answer.status == 413
            assert await client.closed()
        assert calls == []

    run(body())


def expect_head(length: int) -> bytes:
    return request_bytes(
        "POST", "/e", headers={"Content-Length": str(length), "Expect": "100-continue"}
    )


def test_expect_100_continue() -> None:
    async def body() -> None:
        async with connected(max_body_bytes=1000) as client:
            head = expect_head(4)
            await client.send(head)
            interim = await client.answer()
            assert interim.status == 100
            await client.send(b"data")
            final = await client.answer()
            assert final.status == 200
            assert final.body.endswith(b"|data")
            # Declared too large: 413 straight away, no 100 Continue, then close.
            head = expect_head(5000)
            await client.send(head)
            rejected = await client.answer()
            assert rejected.status == 413
            assert await client.closed()

    run(body())


def test_expect_100_continue_behind_a_pipelined_request_waits_its_turn() -> None:
    async def body() -> None:
        release = asyncio.Event()
        started = asyncio.Event()

        async def handler(request: Request) -> Response:
            if request.path == "/slow":
                started.set()
                await release.wait()
            return Response(200, request.path.encode())

        async with connected(handler) as client:
            await client.send(request_bytes("GET", "/slow") + expect_head(2))
            await asyncio.wait_for(started.wait(), WAIT)
            release.set()
            assert (await client.answer()).body == b"/slow"
            assert (await client.answer()).status == 100
            await client.send(b"ok")
            assert (await client.answer()).body == b"/e"
            await client.aclose()

    run(body())


def test_check_head_refuses_a_request_with_a_body_before_reading_it() -> None:
    seen: list[tuple[str, str, bytes]] = []
    statuses: list[int] = []

    def check(request: Request) -> Response | None:
        seen.append((request.method, request.path, request.body))
        return Response(403, b"no", headers=[("x-why", "test")]) if request.path == "/no" else None

    async def main() -> None:
        async with connected(check_head=check, on_reject=statuses.append) as client:
            # Requests without a body are not checked; ones with a body are, once.
            await client.send(request_bytes("GET", "/no") + request_bytes("POST", "/yes", b"abc"))
            assert (await client.answer()).status == 200
            assert (await client.answer()).body.endswith(b"|abc")
            await client.send(expect_head(5).replace(b"/e", b"/no"))
            answer = await client.answer()
            assert (answer.status, answer.body, answer.headers["x-why"]) == (403, b"no", "test")
            assert await client.closed()

    run(main())
    assert seen == [("POST", "/yes", b""), ("POST", "/no", b"")]
    assert statuses == [403]


def test_header_over_the_limit_gets_431() -> None:
    async def body() -> None:
        async with serving(max_header_bytes=2048) as server:
            client = await RawClient.connect(server.port)
            await client.send(request_bytes(headers={"X-Big": "v" * 3000}))
            answer = await client.answer()
            assert answer.status == 431
            assert await client.closed()
            # Many small headers add up too.
            client = await RawClient.connect(server.port)
            many = {f"X-H{n}": "v" * 20 for n in range(200)}
            await client.send(request_bytes(headers=many))
            assert (await client.answer()).status == 431
            assert await client.closed()
            # Just under the limit is fine.
            client = await RawClient.connect(server.port)
            await client.send(request_bytes(headers={"X-Big": "v" * 1500}))
            assert (await client.answer()).status == 200
            await client.aclose()

    run(body())


def test_an_endless_header_line_sent_in_pieces_gets_431() -> None:
    async def body() -> None:
        async with connected(max_header_bytes=2048) as client:
            await client.send(b"GET / HTTP/1.1\r\nX-Endless: ")
            for _ in range(40):
                if client.reader.at_eof():
                    break
                try:
                    await client.send(b"a" * 512)
                except (ConnectionError, OSError):
                    break
            answer = await client.answer()
            assert answer.status == 431

    run(body())


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /  HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ],
)
def test_malformed_requests_get_400_and_close(raw: bytes) -> None:
    async def body() -> None:
        async with connected() as client:
            await client.send(raw)
            answer = await client.answer()
            assert answer.status == 400
            assert answer.headers["connection"] == "close"
            assert await client.closed()

    run(body())


@pytest.mark.parametrize(
    "pieces",
    [
        [request_bytes("GET", "/ok") + b"GET  /healthz HTTP/1.1\r\nHost: t\r\n\r\n"],
        [request_bytes("GET", "/ok") + b"GET ", b" /healthz HTTP/1.1\r\nHost: t\r\n\r\n"],
        [request_bytes("GET", "/ok") + b"GET /healthz ", b" HTTP/1.1\r\nHost: t\r\n\r\n"],
        [request_bytes("POST", "/ok", b"abc") + b"\r\nGET /x  HTTP/1.1\r\nHost: t\r\n\r\n"],
    ],
    ids=["pipelined", "split-after-method", "split-after-target", "after-a-body"],
)
def test_every_request_line_with_a_repeated_space_gets_400(pieces: list[bytes]) -> None:
    # Issue 20.9: only the first line of each read was checked (Go answers 400 to all).
    async def body() -> None:
        async with serving() as server:
            client = await RawClient.connect(server.port)
            (conn,) = server.connections
            for piece in pieces[:-1]:
                await client.send(piece)
                await until(lambda: conn.reading == _HEAD)  # read: the next is another read
            await client.send(pieces[-1])
            assert (await client.answer()).status == 200
            answer = await client.answer()
            assert answer.status == 400 and b"request line" in answer.body
            assert await client.closed()

    run(body())


H2C = {
    "Connection": "Upgrade, HTTP2-Settings",
    "Upgrade": "h2c",
    "HTTP2-Settings": "AAMAAABkAAQAoAAAAAIAAAAA",
}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_an_upgrade_is_ignored_the_body_read_and_the_connection_kept(chunked: bool) -> None:
    # What Java's HttpClient and curl --http2 send on every POST over http://.
    headers = dict(H2C)
    body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" if chunked else b"hello world"
    if chunked:
        headers["Transfer-Encoding"] = "chunked"

    async def main() -> None:
        async with connected() as client:
            post = request_bytes("POST", "/up", body, headers)
            # The body in the same write as the head, then in a later one; pipelined
            # requests after it are framed as HTTP/1.1.
            await client.send(post + request_bytes("GET", "/next"))
            head, rest = post.split(b"\r\n\r\n", 1)
            await client.send(head + b"\r\n\r\n")
            await client.send(rest + request_bytes("POST", "/last", b"x"))
            up = b"POST /up q= len=11|hello world"
            for expected in (up, b"GET /next q= len=0|", up, b"POST /last q= len=1|x"):
                answer = await client.answer()
                assert (answer.status, answer.body) == (200, expected)
                assert "connection" not in answer.headers
            await client.aclose()

    run(main())


def test_an_upgrade_request_with_expect_gets_one_100_continue_then_its_answer() -> None:
    async def main() -> None:
        async with connected() as client:
            headers = {**H2C, "Content-Length": "4", "Expect": "100-continue"}
            await client.send(request_bytes("POST", "/e", headers=headers))
            assert (await client.answer()).status == 100
            await client.send(b"data" + request_bytes("GET", "/after"))
            final = await client.answer()
            assert (final.status, final.body) == (200, b"POST /e q= len=4|data")
            assert (await client.answer()).body.startswith(b"GET /after")

    run(main())


def test_a_websocket_upgrade_is_answered_as_http_and_no_frame_is_read_as_a_request() -> None:
    async def main() -> None:
        async with connected() as client:
            upgrade = {"Upgrade": "websocket", "Connection": "upgrade"}
            await client.send(request_bytes(headers=upgrade) + b"\x81\x05hello")
            answer = await client.answer()
            assert answer.status == 200
            assert (await client.answer()).status == 400
            assert await client.closed()

    run(main())


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
    ],
    ids=["http2", "connect"],
)
def test_what_the_server_does_not_speak_gets_its_status_and_close(raw: bytes, status: int) -> None:
    async def main() -> None:
        async with connected() as client:
            await client.send(raw)
            answer = await client.answer()
            assert (answer.status, answer.headers["connection"]) == (status, "close")
            assert await client.closed()

    run(main())


# -- timeouts and connection limits -------------------------------------------------------


def test_a_stalled_client_gets_408_while_others_are_served_promptly() -> None:
    async def body() -> None:
        async with serving(read_timeout=0.3, keepalive_timeout=5.0) as server:
            loop = asyncio.get_running_loop()
            stalled = await RawClient.connect(server.port)
            started = loop.time()
            await stalled.send(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
            stalled_answer = asyncio.ensure_future(stalled.answer())
            # A normal request beside it is answered at once, long before the stalled
            # one times out.
            normal = await RawClient.connect(server.port)
            await normal.send(request_bytes("GET", "/ok"))
            assert (await normal.answer()).status == 200
            assert not stalled_answer.done()
            answer = await stalled_answer
            waited = loop.time() - started
            assert answer.status == 408
            assert 0.3 <= waited < 2.0
            assert await stalled.closed()
            await normal.aclose()

    run(body())


def test_a_client_dribbling_its_head_is_cut_off_after_read_timeout() -> None:
    async def body() -> None:
        async with serving(read_timeout=0.3) as server:
            loop = asyncio.get_running_loop()
            client = await RawClient.connect(server.port)
            started = loop.time()
            await client.send(b"GET / HTTP/1.1\r\n")
            closed = asyncio.ensure_future(client.answer(timeout=3.0))
            # Keep sending a byte now and then: the deadline is per request, not per read.
            for n in range(100):
                done, _ = await asyncio.wait({closed}, timeout=0.05)
                if done:
                    break
                try:
                    await client.send(f"X-{n}: y\r\n".encode())
                except (ConnectionError, OSError):
                    break
            answer = await closed
            assert answer.status == 408
            assert loop.time() - started < 2.0

    run(body())


def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout() -> None:
    async def body() -> None:
        async with serving(read_timeout=5.0, keepalive_timeout=0.3) as server:
            loop = asyncio.get_running_loop()
            client = await RawClient.connect(server.port)
            await client.send(request_bytes())
            assert (await client.answer()).status == 200
            started = loop.time()
            assert await client.closed(timeout=3.0)
            assert 0.2 <= loop.time() - started < 2.0
            assert not client.answers  # closed quietly: no 408 for an idle connection

    run(body())


def test_at_the_connection_cap_the_longest_idle_connection_makes_room() -> None:
    async def body() -> None:
        rejected: list[int] = []
        async with serving(max_connections=2, on_reject=rejected.append) as server:
            first = await RawClient.connect(server.port)
            second = await RawClient.connect(server.port)
            for client in (first, second):
                await client.send(request_bytes())
                assert (await client.answer()).status == 200
            # Both idle: the one idle for longer is closed, the newcomer is served.
            third = await RawClient.connect(server.port)
            assert await first.closed()
            await third.send(request_bytes())
            assert (await third.answer()).status == 200
            await second.send(request_bytes())
            assert (await second.answer()).status == 200
        assert rejected == []

    run(body())


def test_connections_beyond_max_connections_get_503_when_none_is_idle() -> None:
    async def body() -> None:
        rejected: list[int] = []
        async with serving(max_connections=2, on_reject=rejected.append) as server:
            # Requests half sent are in progress, not idle.
            busy = [await RawClient.connect(server.port) for _ in range(2)]
            for client in busy:
                await client.send(b"GET / HTTP/1.1\r\n")
            await until(lambda: len(server.connections) == 2)
            third = await RawClient.connect(server.port)
            answer = await third.answer()
            assert (answer.status, answer.headers["retry-after"]) == (503, "1")
            assert await third.closed()
            await busy[0].send(b"Host: t\r\nConnection: close\r\n\r\n")
            assert (await busy[0].answer()).status == 200
            # Once a slot frees up, connections are accepted again.
            assert await busy[0].closed()
            fourth = await RawClient.connect(server.port)
            await fourth.send(request_bytes())
            assert (await fourth.answer()).status == 200
        assert rejected == [503]

    run(body())


def test_refused_connections_linger_outside_the_connection_cap_and_are_bounded() -> None:
    # Issue 20.9: a refused client kept its slot for as long as it lingered (up to 40 s).
    async def body() -> None:
        async with serving(max_connections=2) as server:
            assert server.max_lingering == 1
            refused = []
            for _ in range(2):
                client = await RawClient.connect(server.port)
                await client.send(b"GARBAGE\r\n\r\n")
                assert (await client.answer()).status == 400
                refused.append(client)  # kept open: the server lingers on it
            await until(lambda: len(server.lingering) == 1)  # the oldest made room
            assert not server.connections
            assert await refused[0].closed()
            for _ in range(2):  # both slots are free for clients it serves
                client = await RawClient.connect(server.port)
                await client.send(request_bytes())
                assert (await client.answer()).status == 200
            for client in refused:
                await client.aclose()

    run(body())


def test_requests_beyond_the_bytes_budget_get_503_and_bodyless_ones_are_served() -> None:
    release = asyncio.Event()

    async def handler(request: Request) -> Response:
        if request.path == "/hold":
            await release.wait()
        return Response(200, request.path.encode())

    async def main() -> None:
        async with serving(handler, max_bytes_in_flight=50_000) as server:
            holder = await RawClient.connect(server.port)
            await holder.send(request_bytes("POST", "/hold", b"h" * 40_000))
            await until(lambda: server.held == 40_000)
            # A declared body over what is left: 503 on its head, before the body.
            over = await RawClient.connect(server.port)
            await over.send(request_bytes("POST", "/x", headers={"Content-Length": "20000"}))
            answer = await over.answer()
            assert (answer.status, answer.headers["retry-after"]) == (503, "1")
            assert await over.closed()
            # A chunked body is counted as it comes.
            chunked = await RawClient.connect(server.port)
            head = request_bytes("POST", "/c", headers={"Transfer-Encoding": "chunked"})
            await chunked.send(head + b"2710\r\n" + b"c" * 10_000 + b"\r\n")
            await chunked.send(b"2710\r\n" + b"c" * 10_000 + b"\r\n")
            assert (await chunked.answer()).status == 503
            # Requests without a body (health checks) are served meanwhile.
            health = await RawClient.connect(server.port)
            await health.send(request_bytes("GET", "/healthz"))
            assert (await health.answer()).body == b"/healthz"
            # A body dropped half-way gives back what it held.
            dropped = await RawClient.connect(server.port)
            await dropped.send(request_bytes("POST", "/d", headers={"Content-Length": "9000"}))
            await until(lambda: server.held == 49_000)
            await dropped.aclose()
            await until(lambda: server.held == 40_000)
            release.set()
            assert (await holder.answer()).body == b"/hold"
            assert server.held == 0
            # Alone, a request may hold more than the budget: it would never fit otherwise.
            await holder.send(request_bytes("POST", "/big", b"b" * 60_000))
            assert (await holder.answer()).status == 200
            assert server.held == 0

    run(main())


# -- shutdown -------------------------------------------------------------------------------


def test_close_lets_in_flight_requests_finish_and_refuses_new_connections() -> None:
    async def body() -> None:
        entered = asyncio.Event()
        release = asyncio.Event()

        async def handler(request: Request) -> Response:
            if request.path == "/slow":
                entered.set()
                await release.wait()
            return Response(200, b"done " + request.path.encode())

        server = HTTPServer(handler, port=0)
        await server.start()
        port = server.port
        idle = await RawClient.connect(port)
        await idle.send(request_bytes("GET", "/warm"))
        assert (await idle.answer()).status == 200
        busy = await RawClient.connect(port)
        await busy.send(request_bytes("POST", "/slow", b"x"))
        await asyncio.wait_for(entered.wait(), WAIT)

        closing = asyncio.ensure_future(server.close(grace=5.0))
        await asyncio.sleep(0)  # let close() run up to its first wait
        assert server.draining
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        assert await idle.closed()  # idle connections go at once
        assert not closing.done()

        release.set()
        answer = await busy.answer()
        assert answer.status == 200
        assert answer.body == b"done /slow"
        assert answer.headers["connection"] == "close"
        assert await busy.closed()
        await asyncio.wait_for(closing, WAIT)

    run(body())


def test_close_drops_handlers_that_outlive_the_grace_period() -> None:
    async def body() -> None:
        entered = asyncio.Event()
        cancelled = asyncio.Event()

        async def handler(request: Request) -> Response:
            entered.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return Response()

        server = HTTPServer(handler, port=0)
        await server.start()
        client = await RawClient.connect(server.port)
        await client.send(request_bytes())
        await asyncio.wait_for(entered.wait(), WAIT)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await server.close(grace=0.2)
        assert loop.time() - started < 2.0
        assert cancelled.is_set()
        assert await client.closed()
        assert not client.answers

    run(body())


def test_a_client_that_never_reads_its_answers_is_dropped() -> None:
    async def body() -> None:
        big = b"b" * (1 << 20)
        handled: list[str] = []

        async def handler(request: Request) -> Response:
            handled.append(request.path)
            return Response(200, big)

        async with serving(handler, read_timeout=0.3) as server:
            loop = asyncio.get_running_loop()
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            # Ask for far more than the socket buffers hold, and never read.
            writer.write(request_bytes() * 64)
            await writer.drain()
            started = loop.time()
            await until(lambda: bool(handled) and not server.connections)
            assert 0.25 <= loop.time() - started < 3.0
            assert len(handled) < 64  # it stopped handling once the client stopped reading
            writer.close()

    run(body())


# -- framing and header rules ---------------------------------------------------------------


def test_a_repeated_header_name_counts_every_line_toward_the_head_limit() -> None:
    async def body() -> None:
        handled: list[str] = []

        async def handler(request: Request) -> Response:
            handled.append(request.path)
            return Response(200)

        async with connected(handler, max_header_bytes=1024) as client:
            # 900 lines of "a:" are 3.6 KB on the wire but only 900 bytes of names.
            await client.send(b"GET / HTTP/1.1\r\nHost: test\r\n" + b"a:\r\n" * 900 + b"\r\n")
            answer = await client.answer()
            assert answer.status == 431
            assert await client.closed()
            assert handled == []

    run(body())


@pytest.mark.parametrize("coding", ["gzip, chunked", "deflate,chunked", "x-anything, chunked"])
def test_a_transfer_coding_other_than_chunked_gets_501(coding: str) -> None:
    async def body() -> None:
        handled: list[bytes] = []

        async def handler(request: Request) -> Response:
            handled.append(request.body)
            return Response(200)

        rejected: list[int] = []
        async with connected(handler, on_reject=rejected.append) as client:
            chunked = b"5\r\nhello\r\n0\r\n\r\n"
            await client.send(request_bytes("POST", "/", chunked, {"Transfer-Encoding": coding}))
            answer = await client.answer()
            assert answer.status == 501
            assert answer.headers["connection"] == "close"
            assert await client.closed()
        # The body never reaches the handler as if "hello" were the payload.
        assert handled == []
        assert rejected == [501]

    run(body())


def test_an_expectation_other_than_100_continue_gets_417() -> None:
    async def body() -> None:
        handled: list[str] = []

        async def handler(request: Request) -> Response:
            handled.append(request.path)
            return Response(200)

        async with serving(handler) as server:
            client = await RawClient.connect(server.port)
            await client.send(request_bytes("POST", "/", b"abc", {"Expect": "202-accepted"}))
            answer = await client.answer()
            assert answer.status == 417
            assert await client.closed()
            assert handled == []
            # An HTTP/1.0 client's 100-continue is ignored: no interim answer, then 200.
            client = await RawClient.connect(server.port)
            await client.send(
                request_bytes("POST", "/", b"abc", {"Expect": "100-continue"}, version="1.0")
            )
            answer = await client.answer()
            assert answer.status == 200
            assert handled == ["/"]
            await client.aclose()

    run(body())


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a, b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: h\xe9\r\n\r\n",
    ],
)
def test_an_http11_request_without_exactly_one_host_gets_400(raw: bytes) -> None:
    async def body() -> None:
        async with serving() as server:
            client = await RawClient.connect(server.port)
            await client.send(raw)
            answer = await client.answer()
            assert answer.status == 400
            assert b"Host" in answer.body
            assert await client.closed()
            # HTTP/1.0 has no Host requirement.
            client = await RawClient.connect(server.port)
            await client.send(b"GET /old HTTP/1.0\r\n\r\n")
            assert (await client.answer()).status == 200
            await client.aclose()

    run(body())


def test_a_fragment_in_the_target_is_not_part_of_the_path_or_query() -> None:
    async def body() -> None:
        async with connected() as client:
            await client.send(
                request_bytes("GET", "/healthz#top")
                + request_bytes("GET", "/x?a=1#frag")
                + request_bytes("GET", "http://example.com/y?b=2#frag")
            )
            assert (await client.answer()).body.startswith(b"GET /healthz q= ")
            assert (await client.answer()).body.startswith(b"GET /x q=a=1 ")
            assert (await client.answer()).body.startswith(b"GET /y q=b=2 ")
            await client.aclose()

    run(body())


def test_an_unsendable_answer_to_head_is_a_500_without_a_body() -> None:
    async def handler(request: Request) -> Response:
        if request.method == "HEAD":
            return Response(200, b"x", headers=[("x-bad", "a\r\nset-cookie: injected")])
        return Response(200, b"next")

    async def body() -> None:
        async with connected(handler) as client:
            await client.send(request_bytes("HEAD", "/") + request_bytes("GET", "/"))
            raw = b""
            while not raw.endswith(b"next"):
                chunk = await asyncio.wait_for(client.reader.read(4096), WAIT)
                assert chunk
                raw += chunk
            head, _, rest = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 500 ")
            assert b"injected" not in raw
            # No body after the HEAD answer: the next answer follows at once.
            assert rest.startswith(b"HTTP/1.1 200 OK")
            await client.aclose()

    run(body())


def test_an_exception_inside_a_parser_callback_is_a_logged_500_not_a_400(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import cdk.http

    def broken_unquote(text: str) -> str:
        raise RuntimeError("percent decoding broke")

    # A fault of the server while reading a request must not be blamed on the client.
    monkeypatch.setattr(cdk.http, "unquote", broken_unquote)

    async def body() -> None:
        rejected: list[int] = []
        async with connected(on_reject=rejected.append) as client:
            await client.send(request_bytes("GET", "/a%20b"))
            answer = await client.answer()
            assert answer.status == 500
            assert answer.body == b"internal error"
            assert answer.headers["connection"] == "close"
            assert await client.closed()
        assert rejected == [500]

    with caplog.at_level(logging.ERROR, logger="cdk.http"):
        run(body())
    assert "percent decoding broke" in caplog.text


_FD_LIMITED_SERVER = """
import asyncio, resource, sys
sys.path.insert(0, sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from cdk.http import HTTPServer, Response

async def ok(request):
    return Response(200)

async def main():
    server = HTTPServer(ok, keepalive_timeout=30.0, read_timeout=30.0)
    await server.start()
    print(server.port, server.max_connections, flush=True)
    await asyncio.sleep(30)

asyncio.run(main())
"""


def test_connections_beyond_the_open_file_limit_get_503_not_silence() -> None:
    import sys
    from pathlib import Path

    import cdk

    async def body() -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-B",
            "-c",
            _FD_LIMITED_SERVER,
            str(Path(cdk.__file__).parent.parent),
            stdout=asyncio.subprocess.PIPE,
        )
        clients: list[RawClient] = []
        try:
            assert process.stdout is not None
            line = await asyncio.wait_for(process.stdout.readline(), WAIT)
            port, cap = (int(word) for word in line.split())
            assert cap < 200
            # Every connection gets an answer: 200 within the cap, 503 beyond it (none is
            # idle: each has a request half sent).
            for _ in range(cap):
                client = await RawClient.connect(port)
                clients.append(client)
                await client.send(b"GET / HTTP/1.1\r\n")
            for _ in range(230 - cap):
                client = await RawClient.connect(port)
                assert (await client.answer()).status == 503
                await client.aclose()
            for client in clients:
                await client.send(b"Host: t\r\n\r\n")
                assert (await client.answer()).status == 200
        finally:
            for client in clients:
                await client.aclose()
            process.kill()
            await process.wait()

    run(body())


def test_trailer_fields_are_dropped_not_merged_into_the_headers() -> None:
    async def body() -> None:
        seen: list[dict[str, str]] = []

        async def handler(request: Request) -> Response:
            seen.append(request.headers)
            return Response(200, request.body)

        async with connected(handler) as client:
            trailers = b"Authorization: Bearer forged\r\nContent-Type: x/y\r\n\r\n"
            chunked = b"5\r\nhello\r\n0\r\n" + trailers
            head = {"Transfer-Encoding": "chunked", "Content-Type": "text/plain"}
            await client.send(request_bytes("POST", "/", chunked, head))
            answer = await client.answer()
            assert (answer.status, answer.body) == (200, b"hello")
            await client.aclose()
        assert "authorization" not in seen[0]
        assert seen[0]["content-type"] == "text/plain"

    run(body())


@pytest.mark.parametrize("piece", [b"x-t: " + b"a" * 200 + b"\r\n", b"a" * 200])
def test_trailers_over_the_head_limit_get_431(piece: bytes) -> None:
    """Many trailer lines, or one endless line sent in pieces, are cut off like a head."""

    async def body() -> None:
        async with connected(max_header_bytes=1024) as client:
            await client.send(
                request_bytes("POST", "/", b"1\r\nx\r\n0\r\n", {"Transfer-Encoding": "chunked"})
            )
            answered = asyncio.ensure_future(client.answer())
            with suppress(ConnectionError):  # the server may have half-closed already
                for _ in range(5000):  # 1 MB at most
                    if answered.done():
                        break
                    await client.send(piece)
                    await asyncio.sleep(0)  # let the server read between pieces
            answer = await answered
            assert answer.status == 431
            assert await client.closed()

    run(body())


def test_a_chunked_body_larger_than_the_head_limit_arriving_in_pieces_is_accepted() -> None:
    async def body() -> None:
        async with connected(max_header_bytes=1024) as client:
            data = b"z" * 64 * 1024
            await client.send(
                request_bytes("POST", "/", b"", {"Transfer-Encoding": "chunked"})
                + b"%x;ext=1\r\n" % len(data)
            )
            for start in range(0, len(data), 2048):
                await client.send(data[start : start + 2048])
                await asyncio.sleep(0)
            await client.send(b"\r\n0\r\n\r\n")
            answer = await client.answer()
            assert answer.status == 200
            assert answer.body.endswith(b"|" + data)
            await client.aclose()

    run(body())


def test_close_answers_the_request_in_progress_and_leaves_pipelined_ones_unhandled() -> None:
    async def body() -> None:
        entered = asyncio.Event()
        release = asyncio.Event()
        handled: list[str] = []

        async def handler(request: Request) -> Response:
            handled.append(request.path)
            if request.path == "/slow":
                entered.set()
                await release.wait()
            return Response(200, request.path.encode())

        server = HTTPServer(handler, port=0)
        await server.start()
        client = await RawClient.connect(server.port)
        await client.send(
            request_bytes("POST", "/slow", b"x") + request_bytes("GET", "/a") + request_bytes()
        )
        await asyncio.wait_for(entered.wait(), WAIT)
        closing = asyncio.ensure_future(server.close(grace=5.0))
        await asyncio.sleep(0)  # let close() run up to its first wait
        release.set()
        answer = await client.answer()
        # The answer says the connection ends, so the client knows the requests after it
        # were not processed and may send them again elsewhere.
        assert (answer.status, answer.body) == (200, b"/slow")
        assert answer.headers["connection"] == "close"
        assert await client.closed()
        assert not client.answers
        await asyncio.wait_for(closing, WAIT)
        assert handled == ["/slow"]

    run(body())
