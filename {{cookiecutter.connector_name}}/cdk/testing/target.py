"""CaptureTarget: a real HTTP receiver on loopback that records what a source delivers.

It decodes every request with :func:`cdk.codec.from_http` (a malformed one is answered 400 or 415,
as by a strict receiver) and can fail the next requests (a status and ``Retry-After``, a dropped
connection, a late answer, or a seeded random share). It runs on ``aiohttp.web``, apart from the
kit's own HTTP server, so a bug there cannot hide one in delivery: ``async with CaptureTarget()`` in
async code, ``with CaptureTarget.in_thread()`` in sync tests; https:// given an SSLContext.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Self

from aiohttp import web
from cloudevents.core.v1.event import CloudEvent

from cdk.codec import CodecError, from_http
from cdk.testing.runner import LoopThread, wait_on

__all__ = ["CaptureTarget", "free_port"]


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for a server started later on purpose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(slots=True)
class CapturedRequest:
    """One request the target saw: ``status`` None means it was left unanswered (dropped, or
    delayed past the sender's patience); ``events`` is empty when it did not decode (``error``)."""

    headers: dict[str, str]
    body: bytes
    arrived: float
    mode: str | None = None
    events: list[CloudEvent] = field(default_factory=list)
    status: int | None = None
    error: str | None = None

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass(frozen=True, slots=True)
class _Behaviour:
    kind: str  # "answer", "drop" or "delay"
    status: int = 200
    body: bytes = b""
    retry_after: str | None = None
    seconds: float = 0.0


def _answer(status: int, body: bytes | str, retry_after: float | str | None) -> _Behaviour:
    if isinstance(retry_after, int | float):
        retry_after = f"{retry_after:g}"  # whole seconds as HTTP writes them: 3, not 3.0
    data = body.encode("utf-8") if isinstance(body, str) else body
    return _Behaviour("answer", status, data, retry_after)


class CaptureTarget:
    """An HTTP receiver on a loopback port (``port=0``: a free one) recording what it accepts."""

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port
        self._tls = tls
        # Reentrant, so a wait's predicate may read the properties below.
        self._changed = threading.Condition(threading.RLock())
        self._script: deque[_Behaviour] = deque()
        self._standing: _Behaviour | None = None
        self._random: tuple[random.Random, float, float] | None = None
        self._all: list[CapturedRequest] = []
        self._runner: web.ServerRunner | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://{self.host}:{self.port}/"

    async def start(self) -> None:
        """Listen and serve; returns once the port accepts connections."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        server = web.Server(self._handle, access_log=None)
        self._runner = web.ServerRunner(server, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self._tls).start()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @classmethod
    @contextmanager
    def in_thread(cls) -> Iterator[CaptureTarget]:
        """Run a target on its own event loop in a background thread (for sync tests)."""
        loop = LoopThread("cdk-capture-target")
        target = cls()
        try:
            loop.call(target.start(), timeout=10)
            yield target
        finally:
            try:
                loop.call(target.close(), timeout=10)
            finally:
                loop.close()

    def fail_next(
        self,
        n: int = 1,
        status: int = 503,
        *,
        retry_after: float | str | None = None,
        body: bytes | str = b"",
    ) -> None:
        """Answer the next ``n`` requests with ``status`` (and ``Retry-After`` if given)."""
        self._push(n, _answer(status, body, retry_after))

    def reject_next(self, n: int = 1, status: int = 400, body: bytes | str = b"rejected") -> None:
        """Answer the next ``n`` requests with a status a sender must not retry."""
        self._push(n, _answer(status, body, None))

    def drop_next(self, n: int = 1) -> None:
        """Close the connection of the next ``n`` requests without answering."""
        self._push(n, _Behaviour("drop"))

    def delay_next(self, n: int, seconds: float, status: int = 200) -> None:
        """Answer the next ``n`` requests only after ``seconds`` (with ``status``)."""
        self._push(n, _Behaviour("delay", status, seconds=seconds))

    def fail_with(
        self, status: int | None, *, retry_after: float | str | None = None, body: bytes | str = b""
    ) -> None:
        """Answer every request with ``status`` once the script is used up; ``None`` ends it."""
        with self._changed:
            self._standing = None if status is None else _answer(status, body, retry_after)

    def flaky(self, fail: float = 0.0, drop: float = 0.0, seed: int = 0) -> None:
        """Once the script is used up, answer a ``fail`` share of requests 503 and drop a
        ``drop`` share unanswered, drawn from a generator seeded with ``seed``."""
        with self._changed:
            self._random = (random.Random(seed), fail, drop) if fail or drop else None

    def _push(self, n: int, behaviour: _Behaviour) -> None:
        with self._changed:
            self._script.extend([behaviour] * n)

    def _next_behaviour(self) -> _Behaviour | None:
        with self._changed:
            if self._script:
                return self._script.popleft()
            if self._random is not None:
                generator, fail, drop = self._random
                draw = generator.random()
                if draw < drop:
                    return _Behaviour("drop")
                if draw < drop + fail:
                    return _Behaviour("answer", 503)
            return self._standing

    @property
    def requests(self) -> list[CapturedRequest]:
        """The requests answered 2xx, in the order they were answered."""
        return [record for record in self.all_requests if record.accepted]

    @property
    def all_requests(self) -> list[CapturedRequest]:
        """Every request seen, including failed, dropped and malformed ones."""
        with self._changed:
            return list(self._all)

    @property
    def events(self) -> list[CloudEvent]:
        """The events of every accepted request, flattened, in the order they were accepted."""
        return [event for record in self.requests for event in record.events]

    @property
    def attempts(self) -> int:
        """How many requests arrived, whatever the answer."""
        return len(self.all_requests)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Block until ``predicate()`` holds; raise ``TimeoutError`` after ``timeout`` s."""

        def failure() -> str:
            seen = f"{len(self.events)} event(s) in {self.attempts} request(s)"
            return f"condition not met within {timeout}s ({seen})"

        wait_on(self._changed, predicate, timeout, failure)

    def wait_for_sync(self, count: int, timeout: float = 5.0) -> list[CloudEvent]:
        """Block until at least ``count`` events were accepted; return them."""
        self.wait_until(lambda: len(self.events) >= count, timeout)
        return self.events

    async def wait_until_async(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """``wait_until`` in a worker thread, so that the loop serving the target runs on."""
        await asyncio.to_thread(self.wait_until, predicate, timeout)

    async def wait_for(self, count: int, timeout: float = 5.0) -> list[CloudEvent]:
        """Await until at least ``count`` events were accepted; return them."""
        return await asyncio.to_thread(self.wait_for_sync, count, timeout)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        headers = {key.lower(): ", ".join(request.headers.getall(key)) for key in request.headers}
        record = CapturedRequest(headers, await request.read(), time.monotonic())
        behaviour = self._next_behaviour() or _Behaviour("accept")
        if behaviour.kind == "delay":
            await asyncio.sleep(behaviour.seconds)
            if request.transport is None or request.transport.is_closing():
                behaviour = _Behaviour("drop")  # the sender gave up waiting: nothing was answered
        if behaviour.kind == "drop":
            if request.transport is not None:
                request.transport.abort()
            return self._respond(record, None)
        if behaviour.kind == "answer":
            extra = {"Retry-After": behaviour.retry_after} if behaviour.retry_after else None
            return self._respond(record, behaviour.status, body=behaviour.body, headers=extra)
        if request.method != "POST":
            return self._respond(
                record, 405, text="only POST is accepted", headers={"Allow": "POST"}
            )
        try:
            record.mode, record.events = from_http(record.headers, record.body)
        except CodecError as exc:
            record.error = str(exc)
            return self._respond(record, getattr(exc, "status", 400), text=str(exc))
        return self._respond(record, behaviour.status)

    def _respond(self, record: CapturedRequest, status: int | None, **answer: Any) -> web.Response:
        """Record ``record`` as answered ``status`` (None: dropped) and build that answer."""
        record.status = status
        with self._changed:
            self._all.append(record)
            self._changed.notify_all()
        # A dropped request's answer is never written: its connection is gone.
        return web.Response(status=status or 500, **answer)
